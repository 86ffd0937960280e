"""Loading the frozen base model and its tokenizer from a local Hugging Face directory (safetensors only)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import BitsAndBytesConfig

from server.engine.attention import ATTENTION_NAME
from server.engine.compatibility import check_architecture, probe_attention
from server.engine.kv_cache import KVShape
from server.engine.rope import wrap_per_sequence_rope

log = logging.getLogger(__name__)

KV_WINDOW_ATTR = "loraserve_kv_window"  # set on a loaded model by load_base_model (see kv_window)
QUANTIZATION_ATTR = "loraserve_quantization"  # the same, for base_quantization

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_base_model(path: Path, dtype: torch.dtype, device: torch.device, quantization: str = "none") -> PreTrainedModel:
    """The model, frozen, in eval mode, its attention routed to the engine's paged KV cache.

    `quantization` ("bnb-nf4", "bnb-fp4", "bnb-int8") quantizes the linear layers at load with
    bitsandbytes, computing in `dtype`; a checkpoint whose config carries a `quantization_config` loads
    quantized as saved. A model the engine cannot serve exactly is refused (`UnsupportedModelError`,
    naming the architecture and the reason) before its weights are read, or after one probe forward
    (`compatibility.py`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pickled weights are refused)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{path}: encoder-decoder models are not supported (decoder-only only)")
    check_architecture(config)
    method = _quantization_method(path, config, quantization)
    log.info("loading base model from %s (%s, %s, quantization %s)", path, dtype, device, method)
    quantized = {} if method == "none" else {"device_map": str(device)}
    if method != "none" and getattr(config, "quantization_config", None) is None:
        quantized["quantization_config"] = _bnb_config(method, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True, attn_implementation=ATTENTION_NAME,
        **quantized,
    )
    if method == "none":  # a quantized model is placed by device_map; bitsandbytes refuses .to()
        model.to(device)
    model.eval().requires_grad_(False)
    setattr(model, QUANTIZATION_ATTR, method)
    windows = probe_attention(model, kv_shape(model), ATTENTION_NAME)
    recomputed = wrap_per_sequence_rope(model)
    # A LongRoPE sequence is computed again from its first token when it crosses the original context,
    # writing every position anew: no block of it may be given back early.
    windowed = all(w is not None for w in windows) and not recomputed
    setattr(model, KV_WINDOW_ATTR, min(windows) if windowed else None)
    return model


def _quantization_method(path: Path, config, requested: str) -> str:
    """The quantization to load with: the flag's, or the one a pre-quantized checkpoint was saved with."""
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return requested
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    method = _saved_method(saved)
    if method is None:
        raise ValueError(f"{path}: quantization_config {saved.get('quant_method')!r} is not supported "
                         "(bitsandbytes nf4, fp4 or int8 checkpoints are)")
    if requested not in ("none", method):
        raise ValueError(f"{path}: the checkpoint is already quantized ({method}); --quantization {requested} "
                         "cannot re-quantize it (leave it at 'none')")
    return method


def _saved_method(saved: dict) -> str | None:
    if saved.get("quant_method") != "bitsandbytes":
        return None
    if saved.get("load_in_8bit"):
        return "bnb-int8"
    if saved.get("load_in_4bit"):
        return {"nf4": "bnb-nf4", "fp4": "bnb-fp4"}.get(saved.get("bnb_4bit_quant_type", "fp4"))
    return None


def _bnb_config(method: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """How `--quantization` quantizes: bitsandbytes' 4-bit defaults (what QLoRA trains on), computing in
    `dtype`; int8 without LLM.int8()'s outlier decomposition. Its threshold picks the outlier columns over
    the whole batch, so a row's result would depend on the other rows of the step (other adapters'
    activations); at 0 every row is quantized on its own and a mixed batch equals each request alone."""
    if method == "bnb-int8":
        # Activations are quantized through float16 by design; bitsandbytes warns at every call.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.removeprefix("bnb-"),
                              bnb_4bit_compute_dtype=dtype)


@dataclass(frozen=True)
class BaseFootprint:
    """What /v1/models and /metrics say about the base: how it was quantized and the bytes it holds."""

    quantization: str  # 'none', 'bnb-nf4', 'bnb-fp4' or 'bnb-int8'
    resident_bytes: int


def base_footprint(model: PreTrainedModel) -> BaseFootprint:
    return BaseFootprint(getattr(model, QUANTIZATION_ATTR, "none"), base_resident_bytes(model))


def base_resident_bytes(model: PreTrainedModel) -> int:
    """Bytes the base holds in memory: every parameter and buffer once (tied weights are one tensor),
    and the scales bitsandbytes keeps beside its codes (4-bit blocks' absmax, int8 rows' scales)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [t for t in (state.absmax, state.code) if t is not None]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
        scale = getattr(getattr(module, "weight", None), "SCB", None)
        if scale is not None:
            tensors.append(scale)
    unique = {(t.data_ptr(), t.dtype): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values())


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
