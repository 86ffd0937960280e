"""Shared fixtures: small random base models saved to disk, and PEFT adapters built on them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.factories import build_model, gpt2_config, llama_config, make_adapter, save_model

# Tiny models gain nothing from threads, and OpenMP threads spinning against another busy process
# (a server under test, a benchmark) slow a test down a hundredfold.
torch.set_num_threads(1)


class AdapterFactory:
    """Builds PEFT adapters for one base directory, each once per test session."""

    def __init__(self, base_dir: Path, root: Path):
        self.base_dir = base_dir
        self.root = root
        self._built: dict[str, Path] = {}

    def __call__(self, name: str, seed: int, **lora_kwargs) -> Path:
        if name not in self._built:
            self._built[name] = make_adapter(self.base_dir, self.root / name, seed=seed, **lora_kwargs)
        return self._built[name]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_model(build_model(llama_config()), tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_model(build_model(gpt2_config(), std=0.3), tmp_path_factory.mktemp("gpt2") / "base")


@pytest.fixture(scope="session")
def llama_adapters(llama_dir, tmp_path_factory) -> AdapterFactory:
    return AdapterFactory(llama_dir, tmp_path_factory.mktemp("llama_adapters"))


@pytest.fixture(scope="session")
def gpt2_adapters(gpt2_dir, tmp_path_factory) -> AdapterFactory:
    return AdapterFactory(gpt2_dir, tmp_path_factory.mktemp("gpt2_adapters"))


def reference_model(base_dir: Path, adapter_dir: Path | None, merge: bool = False):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
        if merge:
            model = model.merge_and_unload(safe_merge=True)
    return model.eval()


def reference_logprobs(base_dir: Path, prompt: list[int], adapter_dir: Path | None = None) -> torch.Tensor:
    """Next-token log-probabilities after `prompt` from transformers/PEFT: (vocab,)."""
    with torch.inference_mode():
        logits = reference_model(base_dir, adapter_dir)(input_ids=torch.tensor([prompt])).logits
    return torch.log_softmax(logits[0, -1].float(), dim=-1)


def reference_greedy(base_dir: Path, prompt: list[int], max_new_tokens: int, adapter_dir: Path | None = None,
                     merge: bool = False) -> list[int]:
    """Greedy tokens from plain transformers (adapter_dir None) or PEFT, in a fresh model instance."""
    model = reference_model(base_dir, adapter_dir, merge)
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()
