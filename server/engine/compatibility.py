"""Whether the engine serves a base model exactly; at load, a model it cannot is refused with the reason.

The engine owns attention through transformers' attention interface, so a model is served exactly only if
1. its class routes attention through that interface (`_supports_attention_backend`): Bloom, MPT, Falcon
   and GPT-Neo run their own attention code, which ignores ours (wrong tokens) or fails on its name;
2. a probe forward through a recording attention function shows, for every decoder layer,
   exactly one call with `layer_idx` 0..L-1 (the KV cache keeps one entry per layer), keys of the
   cache's shape (no per-layer head counts, no layer reading another's keys), causal attention, and no
   keyword argument with a value the paged attention does not implement (attention sinks, ...);
3. its rotary embedding depends on positions only, or is LongRoPE as Phi-3 runs it, which the engine
   runs per sequence (`rope.py`).
The probe is exact where a list of architectures would go stale: it watches what the modeling code
actually hands the attention function.
"""

from dataclasses import dataclass, field

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from server.engine.kv_cache import KVShape
from server.engine.rope import PER_SEQUENCE_ROPE_TYPES, RECOMPUTE_AT_SWITCH
from server.errors import LoraserveError

PROBE_NAME = "loraserve_probe"
PROBE_TOKENS = 8
# Keyword arguments the paged attention honours (any value), or that only carry the runner's own inputs or
# flags meant for other modules (a MoE router's `output_router_logits`).
HONOURED = frozenset({"scaling", "sliding_window", "softcap", "s_aux", "attn_metadata", "position_ids",
                      "use_cache", "output_router_logits"})
# Keyword arguments that change nothing at these values (dropout is 0 in eval mode; the engine is causal).
INERT = {"dropout": (0.0,), "is_causal": (True,)}
# Layer types (`config.layer_types`) the paged attention implements, and those that only describe the MLP.
SERVED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
MLP_LAYER_TYPES = frozenset({"dense", "sparse"})


class UnsupportedModelError(LoraserveError):
    """A base model the engine cannot serve exactly; the message names the architecture and the reason."""


def check_architecture(config: PreTrainedConfig) -> None:
    """Before loading: refuse a class whose attention bypasses the attention interface, layer types other
    than full and sliding-window attention (chunked, linear/recurrent, sparse...), or LongRoPE where the
    engine cannot match transformers."""
    name = _architecture(config)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModelError(f"{name}: not a causal language model transformers can build")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not model_class._supports_attention_backend:
        raise UnsupportedModelError(
            f"{name}: its attention does not go through transformers' attention interface "
            "(its modeling code computes attention itself), so the engine's paged attention cannot serve it"
        )
    layer_types = set(getattr(config.get_text_config(), "layer_types", None) or ()) - MLP_LAYER_TYPES
    if layer_types - SERVED_LAYER_TYPES:
        raise UnsupportedModelError(
            f"{name}: layer types {', '.join(sorted(layer_types - SERVED_LAYER_TYPES))} are not implemented by "
            "the engine's paged attention (it serves full and sliding-window attention)"
        )
    # dynamic NTK rescales only past max_position_embeddings, beyond the engine's context limit: inert here.
    if _rope_types(config) & PER_SEQUENCE_ROPE_TYPES and config.model_type not in RECOMPUTE_AT_SWITCH:
        raise UnsupportedModelError(
            f"{name}: LongRoPE on model type {config.model_type!r}, whose generate keeps keys computed with the "
            "short factors after the switch; the engine serves LongRoPE per sequence only as Phi-3 does it "
            f"(recomputed at the switch: {', '.join(sorted(RECOMPUTE_AT_SWITCH))})"
        )


@dataclass
class _Recording:
    calls: list[tuple[torch.nn.Module, torch.Size, torch.Size, dict]] = field(default_factory=list)


class _MetadataLost(Exception):
    """The attention function was called without the forward's keyword arguments."""


