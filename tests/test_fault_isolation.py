"""One request cannot harm the others in its batch: a forward pass that fails for one request, logits
that are not finite for one request, and sampling numbers at the edge of float32 each end (at most)
that request, and every other request's output equals its solo run."""

import pytest
import torch

from server.engine.sequence import SamplingParams
from tests.factories import make_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
POISON = 99  # a prompt starting with this token makes the (fault-injected) forward pass raise


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {f"f{i}": llama_adapters(f"fault{i}", seed=950 + i, r=8, lora_alpha=16) for i in range(2)}


def _engine(llama_dir, adapter_dirs):
    engine = make_engine(llama_dir)
    for name, directory in adapter_dirs.items():
        engine.load_adapter(name, directory)
    return engine


def _run(engine, jobs):
    """Every job (prompt, adapter) in one batch; returns each request's tokens, finish reason and error."""
    for i, (prompt, adapter) in enumerate(jobs):
        engine.add_request(f"r{i}", prompt, GREEDY, adapter)
    results = {f"r{i}": [[], None, None] for i in range(len(jobs))}
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id][0] += out.token_ids
            if out.finished:
                results[out.request_id][1:] = [out.finish_reason.value, out.error]
    return [results[f"r{i}"] for i in range(len(jobs))]


JOBS = [([10, 20, 30], None), ([11, 21, 31], "f0"), ([12, 22], "f1"), ([13, 23, 33, 43], "f0")]


@pytest.fixture(scope="module")
def solo(llama_dir, adapter_dirs):
    engine = _engine(llama_dir, adapter_dirs)
    return [_run(engine, [job])[0] for job in JOBS]


def test_a_forward_pass_that_fails_for_one_request_fails_only_that_request(llama_dir, adapter_dirs, solo):
    """Fault injection: the runner raises whenever the poisoned request is in the step, in its prefill
    (it arrives with the others) or later (it arrives while the others decode)."""
    engine = _engine(llama_dir, adapter_dirs)
    real_run = engine.runner.run

    def failing_run(batch):
        if any(seq.prompt_ids[0] == POISON for seq in batch.sequences):
            raise RuntimeError("injected fault")
        return real_run(batch)

    engine.runner.run = failing_run
    results = _run(engine, [*JOBS[:2], ([POISON, 5, 6], "f1"), *JOBS[2:]])
    poisoned = results.pop(2)
    assert poisoned == [[], "abort", "the forward pass failed for this request (RuntimeError)"]
    assert results == solo

    for i, (prompt, adapter) in enumerate(JOBS):  # a poisoned request joining running decodes
        engine.add_request(f"late{i}", prompt, GREEDY, adapter)
    engine.step()
    engine.add_request("poison-late", [POISON, 7], GREEDY, "f0")
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert outputs["poison-late"][-1].error is not None
    assert [sum((o.token_ids for o in outputs[f"late{i}"]), []) for i in range(len(JOBS))] == [
        s[0][1:] for s in solo], "every other request goes on unchanged"


def test_non_finite_logits_fail_only_their_request(llama_dir, adapter_dirs, llama_adapters, solo):
    engine = _engine(llama_dir, adapter_dirs)
    overflowing = engine.load_adapter("overflow", llama_adapters("fault_overflow", seed=960, r=8, lora_alpha=16))
    for weights in overflowing.modules.values():  # finite factors whose product overflows float32
        weights.lora_a.mul_(1e25)
        weights.lora_b.mul_(1e25)
    results = _run(engine, [*JOBS[:1], ([40, 41, 42], "overflow"), *JOBS[1:]])
    failed = results.pop(1)
    assert failed[1:] == ["abort", "the model produced non-finite logits for this request"]
    assert results == solo


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=1e-300, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1e-45, ignore_eos=True, seed=1),
    SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-300, ignore_eos=True, seed=2**64 - 1),
    SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-45, top_k=2**62, ignore_eos=True, seed=-(2**63)),
], ids=["temperature-1e-300", "temperature-denormal", "top_p-1e-300", "top_p-denormal-huge-top_k"])
def test_sampling_numbers_at_the_edge_of_float32_are_greedy(llama_dir, adapter_dirs, solo, params):
    engine = _engine(llama_dir, adapter_dirs)
    engine.add_request("edge", JOBS[1][0], params, JOBS[1][1])
    for i, (prompt, adapter) in enumerate(JOBS):
        engine.add_request(f"r{i}", prompt, GREEDY, adapter)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert tokens["edge"] == solo[1][0], "a vanishing temperature or top_p is greedy"
    assert [tokens[f"r{i}"] for i in range(len(JOBS))] == [s[0] for s in solo]


def test_seed_outside_what_a_generator_takes_is_refused():
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)
    assert torch.Generator().manual_seed(2**64 - 1) is not None


def test_a_step_that_fails_whatever_is_left_out_fails_only_its_own_requests(llama_dir, adapter_dirs, solo):
    """Fault injection: while the flag is up every forward raises, so no request fails alone. The step's
    requests end with an error each (none hangs), and the engine serves the next request as if nothing
    had happened."""
    engine = _engine(llama_dir, adapter_dirs)
    real_run, broken = engine.runner.run, {"on": True}

    def failing_run(batch):
        if broken["on"]:
            raise RuntimeError("injected fault")
        return real_run(batch)

    engine.runner.run = failing_run
    for i, (prompt, adapter) in enumerate(JOBS[:2]):
        engine.add_request(f"r{i}", prompt, GREEDY, adapter)
    failed = engine.step()
    assert sorted((o.request_id, o.finish_reason.value) for o in failed) == [("r0", "abort"), ("r1", "abort")]
    assert all(o.error == "the forward pass failed for this request (RuntimeError)" for o in failed)
    broken["on"] = False
    assert _run(engine, [JOBS[2]]) == [solo[2]]
