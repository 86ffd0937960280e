"""Everything the routes share, built once in the app's lifespan and hung on `app.state.loraserve`."""

from dataclasses import dataclass

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from server.api.access import Access
from server.api.auth import Authenticator
from server.api.inference import InferenceService
from server.api.metrics import Metrics
from server.api.model_resolver import ModelResolver
from server.config import Settings
from server.db import Database
from server.engine.async_engine import AsyncEngine
from server.lora.added_tokens import AdapterTokenizers
from server.experiments.service import ExperimentService
from server.registry.registry import AdapterRegistry
from server.tenancy.audit import AuditLog
from server.tenancy.keys import KeyStore
from server.tenancy.limits import TenantLimiter

# Chat requests without max_tokens get this many tokens at most (OpenAI would use the context).
DEFAULT_CHAT_MAX_TOKENS = 256


@dataclass
class AppState:
    settings: Settings
    database: Database
    engine: AsyncEngine
    tokenizer: PreTrainedTokenizerBase
    tokenizers: AdapterTokenizers  # the base's, or an adapter's that resized the vocabulary (event loop only)
    registry: AdapterRegistry
    models: ModelResolver
    inference: InferenceService
    metrics: Metrics
    experiments: ExperimentService
    auth: Authenticator
    keys: KeyStore
    access: Access
    audit: AuditLog
    limits: TenantLimiter
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS


def app_state(request: Request) -> AppState:
    return request.app.state.loraserve
