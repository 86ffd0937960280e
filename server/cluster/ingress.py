"""The cluster's HTTP front: forwards every request, unchanged, to an engine replica and streams the
answer back. It runs in the `loraserve cluster` process (server/cluster/front.py), or as a Ray Serve
deployment behind Ray Serve's HTTP proxy (deploy/serve.yaml). It knows one thing about the API: which adapter a request
names (the JSON body's `model`), handed to the router as the request's `multiplexed_model_id`
(server/cluster/router.py). Everything else (auth, errors, limits, SSE) is the replicas' own app.
Streamed answers come on one channel per replica once the first has come (server/cluster/channel.py).

A replica that dies before answering yields a 503; one that dies mid-stream ends an SSE stream with an
error event and [DONE], as the single server ends a request the engine failed."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.api.errors import error_body
from server.cluster.asgi_bridge import REPLICA_HEADER, Envelope, Start
from server.cluster.channel import ChannelClient
from server.config import Settings

log = logging.getLogger(__name__)

_SSE = b"text/event-stream"
REPLICA_GONE = "the replica serving this request stopped; retry it"


def adapter_of(method: str, body: bytes, base_name: str) -> str | None:
    """The affinity key of a request: the `model` of a JSON body, unless it is the base (None)."""
    if method != "POST" or not body.startswith(b"{"):
        return None
    try:
        model = json.loads(body).get("model")
    except ValueError:  # the replica answers the 400
        return None
    return model if isinstance(model, str) and model and model != base_name else None


def _sse_error(message: str) -> bytes:
    data = json.dumps(error_body(503, message, code="replica_unavailable"), separators=(",", ":"))
    return f"data: {data}\n\ndata: [DONE]\n\n".encode()


class Ingress:
    def __init__(self, replicas, settings: Settings):
        self._replicas = replicas  # a DeploymentHandle of EngineReplica
        self._channels = ChannelClient(replicas)
        self._base_name = settings.base_name
        # Above every route's own limit (an upload's carries its multipart framing); each replica applies those.
        self._max_body = int(settings.max_upload_size) + int(settings.max_request_body)

    async def __call__(self, request: Request) -> Response:
        body = await self._body(request)
        if body is None:
            return JSONResponse(error_body(413, f"request body over {self._max_body} bytes",
                                           code="request_too_large"), status_code=413)
        envelope: Envelope = {
            "method": request.method, "path": request.url.path, "query_string": request.url.query.encode(),
            "headers": list(request.headers.raw), "body": body,
            "client": (request.client.host, request.client.port) if request.client else None}
        envelope["key"], envelope["channels"] = key, channels = self._channels.prepare()
        adapter = adapter_of(request.method, body, self._base_name)
        stream = self._replicas.options(stream=True, multiplexed_model_id=adapter or "").handle.remote(envelope)
        try:
            start = await stream.__anext__()
        except asyncio.CancelledError:  # the client left before the answer began
            self._channels.release(key)
            stream.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the replica died or was unreachable before answering
            self._channels.release(key)
            log.warning("replica failed before answering %s %s: %r", request.method, request.url.path, exc)
            return JSONResponse(error_body(503, REPLICA_GONE, code="replica_unavailable"), status_code=503,
                                headers={"Retry-After": "1"})
        assert isinstance(start, Start)
        headers = dict(start.headers)
        content_type, replica = headers.get(b"content-type", b""), headers.get(REPLICA_HEADER, b"").decode()
        self._channels.ensure(replica)  # reopens one that ended while its replica runs on
        if start.via_channel:
            pieces = self._channels.relay(key, channels[replica], stream)
        else:
            self._channels.release(key)
            pieces = _own(stream)
        response = StreamingResponse(self._rest(pieces, content_type), status_code=start.status)
        response.raw_headers = list(start.headers)
        return response

    async def close(self) -> None:
        """Close the channels: a replica's drain waits for every request in flight on it, channels too."""
        await self._channels.close()

    def open_channels(self) -> dict[str, str]:
        """Replica id -> the channel open to it (a handle method, for operators and the tests)."""
        return self._channels.open_channels()

    async def _body(self, request: Request) -> bytes | None:
        """The whole body, or None past the largest body any route accepts (the replica applies each
        route's own limit)."""
        pieces, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > self._max_body:
                return None
            pieces.append(piece)
        return b"".join(pieces)

    @staticmethod
    async def _rest(pieces: AsyncIterator[bytes], content_type: bytes) -> AsyncIterator[bytes]:
        try:
            async for piece in pieces:
                yield piece
        except Exception as exc:  # noqa: BLE001 - the replica died mid-answer
            log.warning("replica failed mid-stream: %r", exc)
            if not content_type.startswith(_SSE):
                raise  # a plain body cannot carry an error once its status went out: the connection drops
            yield _sse_error(REPLICA_GONE)
        finally:
            await pieces.aclose()


async def _own(stream) -> AsyncIterator[bytes]:
    """A body that comes on the request's own Ray stream."""
    try:
        async for piece in stream:
            yield piece
    finally:
        stream.cancel()
