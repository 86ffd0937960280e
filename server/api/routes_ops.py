"""Operations: liveness, readiness, Prometheus metrics.

/health and /ready answer anyone (probes). /metrics labels its series with every tenant's adapter and
experiment names, so with auth on it answers admins only (401 without a key, 403 for a tenant's key);
with auth off everyone is an admin and it stays open."""

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.auth import authenticate, require_admin
from server.api.errors import error_response

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """The model is loaded and the engine is running."""
    if getattr(request.app.state, "loraserve", None) is None:
        return error_response(503, "model not loaded yet", code="not_ready")
    return {"status": "ready", "model": request.app.state.loraserve.models.base_name}


@router.get("/metrics", dependencies=[Depends(authenticate), Depends(require_admin)])
async def metrics(request: Request) -> Response:
    registry = request.app.state.loraserve.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
