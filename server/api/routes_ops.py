"""Operations: liveness, readiness, Prometheus metrics."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = getattr(request.app.state, "loraserve", None)
    body = generate_latest(state.metrics.registry) if state is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
