"""Operations: liveness, readiness, Prometheus metrics, the engine's state for the console.

/health and /ready answer anyone (probes). /metrics labels its series with every tenant's adapter and
experiment names, so with auth on it answers admins only (401 without a key, 403 for a tenant's key);
with auth off everyone is an admin and it stays open. /v1/server/state answers any caller with a key:
the engine's load is no one's secret, but adapter names in it are only those the caller may see."""

import asyncio
import time

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.auth import authenticate, caller, require_admin
from server.api.errors import RETRY_AFTER_SECONDS, error_response

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """The model is loaded, the engine is running and the catalogue database answers (a replica cut off
    from it still serves what it holds, but refuses changes: a load balancer should send traffic
    elsewhere)."""
    state = getattr(request.app.state, "loraserve", None)
    if state is None:
        return error_response(503, "model not loaded yet", code="not_ready")
    if not await asyncio.to_thread(state.database.ping):
        return error_response(503, "the catalogue database cannot be reached", code="catalogue_unavailable",
                              headers={"Retry-After": RETRY_AFTER_SECONDS})
    return {"status": "ready", "model": state.models.base_name}


@router.get("/metrics", dependencies=[Depends(authenticate), Depends(require_admin)])
async def metrics(request: Request) -> Response:
    registry = request.app.state.loraserve.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/server/state", dependencies=[Depends(authenticate)])
async def server_state(request: Request) -> dict:
    """The engine at a glance, read from its latest snapshot only (never the engine): requests, KV cache,
    device slots, merged copies, counters since start (tokens/s is the difference of two reads), and who
    is calling. Adapter names are filtered to those the caller may see; the counts are the engine's."""
    state, who = request.app.state.loraserve, caller(request)
    snap = state.engine.snapshot

    def visible(keys) -> list[str]:
        return sorted(k for k in keys if state.access.can_see(who, k.partition("@")[0]))

    return {
        "object": "server.state",
        "time": time.time(),
        "model": state.models.base_name,
        "version": __version__,
        "caller": {"role": who.role, "tenant": who.tenant, "auth": state.auth.enabled},
        "requests": {"running": snap.running, "waiting": snap.waiting},
        "kv_cache": {"blocks": snap.kv_blocks, "free_blocks": snap.kv_free_blocks, "usage": snap.kv_usage},
        "slots": {"capacity": state.settings.max_loras, "used": len(snap.device_adapters)},
        "device_adapters": visible(snap.device_adapters),
        "merged": {"count": len(snap.merged), "bytes": snap.merged_bytes, "budget": int(state.settings.merged_budget),
                   "adapters": visible(snap.merged), "pinned": visible(snap.pinned),
                   "pending": visible(snap.merge_pending)},
        "retiring": visible(snap.retiring),
        "traffic_shares": {k: round(snap.traffic_shares[k], 4) for k in visible(snap.traffic_shares)},
        "counters": {name: getattr(snap, name) for name in (
            "steps", "step_seconds", "tokens_generated", "preemptions", "slot_loads", "slot_evictions",
            "merge_promotions", "merge_demotions", "merge_failures")},
    }
