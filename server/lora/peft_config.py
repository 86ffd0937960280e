"""Reading PEFT's `adapter_config.json`: the fields that change the math, and a refusal of the rest."""

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import AdapterValidationError
from server.lora.patterns import PatternError, compile_pattern

# Every number of a config must be finite: JSON from Python may carry Infinity and NaN.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

# Fields that change what an adapter computes in ways the batched low-rank path does not model.
# Each must be absent or hold its PEFT default (any value in the tuple) for the adapter to be served.
_UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "layer_replication": (None, []),
    "target_parameters": (None, []),
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
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    # Biases the adapter trained: "lora_only" those of adapted modules, "all" every one; lora_bias: a
    # bias on lora_B (scaled with it). Each is served as a per-token bias delta of the adapter's rows.
    bias: Literal["none", "lora_only", "all"] = "none"
    lora_bias: bool = False
    # Full per-adapter copies of these modules (a trained head, embeddings): never LoRA targets.
    modules_to_save: list[str] | None = None
    # Rows of an embedding the adapter replaces: a list for the input embedding, or {module: indices}.
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    # loraserve's key, not PEFT's: names of the new token ids of a resized vocabulary (server/lora/added_tokens.py)
    added_tokens: dict[str, int] | None = None

    def saves(self, module_name: str) -> bool:
        """Whether the adapter holds a full copy of this module (PEFT's modules_to_save match)."""
        return any(module_name == m or module_name.endswith("." + m) for m in self.modules_to_save or [])

    def token_indices(self, module_name: str, input_embedding: bool) -> list[int] | None:
        """The token rows the adapter replaces in this module, if any."""
        indices = self.trainable_token_indices
        if isinstance(indices, dict):
            return next((v for k, v in indices.items() if module_name == k or module_name.endswith("." + k)), None)
        return indices or None if input_embedding else None

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would adapt the module of this dotted name (same rules as PEFT's matcher)."""
        if self.exclude_modules and _matches(self.exclude_modules, module_name) or self.saves(module_name):
            return False
        if self.target_modules is None or not _matches(self.target_modules, module_name):
            return False
        # PEFT applies the layer filter to a list of targets only (a regex selects layers itself).
        return isinstance(self.target_modules, str) or self._in_layers(module_name)

    def _in_layers(self, module_name: str) -> bool:
        """PEFT's `layers_to_transform` / `layers_pattern`: the first numbered segment (after a segment
        named by a pattern, when given) is the layer index."""
        if self.layers_to_transform in (None, []):
            return True
        regexes = _layer_regexes(self.layers_pattern) or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        match = next((m for m in (compile_pattern(r).match(module_name) for r in regexes) if m is not None), None)
        if match is None:
            return False
        wanted = self.layers_to_transform
        return int(match.group("idx")) in (wanted if isinstance(wanted, list) else [wanted])

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


def _layer_regexes(layers_pattern: list[str] | str | None) -> list[str]:
    """PEFT's regex per `layers_pattern` entry: the number after that segment is the layer index."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
    return [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns]


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
    patterns += [("layers_pattern", regex) for regex in _layer_regexes(spec.layers_pattern)]
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
    problems = [f"rank_pattern.{k}: rank must be >= 1, got {v}" for k, v in spec.rank_pattern.items() if v < 1]
    if spec.lora_bias and spec.use_dora:
        problems.append("lora_bias: not supported together with use_dora (PEFT refuses it too)")
    return problems
