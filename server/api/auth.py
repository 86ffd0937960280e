"""Who is calling: `Authorization: Bearer <key>` -> Principal, for every /v1 route.

An ASGI middleware authenticates before anything reads the body (FastAPI parses an upload's form before
it runs a route's dependencies), so a request without a valid key never gets its body read; the route
dependency then only picks up the principal.

With auth off every caller is an anonymous admin (local use, the demo). The admin key from the
configuration is compared by digest in constant time; other keys are looked up by digest in the key
store's in-memory copy (server/tenancy/keys.py), so authenticating asks no database.
"""

import hmac
import logging

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import domain_error_status, error_response

from server.tenancy.errors import AuthenticationError, PermissionDeniedError
from server.tenancy.keys import KeyStore, Principal, digest

log = logging.getLogger(__name__)

ANONYMOUS = Principal("anonymous", "admin")
CONFIG_ADMIN = Principal("config-admin", "admin")


class Authenticator:
    def __init__(self, keys: KeyStore, enabled: bool, admin_key: str | None = None):
        self.enabled = enabled
        self._keys = keys
        self._admin_digest = digest(admin_key) if admin_key else None

    def principal(self, authorization: str | None) -> Principal:
        """The caller of a request with this Authorization header; AuthenticationError if none."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        if self._admin_digest is not None and hmac.compare_digest(digest(secret), self._admin_digest):
            return CONFIG_ADMIN
        principal = self._keys.authenticate(secret)
        if principal is None:
            raise AuthenticationError("invalid or revoked API key")
        return principal


class AuthMiddleware:
    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...] = ("/v1/", "/tokenize", "/detokenize")):
        """`prefixes`: the paths that need a key (the API, and vLLM's tokenizer routes outside /v1)."""
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state.loraserve if scope["type"] == "http" else None
        if state is not None and scope["path"].startswith(self.prefixes):
            header = dict(scope.get("headers") or []).get(b"authorization")
            try:
                principal = state.auth.principal(header.decode("latin-1") if header is not None else None)
            except AuthenticationError as exc:
                status, code = domain_error_status(exc)
                response = error_response(status, str(exc), code=code, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def authenticate(request: Request) -> None:
    """Router dependency: the principal the middleware found (or found now), or 401."""
    if getattr(request.state, "principal", None) is None:
        state = request.app.state.loraserve
        request.state.principal = state.auth.principal(request.headers.get("authorization"))


async def require_admin(request: Request) -> None:
    """Router dependency (after `authenticate`): 403 unless the caller is an admin."""
    if not caller(request).is_admin:
        raise PermissionDeniedError("this endpoint is for admins")


def caller(request: Request) -> Principal:
    return request.state.principal
