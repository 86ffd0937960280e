"""The one place that turns Settings into a uvicorn server: `loraserve serve` and the tests' RunningServer
both run what `build_server` returns, so the tests exercise exactly the limits production runs with."""

from functools import partial

import uvicorn
from starlette.types import ASGIApp

from server.api.descriptors import ensure_descriptors
from server.api.http_protocol import ConnectionCounts, HeadLimits, LimitedH11Protocol
from server.config import Settings


def build_server(app: ASGIApp, settings: Settings) -> uvicorn.Server:
    """A uvicorn server for `app` with every connection limit of `settings`; the open-files limit is
    raised for its connection cap first (server/api/descriptors.py)."""
    ensure_descriptors(settings.max_connections)
    protocol = partial(  # uvicorn calls `http` like a protocol class, with keyword arguments
        LimitedH11Protocol,
        head=HeadLimits(settings.max_header_fields, settings.request_head_timeout),
        connections=ConnectionCounts(settings.max_connections, settings.max_connections_per_client))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None,
        http=protocol,  # type: ignore[arg-type]
        ws="none",  # no WebSocket routes; an upgraded connection would also leave the protocol's counts
        h11_max_incomplete_event_size=int(settings.max_header_bytes),
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]  (a float works)
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds))
    return uvicorn.Server(config)
