"""Adapter forms beyond q/k/v/o deltas, made with PEFT and served equal to PEFT, alone and in mixed batches.

Each adapter is trained-looking: every parameter PEFT makes trainable (LoRA factors, biases, ...) is
perturbed, so each form changes the output (checked first), then compared with PEFT in a fresh instance.
"""

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.sequence import SamplingParams
from server.errors import AdapterValidationError
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import reference_greedy
from tests.factories import build_model, llama_config, make_engine, resize_favouring_new_tokens, save_model
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
    "lm_head_lora": dict(seed=36, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]),
    "embed_lora": dict(seed=37, r=8, lora_alpha=16, target_modules=["embed_tokens", "v_proj"]),
    "saved_head": dict(seed=38, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "saved_embed": dict(seed=39, r=4, lora_alpha=8, target_modules=["o_proj"], modules_to_save=["embed_tokens"]),
    "saved_linear": dict(seed=40, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["up_proj"]),
    "trainable_tokens": dict(seed=41, r=4, lora_alpha=8, target_modules=["v_proj"],
                             trainable_token_indices=[5, 40, 77, 120, 7, 200, 15]),
}


def make_form_adapter(base_dir, directory, seed: int, vocabulary: int | None = None, save_embedding_layers=False,
                      **lora_kwargs):
    """A PEFT adapter whose every trainable parameter is perturbed (LoRA factors, trained biases, copies);
    with `vocabulary`, trained on the base resized to that many tokens (tests/test_resized_vocabulary.py)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if vocabulary is not None:
        resize_favouring_new_tokens(base, vocabulary, seed)
    peft_model = get_peft_model(base, LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                scale = 0.3 if "lora_" in name else 0.1
                param.add_(scale * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(directory, save_embedding_layers=save_embedding_layers)
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
            cache[key] = reference_greedy(biased_dir, prompt, MAX_NEW, form_dirs[name] if name else None)
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


@pytest.mark.parametrize("name", FORMS)
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


GPT2_FORMS = {  # GPT-2 ties its output head to the input embedding
    "tied_tokens": dict(seed=51, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                        trainable_token_indices=[5, 40, 77, 120, 7, 64]),
    "wte_lora": dict(seed=52, r=8, lora_alpha=16, target_modules=["wte", "c_fc"], fan_in_fan_out=True),
}


def test_gpt2_tied_embedding_forms_match_peft(gpt2_dir, tmp_path):
    """Trainable tokens on a tied embedding change the head's rows too (PEFT ties them); an embedding
    LoRA changes only the input side."""
    dirs = {name: make_form_adapter(gpt2_dir, tmp_path / name, **kwargs) for name, kwargs in GPT2_FORMS.items()}
    engine = make_engine(gpt2_dir, max_loras=4)
    for name, directory in dirs.items():
        engine.load_adapter(name, directory)
    assert "lm_head" in engine.adapters["tied_tokens"].modules
    names = [None, *GPT2_FORMS, "tied_tokens"]
    prompts = [PROMPTS[i % 2] for i in range(len(names))]
    batched = engine.generate(prompts, GREEDY, names)
    assert len({tuple(c.token_ids) for c in batched[:3]}) == 3
    for prompt, name, got in zip(prompts, names, batched):
        assert got.token_ids == reference_greedy(gpt2_dir, prompt, MAX_NEW, dirs[name] if name else None), name


def test_a_resized_head_without_the_embeddings_rows_is_refused_by_name(biased_dir, form_dirs, tmp_path):
    """Served only with the new rows of both (tests/test_resized_vocabulary.py): here the embedding lacks them."""
    directory = tmp_path / "resized"
    directory.mkdir()
    (directory / CONFIG_FILE).write_bytes((form_dirs["saved_head"] / CONFIG_FILE).read_bytes())
    tensors = load_file(form_dirs["saved_head"] / WEIGHTS_FILE)
    head = tensors["base_model.model.lm_head.weight"]
    tensors["base_model.model.lm_head.weight"] = torch.cat([head, torch.randn(3, head.shape[1])])
    save_file(tensors, directory / WEIGHTS_FILE)
    engine = make_engine(biased_dir, max_loras=2)
    with pytest.raises(AdapterValidationError, match=r"model\.embed_tokens: the adapter's vocabulary has 262 rows, "
                                                     r"the base's 259; model\.embed_tokens needs the new rows too"):
        engine.load_adapter("resized", directory)


def test_full_copies_count_in_host_bytes_and_slot_pool(engine, form_dirs):
    adapter = engine.adapters["saved_head"]
    copy = adapter.modules["lm_head"].copy[0]
    assert adapter.nbytes >= copy.numel() * copy.element_size()
    engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0), ["saved_head"])
    assert engine.slots.per_slot_bytes >= copy.numel() * copy.element_size()


def test_an_upload_whose_copies_exceed_the_limit_is_refused_before_storing(biased_dir, form_dirs, tmp_path):
    """The copy is in the weights file: a limit above a LoRA-only upload and below this one refuses it."""
    size = (form_dirs["saved_head"] / WEIGHTS_FILE).stat().st_size
    lora_only = (form_dirs["lora_bias"] / WEIGHTS_FILE).stat().st_size
    assert lora_only < size // 2
    settings = Settings(model=biased_dir, dtype="float32", device="cpu", adapters_dir=tmp_path / "adapters",
                        kv_cache_memory=16 * 1024**2, max_upload_size=size // 2)
    with RunningServer(settings) as server:
        assert _upload(server.url, "lora-bias", form_dirs["lora_bias"]).status_code == 201
        response = _upload(server.url, "saved-head", form_dirs["saved_head"])
        assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"
        listed = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in listed if m["id"] == "saved-head"] == []


def test_dora_on_the_head_is_refused_by_name(biased_dir, tmp_path):
    directory = make_form_adapter(biased_dir, tmp_path / "dora_head", seed=61, r=4, lora_alpha=8, use_dora=True,
                                  target_modules=["q_proj", "lm_head"])
    engine = make_engine(biased_dir, max_loras=2)
    with pytest.raises(AdapterValidationError, match=r"use_dora on 'lm_head'"):
        engine.load_adapter("dora-head", directory)
