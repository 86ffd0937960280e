"""Loading the frozen base model and its tokenizer from a local Hugging Face directory (safetensors only)."""

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.engine.attention import ATTENTION_NAME
from server.engine.compatibility import check_architecture, probe_attention
from server.engine.kv_cache import KVShape
from server.engine.rope import wrap_per_sequence_rope

log = logging.getLogger(__name__)

KV_WINDOW_ATTR = "loraserve_kv_window"  # set on a loaded model by load_base_model (see kv_window)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_base_model(path: Path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The model, frozen, in eval mode, its attention routed to the engine's paged KV cache.

    A model the engine cannot serve exactly is refused (`UnsupportedModelError`, naming the architecture
    and the reason) before its weights are read, or after one probe forward (`compatibility.py`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pickled weights are refused)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{path}: encoder-decoder models are not supported (decoder-only only)")
    check_architecture(config)
    log.info("loading base model from %s (%s, %s)", path, dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True, attn_implementation=ATTENTION_NAME
    )
    model.to(device).eval().requires_grad_(False)
    windows = probe_attention(model, kv_shape(model), ATTENTION_NAME)
    recomputed = wrap_per_sequence_rope(model)
    # A LongRoPE sequence is computed again from its first token when it crosses the original context,
    # writing every position anew: no block of it may be given back early.
    windowed = all(w is not None for w in windows) and not recomputed
    setattr(model, KV_WINDOW_ATTR, min(windows) if windowed else None)
    return model


def kv_window(model: PreTrainedModel) -> int | None:
    """The smallest sliding window when every layer has one (keys older than it are never read again,
    so the KV cache may drop their blocks); None when some layer attends to the whole context."""
    return getattr(model, KV_WINDOW_ATTR, None)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(Path(path), local_files_only=True)


def kv_shape(model: PreTrainedModel) -> KVShape:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    return KVShape(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def max_context(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
