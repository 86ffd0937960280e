"""The engine thread fed from asyncio: concurrent streams, late arrivals, cancellation."""

import asyncio

import pytest

from server.engine.async_engine import AsyncEngine
from server.engine.sequence import SamplingParams
from server.errors import UnknownAdapterError
from tests.factories import make_engine


@pytest.fixture
def async_engine(llama_dir, llama_adapters):
    engine = make_engine(llama_dir)
    for i in range(4):
        engine.load_adapter(f"a{i}", llama_adapters(f"async{i}", seed=200 + i, r=4 + 4 * i, lora_alpha=16))
    runner = AsyncEngine(engine)
    runner.start()
    yield runner
    runner.stop()


async def _collect(engine: AsyncEngine, prompt, params, adapter=None):
    tokens, chunks, last = [], 0, None
    async for out in engine.generate(prompt, params, adapter):
        tokens += out.token_ids
        chunks += 1
        last = out
    return tokens, chunks, last


def test_concurrent_streams_equal_the_sync_engine(async_engine):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    jobs = [([7 + i, 50, 90 + i], [None, "a0", "a1", "a2", "a3"][i % 5]) for i in range(20)]

    async def main():
        return await asyncio.gather(*(_collect(async_engine, p, params, a) for p, a in jobs))

    results = asyncio.run(main())
    expected = async_engine._call(  # the engine's own synchronous generate, on its thread
        lambda: async_engine._engine.generate([p for p, _ in jobs], params, [a for _, a in jobs])).result()
    for (tokens, chunks, last), want in zip(results, expected):
        assert tokens == want.token_ids
        assert chunks == 10, "one streamed chunk per token"
        assert last.finished and last.finish_reason == "length" and last.completion_tokens == 10


def test_a_late_short_request_does_not_wait_for_a_long_one(async_engine):
    async def main():
        order = []

        async def run(name, max_tokens, delay):
            await asyncio.sleep(delay)
            await _collect(async_engine, [5, 6, 7],
                           SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            order.append(name)

        await asyncio.gather(run("long", 120, 0), run("short", 3, 0.05))
        return order

    assert asyncio.run(main()) == ["short", "long"]


def test_leaving_the_stream_aborts_and_frees_the_cache(async_engine):
    async def main():
        stream = async_engine.generate([5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        await async_engine.wait_for_merges()  # any command: the abort before it has run

    asyncio.run(main())
    snapshot = async_engine.snapshot
    assert snapshot.kv_free_blocks == snapshot.kv_blocks
    assert snapshot.running == snapshot.waiting == 0


def test_refusal_reaches_the_caller(async_engine):
    async def main():
        await _collect(async_engine, [5], SamplingParams(max_tokens=2), "missing")

    with pytest.raises(UnknownAdapterError):
        asyncio.run(main())


def test_only_the_engine_thread_asks_for_parallel_torch_work(llama_dir):
    """torch's thread count is per thread: the engine thread gets its own, this one keeps one
    (server/engine/torch_threads.py explains why a second parallel thread slows every step)."""
    import threading

    import torch

    from server.engine.torch_threads import use_one_thread

    runner = AsyncEngine(make_engine(llama_dir), threads=2)
    runner.start()
    try:
        assert runner._call(torch.get_num_threads).result(timeout=30) == 2
        assert torch.get_num_threads() == 1  # conftest keeps the test thread at one
        seen = []
        worker = threading.Thread(target=lambda: (use_one_thread(), seen.append(torch.get_num_threads())))
        worker.start()
        worker.join()
        assert seen == [1]
        assert runner._call(torch.get_num_threads).result(timeout=30) == 2, "the worker must not change the engine's"
    finally:
        runner.stop()
