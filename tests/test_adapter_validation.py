"""Bad adapters are refused with a message that names the problem; nothing is ever unpickled."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from server.errors import AdapterValidationError
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, load_lora_adapter
from server.lora.peft_config import parse_lora_spec
from server.lora.targets import find_target_modules
from tests.factories import build_model, llama_config, make_adapter, save_model

PREFIX = "base_model.model.model.layers.0.self_attn"


@pytest.fixture(scope="module")
def targets(llama_dir):
    return find_target_modules(AutoModelForCausalLM.from_pretrained(llama_dir))


@pytest.fixture(scope="module")
def good_adapter(llama_adapters) -> Path:
    return llama_adapters("valid_r8", seed=21, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def adapter_copy(good_adapter, tmp_path) -> Path:
    return Path(shutil.copytree(good_adapter, tmp_path / "adapter"))


def _load(directory: Path, targets, max_rank: int = 64):
    return load_lora_adapter(directory, targets, name="x", max_rank=max_rank, dtype=torch.float32)


def _refusal(directory: Path, targets, max_rank: int = 64) -> str:
    with pytest.raises(AdapterValidationError) as info:
        _load(directory, targets, max_rank)
    return str(info.value)


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(changes)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(directory / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)


def test_valid_adapter_loads_with_scale_folded(good_adapter, targets):
    adapter = _load(good_adapter, targets)
    assert sorted(adapter.modules) == sorted(n for n in targets if n.endswith(("q_proj", "v_proj")))
    raw = load_file(good_adapter / WEIGHTS_FILE)
    folded = adapter.modules["model.layers.0.self_attn.q_proj"].lora_b
    torch.testing.assert_close(folded, raw[f"{PREFIX}.q_proj.lora_B.weight"] * (16 / 8))
    assert adapter.trainable_parameters == sum(t.numel() for t in raw.values())


def test_pickle_is_refused_and_never_opened(adapter_copy, targets):
    (adapter_copy / WEIGHTS_FILE).unlink()
    (adapter_copy / "adapter_model.bin").write_bytes(b"\x80\x04 not even a real pickle")
    assert "pickle files are refused" in _refusal(adapter_copy, targets)


@pytest.mark.parametrize("changes,field", [
    ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    ({"bias": "everything"}, "bias"),  # "lora_only" and "all" are served (tests/test_adapter_forms.py)
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": "first"}, "layers_to_transform"),
    ({"lora_bias": True, "use_dora": True}, "lora_bias"),
    ({"r": "eight"}, "r"),
    ({"use_dora": "yes"}, "use_dora"),
    ({"target_modules": None}, "target_modules"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
])
def test_unsupported_or_wrong_config_names_the_field(adapter_copy, targets, changes, field):
    _edit_config(adapter_copy, **changes)
    assert f"{field}" in _refusal(adapter_copy, targets)


def test_every_problem_is_reported_at_once():
    with pytest.raises(AdapterValidationError) as info:
        parse_lora_spec({"peft_type": "IA3", "bias": "everything", "r": "x", "target_modules": ["q_proj"]})
    assert len(info.value.problems) == 3


def test_config_must_be_a_json_object(adapter_copy, targets):
    (adapter_copy / CONFIG_FILE).write_text("[1, 2]")
    assert "JSON object" in _refusal(adapter_copy, targets)
    (adapter_copy / CONFIG_FILE).write_text("{not json")
    assert "not valid JSON" in _refusal(adapter_copy, targets)


def test_rank_above_the_limit(adapter_copy, targets):
    assert "exceeds the server's max_lora_rank 4" in _refusal(adapter_copy, targets, max_rank=4)


def test_nan_values(adapter_copy, targets):
    def poison(t):
        t[f"{PREFIX}.q_proj.lora_B.weight"][0, 0] = float("nan")
    _edit_tensors(adapter_copy, poison)
    assert "q_proj.lora_B.weight: contains NaN or Inf" in _refusal(adapter_copy, targets)


def test_integer_dtype(adapter_copy, targets):
    def to_int(t):
        t[f"{PREFIX}.v_proj.lora_A.weight"] = t[f"{PREFIX}.v_proj.lora_A.weight"].to(torch.int32)
    _edit_tensors(adapter_copy, to_int)
    assert "dtype torch.int32 not allowed" in _refusal(adapter_copy, targets)


def test_wrong_shape(adapter_copy, targets):
    def reshape(t):
        t[f"{PREFIX}.q_proj.lora_A.weight"] = torch.zeros(8, 65)
    _edit_tensors(adapter_copy, reshape)
    assert "q_proj.lora_A.weight: shape (8, 65), expected (8, 64)" in _refusal(adapter_copy, targets)


def test_tensor_for_a_module_the_base_lacks(adapter_copy, targets):
    def add(t):
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    _edit_tensors(adapter_copy, add)
    assert "no linear module named 'model.layers.9.self_attn.q_proj'" in _refusal(adapter_copy, targets)


def test_unknown_tensor_name(adapter_copy, targets):
    _edit_tensors(adapter_copy, lambda t: t.update({"something.else": torch.zeros(2)}))
    assert "something.else: not a LoRA tensor name" in _refusal(adapter_copy, targets)


def test_missing_half_of_a_module(adapter_copy, targets):
    _edit_tensors(adapter_copy, lambda t: t.pop(f"{PREFIX}.v_proj.lora_B.weight"))
    assert "model.layers.0.self_attn.v_proj: missing lora_B.weight" in _refusal(adapter_copy, targets)


def test_module_targeted_but_absent(adapter_copy, targets):
    _edit_tensors(adapter_copy, lambda t: [t.pop(k) for k in list(t) if "layers.1.self_attn.q_proj" in k])
    assert "model.layers.1.self_attn.q_proj: adapted by target_modules but has no weights" in _refusal(adapter_copy, targets)


def test_truncated_safetensors(adapter_copy, targets):
    data = (adapter_copy / WEIGHTS_FILE).read_bytes()
    (adapter_copy / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    assert "not a valid safetensors file" in _refusal(adapter_copy, targets)


def test_adapter_for_another_base(tmp_path, targets):
    """Same architecture, other dimensions: shapes do not match this base."""
    other_base = save_model(build_model(llama_config(hidden_size=32, intermediate_size=64)), tmp_path / "other")
    other = make_adapter(other_base, tmp_path / "other_adapter", seed=1, r=4, lora_alpha=8)
    message = _refusal(other, targets)
    assert "shape (4, 32), expected (4, 64)" in message


# ---- numbers and patterns from a tenant's config --------------------------------------------------

@pytest.mark.parametrize("changes, expected", [
    ({"lora_alpha": float("inf")}, "lora_alpha: Input should be a finite number"),
    ({"lora_alpha": float("nan")}, "lora_alpha: Input should be a finite number"),
    ({"alpha_pattern": {"q_proj": float("-inf")}}, "alpha_pattern.q_proj: Input should be a finite number"),
    ({"lora_alpha": 1e300}, "is not finite in the serving dtype"),
    ({"target_modules": "("}, "target_modules: not a valid regular expression"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern.(: not a valid regular expression"),
    ({"exclude_modules": "[z-a]"}, "exclude_modules: not a valid regular expression"),
    ({"target_modules": r"(?=.*0\.self_attn\.q_proj$).{6}(?:.+)+X"}, "lookaround and backreferences"),
    ({"target_modules": "q" * 2000}, "longer than 1024 characters"),
], ids=["alpha-inf", "alpha-nan", "alpha-pattern-inf", "alpha-overflows", "bad-regex", "bad-rank-key",
        "bad-exclude", "lookahead", "too-long"])
def test_config_numbers_and_patterns_are_checked(adapter_copy, targets, changes, expected):
    _edit_config(adapter_copy, **changes)
    assert expected in _refusal(adapter_copy, targets)


@pytest.mark.timeout(60)  # under a backtracking engine this test would run for hours
def test_a_backtracking_pattern_matches_in_linear_time(adapter_copy, targets):
    """`(?:.+)+X`-style patterns take time exponential in the module name's length under Python's `re`;
    under RE2 the config is refused like any other that selects nothing it ships weights for."""
    _edit_config(adapter_copy, target_modules=r"(?:.+)+(?:.+)+(?:.+)+(?:.+)+X")
    assert "is not selected by target_modules" in _refusal(adapter_copy, targets)
