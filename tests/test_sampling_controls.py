"""Sampling controls (logit_bias, presence/frequency/repetition penalties, min_tokens, min_p) against
transformers' own logits processors where one exists and OpenAI's formula otherwise; per request in a
mixed batch of adapters, where a request without controls is token-equal to a run without the others."""

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.logits_processors import adjust_logits
from server.engine.sampler import sampling_probs
from server.engine.sequence import SamplingParams, Sequence
from tests.conftest import reference_model
from tests.factories import VOCAB, make_engine

PROMPT = [40, 77, 101, 9, 33, 77, 40]
EOS = frozenset({2})


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's formula: mu[j] -= c[j] * frequency + (c[j] > 0) * presence, c counted over the output."""

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids[:, self.prompt_length:],
                                                       torch.ones_like(input_ids[:, self.prompt_length:], dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def _seq(params: SamplingParams, output: list[int] = (), prompt: list[int] = PROMPT) -> Sequence:
    return Sequence("r", list(prompt), params, output_ids=list(output))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    output = [5, 77, 200, 5]
    ours = adjust_logits(logits, [_seq(SamplingParams(repetition_penalty=penalty), output), _seq(SamplingParams())], EOS)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([PROMPT + output]), logits[:1].clone())
    torch.testing.assert_close(ours[0], theirs[0])
    assert torch.equal(ours[1], logits[1]), "a row without controls is untouched"


def test_logit_bias_equals_transformers_sequence_bias():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2))
    bias = ((7, 5.0), (40, -100.0), (258, 0.25))
    ours = adjust_logits(logits, [_seq(SamplingParams(logit_bias=bias))], EOS)
    theirs = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias])(torch.tensor([PROMPT]), logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_frequency_and_presence_penalties_follow_openai_formula():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    output = [5, 5, 5, 9, 77]  # 77 is in the prompt too: only the output counts
    params = SamplingParams(frequency_penalty=0.7, presence_penalty=-1.1)
    ours = adjust_logits(logits, [_seq(params, output)], EOS)
    theirs = OpenAIPenalties(len(PROMPT), 0.7, -1.1)(torch.tensor([PROMPT + output]), logits.clone())
    torch.testing.assert_close(ours, theirs)
    assert ours[0, 5] == pytest.approx(float(logits[0, 5]) - 3 * 0.7 + 1.1)


def test_min_tokens_equals_transformers_min_new_tokens():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(min_tokens=3, stop_token_ids=(9,))
    processor = MinNewTokensLengthLogitsProcessor(len(PROMPT), 3, eos_token_id=[2, 9])
    for done in range(5):
        output = [50] * done
        ours = adjust_logits(logits, [_seq(params, output)], EOS)
        torch.testing.assert_close(ours, processor(torch.tensor([PROMPT + output]), logits.clone()))
    ignoring = adjust_logits(logits, [_seq(SamplingParams(min_tokens=3, ignore_eos=True))], EOS)
    assert torch.equal(ignoring, logits), "with ignore_eos, EOS does not stop, so it is not banned"


@pytest.mark.parametrize("params, warpers", [
    (SamplingParams(temperature=0.7, min_p=0.1), [TemperatureLogitsWarper(0.7), MinPLogitsWarper(0.1)]),
    (SamplingParams(temperature=1.3, top_k=40, top_p=0.9, min_p=0.05),
     [TemperatureLogitsWarper(1.3), TopKLogitsWarper(40), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)]),
])
def test_sampling_distribution_equals_transformers_warpers(params, warpers):
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 4
    ours = sampling_probs(logits, params)
    scores = logits[None].clone()
    for warper in warpers:
        scores = warper(torch.tensor([PROMPT]), scores)
    theirs = torch.softmax(scores[0], dim=-1)
    torch.testing.assert_close(ours / ours.sum(), theirs)
    assert 1 < int((ours > 0).sum()) < VOCAB, "the filter kept some tokens and dropped others"


