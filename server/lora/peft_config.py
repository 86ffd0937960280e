"""Reading PEFT's `adapter_config.json`: the fields that change the math, and a refusal of the rest."""

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import AdapterValidationError
from server.lora.patterns import PatternError, compile_pattern

# Every number of a config must be finite: JSON from Python may carry Infinity and NaN.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

# Fields that change what an adapter computes in ways the batched low-rank path does not model.
# Each must be absent or hold its PEFT default (any value in the tuple) for the adapter to be served.
_UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "bias": ("none",),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False),
}


class LoraSpec(BaseModel):
    """The parts of a PEFT LoRA config that loraserve honours."""

    model_config = ConfigDict(extra="ignore", strict=True)

    peft_type: str = "LORA"
    r: int = Field(8, ge=1)
    lora_alpha: FiniteFloat = 8.0
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, FiniteFloat] = Field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would adapt the module of this dotted name (same rules as PEFT's matcher)."""
        if self.exclude_modules and _matches(self.exclude_modules, module_name):
            return False
        return self.target_modules is not None and _matches(self.target_modules, module_name)

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def scale_for(self, module_name: str) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA, with the per-module overrides applied."""
        rank = self.rank_for(module_name)
        key = _pattern_key(self.alpha_pattern, module_name)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _matches(targets: list[str] | str, module_name: str) -> bool:
    if isinstance(targets, str):
        return compile_pattern(targets).fullmatch(module_name) is not None
    return module_name in targets or any(module_name.endswith("." + t) for t in targets)


def _key_pattern(key: str) -> str:
    """How PEFT's `get_pattern_key` reads a rank_pattern/alpha_pattern key: a match at the name's end."""
    return rf"(.*\.)?({key})$"


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the name."""
    for key in patterns:
        if compile_pattern(_key_pattern(key)).match(module_name):
            return key
    return None


def _pattern_problems(spec: LoraSpec) -> list[str]:
    """Every regular expression of the config, compiled now so that matching can never fail later."""
    patterns = [(f, getattr(spec, f)) for f in ("target_modules", "exclude_modules") if isinstance(getattr(spec, f), str)]
    patterns += [(f"{f}.{key}", _key_pattern(key)) for f in ("rank_pattern", "alpha_pattern") for key in getattr(spec, f)]
    problems = []
    for where, pattern in patterns:
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def parse_lora_spec(raw: Any) -> LoraSpec:
    """Validate a decoded adapter_config.json; every problem is reported at once, naming its field."""
    if not isinstance(raw, dict):
        raise AdapterValidationError(["adapter_config.json: must be a JSON object"])
    problems = []
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        problems.append(f"peft_type: {peft_type!r} is not supported (only 'LORA')")
    for field, allowed in _UNSUPPORTED_FIELDS.items():
        if field in raw and raw[field] not in allowed:
            problems.append(f"{field}: {raw[field]!r} is not supported (allowed: {allowed[0]!r})")
    if raw.get("target_modules") is None:
        problems.append("target_modules: required")
    # PEFT writes floats for integers and vice versa in the wild; accept numbers where numbers go.
    coerced = dict(raw)
    if isinstance(coerced.get("lora_alpha"), int) and not isinstance(coerced.get("lora_alpha"), bool):
        coerced["lora_alpha"] = float(coerced["lora_alpha"])
    if isinstance(coerced.get("alpha_pattern"), dict):
        coerced["alpha_pattern"] = {
            k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in coerced["alpha_pattern"].items()
        }
    try:
        spec = LoraSpec.model_validate(coerced)
    except ValidationError as exc:
        problems.extend(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        spec = None
    if spec is not None:
        problems.extend(_rank_problems(spec) + _pattern_problems(spec))
    if problems:
        raise AdapterValidationError(problems)
    return spec


def _rank_problems(spec: LoraSpec) -> list[str]:
    return [f"rank_pattern.{k}: rank must be >= 1, got {v}" for k, v in spec.rank_pattern.items() if v < 1]
