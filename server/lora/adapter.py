"""Loading a PEFT LoRA adapter from safetensors, validated against the base, ready for the batched path.

Every tensor is accounted for, every problem is reported at once, and nothing is ever unpickled.
At load the scale (alpha/r or alpha/sqrt(r)) and, for DoRA, the per-output-channel factor
g = m / ‖W + scale·B·A‖ are folded into B, so serving is `y = g ⊙ (x·Wᵀ) + (x·Aᵀ)·B'ᵀ + bias`
with `B' = g ⊙ scale·B` (g = 1 for plain LoRA).
"""

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from server.errors import AdapterValidationError
from server.lora.added_tokens import added_token_problems
from server.lora.parts import (ALIASES, BIAS_PARTS, COPY, KEY, OWN, SAVED_AGAIN, TOKENS, expected_shapes, needed_parts,
                               part_problem, vocabulary_rows)
from server.lora.peft_config import LoraSpec, parse_lora_spec
from server.lora.targets import EMBEDDING, HEAD, LINEAR, TargetModule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
_ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
# A LoRA adapter's header lists a few hundred tensors: kilobytes. Refused before parsing above this.
MAX_HEADER_BYTES = 1024**2


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted module: A is (r, d_in); B already holds scale (and DoRA's g): (d_out, r).
    A module without LoRA factors (only a bias, a full copy or token rows) has rank 0."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    dora_scale: torch.Tensor | None  # g, (d_out,), only for DoRA
    bias: torch.Tensor | None = None  # (d_out,) added to the adapter's rows: trained bias - base bias + scale·lora_B.bias
    # modules_to_save, or an embedding's/head's own weights (save_embedding_layers): (weight, bias), native
    # layout; it replaces the base's module for the adapter's rows (LoRA factors, token rows on top)
    copy: tuple[torch.Tensor, torch.Tensor | None] | None = None
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # trainable tokens: (ids (n,), rows (n, d_out))

    @property
    def tensors(self) -> list[torch.Tensor]:
        extra = [*(self.copy or ()), *(self.tokens or ())]
        return [t for t in (self.lora_a, self.lora_b, self.dora_scale, self.bias, *extra) if t is not None]

    @property
    def per_token(self) -> bool:
        """Served per slot by the module's wrapper (not the batched op): a copy or token rows."""
        return self.copy is not None or self.tokens is not None

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter in host memory, validated against one base model."""

    name: str
    spec: LoraSpec
    modules: dict[str, LoraModuleWeights]
    # Rows of the adapter's vocabulary when it resized the base's (its embedding and head copies have them);
    # None: the base's vocabulary.
    vocabulary: int | None = None

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    @property
    def trainable_parameters(self) -> int:
        return sum(t.numel() for w in self.modules.values() for t in w.tensors
                   if t is not w.dora_scale and t.is_floating_point())

    @property
    def nbytes(self) -> int:
        """Host bytes, full copies included: what the host cache and the slot pool account for (a tensor two
        modules share, a tied head's copy, once)."""
        unique = {id(t): t for w in self.modules.values() for t in w.tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())


def load_lora_adapter(
    directory: Path,
    targets: dict[str, TargetModule],
    *,
    name: str,
    max_rank: int,
    dtype: torch.dtype,
) -> LoraAdapter:
    """Read and validate a PEFT adapter directory; raise AdapterValidationError listing every problem."""
    directory = Path(directory)
    spec = parse_lora_spec(_read_config(directory))
    tensors = _read_tensors(directory)
    grouped, problems = _group_by_module(tensors, spec, targets)
    vocabulary = _adapter_vocabulary(grouped, targets)
    expected = {m for m, t in targets.items() if needed_parts(spec, t, m, set())}
    problems += [f"{m}: {_selected_by(spec, m)} but has no weights in {WEIGHTS_FILE}" for m in sorted(expected - grouped.keys())]
    if not grouped and not problems:
        problems.append(f"{WEIGHTS_FILE}: holds no LoRA weights")
    modules = {}
    for module_name, parts in sorted(grouped.items()):
        module_problems = _check_module(module_name, parts, spec, targets[module_name], max_rank, vocabulary)
        problems += module_problems
        if not module_problems:
            folded = _fold(parts, spec, module_name, targets[module_name], dtype)
            problems += _overflow_problems(module_name, folded)
            modules[module_name] = folded
    modules.update(_tied_head(modules, targets, spec))
    base_vocabulary = _base_vocabulary(targets)
    if not problems and vocabulary > base_vocabulary:
        problems += _resized_problems(modules, targets, vocabulary, base_vocabulary)
    problems += added_token_problems(spec.added_tokens, vocabulary, base_vocabulary)
    if problems:
        raise AdapterValidationError(problems)
    return LoraAdapter(name=name, spec=spec, modules=modules,
                       vocabulary=vocabulary if vocabulary > base_vocabulary else None)


def _tied_head(modules: dict[str, LoraModuleWeights], targets: dict[str, TargetModule], spec: LoraSpec
               ) -> dict[str, LoraModuleWeights]:
    """An output head tied to the input embedding follows what the adapter did to the embedding's own
    weights: PEFT's trainable tokens change the head's rows too, and save_embedding_layers' weights (not a
    modules_to_save copy, which leaves the tie behind) are the head's weights as well."""
    head = next((t for t in targets.values() if t.kind == HEAD), None)
    for name, weights in modules.items():
        tied = head is not None and head.module.weight is targets[name].module.weight
        if targets[name].kind != EMBEDDING or not tied or head.name in modules:
            continue
        copy = (weights.copy[0], None) if weights.copy is not None and not spec.saves(name) else None
        if weights.tokens is not None or copy is not None:
            dtype = weights.lora_a.dtype
            no_factors = (torch.zeros(0, head.in_features, dtype=dtype), torch.zeros(head.out_features, 0, dtype=dtype))
            return {head.name: LoraModuleWeights(*no_factors, None, copy=copy, tokens=weights.tokens)}
    return {}


def _base_vocabulary(targets: dict[str, TargetModule]) -> int:
    """The base's vocabulary: the input embedding's rows (or the head's, when the embedding is no target)."""
    sizes = [t.in_features if t.kind == EMBEDDING else t.out_features for t in targets.values() if t.kind != LINEAR]
    return max(sizes, default=0)


def _adapter_vocabulary(grouped: dict[str, dict[str, torch.Tensor]], targets: dict[str, TargetModule]) -> int:
    """The largest vocabulary any part of the embedding or the head was made for, or the base's. Parts of
    another size than the result are then refused by their shape."""
    sizes = [vocabulary_rows(targets[module], part, tuple(tensor.shape))
             for module, parts in grouped.items() for part, tensor in parts.items()]
    return max([s for s in sizes if s is not None] + [_base_vocabulary(targets)])


def _resized_problems(modules: dict[str, LoraModuleWeights], targets: dict[str, TargetModule], vocabulary: int,
                      base_vocabulary: int) -> list[str]:
    """A vocabulary larger than the base's is served only when both the input embedding and the output
    head have the new rows: a full copy of each (modules_to_save, or save_embedding_layers' weights)."""
    problems = []
    for target in targets.values():
        if target.kind == LINEAR:
            continue
        weights = modules.get(target.name)
        if weights is None or weights.copy is None:
            problems.append(
                f"{target.name}: the adapter's vocabulary has {vocabulary} rows, the base's {base_vocabulary}; "
                f"{target.name} needs the new rows too: a full copy of {vocabulary} rows (modules_to_save, or "
                "save_pretrained(save_embedding_layers=True)); adapters with a resized vocabulary are served only so")
        elif weights.copy[1] is not None and weights.copy[1].shape[0] != vocabulary:
            problems.append(f"{target.name}: the base's head has a bias of {base_vocabulary} entries; a head of "
                            f"{vocabulary} rows needs its own (list {target.name} in modules_to_save)")
    return problems


def _selected_by(spec: LoraSpec, module: str) -> str:
    if spec.saves(module):
        return "listed in modules_to_save"
    return "adapted by target_modules" if spec.targets(module) else "in trainable_token_indices"


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterValidationError([f"{CONFIG_FILE}: missing"])
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterValidationError([f"{CONFIG_FILE}: not valid JSON ({exc})"]) from None


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickles = [p for p in _PICKLE_FILES if (directory / p).exists()]
        if pickles:
            raise AdapterValidationError([f"{pickles[0]}: pickle files are refused; provide {WEIGHTS_FILE}"])
        raise AdapterValidationError([f"{WEIGHTS_FILE}: missing"])
    problem = _header_problem(path)
    if problem is not None:
        raise AdapterValidationError([f"{WEIGHTS_FILE}: not a valid safetensors file ({problem})"])
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt file; all mean the same
        raise AdapterValidationError([f"{WEIGHTS_FILE}: not a valid safetensors file ({exc})"]) from None


def _header_problem(path: Path) -> str | None:
    """Check the 8-byte little-endian header length before anything parses the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        return f"truncated: {size} bytes, not even a header length"
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        return f"header of {length} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes"
    if 8 + length > size:
        return f"truncated: the header claims {length} bytes but the file has {size - 8} after its length"
    return None


def _group_by_module(
    tensors: dict[str, torch.Tensor], spec: LoraSpec, targets: dict[str, TargetModule]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            problems.append(f"{key}: not a LoRA tensor name (expected base_model.model.<module>.lora_A.weight, ...)")
            continue
        module, part = match["module"], ALIASES.get(match["part"], match["part"])
        problem = part_problem(spec, targets.get(module), module, part)
        if problem is not None:
            problems.append(f"{key}: {problem}")
        else:
            grouped.setdefault(module, {})[part] = tensor
    return grouped, problems


def _check_module(
    module: str, parts: dict[str, torch.Tensor], spec: LoraSpec, target: TargetModule, max_rank: int, vocabulary: int
) -> list[str]:
    problems = [f"{module}: missing {p}" for p in needed_parts(spec, target, module, set(parts)) if p not in parts]
    if not spec.use_dora and "lora_magnitude_vector" in parts:
        problems.append(f"{module}: lora_magnitude_vector present but use_dora is not set")
    if problems:
        return problems
    rank = spec.rank_for(module)
    expected = expected_shapes(spec, target, module, vocabulary)
    for part, tensor in parts.items():
        if tuple(tensor.shape) != expected[part]:
            problems.append(f"{module}.{part}: shape {tuple(tensor.shape)}, expected {expected[part]} (r={rank}"
                            + (f", vocabulary {vocabulary})" if target.kind != LINEAR else ")"))
        if tensor.dtype not in _ALLOWED_DTYPES:
            problems.append(f"{module}.{part}: dtype {tensor.dtype} not allowed (float32, float16, bfloat16)")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{module}.{part}: contains NaN or Inf")
    if SAVED_AGAIN in parts and not problems and not torch.equal(parts[SAVED_AGAIN], parts[COPY]):
        problems.append(f"{module}.{SAVED_AGAIN}: differs from {module}.{COPY} (two different copies of one module)")
    if COPY in parts and OWN in parts:
        problems.append(f"{module}: both {COPY} and {OWN} (two replacements of one module's weights)")
    indices = spec.token_indices(module, target.kind == EMBEDDING) or []
    if target.kind == EMBEDDING and any(not 0 <= i < vocabulary for i in indices):
        problems.append(f"trainable_token_indices: {module} has {vocabulary} rows; indices must be below that")
    if "lora_A.weight" in parts and rank > max_rank:
        problems.append(f"{module}: rank {rank} exceeds the server's max_lora_rank {max_rank}")
    return problems


def _overflow_problems(module: str, weights: LoraModuleWeights) -> list[str]:
    """Finite factors can still overflow once scaled (a huge alpha) or cast to the serving dtype."""
    parts = {"lora_B (scaled)": weights.lora_b, "lora_A": weights.lora_a, "DoRA scale": weights.dora_scale,
             "bias": weights.bias, "copy": weights.copy[0] if weights.copy else None}
    return [f"{module}: {part} is not finite in the serving dtype (alpha or weights too large)"
            for part, tensor in parts.items() if tensor is not None and not torch.isfinite(tensor).all()]


def _fold(
    parts: dict[str, torch.Tensor], spec: LoraSpec, module: str, target: TargetModule, dtype: torch.dtype
) -> LoraModuleWeights:
    a = parts.get("lora_A.weight", torch.zeros(0, target.in_features)).float()
    b = parts.get("lora_B.weight", torch.zeros(target.out_features, 0)).float() * spec.scale_for(module)
    dora_scale = None
    if "lora_magnitude_vector" in parts:
        # DoRA's column norm is constant at inference: compute it once here (PEFT detaches it too).
        weight = target.weight_out_in().detach()
        norm = torch.linalg.norm(weight.float() + (b @ a).to(weight.device), dim=1).cpu()
        dora_scale = parts["lora_magnitude_vector"].float() / norm
        b = b * dora_scale[:, None]
        dora_scale = dora_scale.to(dtype)
    copy = _copy(parts, spec.saves(module), target, dtype)
    tokens = None
    if TOKENS in parts:
        ids = torch.tensor(spec.token_indices(module, target.kind == EMBEDDING), dtype=torch.long)
        tokens = (ids, parts[TOKENS].to(dtype))
    return LoraModuleWeights(lora_a=a.to(dtype).contiguous(), lora_b=b.to(dtype).contiguous(), dora_scale=dora_scale,
                             bias=None if copy else _bias_delta(parts, spec.scale_for(module), target, dtype),
                             copy=copy, tokens=tokens)


def _copy(parts: dict[str, torch.Tensor], saved: bool, target: TargetModule, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """modules_to_save's copy with its bias, or an embedding's/head's own weights with the base's bias."""
    weight = parts.get(COPY, parts.get(OWN))
    if weight is None:
        return None
    bias = parts.get("bias") if saved else getattr(target.module, "bias", None)
    return weight.to(dtype), None if bias is None else bias.detach().to(dtype)


def _bias_delta(parts: dict[str, torch.Tensor], scale: float, target: TargetModule, dtype: torch.dtype
                ) -> torch.Tensor | None:
    """What the adapter adds to the base's bias: its trained bias minus the base's, plus scale·lora_B.bias."""
    if not any(part in parts for part in BIAS_PARTS):
        return None
    delta = torch.zeros(target.out_features)
    trained = parts.get("base_layer.bias", parts.get("bias"))
    if trained is not None:
        delta += trained.float() - target.module.bias.detach().float().cpu()
    if "lora_B.bias" in parts:
        delta += parts["lora_B.bias"].float() * scale
    return delta.to(dtype)
