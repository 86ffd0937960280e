"""Adapter forms beyond q/k/v/o deltas, made with PEFT and served equal to PEFT, alone and in mixed batches.

Each adapter is trained-looking: every parameter PEFT makes trainable (LoRA factors, biases, ...) is
perturbed, so each form changes the output (checked first), then compared with PEFT in a fresh instance.
"""

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.sequence import SamplingParams
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.factories import build_model, llama_config, make_engine, save_model
from tests.server_harness import RunningServer

MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
PROMPTS = [[5, 40, 77, 101, 9, 33], [120, 7, 7, 64], [200, 15, 88, 31, 45, 46, 47, 12, 3]]

FORMS = {
    "bias_lora_only": dict(seed=31, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], bias="lora_only"),
    "bias_all": dict(seed=32, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], bias="all"),
    "lora_bias": dict(seed=33, r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"], lora_bias=True),
    "layers_to_transform": dict(seed=34, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                layers_to_transform=[1]),
    "layers_pattern": dict(seed=35, r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                           layers_to_transform=[0], layers_pattern="layers"),
}


def make_form_adapter(base_dir, directory, seed: int, **lora_kwargs):
    """A PEFT adapter whose every trainable parameter is perturbed (LoRA factors, trained biases, copies)."""
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                scale = 0.3 if "lora_" in name else 0.1
                param.add_(scale * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(directory, save_embedding_layers=False)
    return directory


@pytest.fixture(scope="module")
def biased_dir(tmp_path_factory):
    """Llama with biases on every projection, so the bias forms have something to change."""
    config = llama_config(attention_bias=True, mlp_bias=True)
    return save_model(build_model(config), tmp_path_factory.mktemp("biased") / "base")


@pytest.fixture(scope="module")
def form_dirs(biased_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    return {name: make_form_adapter(biased_dir, root / name, **kwargs) for name, kwargs in FORMS.items()}


@pytest.fixture(scope="module")
def engine(biased_dir, form_dirs):
    engine = make_engine(biased_dir, max_loras=8)
    for name, directory in form_dirs.items():
        engine.load_adapter(name, directory)
    return engine


@pytest.fixture(scope="module")
def references(biased_dir, form_dirs):
    cache = {}

    def reference(prompt, name):
        key = (tuple(prompt), name)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(biased_dir, dtype=torch.float32)
            if name is not None:
                model = PeftModel.from_pretrained(model, form_dirs[name])
            with torch.inference_mode():
                out = model.eval().generate(
                    input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    return reference


def _alone(engine, prompt, name):
    return engine.generate([prompt], GREEDY, [name])[0].token_ids


def test_every_form_changes_the_output(engine):
    outputs = {name: tuple(_alone(engine, PROMPTS[0], name)) for name in [None, *FORMS]}
    assert len(set(outputs.values())) == len(outputs), outputs


def test_layer_filters_adapt_only_their_layers(engine):
    assert {m.split(".")[2] for m in engine.adapters["layers_to_transform"].modules} == {"1"}
    assert {m.split(".")[2] for m in engine.adapters["layers_pattern"].modules} == {"0"}


def test_bias_all_serves_biases_of_modules_lora_does_not_adapt(engine):
    adapter = engine.adapters["bias_all"]
    bias_only = [name for name, w in adapter.modules.items() if w.rank == 0]
    assert bias_only and all(adapter.modules[name].bias is not None for name in bias_only)


@pytest.mark.parametrize("name", FORMS)
def test_alone_matches_peft(engine, references, name):
    for prompt in PROMPTS[:2]:
        assert _alone(engine, prompt, name) == references(prompt, name)


def test_mixed_batch_matches_peft(engine, references):
    names = [None, *FORMS, None, "bias_all"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    for prompt, name, got in zip(prompts, names, engine.generate(prompts, GREEDY, names)):
        assert got.token_ids == references(prompt, name), name


def test_a_bias_adapter_is_not_merged(engine):
    """A merged copy holds weights only: a pin is recorded as a failed build and serving goes on unmerged."""
    before = _alone(engine, PROMPTS[0], "lora_bias")
    engine.pin_merged("lora_bias")
    engine.merges.wait_for_builds()
    try:
        assert "lora_bias" not in engine.merges.merged
        assert _alone(engine, PROMPTS[0], "lora_bias") == before
    finally:
        engine.unpin_merged("lora_bias")


def _upload(url: str, name: str, directory) -> httpx.Response:
    files = {part: (part, (directory / part).read_bytes()) for part in (CONFIG_FILE, WEIGHTS_FILE)}
    return httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, timeout=60)


@pytest.mark.parametrize("name", ["bias_all", "lora_bias", "layers_pattern"])
def test_uploaded_over_http_and_served_through_the_tiers(biased_dir, form_dirs, engine, tmp_path, name):
    """Upload -> blob store -> host cache -> device slot; the text equals the engine's, which equals PEFT's."""
    settings = Settings(model=biased_dir, dtype="float32", device="cpu", adapters_dir=tmp_path / "adapters",
                        kv_cache_memory=16 * 1024**2, max_loras=2)
    served = name.replace("_", "-")
    with RunningServer(settings) as server:
        response = _upload(server.url, served, form_dirs[name])
        assert response.status_code == 201, response.text
        body = {"model": served, "prompt": PROMPTS[1], "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
        choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["text"] == engine.generate([PROMPTS[1]], GREEDY, [name])[0].text
