"""The one settings object. Environment variables (LORASERVE_*) and CLI flags both map onto it."""

from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DType = Literal["float32", "bfloat16", "float16", "auto"]
Quantization = Literal["none", "bnb-nf4", "bnb-fp4", "bnb-int8"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="ignore")

    # The base model
    model: Path = Field(Path("demo/base"), description="Local Hugging Face model directory.")
    served_model_name: str | None = Field(None, description="Name of the base in /v1/models (default: dir name).")
    dtype: DType = Field("auto", description="float32 on CPU, bfloat16 on CUDA when 'auto'.")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto'.")
    quantization: Quantization = Field(
        "none", description="Quantize the base at load with bitsandbytes (a checkpoint that is already quantized "
        "loads as such with 'none').")

    # Adapters on the device
    max_loras: int = Field(32, ge=1, description="Adapter slots on the device (adapters in one batch).")
    max_lora_rank: int = Field(64, ge=1, description="Largest rank accepted; slots are padded to it.")
    slot_copy_memory: ByteSize = Field(
        ByteSize(4 * 1024**3), description="Bytes the adapters in slots may hold slot by slot (full module copies, "
        "resized vocabularies, head and embedding factors); idle ones are evicted to make room; 0 = no limit.")

    # Batching and the KV cache
    max_num_seqs: int = Field(64, ge=1, description="Sequences in the running batch at most.")
    torch_threads: int | None = Field(None, ge=1, description="Threads of the engine's forward pass (default: cores).")
    cpu_kernel: bool = Field(True, description="Fused C++ ops for float32 CPU decode steps: the LoRA op and paged "
                                               "attention (built in the background on the first start).")
    max_batch_tokens: int = Field(
        2048, ge=16, description="Tokens in one forward pass at most; longer prompts are prefilled in chunks.")
    max_queue: int = Field(1024, ge=0, description="Requests waiting for admission at most.")
    kv_cache_memory: ByteSize = Field(ByteSize(512 * 1024**2), description="Bytes for the KV cache.")
    kv_block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    enable_prefix_caching: bool = Field(
        True, description="Keep full KV blocks after their request and reuse them for prompts that start the same way.")

    # Merged copies of popular adapters
    merged_budget: ByteSize = Field(ByteSize(512 * 1024**2), description="Bytes of merged weights; 0 = off.")
    merge_promote_share: float = Field(0.5, gt=0, description="Share of recent tokens that earns a merged copy.")
    merge_demote_share: float = Field(0.25, ge=0, description="Share below which a merged copy is dropped.")
    merge_half_life_tokens: int = Field(4096, ge=1, description="Tokens after which past traffic counts half.")

    # Adapters as data
    adapters_dir: Path = Field(Path("adapters"), description="Adapter store: hand-placed PEFT dirs and blobs.")
    catalogue_url: str | None = Field(None, description="SQLAlchemy URL (default: SQLite in adapters_dir).")
    host_cache_memory: ByteSize = Field(ByteSize(1024**3), description="Bytes of adapters kept in host memory.")
    max_upload_size: ByteSize = Field(ByteSize(512 * 1024**2), description="Largest adapter upload accepted.")
    max_request_body: ByteSize = Field(ByteSize(2 * 1024**2), ge=1024,
                                       description="Largest request body but uploads (those get max_upload_size).")
    lora: list[str] = Field(default_factory=list, description="NAME=PATH adapters registered at start.")

    # Tenants and keys
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="API keys required: 'auto' = on when an admin key is set or the catalogue holds a live key.")
    admin_key: SecretStr | None = Field(
        None, description="The first admin key; prefer the environment variable (a flag shows in `ps`).")
    # Limits of each tenant (admins have none); 0 = no limit.
    tenant_requests_per_minute: int = Field(600, ge=0, description="Inference requests per minute.")
    tenant_tokens_per_minute: int = Field(200_000, ge=0,
                                          description="Tokens asked for (max_tokens x choices) per minute.")
    tenant_max_concurrent: int = Field(32, ge=0, description="Inference requests in flight at once.")
    tenant_max_adapters: int = Field(100, ge=0, description="Adapter names with a live version.")
    tenant_max_adapter_bytes: ByteSize = Field(ByteSize(10 * 1024**3),
                                               description="Bytes of live adapter versions.")

    # HTTP
    host: str = Field("127.0.0.1", description="Address the HTTP server listens on (0.0.0.0 = all).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP server.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines as JSON or as plain text; auto: text when stderr is a terminal, else JSON.")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="Time in-flight requests get to finish.")
    # Limits of every connection, checked before the application sees a request (server/api/http_protocol.py).
    max_connections: int = Field(1024, ge=1, description="Open HTTP connections at most; more: 503 and closed.")
    max_connections_per_client: int = Field(
        128, ge=0, description="Open connections from one client address; more: 503 and closed; 0 = no limit.")
    max_header_bytes: ByteSize = Field(
        ByteSize(64 * 1024), ge=1024, description="Largest request head (request line and header fields); 431.")
    max_header_fields: int = Field(100, ge=1, description="Header fields of one request at most; 431.")
    request_head_timeout: float = Field(
        10.0, gt=0, description="Seconds a client gets to send a whole request head; 408.")
    keep_alive_timeout: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open.")

    # Scale-out (`loraserve cluster`, server/cluster/): every other setting applies to each replica.
    replicas: int = Field(1, ge=1, description="Engine replicas behind the cluster's one HTTP endpoint.")
    replica_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved by each replica (a fraction shares a core).")
    stream_interval: float = Field(
        0.025, ge=0, le=1, description="Seconds a replica gathers its streams' events before sending them through Ray "
                                       "together, on one channel to the ingress (each send costs CPU on the "
                                       "engine's core); 0 = each at once.")
    shared_limits: bool = Field(
        False, description="Tenant limits counted in the catalogue database, across every process sharing it "
                           "(`loraserve cluster` turns it on).")

    @property
    def base_name(self) -> str:
        """The base model's name in the API: `served_model_name`, else its directory's name."""
        return self.served_model_name or Path(self.model).resolve().name


# Settings only `loraserve cluster` reads: other commands do not offer them.
CLUSTER_ONLY = frozenset({"replicas", "replica_cpus", "stream_interval"})
