"""What each tensor of a PEFT adapter file is (its module and its part), and whether it belongs there.

    <module>.lora_A.weight / lora_B.weight        LoRA factors (lora_embedding_A / _B on an embedding)
    <module>.lora_magnitude_vector                DoRA's magnitude
    <module>.lora_B.bias                          lora_bias=True
    <module>.base_layer.bias, <module>.bias       a trained bias (bias="lora_only" / "all")
    <module>.weight, <module>.bias                a full copy of a module in modules_to_save
    <module>.token_adapter.trainable_tokens_delta the new rows of trainable_token_indices
"""

import re

from server.lora.peft_config import LoraSpec
from server.lora.targets import EMBEDDING, LINEAR, TargetModule

# The shortest module name that leaves a known part: `q_proj.base_layer.bias` is q_proj's trained bias.
KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                 r"lora_embedding_B|lora_B\.bias|lora_magnitude_vector|base_layer\.bias|base_layer\.weight|"
                 r"token_adapter\.trainable_tokens_delta|bias|weight)$")
# PEFT's names for an embedding's factors are the same matrices as a linear layer's: A (r, vocab), B (d, r).
ALIASES = {"lora_embedding_A": "lora_A.weight", "lora_embedding_B": "lora_B.weight"}
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_B.bias", "base_layer.bias")
BIAS_PARTS = ("lora_B.bias", "base_layer.bias", "bias")
COPY = "weight"  # with "bias" when the module is saved whole
TOKENS = "token_adapter.trainable_tokens_delta"


def part_problem(spec: LoraSpec, target: TargetModule | None, module: str, part: str) -> str | None:
    """Why a tensor of this module and part does not belong in this adapter (None: it does)."""
    if target is None:
        if part == "bias":
            return f"bias of {module!r}: only linear layers' biases are served (bias='all' trained another kind)"
        return f"the base model has no linear module named {module!r}"
    if part == "base_layer.weight":
        return (f"the base's own weights of {module!r} (save_embedding_layers, a resized vocabulary): "
                "adapters are served on the base's weights")
    if spec.saves(module):
        if part not in (COPY, "bias"):
            return f"{module!r} is in modules_to_save: the adapter holds a full copy of it, not {part}"
        return "modules_to_save on a quantized layer is not supported" if target.quantized else None
    if part == COPY:
        return f"a full copy of {module!r} needs the module listed in modules_to_save"
    if part == TOKENS:
        embedding = target.kind == EMBEDDING
        return None if spec.token_indices(module, embedding) else f"{module!r} is not in trainable_token_indices"
    return _lora_part_problem(spec, target, module, part)


def _lora_part_problem(spec: LoraSpec, target: TargetModule, module: str, part: str) -> str | None:
    if part == "bias":  # a trained bias of a module LoRA does not adapt
        if spec.bias != "all" or spec.targets(module):
            return f"a bias of {module!r} needs bias='all' (and the module not adapted)"
    elif not spec.targets(module):
        return f"module {module!r} is not selected by target_modules"
    elif part == "base_layer.bias" and spec.bias == "none":
        return f"a trained bias of {module!r} needs bias='lora_only' or 'all' in the config"
    elif part == "lora_B.bias" and not spec.lora_bias:
        return "lora_B.bias needs lora_bias=true in the config"
    if part in BIAS_PARTS and getattr(target.module, "bias", None) is None:
        return f"a bias for {module!r}, whose base layer has none"
    if target.kind != LINEAR and part == "lora_magnitude_vector":
        return f"use_dora on {module!r} (an embedding or the output head) is not supported"
    return None


def needed_parts(spec: LoraSpec, target: TargetModule, module: str, parts: set[str]) -> list[str]:
    """The parts this module must have, given the config and the parts present."""
    if spec.saves(module):
        return [COPY] + (["bias"] if getattr(target.module, "bias", None) is not None else [])
    needed = []
    if spec.targets(module):
        needed = ["lora_A.weight", "lora_B.weight"] + (["lora_B.bias"] if spec.lora_bias else [])
        needed += ["lora_magnitude_vector"] if spec.use_dora else []
    if spec.token_indices(module, target.kind == EMBEDDING):
        needed.append(TOKENS)
    return needed


def expected_shapes(spec: LoraSpec, target: TargetModule, module: str) -> dict[str, tuple[int, ...]]:
    rank = spec.rank_for(module)
    indices = spec.token_indices(module, target.kind == EMBEDDING) or []
    return {
        "lora_A.weight": (rank, target.in_features),
        "lora_B.weight": (target.out_features, rank),
        **{part: (target.out_features,) for part in ("lora_magnitude_vector", *BIAS_PARTS)},
        COPY: tuple(target.module.weight.shape),
        TOKENS: (len(indices), target.out_features),
    }
