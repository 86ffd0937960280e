"""Each HTTP/1.1 connection: uvicorn's h11 protocol plus the limits its configuration cannot express, so
that no client can stall the server or lock the others out.

Invariants, per server:
- A request head (request line and header fields) is buffered up to `h11_max_incomplete_event_size`
  bytes (h11's own limit, set from `max_header_bytes` in server/api/http_server.py); beyond that, or with
  more than `max_fields` header fields, the client gets 431 and the connection is closed.
- A connection gets `timeout` seconds from its opening, or from the first byte of its next request, to
  deliver a whole head; then it gets 408 (or nothing, if it sent nothing) and is closed. Idle keep-alive
  connections are closed by uvicorn's `timeout_keep_alive`.
- At most `ConnectionCounts.total_cap` connections are open, and at most `per_client_cap` from one client
  address: one more is answered 503 at once and closed, holding its descriptor only that long.
- Every refusal is in the OpenAI error shape (server/api/errors.py) with `Connection: close`.

Why a subclass, and not configuration alone:
- uvicorn's `limit_concurrency` is checked per request, against open connections plus requests in
  flight: connections beyond it are still accepted and held (an idle one is never refused), and the
  connection that reaches the limit gets 503 for every request. It bounds no descriptors.
- `timeout_keep_alive` is armed only after a response: a connection that never completes a head (no
  byte at all, or one byte a second) is never timed out.
- h11 counts no header fields, and uvicorn answers h11's 431 hint with a text/plain 400.
h11 rather than httptools (uvicorn's choice when both are installed): httptools buffers a header of any
size before Python sees it, and has no limit to configure.
"""

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from server.api.errors import RETRY_AFTER_SECONDS, error_response

log = logging.getLogger(__name__)

_CODES = {400: "invalid_http_request", 408: "request_head_timeout", 431: "request_header_fields_too_large",
          503: "too_many_connections"}


@dataclass(frozen=True)
class HeadLimits:
    max_fields: int  # header fields of one request
    timeout: float  # seconds to deliver a whole head


class ConnectionCounts:
    """Open connections of one server, in total and per client address. Only the server's event loop
    calls it (no lock). Each `admit` that returns None is undone by exactly one `release`."""

    def __init__(self, total_cap: int, per_client_cap: int):
        self.total_cap = total_cap
        self.per_client_cap = per_client_cap  # 0 = no limit
        self.total = 0
        self.by_client: Counter[str | None] = Counter()

    def admit(self, client: str | None) -> str | None:
        """Count a new connection from `client` (None: no address, a Unix socket) and return None, or
        return why it is over a cap and count nothing."""
        if self.total >= self.total_cap:
            return f"the server holds its maximum of {self.total_cap} connections"
        if client is not None and self.per_client_cap and self.by_client[client] >= self.per_client_cap:
            return f"{client} holds its maximum of {self.per_client_cap} connections"
        self.total += 1
        self.by_client[client] += 1
        return None

    def release(self, client: str | None) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]


class _LimitedConnection(h11.Connection):
    """h11's server side that also refuses a head with more than `max_fields` fields (431), and keeps the
    status and message of its refusal for the answer."""

    def __init__(self, max_bytes: int, max_fields: int):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_bytes)
        self.max_bytes = max_bytes
        self.max_fields = max_fields
        self.refusal: tuple[int, str] | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self.refusal = (status, f"request head exceeds {self.max_bytes} bytes" if status == 431
                            else f"invalid HTTP request: {exc}")
            raise
        if isinstance(event, h11.Request) and len(event.headers) > self.max_fields:
            self.refusal = (431, f"request has more than {self.max_fields} header fields")
            raise h11.RemoteProtocolError(self.refusal[1], error_status_hint=431)
        return event


def refusal_bytes(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response in the OpenAI error shape, announcing that the connection closes."""
    response = error_response(status, message, code=_CODES.get(status),
                              headers={**(headers or {}), "Connection": "close"})
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in response.raw_headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + response.body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header-field, head-time and connection limits (see the module)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, head: HeadLimits,
                 connections: ConnectionCounts):
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _LimitedConnection(config.h11_max_incomplete_event_size, head.max_fields)
        self._head = head
        self._connections = connections
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        refusal = self._connections.admit(self._client_host)
        if refusal is not None:
            log.warning("connection refused: %s", refusal)
            self._refuse(503, f"too many connections: {refusal}", {"Retry-After": RETRY_AFTER_SECONDS})
            return
        self._admitted = True
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self._connections.release(self._client_host)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # these bytes begin (or continue) a head
            self._arm_head_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or the connection is done)
            self._cancel_head_timer()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to any request h11 refuses: here with h11's status (431 for a head too large)
        in the OpenAI error shape, instead of a text/plain 400."""
        status, message = self.conn.refusal or (400, msg)
        self._refuse(status, message)

    @property
    def _client_host(self) -> str | None:
        return self.client[0] if self.client else None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head.timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.trailing_data[0]:
            self._refuse(408, f"request head not received within {self._head.timeout:g} seconds")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        if not self.transport.is_closing():
            self.transport.write(refusal_bytes(status, message, headers))
            self.transport.close()
