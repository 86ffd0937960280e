"""Request bodies are limited while they stream in: a declared Content-Length over the limit is refused
before a byte is read, and an undeclared (chunked) body is counted as it arrives and cut off at the limit.
Nothing ever buffers a body beyond its limit."""

from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_response


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(413, _message(limit), code="request_too_large")
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises an HTTPException met while reading the body; the handler answers it.
                    raise HTTPException(413, _message(limit))
            return message

        await self.app(scope, limited, send)


def _message(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"
