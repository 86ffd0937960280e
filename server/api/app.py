"""The FastAPI application: built from Settings, the engine started and stopped with its lifespan."""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI

from server import __version__
from server.api import routes_adapters, routes_admin, routes_experiments, routes_inference, routes_ops, routes_tokenize
from server.api import console
from server.api.access import Access
from server.api.auth import AuthMiddleware, Authenticator, authenticate, require_admin
from server.api.body_limit import BodySizeLimitMiddleware
from server.api.errors import install_error_handlers
from server.api.inference import InferenceService
from server.api.logging import RequestIdMiddleware
from server.api.metrics import Metrics
from server.api.model_resolver import ModelResolver
from server.api.state import AppState
from server.config import Settings
from server.db import open_database
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.engine.model_loader import base_footprint
from server.engine.torch_threads import engine_threads, use_one_thread
from server.experiments.service import ExperimentService
from server.experiments.store import ExperimentStore
from server.lora.added_tokens import AdapterTokenizers
from server.registry.catalogue import Catalogue
from server.registry.namespace import Namespace
from server.registry.registry import AdapterRegistry, validator_for
from server.tenancy.audit import AuditLog
from server.tenancy.keys import KeyStore
from server.tenancy.shared_limits import limiter_for

log = logging.getLogger(__name__)


def build_state(settings: Settings, threads: int | None = None) -> AppState:
    """Load the model, open the registry, register adapters from disk and flags (slow: run off the loop).
    `threads`: torch threads of the engine thread (None: torch's setting)."""
    engine = LLMEngine.from_settings(settings)
    base_name = settings.base_name
    # One database for every store; one namespace for adapter names, aliases and experiments.
    database = open_database(settings.adapters_dir, settings.catalogue_url)
    names = Namespace(database, reserved={base_name})
    registry = AdapterRegistry(
        settings.adapters_dir, validator_for(engine.targets, max_rank=settings.max_lora_rank, dtype=engine.dtype),
        Catalogue(database, names), host_cache_bytes=int(settings.host_cache_memory),
        max_upload_bytes=int(settings.max_upload_size),
    )
    report = registry.discover()
    log.info("adapters discovered in %s: %s", settings.adapters_dir, report)
    for pair in settings.lora:
        name, _, path = pair.partition("=")
        registry.register_directory(name, Path(path), source="cli")
    runner = AsyncEngine(engine, threads)
    metrics = Metrics()
    metrics.watch_engine(runner)
    footprint = base_footprint(engine.model)
    metrics.watch_base(footprint)
    store = ExperimentStore(database, names)
    experiments = ExperimentService(store, registry, base_name, observer=metrics.experiments)
    keys = KeyStore(database)
    access = Access(names, base_name)
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    enabled = settings.auth == "on" or (settings.auth == "auto" and bool(admin_key or keys.active_keys()))
    return AppState(
        settings=settings,
        database=database,
        engine=runner,
        tokenizer=engine.tokenizer,
        tokenizers=AdapterTokenizers(engine.tokenizer),
        registry=registry,
        models=ModelResolver(base_name, registry, metrics, created=int(time.time()), experiments=experiments,
                             access=access, footprint=footprint),
        inference=InferenceService(runner, metrics, experiments),
        metrics=metrics,
        experiments=experiments,
        auth=Authenticator(keys, enabled, admin_key),
        keys=keys,
        access=access,
        audit=AuditLog(database),
        limits=limiter_for(settings, database),
    )


# Room for the multipart framing and the form fields around an upload's two files.
_UPLOAD_OVERHEAD = 64 * 1024


def _body_limit(settings: Settings):
    upload = int(settings.max_upload_size) + _UPLOAD_OVERHEAD
    request = int(settings.max_request_body)

    def limit_for(scope) -> int:
        return upload if scope["method"] == "POST" and scope["path"] == "/v1/adapters" else request

    return limit_for


def _log_auth(state: AppState) -> None:
    if state.auth.enabled:
        log.info("auth: on (API keys required; %d live key(s) in the catalogue%s)", state.keys.active_keys(),
                 ", plus the configured admin key" if state.settings.admin_key else "")
        if not state.settings.admin_key and not state.keys.active_keys():
            log.error("auth is on but no key exists: create one with `loraserve keys create --role admin`")
    else:
        log.warning("AUTH IS OFF: every client is an admin and sees every tenant's adapters. "
                    "Set LORASERVE_ADMIN_KEY (or --auth on) before exposing this server.")


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Only the engine thread runs parallel torch work (server/engine/torch_threads.py): this thread and
        # the worker threads that load the model and validate uploads stay serial.
        threads = engine_threads(settings.torch_threads)
        use_one_thread()
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="loraserve-worker", initializer=use_one_thread))
        state = await asyncio.to_thread(build_state, settings, threads)
        state.engine.start()
        app.state.loraserve = state
        _log_auth(state)
        log.info("serving %s with %d adapters on http://%s:%d (auth: %s); console: http://%s:%d/ui",
                 state.models.base_name, len(state.registry.latest_versions()), settings.host, settings.port,
                 "on" if state.auth.enabled else "OFF", settings.host, settings.port)
        try:
            yield
        finally:
            app.state.loraserve = None
            await asyncio.to_thread(state.engine.stop)
            state.database.close()

    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    app.state.loraserve = None
    app.add_middleware(BodySizeLimitMiddleware, limit_for=_body_limit(settings))
    app.add_middleware(AuthMiddleware)  # outside the body limit: no key, no body read at all
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    app.include_router(routes_ops.router)
    for module in (routes_inference, routes_tokenize, routes_adapters, routes_experiments):
        app.include_router(module.router, dependencies=[Depends(authenticate)])
    app.include_router(routes_admin.router, dependencies=[Depends(authenticate), Depends(require_admin)])
    app.include_router(console.router)  # /ui (and / redirects there): pages that call the /v1 API
    return app
