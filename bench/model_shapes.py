"""The random Llama the benchmarks build: its full shape (63M parameters, the one behind the figures in
docs/) and its quick shape (smoke runs), the options every benchmark has for it, and its config."""

from collections.abc import Mapping
from dataclasses import dataclass

from transformers import LlamaConfig

from tests.factories import llama_config

FULL_MODEL = dict(hidden=768, intermediate=2048, layers=10, heads=12, kv_heads=4)
QUICK_MODEL = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2)


@dataclass(frozen=True)
class ModelOptions:
    """The model part of a benchmark's options (each benchmark adds its workload's)."""

    quick: bool
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


def base_config(shape: Mapping[str, int]) -> LlamaConfig:
    """The tests' byte-vocabulary Llama at `shape`'s size."""
    return llama_config(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                        num_key_value_heads=shape["kv_heads"], max_position_embeddings=512)
