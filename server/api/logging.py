"""Structured logs carrying the request id, the middleware that assigns it (and returns it), and log lines
that never share a line with a progress bar."""

import contextvars
import json
import logging
import sys
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tqdm import tqdm
from transformers.utils import logging as hf_logging

REQUEST_ID_HEADER = "x-request-id"
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
log = logging.getLogger("server.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class LineAboveBars(logging.StreamHandler):
    """Writes each record through tqdm, which clears any progress bar on the same stream, writes the line and
    draws the bar again below it: a log line never lands in the middle of a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 (logging's contract: report through handleError, never raise)
            self.handleError(record)


def configure_logging(log_format: str) -> None:
    """`auto`: readable lines for a person at a terminal, JSON for a collector reading a pipe or a file.

    Progress bars (transformers' "Loading weights") are for a person watching: they are drawn only as text at
    a terminal, with log lines written above them; elsewhere they are off, so every line is one record.
    transformers' own records go through the same handler (it keeps a private stderr handler otherwise)."""
    at_terminal = sys.stderr.isatty()
    if log_format == "auto":
        log_format = "text" if at_terminal else "json"
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
    else:
        handler = LineAboveBars()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if log_format == "text" and at_terminal:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


class RequestIdMiddleware:
    """Takes the caller's X-Request-ID (or makes one), exposes it to logs and routes, returns it, and logs
    one access line per request. Pure ASGI, so streamed responses pass through untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if given and len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("%s %s %s", scope["method"], scope["path"], status, extra={"fields": {
                "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2)}})
            request_id_var.reset(token)