def _recording_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Records the call, answers with plain causal attention so the forward goes on."""
    recording: _Recording | None = kwargs.get("attn_metadata")
    if recording is None:
        raise _MetadataLost
    recording.calls.append((module, key.shape, value.shape, dict(kwargs, scaling=scaling)))
    out = scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


AttentionInterface.register(PROBE_NAME, _recording_attention)


def probe_attention(model: PreTrainedModel, shape: KVShape, served_name: str) -> tuple[int | None, ...]:
    """Run one small forward with the recording attention and refuse what the paged attention cannot honour;
    return each layer's sliding window (None: the layer attends to the whole context).

    Leaves the model on `served_name` (the attention implementation it serves with)."""
    recording = _Recording()
    model.set_attn_implementation(PROBE_NAME)
    if model.config._attn_implementation != PROBE_NAME:  # transformers only warned: nothing changed
        raise UnsupportedModelError(f"{_architecture(model.config)}: its attention implementation cannot be "
                                    "set at run time (transformers finds no attention interface in its code)")
    try:
        with torch.inference_mode():
            ids = torch.arange(PROBE_TOKENS, device=model.device)
            model(input_ids=(ids + 1).unsqueeze(0), position_ids=ids.unsqueeze(0), attn_metadata=recording,
                  use_cache=False)
    except _MetadataLost:
        raise UnsupportedModelError(
            f"{_architecture(model.config)}: its layers do not hand the forward's keyword arguments on to the "
            "attention function, so the engine's batch metadata cannot reach it"
        ) from None
    finally:
        model.set_attn_implementation(served_name)
    problems = _problems(recording, shape)
    if problems:
        raise UnsupportedModelError(f"{_architecture(model.config)}: " + "; ".join(problems))
    windows = {module.layer_idx: kwargs.get("sliding_window") for module, _, _, kwargs in recording.calls}
    return tuple(windows[layer] for layer in range(shape.num_layers))


def _problems(recording: _Recording, shape: KVShape) -> list[str]:
    layers = [getattr(module, "layer_idx", None) for module, *_ in recording.calls]
    if None in layers or sorted(layers) != list(range(shape.num_layers)):
        return [f"attention was called for layers {layers}, the KV cache needs each of 0..{shape.num_layers - 1} "
                "once"]
    problems: dict[str, list[int]] = {}  # problem -> layers that have it
    for module, key_shape, value_shape, kwargs in recording.calls:
        found = [f"its attention's {kind} differ from the KV cache's shape ({got[1]} heads × {got[3]} dims where "
                 f"the cache holds {shape.num_kv_heads} × {shape.head_dim})"
                 for kind, got in (("keys", key_shape), ("values", value_shape))
                 if (got[1], got[3]) != (shape.num_kv_heads, shape.head_dim)]
        if getattr(module, "is_causal", True) is False:
            found.append("bidirectional attention (the engine attends causally)")
        unknown = sorted(name for name, value in kwargs.items() if not _honoured(name, value))
        if unknown:
            found.append(f"passes {', '.join(unknown)} to its attention, which the engine does not implement")
        for problem in found:
            problems.setdefault(problem, []).append(module.layer_idx)
    return [f"{problem} (layers {', '.join(map(str, layers))})" for problem, layers in problems.items()]


def _honoured(name: str, value) -> bool:
    if name in HONOURED or value is None:
        return True
    return isinstance(value, (int, float)) and value in INERT.get(name, ())


def _rope_types(config: PreTrainedConfig) -> set[str]:
    """Every rope type of the model: one, or one per layer type (Gemma-3's local and global layers)."""
    params = getattr(config.get_text_config(), "rope_parameters", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)]
    return {p.get("rope_type", "default") for p in nested or [params]}


def _architecture(config: PreTrainedConfig) -> str:
    return ", ".join(getattr(config, "architectures", None) or []) or config.model_type
