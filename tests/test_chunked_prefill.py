"""Chunked prefill: a step holds at most max_batch_tokens tokens; a long prompt is prefilled over several
steps beside running decodes (which go first) and gives what a one-step prefill gives."""

import pytest

from server.engine.sequence import SamplingParams
from tests.conftest import reference_greedy
from tests.factories import make_engine

STEP = 16  # the smallest max_batch_tokens Settings accepts
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = [(13 * i + 5) % 250 + 3 for i in range(4 * STEP + 7)]  # 4× the step, and a partial chunk


@pytest.fixture(scope="module")
def adapter_dir(llama_adapters):
    return llama_adapters("chunked", seed=71, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def test_a_prompt_of_four_steps_is_served_exactly(llama_dir, adapter_dir):
    engine = make_engine(llama_dir, max_batch_tokens=STEP, enable_prefix_caching=False)
    engine.load_adapter("a", adapter_dir)
    for adapter, path in ((None, None), ("a", adapter_dir)):
        got = engine.generate([LONG], GREEDY, [adapter])[0].token_ids
        assert got == reference_greedy(llama_dir, LONG, GREEDY.max_tokens, path), adapter
    assert engine.steps >= 2 * (len(LONG) // STEP + GREEDY.max_tokens)  # two requests, each chunked


def test_chunked_equals_one_step_prefill_in_a_mixed_batch(llama_dir, adapter_dir):
    prompts = [LONG, LONG[:STEP + 3], LONG[5:9], LONG[::-1][:2 * STEP]]
    adapters = [None, "a", "a", None]
    outputs = {}
    for budget in (STEP, 2048):
        engine = make_engine(llama_dir, max_batch_tokens=budget, enable_prefix_caching=False)
        engine.load_adapter("a", adapter_dir)
        outputs[budget] = [c.token_ids for c in engine.generate(prompts, GREEDY, adapters)]
    assert outputs[STEP] == outputs[2048]
    assert len({tuple(t) for t in outputs[STEP]}) == len(prompts)


def test_running_decodes_get_a_token_every_step_while_a_long_prompt_prefills(llama_dir):
    """Decodes go first: the stream that runs keeps producing one token per step; the long prompt takes
    the rest of each step's budget and its first token comes after ceil((len - budget share) / share)."""
    engine = make_engine(llama_dir, max_batch_tokens=STEP, enable_prefix_caching=False)
    stream = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine.add_request("stream", LONG[:5], stream)
    engine.step()  # its prefill
    engine.add_request("long", LONG, GREEDY)
    steps_until_long_starts = 0
    while True:
        outputs = {out.request_id: out for out in engine.step()}
        assert "stream" in outputs, "the running stream was stalled"
        steps_until_long_starts += 1
        if "long" in outputs:
            break
    assert steps_until_long_starts == -(-len(LONG) // (STEP - 1))  # one token of each step is the stream's


def test_prompt_logprobs_over_chunks_equal_one_step(llama_dir):
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3)
    results = []
    for budget in (STEP, 2048):
        engine = make_engine(llama_dir, max_batch_tokens=budget)
        engine.add_request("p", LONG, params)
        first = None
        while first is None:
            first = next((out for out in engine.step() if out.request_id == "p"), None)
        results.append(first.prompt_logprobs)
    chunked, whole = results
    assert len(chunked) == len(whole) == len(LONG) - 1
    for a, b in zip(chunked, whole):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
