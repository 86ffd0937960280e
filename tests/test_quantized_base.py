"""A base quantized by bitsandbytes (NF4, int8) serves adapters exactly as PEFT does on the SAME quantized model.

PEFT's references load the base with the same `BitsAndBytesConfig` the server builds for `--quantization`
and put the adapter on top (QLoRA's serving path). Tolerances for next-token logprobs:
- NF4 (and FP4): the 4-bit codes are dequantized to a float32 matrix before an ordinary matmul, on both
  sides, so only the summation order differs (the packed batch against PEFT's one sequence): 1e-4, as on
  a full-precision base (tests/test_parity.py).
- int8 (vector-wise, no outlier threshold: see `_bnb_config`): activations are quantized too, per row, to 127 levels of their largest value. A
  float32 rounding difference upstream (summation order) can move one activation code by one level, a
  relative step of 1/127 ≈ 0.8% of that row's largest value, which reaches the logits: 2e-3 covers it
  (the largest difference measured here was below 5e-4). Greedy equality is then meaningful only where
  PEFT's top token leads the next by more than that, which the tests check before comparing.

DoRA over a quantized base has no PEFT reference on this CPU: on int8 PEFT's DoRA fails inside
bitsandbytes (`int8_mm_dequant` without column statistics), and on 4-bit, bitsandbytes repacks the weights
for AVX512-BF16 at the first forward, which PEFT's DoRA then dequantizes as if it were the original layout
(peft `dequantize_module_weight` -> bnb `dequantize_4bit`): wrong column norms. loraserve reads the matrix
through the layer's own forward (`dense_weight`, checked below against the layer); its DoRA adapter is
served in the mixed batch and must give there what it gives alone.
"""

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.model_loader import _bnb_config, base_footprint, load_base_model, load_tokenizer
from server.engine.sequence import SamplingParams
from server.lora.quantized import dense_weight
from tests.server_harness import RunningServer

MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
PROMPTS = [[5, 40, 77, 101, 9, 33], [120, 7, 7, 64], [200, 15, 88, 31, 45, 46, 47, 12, 3]]
TOLERANCE = {"bnb-nf4": 1e-4, "bnb-int8": 2e-3}
ADAPTERS = {
    "q_v": dict(seed=21, r=8, lora_alpha=16),
    "mlp_r4": dict(seed=22, r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "attn_r16": dict(seed=23, r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "dora": dict(seed=24, r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}
METHODS = ["bnb-nf4", "bnb-int8"]


def _engine(model_dir, quantization: str, **settings) -> LLMEngine:
    values = dict(model=model_dir, dtype="float32", device="cpu", kv_cache_memory=32 * 1024**2, max_loras=8,
                  max_lora_rank=64, merged_budget=64 * 1024**2, merge_promote_share=2.0, quantization=quantization)
    values.update(settings)
    model = load_base_model(model_dir, torch.float32, torch.device("cpu"), quantization)
    return LLMEngine(model, load_tokenizer(model_dir), Settings(**values))


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {name: llama_adapters(f"quant-{name}", **kwargs) for name, kwargs in ADAPTERS.items()}


@pytest.fixture(scope="module")
def engines(llama_dir, adapter_dirs):
    built = {}
    for method in METHODS:
        engine = _engine(llama_dir, method)
        for name, directory in adapter_dirs.items():
            engine.load_adapter(name, directory)
        built[method] = engine
    return built


def _peft(base_dir, method: str, adapter_dir=None):
    """PEFT on the same quantized base, in a fresh instance (bitsandbytes' config built as the server does)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map="cpu",
                                                 quantization_config=_bnb_config(method, torch.float32))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def _peft_greedy(base_dir, method, prompt, adapter_dir=None) -> tuple[list[int], list[float]]:
    """PEFT's greedy tokens and, at each step, the lead of its top token over the second (logprobs)."""
    model = _peft(base_dir, method, adapter_dir)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    margins = [float(top[0] - top[1]) for top in (torch.log_softmax(s[0], -1).topk(2).values for s in out.scores)]
    return out.sequences[0, len(prompt):].tolist(), margins


def _peft_decided(base_dir, method, prompt, adapter_dir=None) -> list[int]:
    """PEFT's greedy tokens up to its first near-tie: a step whose top two logprobs are closer than the
    tolerance may go either way within it, and every later token follows from that choice."""
    tokens, margins = _peft_greedy(base_dir, method, prompt, adapter_dir)
    decided = next((i for i, m in enumerate(margins) if m <= TOLERANCE[method]), len(tokens))
    assert decided >= MAX_NEW // 2, f"PEFT's greedy path has a near-tie at step {decided}: too short to compare"
    return tokens[:decided]


@pytest.fixture(scope="module")
def references(llama_dir, adapter_dirs):
    cache = {}

    def reference(method, prompt, name):
        key = (method, tuple(prompt), name)
        if key not in cache:
            cache[key] = _peft_decided(llama_dir, method, prompt, adapter_dirs[name] if name else None)
        return cache[key]

    return reference


def _alone(engine, prompt, name):
    return engine.generate([prompt], GREEDY, [name])[0].token_ids


def _agrees(got: list[int], expected: list[int]) -> bool:
    return got[:len(expected)] == expected


@pytest.mark.parametrize("method", METHODS)
def test_the_base_is_quantized_and_adapters_change_the_output(engines, method):
    engine = engines[method]
    assert base_footprint(engine.model).quantization == method
    assert any(t.quantized for t in engine.targets.values()), "the LoRA path must wrap the quantized layers"
    outputs = {name: tuple(_alone(engine, PROMPTS[0], name)) for name in [None, *ADAPTERS]}
    assert len(set(outputs.values())) == len(outputs), outputs


COMPARED = [None, *(name for name in ADAPTERS if name != "dora")]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", COMPARED)
def test_alone_matches_peft_on_the_same_quantized_base(engines, references, method, name):
    for prompt in PROMPTS[:2]:
        assert _agrees(_alone(engines[method], prompt, name), references(method, prompt, name))


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_matches_peft_on_the_same_quantized_base(engines, references, method):
    names = [None, *ADAPTERS, None, "q_v"]  # DoRA too: it must not disturb the others' rows
    prompts = [PROMPTS[i % 2] for i in range(len(names))]  # the prompts whose references have no early tie
    batched = engines[method].generate(prompts, GREEDY, names)
    alone = {name: _alone(engines[method], prompts[names.index(name)], name) for name in ["dora"]}
    for prompt, name, got in zip(prompts, names, batched):
        if name in COMPARED:
            assert _agrees(got.token_ids, references(method, prompt, name)), (method, name)
        else:
            assert got.token_ids == alone[name]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", [None, "q_v", "attn_r16"])
def test_next_token_logprobs_within_the_stated_tolerance(llama_dir, engines, adapter_dirs, method, name):
    engine = engines[method]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
    request_id = f"quant-logprobs-{method}-{name}"
    engine.add_request(request_id, PROMPTS[2], params, name)
    (output,) = [o for o in engine.step() if o.request_id == request_id]
    with torch.inference_mode():
        logits = _peft(llama_dir, method, adapter_dirs[name] if name else None)(input_ids=torch.tensor([PROMPTS[2]])).logits
    expected = torch.log_softmax(logits[0, -1].float(), dim=-1)
    got = output.logprobs[0]
    assert [i for i, _ in got.top] == expected.topk(5).indices.tolist()
    assert [v for _, v in got.top] == pytest.approx(expected.topk(5).values.tolist(), abs=TOLERANCE[method])


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-fp4", "bnb-int8"])
def test_dense_weight_is_what_the_layer_multiplies_by(llama_dir, method):
    model = load_base_model(llama_dir, torch.float32, torch.device("cpu"), method)
    layer = model.model.layers[0].mlp.down_proj  # not square: (64, 128)
    x = torch.randn(5, layer.in_features)
    with torch.inference_mode():
        expected = layer(x)
        # The 4-bit CPU kernel rounds to bfloat16 (AVX512-BF16) and int8 quantizes x (1/127 of its largest
        # value); one-hot rows are exact in both, so the matrix read is the layer's own.
        tol = 5e-2 if method == "bnb-int8" else 1e-2
        assert torch.allclose(x @ dense_weight(layer).T, expected, rtol=tol, atol=tol)
        assert torch.equal(layer(x), expected), "reading the weight must leave the layer as it was"


def test_quantized_base_holds_fewer_bytes(llama_dir, engines):
    full = base_footprint(load_base_model(llama_dir, torch.float32, torch.device("cpu"))).resident_bytes
    nf4 = base_footprint(engines["bnb-nf4"].model).resident_bytes
    int8 = base_footprint(engines["bnb-int8"].model).resident_bytes
    # This model is mostly embeddings (vocabulary 259 x 64, not quantized): the ratios are the bench's job.
    assert nf4 < int8 < full


@pytest.mark.parametrize("method", METHODS)
def test_no_merged_copy_on_a_quantized_base(engines, method):
    """A dense merged copy changed next-token logprobs by 6.5e-3 (nf4) and 7.8e-3 (int8), beyond the
    tolerances above: a pin records a failed build with the reason, and serving goes on unmerged."""
    engine = engines[method]
    before = _alone(engine, PROMPTS[0], "q_v")
    assert not engine.merges.policy.enabled
    engine.pin_merged("q_v")
    engine.merges.wait_for_builds()
    try:
        assert "q_v" not in engine.merges.merged
        (event,) = [e for e in engine.merges.events if e.adapter == "q_v"]
        assert event.action == "failed" and "quantized base" in event.reason
        assert _alone(engine, PROMPTS[0], "q_v") == before
    finally:
        engine.unpin_merged("q_v")


def test_a_pre_quantized_checkpoint_loads_as_such(llama_dir, tmp_path, adapter_dirs, references):
    saved = tmp_path / "nf4"
    _peft(llama_dir, "bnb-nf4").save_pretrained(saved)
    load_tokenizer(llama_dir).save_pretrained(saved)
    engine = _engine(saved, "none")
    assert base_footprint(engine.model).quantization == "bnb-nf4"
    engine.load_adapter("q_v", adapter_dirs["q_v"])
    assert _agrees(_alone(engine, PROMPTS[0], "q_v"), references("bnb-nf4", PROMPTS[0], "q_v"))
    with pytest.raises(ValueError, match="already quantized"):
        load_base_model(saved, torch.float32, torch.device("cpu"), "bnb-int8")


def test_models_and_metrics_show_the_quantization(llama_dir, tmp_path):
    saved = tmp_path / "int8"
    _peft(llama_dir, "bnb-int8").save_pretrained(saved)
    load_tokenizer(llama_dir).save_pretrained(saved)
    settings = Settings(model=saved, dtype="float32", device="cpu", adapters_dir=tmp_path / "adapters",
                        kv_cache_memory=16 * 1024**2, max_loras=4)
    with RunningServer(settings) as server:
        card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        metrics = httpx.get(f"{server.url}/metrics").text
    assert card["quantization"] == "bnb-int8" and card["resident_bytes"] > 0
    assert f'loraserve_base_resident_bytes{{quantization="bnb-int8"}} {float(card["resident_bytes"])}' in metrics


def test_the_quantization_flag_quantizes_the_served_base(llama_dir, tmp_path):
    """`--quantization bnb-nf4` on a full-precision directory: the server's base is NF4, and smaller."""
    settings = Settings(model=llama_dir, dtype="float32", device="cpu", adapters_dir=tmp_path / "adapters",
                        kv_cache_memory=16 * 1024**2, max_loras=4, quantization="bnb-nf4")
    with RunningServer(settings) as server:
        card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        answer = httpx.post(f"{server.url}/v1/completions", json={
            "model": card["id"], "prompt": "hello", "max_tokens": 3, "temperature": 0}).json()
    full = base_footprint(load_base_model(llama_dir, torch.float32, torch.device("cpu"))).resident_bytes
    assert card["quantization"] == "bnb-nf4" and card["resident_bytes"] < 0.5 * full
    assert answer["usage"]["completion_tokens"] == 3


QUANT_FORMS = {  # adapter forms on a quantized base (the head and the embedding stay unquantized)
    "head_lora": dict(seed=71, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]),
    "saved_head": dict(seed=72, r=4, lora_alpha=8, target_modules=["o_proj"], modules_to_save=["lm_head"]),
    "embed_lora": dict(seed=73, r=8, lora_alpha=16, target_modules=["embed_tokens", "down_proj"]),
    "tokens": dict(seed=75, r=4, lora_alpha=8, target_modules=["v_proj"], trainable_token_indices=[5, 40, 120, 7]),
    "layers": dict(seed=74, r=8, lora_alpha=16, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
}


def test_adapter_forms_on_a_quantized_base_match_peft(llama_dir, tmp_path):
    from tests.test_adapter_forms import make_form_adapter

    dirs = {name: make_form_adapter(llama_dir, tmp_path / name, **kwargs) for name, kwargs in QUANT_FORMS.items()}
    engine = _engine(llama_dir, "bnb-nf4")
    for name, directory in dirs.items():
        engine.load_adapter(name, directory)
    names = [None, *QUANT_FORMS]
    prompts = [PROMPTS[i % 2] for i in range(len(names))]
    batched = engine.generate(prompts, GREEDY, names)
    assert len({tuple(c.token_ids) for c in batched}) == len(names)
    for prompt, name, got in zip(prompts, names, batched):
        assert _agrees(got.token_ids, _peft_decided(llama_dir, "bnb-nf4", prompt, dirs[name] if name else None)), name


def test_gpt2_conv1d_quantized_matches_peft(gpt2_dir, gpt2_adapters):
    """bitsandbytes turns GPT-2's Conv1D into Linear4bit (weight (out, in)); its adapters still apply."""
    adapter_dir = gpt2_adapters("quant-gpt2", seed=81, r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"],
                                fan_in_fan_out=True)
    engine = _engine(gpt2_dir, "bnb-nf4")
    engine.load_adapter("attn", adapter_dir)
    assert not any(t.fan_in_fan_out for t in engine.targets.values() if t.quantized)
    batched = engine.generate([PROMPTS[0], PROMPTS[0]], GREEDY, [None, "attn"])
    assert batched[0].token_ids != batched[1].token_ids
    for name, got in zip([None, "attn"], batched):
        assert _agrees(got.token_ids, _peft_decided(gpt2_dir, "bnb-nf4", PROMPTS[0], adapter_dir if name else None)), name
