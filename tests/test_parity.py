"""Greedy float32 output of the engine equals transformers' generate (base) and PEFT's (every adapter form)."""

import random

import pytest
import torch

from server.engine.sequence import SamplingParams
from tests.conftest import reference_model, reference_greedy, reference_logprobs
from tests.factories import make_engine

MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
PROMPTS = [[5, 40, 77, 101, 9, 33], [120, 7, 7, 64], [200, 15, 88, 31, 45, 46, 47, 12, 3]]

LLAMA_ADAPTERS = {
    "r4_alpha8": dict(seed=1, r=4, lora_alpha=8),
    "r16_alpha4_attn": dict(seed=2, r=16, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r8_alpha32": dict(seed=3, r=8, lora_alpha=32, target_modules=["q_proj", "o_proj"]),
    "rslora": dict(seed=4, r=16, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    "mlp": dict(seed=5, r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "patterns": dict(seed=6, r=8, lora_alpha=16,
                     target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                     rank_pattern={"q_proj": 4, "down_proj": 2}, alpha_pattern={"v_proj": 40}),
    "regex_targets": dict(seed=7, r=6, lora_alpha=12, target_modules=r".*\.(k_proj|up_proj)"),
    "dora": dict(seed=8, r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}
GPT2_ADAPTERS = {
    "attn": dict(seed=11, r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "mlp_rslora": dict(seed=12, r=4, lora_alpha=8, use_rslora=True, target_modules=["c_fc"], fan_in_fan_out=True),
    "dora": dict(seed=13, r=8, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
}


def _engine_with(base_dir, factory, adapters: dict):
    # merged copies only when pinned: automatic promotion would make these tests about the merged path
    engine = make_engine(base_dir, merged_budget=64 * 1024**2, merge_promote_share=2.0)
    for name, kwargs in adapters.items():
        engine.load_adapter(name, factory(name, **kwargs))
    return engine


@pytest.fixture(scope="module")
def llama_engine(llama_dir, llama_adapters):
    return _engine_with(llama_dir, llama_adapters, LLAMA_ADAPTERS)


@pytest.fixture(scope="module")
def gpt2_engine(gpt2_dir, gpt2_adapters):
    return _engine_with(gpt2_dir, gpt2_adapters, GPT2_ADAPTERS)


def _alone(engine, prompt, adapter):
    return engine.generate([prompt], GREEDY, [adapter])[0].token_ids


@pytest.mark.parametrize("engine_name,adapters", [("llama_engine", LLAMA_ADAPTERS), ("gpt2_engine", GPT2_ADAPTERS)])
def test_adapters_change_the_output(request, engine_name, adapters):
    """Without this, equality with PEFT would prove nothing: every adapter must steer generation."""
    engine = request.getfixturevalue(engine_name)
    outputs = {name: tuple(_alone(engine, PROMPTS[0], name)) for name in [None, *adapters]}
    assert len(set(outputs.values())) == len(outputs), outputs
    assert all(len(set(o)) > 2 for o in outputs.values()), "degenerate outputs make a weak comparison"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_base_matches_transformers_generate(llama_engine, llama_dir, prompt):
    assert _alone(llama_engine, prompt, None) == reference_greedy(llama_dir, prompt, MAX_NEW)


def test_gpt2_base_matches_transformers_generate(gpt2_engine, gpt2_dir):
    for prompt in PROMPTS:
        assert _alone(gpt2_engine, prompt, None) == reference_greedy(gpt2_dir, prompt, MAX_NEW)


@pytest.mark.parametrize("name", LLAMA_ADAPTERS)
def test_llama_adapter_matches_peft(llama_engine, llama_dir, llama_adapters, name):
    adapter_dir = llama_adapters(name, **LLAMA_ADAPTERS[name])
    for prompt in PROMPTS[:2]:
        assert _alone(llama_engine, prompt, name) == reference_greedy(llama_dir, prompt, MAX_NEW, adapter_dir)


@pytest.mark.parametrize("name", GPT2_ADAPTERS)
def test_gpt2_adapter_matches_peft(gpt2_engine, gpt2_dir, gpt2_adapters, name):
    adapter_dir = gpt2_adapters(name, **GPT2_ADAPTERS[name])
    for prompt in PROMPTS[:2]:
        assert _alone(gpt2_engine, prompt, name) == reference_greedy(gpt2_dir, prompt, MAX_NEW, adapter_dir)


def test_all_adapters_in_one_batch_match_peft(llama_engine, llama_dir, llama_adapters):
    names = [None, *LLAMA_ADAPTERS]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    batched = llama_engine.generate(prompts, GREEDY, names)
    for prompt, name, got in zip(prompts, names, batched):
        adapter_dir = llama_adapters(name, **LLAMA_ADAPTERS[name]) if name else None
        assert got.token_ids == reference_greedy(llama_dir, prompt, MAX_NEW, adapter_dir), name


def test_a_crowded_batch_gives_every_request_what_it_gets_alone(llama_engine, llama_dir, llama_adapters):
    """63 requests of 40-64 positions over 9 models at once, then 7 at a time: the same tokens, and at each
    step PEFT's argmax on the same history (a batch-dependent error would show in neither small test)."""
    rng = random.Random(5)
    names = [[None, *LLAMA_ADAPTERS][i % 9] for i in range(63)]
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(8, 32))] for _ in names]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    together = [c.token_ids for c in llama_engine.generate(prompts, params, names)]
    by_seven = [c.token_ids for i in range(0, 63, 7)
                for c in llama_engine.generate(prompts[i:i + 7], params, names[i:i + 7])]
    assert together == by_seven
    for name in {*names}:
        model = reference_model(llama_dir, llama_adapters(name, **LLAMA_ADAPTERS[name]) if name else None)
        for prompt, tokens in [(p, t) for p, t, n in zip(prompts, together, names) if n == name]:
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            assert logits.argmax(-1).tolist() == tokens, name


@pytest.mark.parametrize("engine_name,adapters,name", [
    ("llama_engine", LLAMA_ADAPTERS, "patterns"),
    ("llama_engine", LLAMA_ADAPTERS, "dora"),
    ("gpt2_engine", GPT2_ADAPTERS, "attn"),
    ("gpt2_engine", GPT2_ADAPTERS, "dora"),
])
def test_merged_copy_matches_peft_merge_and_unload(request, engine_name, adapters, name):
    engine = request.getfixturevalue(engine_name)
    base_dir = request.getfixturevalue(engine_name.replace("engine", "dir"))
    adapter_dir = request.getfixturevalue(engine_name.replace("engine", "adapters"))(name, **adapters[name])
    unmerged = _alone(engine, PROMPTS[0], name)
    engine.pin_merged(name)
    engine.merges.wait_for_builds()
    try:
        steps_before = engine.runner.merged_steps
        merged = _alone(engine, PROMPTS[0], name)
        assert engine.runner.merged_steps - steps_before == MAX_NEW, "the merged weights were not used"
    finally:
        engine.unpin_merged(name)
    assert merged == unmerged == reference_greedy(base_dir, PROMPTS[0], MAX_NEW, adapter_dir, merge=True)


@pytest.mark.parametrize("engine_name,adapters,name", [
    *[("llama_engine", LLAMA_ADAPTERS, n) for n in [None, *LLAMA_ADAPTERS]],
    *[("gpt2_engine", GPT2_ADAPTERS, n) for n in [None, *GPT2_ADAPTERS]],
])
def test_next_token_logprobs_match_reference(request, engine_name, adapters, name):
    """Token equality can hide small errors (a 1% DoRA scale slip keeps the argmax): compare numbers too."""
    engine = request.getfixturevalue(engine_name)
    base_dir = request.getfixturevalue(engine_name.replace("engine", "dir"))
    adapter_dir = request.getfixturevalue(engine_name.replace("engine", "adapters"))(name, **adapters[name]) if name else None
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
    request_id = f"logprobs-{name}"
    engine.add_request(request_id, PROMPTS[2], params, name)
    (output,) = [o for o in engine.step() if o.request_id == request_id]
    got = output.logprobs[0]
    expected = reference_logprobs(base_dir, PROMPTS[2], adapter_dir)
    top_values, top_ids = expected.topk(5)
    assert [i for i, _ in got.top] == top_ids.tolist()
    assert [v for _, v in got.top] == pytest.approx(top_values.tolist(), abs=1e-4)
    assert got.logprob == pytest.approx(float(expected[got.token_id]), abs=1e-4)
