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
from server.lora.peft_config import LoraSpec, parse_lora_spec
from server.lora.targets import TargetModule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
_ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
# A LoRA adapter's header lists a few hundred tensors: kilobytes. Refused before parsing above this.
MAX_HEADER_BYTES = 1024**2
# The shortest module name that leaves a known part: `q_proj.base_layer.bias` is q_proj's trained bias.
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\."
                  r"(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector|base_layer\.bias|bias)$")
_BIAS_PARTS = ("lora_B.bias", "base_layer.bias", "bias")


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted module: A is (r, d_in); B already holds scale (and DoRA's g): (d_out, r).
    A module whose only change is its bias (PEFT's bias="all") has rank 0."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    dora_scale: torch.Tensor | None  # g, (d_out,), only for DoRA
    bias: torch.Tensor | None = None  # (d_out,) added to the adapter's rows: trained bias - base bias + scale·lora_B.bias

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter in host memory, validated against one base model."""

    name: str
    spec: LoraSpec
    modules: dict[str, LoraModuleWeights]

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    @property
    def trainable_parameters(self) -> int:
        return sum(w.lora_a.numel() + w.lora_b.numel() + (w.bias.numel() if w.bias is not None else 0)
                   for w in self.modules.values())

    @property
    def nbytes(self) -> int:
        tensors = [t for w in self.modules.values() for t in (w.lora_a, w.lora_b, w.dora_scale, w.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


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
    expected = {m for m in targets if spec.targets(m)}
    problems += [f"{m}: adapted by target_modules but has no weights in {WEIGHTS_FILE}" for m in sorted(expected - grouped.keys())]
    if not grouped and not problems:
        problems.append(f"{WEIGHTS_FILE}: holds no LoRA weights")
    modules = {}
    for module_name, parts in sorted(grouped.items()):
        module_problems = _check_module(module_name, parts, spec, targets[module_name], max_rank)
        problems += module_problems
        if not module_problems:
            folded = _fold(parts, spec, module_name, targets[module_name], dtype)
            problems += _overflow_problems(module_name, folded)
            modules[module_name] = folded
    if problems:
        raise AdapterValidationError(problems)
    return LoraAdapter(name=name, spec=spec, modules=modules)


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
        match = _KEY.match(key)
        if match is None:
            problems.append(f"{key}: not a LoRA tensor name (expected base_model.model.<module>.lora_A.weight, ...)")
            continue
        module, part = match["module"], match["part"]
        problem = _part_problem(spec, targets, module, part)
        if problem is not None:
            problems.append(f"{key}: {problem}")
        else:
            grouped.setdefault(module, {})[part] = tensor
    return grouped, problems


def _part_problem(spec: LoraSpec, targets: dict[str, TargetModule], module: str, part: str) -> str | None:
    """Why a tensor of this module and part does not belong in this adapter (None: it does)."""
    if module not in targets:
        if part == "bias":
            return f"bias of {module!r}: only linear layers' biases are served (bias='all' trained another kind)"
        return f"the base model has no linear module named {module!r}"
    if part == "bias":  # a trained bias of a module LoRA does not adapt
        if spec.bias != "all" or spec.targets(module):
            return f"a bias of {module!r} needs bias='all' (and the module not adapted)"
    elif not spec.targets(module):
        return f"module {module!r} is not selected by target_modules"
    elif part == "base_layer.bias" and spec.bias == "none":
        return f"a trained bias of {module!r} needs bias='lora_only' or 'all' in the config"
    elif part == "lora_B.bias" and not spec.lora_bias:
        return "lora_B.bias needs lora_bias=true in the config"
    if part in _BIAS_PARTS and targets[module].module.bias is None:
        return f"a bias for {module!r}, whose base layer has none"
    return None


def _check_module(
    module: str, parts: dict[str, torch.Tensor], spec: LoraSpec, target: TargetModule, max_rank: int
) -> list[str]:
    magnitude = parts.get("lora_magnitude_vector")
    needed = ("lora_A.weight", "lora_B.weight") if "bias" not in parts else ()
    needed += ("lora_B.bias",) if spec.lora_bias and needed else ()
    problems = [f"{module}: missing {p}" for p in needed if p not in parts]
    if spec.use_dora and magnitude is None:
        problems.append(f"{module}: use_dora is set but lora_magnitude_vector is missing")
    if not spec.use_dora and magnitude is not None:
        problems.append(f"{module}: lora_magnitude_vector present but use_dora is not set")
    if problems:
        return problems
    rank = spec.rank_for(module)
    expected = {
        "lora_A.weight": (rank, target.in_features),
        "lora_B.weight": (target.out_features, rank),
        **{part: (target.out_features,) for part in ("lora_magnitude_vector", *_BIAS_PARTS)},
    }
    for part, tensor in parts.items():
        if tuple(tensor.shape) != expected[part]:
            problems.append(f"{module}.{part}: shape {tuple(tensor.shape)}, expected {expected[part]} (r={rank})")
        if tensor.dtype not in _ALLOWED_DTYPES:
            problems.append(f"{module}.{part}: dtype {tensor.dtype} not allowed (float32, float16, bfloat16)")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{module}.{part}: contains NaN or Inf")
    if rank > max_rank:
        problems.append(f"{module}: rank {rank} exceeds the server's max_lora_rank {max_rank}")
    return problems


def _overflow_problems(module: str, weights: LoraModuleWeights) -> list[str]:
    """Finite factors can still overflow once scaled (a huge alpha) or cast to the serving dtype."""
    parts = {"lora_B (scaled)": weights.lora_b, "lora_A": weights.lora_a, "DoRA scale": weights.dora_scale,
             "bias": weights.bias}
    return [f"{module}: {part} is not finite in the serving dtype (alpha or weights too large)"
            for part, tensor in parts.items() if tensor is not None and not torch.isfinite(tensor).all()]


def _fold(
    parts: dict[str, torch.Tensor], spec: LoraSpec, module: str, target: TargetModule, dtype: torch.dtype
) -> LoraModuleWeights:
    a = parts.get("lora_A.weight", torch.zeros(0, target.in_features)).float()
    b = parts.get("lora_B.weight", torch.zeros(target.out_features, 0)).float() * spec.scale_for(module)
    dora_scale = None
    if spec.use_dora:
        # DoRA's column norm is constant at inference: compute it once here (PEFT detaches it too).
        weight = target.weight_out_in().detach()
        norm = torch.linalg.norm(weight.float() + (b @ a).to(weight.device), dim=1).cpu()
        dora_scale = parts["lora_magnitude_vector"].float() / norm
        b = b * dora_scale[:, None]
        dora_scale = dora_scale.to(dtype)
    return LoraModuleWeights(lora_a=a.to(dtype).contiguous(), lora_b=b.to(dtype).contiguous(), dora_scale=dora_scale,
                             bias=_bias_delta(parts, spec.scale_for(module), target, dtype))


def _bias_delta(parts: dict[str, torch.Tensor], scale: float, target: TargetModule, dtype: torch.dtype
                ) -> torch.Tensor | None:
    """What the adapter adds to the base's bias: its trained bias minus the base's, plus scale·lora_B.bias."""
    if not any(part in parts for part in _BIAS_PARTS):
        return None
    delta = torch.zeros(target.out_features)
    trained = parts.get("base_layer.bias", parts.get("bias"))
    if trained is not None:
        delta += trained.float() - target.module.bias.detach().float().cpu()
    if "lora_B.bias" in parts:
        delta += parts["lora_B.bias"].float() * scale
    return delta.to(dtype)