# ---- in the engine: a mixed batch of adapters, against transformers/PEFT generate ------------------------


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {"ca": llama_adapters("ctrl_a", seed=811, r=8, lora_alpha=16),
            "cb": llama_adapters("ctrl_b", seed=812, r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"])}


@pytest.fixture(scope="module")
def engine(llama_dir, adapter_dirs):
    engine = make_engine(llama_dir)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    return engine


def _reference(llama_dir, adapter_dir, max_tokens, processors, eos=None):
    model = reference_model(llama_dir, adapter_dir)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0,
                             logits_processor=LogitsProcessorList(processors))
    return out[0, len(PROMPT):].tolist()


GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


def test_controls_in_a_mixed_batch_equal_transformers(llama_dir, adapter_dirs, engine):
    plain = {a: engine.generate([PROMPT], SamplingParams(**GREEDY), [a])[0].token_ids for a in (None, "ca", "cb")}
    bias = ((plain["ca"][1], -100.0), (plain["ca"][1] ^ 1, 8.0))
    cases = [  # (adapter, params, transformers processors)
        ("ca", SamplingParams(**GREEDY, repetition_penalty=1.8), [RepetitionPenaltyLogitsProcessor(1.8)]),
        ("ca", SamplingParams(**GREEDY, logit_bias=bias), [SequenceBiasLogitsProcessor([[[t], b] for t, b in bias])]),
        ("cb", SamplingParams(**GREEDY, frequency_penalty=2.0, presence_penalty=0.5),
         [OpenAIPenalties(len(PROMPT), 2.0, 0.5)]),
        (None, SamplingParams(**GREEDY, repetition_penalty=0.6, frequency_penalty=1.0, logit_bias=bias),
         [SequenceBiasLogitsProcessor([[[t], b] for t, b in bias]), RepetitionPenaltyLogitsProcessor(0.6),
          OpenAIPenalties(len(PROMPT), 1.0, 0.0)]),
    ]
    expected = [_reference(llama_dir, adapter_dirs.get(a), 12, procs) for a, _, procs in cases]
    assert all(e != plain[a] for e, (a, _, _) in zip(expected, cases)), "each control changes the output"
    jobs = [*((a, p) for a, p, _ in cases), *((a, SamplingParams(**GREEDY)) for a in (None, "ca", "cb"))]
    results = engine.generate([PROMPT] * len(jobs), [p for _, p in jobs], [a for a, _ in jobs])
    assert [r.token_ids for r in results[:len(cases)]] == expected
    assert [r.token_ids for r in results[len(cases):]] == [plain[None], plain["ca"], plain["cb"]]


def test_min_tokens_holds_back_eos_like_transformers(llama_dir, adapter_dirs, engine):
    plain = engine.generate([PROMPT], SamplingParams(**GREEDY), ["cb"])[0].token_ids
    eos = plain[1]  # pretend the model's EOS is a token it produces early
    engine._eos_ids = frozenset({eos})
    try:
        early = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0), ["cb"])[0]
        held = engine.generate([PROMPT] * 2, [SamplingParams(max_tokens=12, temperature=0, min_tokens=5),
                                              SamplingParams(max_tokens=12, temperature=0)], ["cb", "ca"])
    finally:
        engine._eos_ids = EOS
    assert early.token_ids == plain[:2] and early.finish_reason == "stop"
    expected = _reference(llama_dir, adapter_dirs["cb"], 12, [MinNewTokensLengthLogitsProcessor(len(PROMPT), 5, eos)],
                          eos=eos)
    assert held[0].token_ids == expected and len(expected) >= 5 and eos not in expected[:5]


def test_sampled_requests_without_controls_are_unchanged_by_those_with(engine):
    free = [SamplingParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    alone = engine.generate([PROMPT] * 2, free, ["ca", None])
    controlled = [SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True, min_p=0.2,
                                 presence_penalty=1.5, logit_bias=((50, 3.0),)),
                  SamplingParams(max_tokens=10, temperature=0.8, seed=4, ignore_eos=True, repetition_penalty=1.2)]
    mixed = engine.generate([PROMPT] * 4, [free[0], *controlled, free[1]], ["ca", "cb", "ca", None])
    assert [mixed[0].token_ids, mixed[3].token_ids] == [r.token_ids for r in alone]
    again = engine.generate([PROMPT] * 2, controlled, ["cb", "ca"])
    assert [r.token_ids for r in again] == [mixed[1].token_ids, mixed[2].token_ids], "seeded controls reproduce"


@pytest.mark.parametrize("bad", [dict(logit_bias=((1, 101.0),)), dict(frequency_penalty=2.5),
                                 dict(presence_penalty=-3), dict(repetition_penalty=0), dict(repetition_penalty=1000), dict(min_p=1.5),
                                 dict(min_tokens=-1), dict(prompt_logprobs=21)])
def test_invalid_controls_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_min_tokens_holds_back_stop_strings_like_vllm(engine):
    """A stop string in the text of the first min_tokens tokens does not end the output (vLLM checks stop
    strings only from min_tokens on); the same string later does."""
    plain = engine.generate([PROMPT], SamplingParams(**GREEDY), ["cb"])[0]
    stop = engine.tokenizer.decode(plain.token_ids[1:2])  # the text of the second token
    early = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, stop=(stop,)), ["cb"])[0]
    assert early.finish_reason == "stop" and len(early.token_ids) < 6
    held = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, stop=(stop,), min_tokens=6),
                           ["cb"])[0]
    assert len(held.token_ids) >= 6, "the stop string inside the first min_tokens tokens must not end it"
    assert held.token_ids == plain.token_ids[:len(held.token_ids)]
