"""What each tensor of a PEFT adapter file is (its module and its part), and whether it belongs there.

    <module>.lora_A.weight / lora_B.weight        LoRA factors (lora_embedding_A / _B on an embedding)
    <module>.lora_magnitude_vector                DoRA's magnitude
    <module>.lora_B.bias                          lora_bias=True
    <module>.base_layer.bias, <module>.bias       a trained bias (bias="lora_only" / "all")
    <module>.weight, <module>.bias                a full copy of a module in modules_to_save
    <module>.modules_to_save.weight               the same copy again (PEFT saving embedding layers)
    <module>.original_module.weight               the base's weights as the adapter saw them (not served)
    <module>.token_adapter.trainable_tokens_delta the new rows of trainable_token_indices
    <module>.base_layer.weight, <module>.weight   the input embedding's or output head's own weights
      (.token_adapter.base_layer.weight)          (save_embedding_layers, e.g. after a resized vocabulary):
                                                  a full copy the adapter's rows go through, LoRA on top
"""

import re

from server.lora.peft_config import LoraSpec
from server.lora.targets import EMBEDDING, HEAD, LINEAR, TargetModule

# The shortest module name that leaves a known part: `q_proj.base_layer.bias` is q_proj's trained bias.
KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                 r"lora_embedding_B|lora_B\.bias|lora_magnitude_vector|base_layer\.bias|base_layer\.weight|"
                 r"token_adapter\.trainable_tokens_delta|token_adapter\.base_layer\.weight|modules_to_save\.weight|"
                 r"original_module\.weight|bias|weight)$")
# PEFT's names for an embedding's factors are the same matrices as a linear layer's: A (r, vocab), B (d, r).
ALIASES = {"lora_embedding_A": "lora_A.weight", "lora_embedding_B": "lora_B.weight",
           "token_adapter.base_layer.weight": "base_layer.weight"}
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_B.bias", "base_layer.bias")
BIAS_PARTS = ("lora_B.bias", "base_layer.bias", "bias")
COPY = "weight"  # with "bias" when the module is saved whole
OWN = "base_layer.weight"  # an adapted embedding's or head's own weights (save_embedding_layers)
SAVED_AGAIN, ORIGINAL = "modules_to_save.weight", "original_module.weight"
TOKENS = "token_adapter.trainable_tokens_delta"


def part_problem(spec: LoraSpec, target: TargetModule | None, module: str, part: str) -> str | None:
    """Why a tensor of this module and part does not belong in this adapter (None: it does)."""
    if target is None:
        if part == "bias":
            return f"bias of {module!r}: only linear layers' biases are served (bias='all' trained another kind)"
        return f"the base model has no linear module named {module!r}"
    vocabulary_shaped = target.kind in (EMBEDDING, HEAD)
    if target.quantized and (spec.saves(module) or part in (COPY, OWN)):
        return f"a full copy of {module!r}, a quantized layer, is not supported"
    if spec.saves(module):
        if part not in (COPY, "bias", SAVED_AGAIN, ORIGINAL):
            return f"{module!r} is in modules_to_save: the adapter holds a full copy of it, not {part}"
        return None
    if part in (SAVED_AGAIN, ORIGINAL):
        return f"{part} of {module!r} needs the module listed in modules_to_save"
    wrapped = spec.targets(module) or spec.token_indices(module, target.kind == EMBEDDING)
    if part == COPY and not (vocabulary_shaped and not wrapped):
        return f"a full copy of {module!r} needs the module listed in modules_to_save"
    if part == OWN and not (vocabulary_shaped and wrapped):
        return (f"{module}.base_layer.weight: the base's own weights are replaced only for the input embedding "
                "or the output head (save_embedding_layers)")
    if part in (COPY, OWN):
        return None
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


def expected_shapes(spec: LoraSpec, target: TargetModule, module: str, vocabulary: int
                    ) -> dict[str, tuple[int, ...]]:
    """Each part's shape; `vocabulary` is the adapter's (the base's, or more rows when it resized it)."""
    rank = spec.rank_for(module)
    indices = spec.token_indices(module, target.kind == EMBEDDING) or []
    d_in = vocabulary if target.kind == EMBEDDING else target.in_features
    d_out = vocabulary if target.kind == HEAD else target.out_features
    copy = tuple(target.module.weight.shape) if target.kind == LINEAR else (vocabulary, target.module.weight.shape[1])
    return {
        "lora_A.weight": (rank, d_in),
        "lora_B.weight": (d_out, rank),
        **{part: (d_out,) for part in ("lora_magnitude_vector", *BIAS_PARTS)},
        **{part: copy for part in (COPY, OWN, SAVED_AGAIN, ORIGINAL)},
        TOKENS: (len(indices), target.out_features),
    }


def vocabulary_rows(target: TargetModule, part: str, shape: tuple[int, ...]) -> int | None:
    """How many vocabulary rows this part of the input embedding or output head was made for (None: the
    part has no vocabulary axis)."""
    if len(shape) != 2 or target.kind == LINEAR:
        return None
    if part in (COPY, OWN, SAVED_AGAIN, ORIGINAL):
        return shape[0]
    axis = {(EMBEDDING, "lora_A.weight"): 1, (HEAD, "lora_B.weight"): 0}.get((target.kind, part))
    return None if axis is None else shape[axis]
