"""An HTTP request carried across a Ray call: the ingress packs it into a plain dict (`Envelope`), the
replica plays it into the loraserve ASGI app and streams back what the app sends: first the status and
headers (`Start`), then the body in the pieces the app wrote them (SSE events stay events).

The replica runs the very app `loraserve serve` runs (routes, auth, errors, limits), so the cluster
speaks the same API by construction. Leaving early (the client went, the ingress stopped reading) sends
the app `http.disconnect`, as uvicorn does, so the engine aborts the request.

An event stream's body may go through a channel instead (server/cluster/channel.py): then the `Start` says
so (`via_channel`) and the request's own stream ends when the answer does.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

from server.cluster.channel import ChannelSender

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-replica"  # every answer names the replica that gave it
# method, path, query_string (bytes), headers (list of (bytes, bytes)), body (bytes), client; from an ingress
# also key and channels (server/cluster/channel.py)
Envelope = dict


@dataclass(frozen=True)
class Start:
    status: int
    headers: list[tuple[bytes, bytes]]
    via_channel: bool = False  # the body comes on the ingress's channel, not on this stream


def scope_of(envelope: Envelope) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http", "root_path": "",
        "method": envelope["method"], "path": envelope["path"], "raw_path": envelope["path"].encode(),
        "query_string": envelope["query_string"], "headers": envelope["headers"],
        "client": envelope.get("client"), "server": ("loraserve-replica", 0),
    }


async def play(app: ASGIApp, envelope: Envelope, extra_headers: list[tuple[bytes, bytes]],
               flush_s: float = 0.0, channel: ChannelSender | None = None) -> AsyncIterator[Start | bytes]:
    """Run one request through `app`: yields a `Start`, then the body's non-empty pieces; an event
    stream's pieces at most every `flush_s` seconds (what arrived meanwhile goes out as one), or into
    `channel` if it is still open when the stream starts."""
    out: asyncio.Queue[Message | None] = asyncio.Queue()
    left = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": envelope["body"], "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope_of(envelope), receive, send)
        except Exception:  # the app's error handlers already answered (a 500); uvicorn would log it too
            log.exception("unhandled error in %s %s", envelope["method"], envelope["path"])
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        streaming, ended, on_channel = False, False, False
        while not ended and (message := await out.get()) is not None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                streaming = dict(headers).get(b"content-type", b"").startswith(b"text/event-stream")
                on_channel = streaming and channel is not None and channel.start()
                yield Start(message["status"], [*headers, *extra_headers], via_channel=on_channel)
                continue
            if on_channel:  # the channel gathers the events of every stream on it
                if body := message.get("body", b""):
                    channel.send(body)
                continue
            # Every item costs Ray messages (~1 ms of CPU on the way to the client): a stream's events are
            # sent at most every `flush_s`, together (vLLM's stream interval, in time).
            if streaming and flush_s:
                await asyncio.sleep(flush_s)
            pieces = [message.get("body", b"")]
            while not out.empty():
                queued = out.get_nowait()
                if queued is None:
                    ended = True
                    break
                pieces.append(queued.get("body", b""))
            if body := b"".join(pieces):
                yield body
    finally:
        if channel is not None:
            channel.end()
        left.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5)
