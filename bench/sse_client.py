"""A minimal streaming client for the HTTP benchmark: raw asyncio sockets, parsed after the clock stops.

The benchmark's client shares the 2 cores with the server it measures; httpx parses every SSE line as
it arrives (about 0.4 s of CPU per 2,048 tokens here), which the server then pays for in slower steps.
This client only reads bytes while timed; it checks the status and decodes the chunked SSE body into
the streamed text and usage afterwards, so the benchmark can still verify every response.
"""

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class StreamedCompletion:
    text: str
    completion_tokens: int


async def fetch_stream(url: str, body: dict) -> bytes:
    """POST `body` to `url` (one connection, closed by the server after the response); the raw response."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    payload = json.dumps(body).encode()
    writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (parts.path.encode(), parts.netloc.encode(), len(payload), payload))
    chunks = []
    while data := await reader.read(1 << 16):
        chunks.append(data)
    writer.close()
    return b"".join(chunks)


def parse_completion_stream(raw: bytes) -> StreamedCompletion:
    """The text and usage of a streamed /v1/completions response (HTTP/1.1, chunked, SSE)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"unexpected response: {raw[:300]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    text, tokens = [], 0
    for event in body.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        chunk = json.loads(event[6:])
        text += [choice["text"] for choice in chunk["choices"]]
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return StreamedCompletion("".join(text), tokens)


def _dechunk(body: bytes) -> bytes:
    out, position = [], 0
    while True:
        line_end = body.index(b"\r\n", position)
        size = int(body[position:line_end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[line_end + 2:line_end + 2 + size])
        position = line_end + 2 + size + 2
