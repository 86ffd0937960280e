"""Continuous batching: many adapters in one batch, late arrivals, preemption, slot eviction, limits."""

import random

import pytest

from server.engine.sequence import SamplingParams
from server.errors import CapacityError, InvalidRequestError, RequestTooLargeError, UnknownAdapterError
from tests.factories import VOCAB, make_engine

ADAPTERS = {f"mix{i}": dict(seed=100 + i, r=[4, 8, 16][i % 3], lora_alpha=[8, 16, 8][i % 3],
                            target_modules=[["q_proj", "v_proj"], ["k_proj", "o_proj", "up_proj"],
                                            ["q_proj", "down_proj"]][i % 3])
            for i in range(8)}


def _requests(count: int, seed: int = 0):
    """(prompt, params, adapter) triples: mixed prompt lengths, max_tokens, adapters and the bare base."""
    rng = random.Random(seed)
    names = [None, *ADAPTERS]
    out = []
    for i in range(count):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randint(2, 30))]
        params = SamplingParams(max_tokens=rng.randint(3, 14), temperature=0, ignore_eos=True)
        out.append((prompt, params, names[i % len(names)]))
    return out


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {name: llama_adapters(name, **kwargs) for name, kwargs in ADAPTERS.items()}


def _engine(llama_dir, adapter_dirs, **settings):
    engine = make_engine(llama_dir, **settings)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def alone(llama_dir, adapter_dirs):
    """Each request's tokens when it runs by itself."""
    engine = _engine(llama_dir, adapter_dirs)
    cache = {}

    def run(prompt, params, adapter):
        key = (tuple(prompt), params, adapter)
        if key not in cache:
            cache[key] = engine.generate([prompt], params, [adapter])[0].token_ids
        return cache[key]
    return run


def test_many_adapters_in_one_batch_equal_each_alone(llama_dir, adapter_dirs, alone):
    requests = _requests(27)
    engine = _engine(llama_dir, adapter_dirs)
    results = engine.generate([r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests])
    assert len({r[2] for r in requests}) == 9  # 8 adapters and the bare base, all at once
    for (prompt, params, adapter), got in zip(requests, results):
        assert got.token_ids == alone(prompt, params, adapter), adapter
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.allocator.num_blocks


def test_requests_arriving_mid_generation(llama_dir, adapter_dirs, alone):
    engine = _engine(llama_dir, adapter_dirs)
    requests = _requests(18, seed=1)
    produced: dict[str, list[int]] = {}
    finished = set()
    pending = list(enumerate(requests))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:  # a new request every other step, while others are mid-flight
            i, (prompt, params, adapter) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params, adapter)
            produced[f"r{i}"] = []
        for out in engine.step():
            produced[out.request_id] += out.token_ids
            if out.finished:
                finished.add(out.request_id)
        step += 1
    assert len(finished) == len(requests)
    for i, (prompt, params, adapter) in enumerate(requests):
        assert produced[f"r{i}"] == alone(prompt, params, adapter)


def test_preemption_under_a_tiny_kv_cache_keeps_outputs(llama_dir, adapter_dirs, alone):
    # 2 layers * 2 kv heads * 16 dims * 2 (k,v) * 4 bytes = 512 bytes/token; 12 blocks of 4 tokens.
    engine = _engine(llama_dir, adapter_dirs, kv_cache_memory=512 * 4 * 12, kv_block_size=4)
    requests = [r for r in _requests(12, seed=2) if len(r[0]) + r[1].max_tokens <= 40]
    results = engine.generate([r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests])
    assert engine.scheduler.preemptions > 0, "the cache was meant to overflow"
    for (prompt, params, adapter), got in zip(requests, results):
        assert got.token_ids == alone(prompt, params, adapter)
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.allocator.num_blocks


def test_more_adapters_than_slots(llama_dir, adapter_dirs, alone):
    engine = _engine(llama_dir, adapter_dirs, max_loras=3)
    requests = _requests(20, seed=3)
    results = engine.generate([r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests])
    assert engine.slots.evictions > 0
    for (prompt, params, adapter), got in zip(requests, results):
        assert got.token_ids == alone(prompt, params, adapter)


def test_abort_frees_cache_and_slot(llama_dir, adapter_dirs):
    engine = _engine(llama_dir, adapter_dirs, max_loras=1)
    engine.add_request("long", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), "mix0")
    engine.step()
    assert engine.kv_cache.allocator.num_free < engine.kv_cache.allocator.num_blocks
    final = engine.abort("long")
    assert final.finished and final.finish_reason == "abort"
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.allocator.num_blocks
    assert not engine.has_unfinished()
    # the only slot is free again: another adapter can take it
    assert engine.generate([[9, 9]], SamplingParams(max_tokens=2, temperature=0), ["mix1"])[0].token_ids


def test_refusals(llama_dir, adapter_dirs):
    engine = _engine(llama_dir, adapter_dirs, max_queue=2)
    params = SamplingParams(max_tokens=4)
    with pytest.raises(UnknownAdapterError):
        engine.add_request("u", [5], params, "no-such-adapter")
    with pytest.raises(RequestTooLargeError, match="context length 256"):
        engine.add_request("big", [5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], params)
    for outside in ([VOCAB], [-1], [2**63]):
        with pytest.raises(InvalidRequestError, match="outside the vocabulary") as refused:
            engine.add_request("oov", [5, *outside], params)
        assert refused.value.param == "prompt"
    engine.add_request("q1", [5], params)
    engine.add_request("q2", [5], params)
    with pytest.raises(CapacityError):
        engine.add_request("q3", [5], params)
