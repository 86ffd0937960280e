"""The FastAPI application: built from Settings, the engine started and stopped with its lifespan."""

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from server import __version__
from server.api import routes_adapters, routes_experiments, routes_inference, routes_ops
from server.api.errors import install_error_handlers
from server.api.inference import InferenceService
from server.api.logging import RequestIdMiddleware
from server.api.metrics import Metrics
from server.api.model_resolver import ModelResolver
from server.api.state import AppState
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.experiments.service import ExperimentService
from server.experiments.store import ExperimentStore
from server.registry.registry import AdapterRegistry, validator_for

log = logging.getLogger(__name__)


def build_state(settings: Settings) -> AppState:
    """Load the model, open the registry, register adapters from disk and flags (slow: run off the loop)."""
    engine = LLMEngine.from_settings(settings)

    registry = AdapterRegistry(
        settings.adapters_dir, validator_for(engine.targets, max_rank=settings.max_lora_rank, dtype=engine.dtype),
        catalogue_url=settings.catalogue_url, host_cache_bytes=int(settings.host_cache_memory),
        max_upload_bytes=int(settings.max_upload_size),
    )
    report = registry.discover()
    log.info("adapters discovered in %s: %s", settings.adapters_dir, report)
    for pair in settings.lora:
        name, _, path = pair.partition("=")
        registry.register_directory(name, Path(path), source="cli")
    metrics = Metrics()
    metrics.watch_engine(engine)
    runner = AsyncEngine(engine)
    base_name = settings.served_model_name or Path(settings.model).resolve().name
    # Experiments keep their tables in the catalogue's database, through the catalogue's own engine.
    store = ExperimentStore(registry.catalogue.engine)
    experiments = ExperimentService(store, registry, base_name, observer=metrics.experiments)
    return AppState(
        settings=settings,
        engine=runner,
        tokenizer=engine.tokenizer,
        registry=registry,
        models=ModelResolver(base_name, registry, metrics, created=int(time.time()), experiments=experiments),
        inference=InferenceService(runner, metrics, experiments),
        metrics=metrics,
        experiments=experiments,
    )


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await asyncio.to_thread(build_state, settings)
        state.engine.start()
        app.state.loraserve = state
        log.info("serving %s with %d adapters on http://%s:%d (auth: off)", state.models.base_name,
                 len(state.registry.latest_versions()), settings.host, settings.port)
        try:
            yield
        finally:
            app.state.loraserve = None
            await asyncio.to_thread(state.engine.stop)
            await asyncio.to_thread(state.experiments.close)
            state.registry.close()

    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    app.state.loraserve = None
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    for module in (routes_ops, routes_inference, routes_adapters, routes_experiments):
        app.include_router(module.router)
    return app
