"""The one settings object. Environment variables (LORASERVE_*) and CLI flags both map onto it."""

from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DType = Literal["float32", "bfloat16", "float16", "auto"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="ignore")

    # The base model
    model: Path = Field(Path("demo/base"), description="Local Hugging Face model directory.")
    dtype: DType = Field("auto", description="float32 on CPU, bfloat16 on CUDA when 'auto'.")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto'.")

    # Adapters on the device
    max_loras: int = Field(32, ge=1, description="Adapter slots on the device (adapters in one batch).")
    max_lora_rank: int = Field(64, ge=1, description="Largest rank accepted; slots are padded to it.")

    # Batching and the KV cache
    max_num_seqs: int = Field(64, ge=1, description="Sequences in the running batch at most.")
    max_batch_tokens: int = Field(2048, ge=16, description="Tokens in one forward pass at most.")
    max_queue: int = Field(1024, ge=0, description="Requests waiting for admission at most.")
    kv_cache_memory: ByteSize = Field(ByteSize(512 * 1024**2), description="Bytes for the KV cache.")
    kv_block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
