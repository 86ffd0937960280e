"""Sampling controls: seeds, top-k/top-p, stop strings, EOS, max_tokens, logprobs."""

import pytest

from server.engine.sequence import SamplingParams
from tests.factories import byte_tokenizer, make_engine

PROMPT = [40, 77, 101, 9, 33]


@pytest.fixture(scope="module")
def engine(llama_dir):
    return make_engine(llama_dir)


def _tokens(engine, params, prompt=PROMPT, adapter=None):
    return engine.generate([prompt], params, [adapter])[0]


def test_seed_is_reproducible_alone_and_in_a_batch(engine):
    params = SamplingParams(max_tokens=16, temperature=1.2, seed=1234, ignore_eos=True)
    alone = _tokens(engine, params).token_ids
    assert _tokens(engine, params).token_ids == alone
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in range(5)]
    batched = engine.generate([PROMPT] * 6, [params, *others], None)
    assert batched[0].token_ids == alone
    assert len({tuple(c.token_ids) for c in batched}) > 1, "different seeds should sample differently"


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    greedy = _tokens(engine, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)).token_ids
    assert _tokens(engine, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3, ignore_eos=True)).token_ids == greedy
    assert _tokens(engine, SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True)).token_ids == greedy


def test_top_k_restricts_choices(engine):
    engine.add_request("k", PROMPT, SamplingParams(max_tokens=1, temperature=5.0, top_k=3, logprobs=3))
    (out,) = engine.step()
    allowed = {i for i, _ in out.logprobs[0].top}
    seen = {_tokens(engine, SamplingParams(max_tokens=1, temperature=5.0, top_k=3, seed=s)).token_ids[0]
            for s in range(40)}
    assert seen <= allowed and len(seen) > 1


def test_max_tokens_finishes_with_length(engine):
    result = _tokens(engine, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert len(result.token_ids) == 7 and result.finish_reason == "length"


def test_stop_string_cuts_the_text(engine):
    full = _tokens(engine, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    at = next(i for i in range(3, len(full.text) - 2)
              if full.text.find(full.text[i:i + 2]) == i and "\ufffd" not in full.text[i:i + 2])
    stop = full.text[at:at + 2]
    cut = _tokens(engine, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,)))
    assert cut.text == full.text[:at] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(full.token_ids)


def test_stop_token_and_eos(engine):
    full = _tokens(engine, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)).token_ids
    stopped = _tokens(engine, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(full[3],)))
    assert stopped.token_ids == full[: full.index(full[3]) + 1] and stopped.finish_reason == "stop"
    engine._eos_ids = frozenset({full[2]})  # pretend the model's EOS is a token it will produce
    try:
        eos = _tokens(engine, SamplingParams(max_tokens=12, temperature=0))
        assert eos.token_ids == full[: full.index(full[2]) + 1] and eos.finish_reason == "stop"
        ignored = _tokens(engine, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert ignored.token_ids == full
    finally:
        engine._eos_ids = frozenset({2})


def test_streamed_text_adds_up_to_the_decoded_text(engine):
    params = SamplingParams(max_tokens=15, temperature=0.9, seed=7, ignore_eos=True)
    result = _tokens(engine, params)
    assert result.text == byte_tokenizer().decode(result.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(logprobs=50)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
