"""AsyncEngine is the engine's only surface: its state is read through snapshots, request ids are the
engine's own, a failed merge does not disturb serving, and a drained delete frees what it held."""

import asyncio
import re
import threading
from collections import deque

import httpx
import pytest

from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.sequence import SamplingParams
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from tests.factories import make_engine
from tests.server_harness import RunningServer

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {f"s{i}": llama_adapters(f"surface{i}", seed=900 + i, r=8, lora_alpha=16,
                                    target_modules=["q_proj", "v_proj", "down_proj"]) for i in range(3)}


def _settings(llama_dir, store, **overrides) -> Settings:
    values = dict(model=llama_dir, adapters_dir=store, dtype="float32", device="cpu", kv_cache_memory=32 * 1024**2,
                  served_model_name="base", log_format="text")
    values.update(overrides)
    return Settings(**values)


def _upload(url: str, name: str, directory) -> None:
    files = {f: (f, (directory / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
    response = httpx.post(url + "/v1/adapters", data={"name": name}, files=files, timeout=60)
    assert response.status_code == 201, response.text


def _complete(url: str, model: str, max_tokens: int = 16, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": "surface!", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        **extra})


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# ---- 1. only the engine thread reads engine state ------------------------------------------------

class _ThreadGuard:
    """Mixed into a container: records every read made from a thread other than `owner`."""

    owner: int
    foreign: list

    def _check(self):
        if threading.get_ident() != self.owner:
            self.foreign.append(threading.current_thread().name)

    def __iter__(self):
        self._check()
        return super().__iter__()

    def __len__(self):
        self._check()
        return super().__len__()

    def __contains__(self, item):
        self._check()
        return super().__contains__(item)


def _guarded(container, owner: int, foreign: list):
    cls = type(f"Guarded{type(container).__name__}", (_ThreadGuard, type(container)), {})
    guarded = cls(container)
    guarded.owner, guarded.foreign = owner, foreign
    return guarded


def test_routes_and_metrics_never_read_the_engine_from_another_thread(llama_dir, adapter_dirs, tmp_path):
    """The engine's containers record reads from foreign threads; routes and scrapes must make none."""
    with RunningServer(_settings(llama_dir, tmp_path, merged_budget=64 * 1024**2)) as server:
        _upload(server.url, "s0", adapter_dirs["s0"])
        engine = server.state.engine
        foreign: list[str] = []

        def install_guards():
            owner = threading.get_ident()  # the engine thread
            merges, slots = engine._engine.merges, engine._engine.slots
            merges.merged = _guarded(merges.merged, owner, foreign)
            merges.pinned = _guarded(merges.pinned, owner, foreign)
            merges.events = _guarded(merges.events, owner, foreign)
            slots._resident = _guarded(slots._resident, owner, foreign)
            scheduler = engine._engine.scheduler
            scheduler.waiting = _guarded(scheduler.waiting, owner, foreign)

        engine._call(install_guards).result()
        assert _complete(server.url, "s0").status_code == 200
        assert httpx.post(server.url + "/v1/adapters/s0/merge").status_code == 200
        asyncio.run(engine.wait_for_merges())
        assert _complete(server.url, "s0").status_code == 200
        for path in ("/metrics", "/v1/adapters", "/v1/adapters/s0", "/v1/server/state"):
            assert httpx.get(server.url + path).status_code == 200
        assert httpx.post(server.url + "/v1/adapters/s0/warm").status_code == 200
        assert httpx.get(server.url + "/v1/adapters/s0").json()["resident"] == "merged"
        assert foreign == [], f"engine state read from {sorted(set(foreign))}"


def test_scrapes_and_adapter_views_during_merge_churn(llama_dir, adapter_dirs, tmp_path):
    """Traffic swings between adapters with a short half-life, so merged copies come and go every few
    steps; 1,000 scrapes and adapter views meanwhile all answer."""
    settings = _settings(llama_dir, tmp_path, merged_budget=64 * 1024**2, merge_half_life_tokens=16,
                         max_num_seqs=8)
    with RunningServer(settings) as server:
        for name, directory in adapter_dirs.items():
            _upload(server.url, name, directory)
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                for name in adapter_dirs:
                    _complete(server.url, name, max_tokens=40)

        drivers = [threading.Thread(target=traffic) for _ in range(2)]
        for driver in drivers:
            driver.start()
        statuses = []
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                for i in range(1000):
                    path = "/metrics" if i % 2 else f"/v1/adapters/s{i % 3}"
                    statuses.append(http.get(path).status_code)
        finally:
            stop.set()
            for driver in drivers:
                driver.join()
        metrics = httpx.get(server.url + "/metrics").text
        assert statuses == [200] * 1000
        assert _metric(metrics, "loraserve_merge_promotions_total") >= 2, "the merge policy should have churned"


# ---- 2. request ids are the engine's ------------------------------------------------------------

def test_two_requests_with_the_same_request_id_both_complete(llama_dir, adapter_dirs, tmp_path):
    with RunningServer(_settings(llama_dir, tmp_path)) as server:
        _upload(server.url, "s1", adapter_dirs["s1"])
        solo = {m: _complete(server.url, m, 30).json()["choices"][0]["text"] for m in ("base", "s1")}

        async def both():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                headers = {"X-Request-ID": "same-id"}
                bodies = [{"model": m, "prompt": "surface!", "max_tokens": 30, "temperature": 0,
                           "ignore_eos": True} for m in ("base", "s1")]
                return await asyncio.wait_for(asyncio.gather(
                    *(http.post("/v1/completions", json=b, headers=headers) for b in bodies)), timeout=60)

        responses = asyncio.run(both())
        assert [r.status_code for r in responses] == [200, 200]
        assert [r.headers["x-request-id"] for r in responses] == ["same-id", "same-id"]
        assert [r.json()["choices"][0]["text"] for r in responses] == [solo["base"], solo["s1"]]


# ---- 3. a failed merge leaves serving alone ------------------------------------------------------

def test_a_failed_merge_leaves_every_request_intact(llama_dir, adapter_dirs):
    engine = make_engine(llama_dir, merged_budget=64 * 1024**2, merge_promote_share=2.0)
    for name in ("s0", "s1"):
        engine.load_adapter(name, adapter_dirs[name])
    overflowing = engine.load_adapter("overflow", adapter_dirs["s2"])
    for weights in overflowing.modules.values():  # finite factors whose product overflows float32
        weights.lora_a.mul_(1e25)
        weights.lora_b.mul_(1e25)
    prompts = [[10 + i, 20, 30 + i] for i in range(6)]
    names = [None, "s0", "s1", "s0", None, "s1"]
    expected = [c.token_ids for c in engine.generate(prompts, GREEDY, names)]

    runner = AsyncEngine(engine)
    runner.start()
    try:
        async def main():
            async def collect(prompt, name):
                return [t async for out in runner.generate(prompt, GREEDY, name) for t in out.token_ids]

            jobs = [asyncio.create_task(collect(p, n)) for p, n in zip(prompts, names)]
            await asyncio.sleep(0.05)  # the requests are running when the merge is asked for and fails
            await runner.pin_merged(overflowing)
            await runner.wait_for_merges()
            return await asyncio.gather(*jobs)

        assert asyncio.run(main()) == expected
        snapshot = runner.snapshot
        assert snapshot.merge_failures == 1 and "overflow" not in snapshot.merged
        assert [e.action for e in snapshot.events_of("overflow")] == ["failed"]
        assert "non-finite" in snapshot.events_of("overflow")[0].reason
    finally:
        runner.stop()


# ---- 4. a drained delete frees the slot, the host copy and the merged budget ----------------------

def test_delete_while_in_use_frees_everything_after_the_last_request(llama_dir, adapter_dirs, tmp_path):
    with RunningServer(_settings(llama_dir, tmp_path, merged_budget=64 * 1024**2)) as server:
        url, engine = server.url, server.state.engine
        _upload(url, "s2", adapter_dirs["s2"])
        assert httpx.post(url + "/v1/adapters/s2/merge").status_code == 200
        asyncio.run(engine.wait_for_merges())
        assert engine.snapshot.merged == {"s2@1"}
        body = {"model": "s2", "prompt": "surface!", "max_tokens": 150, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            deleted = http.delete("/v1/adapters/s2").json()
            assert deleted == {"deleted": ["s2@1"], "draining": ["s2@1"]}
            during = http.get("/metrics").text
            assert _metric(during, "loraserve_retiring_adapters") == 1
            assert _metric(during, "loraserve_merged_bytes") == 0, "a deleted adapter's copy frees its budget"
            assert _complete(url, "s2@1").status_code == 404
            assert [line for line in lines if line][-1] == "data: [DONE]"  # the running request finishes
        after = httpx.get(url + "/metrics").text
        assert _metric(after, "loraserve_retiring_adapters") == 0
        assert _metric(after, "loraserve_device_adapters") == 0
        assert _metric(after, "loraserve_merged_adapters") == 0
        assert "s2@1" not in server.state.registry.cache
        assert engine.snapshot.pinned == frozenset()


def test_snapshot_fields_are_immutable(llama_dir):
    runner = AsyncEngine(make_engine(llama_dir))
    snapshot = runner.snapshot
    with pytest.raises(TypeError):
        snapshot.traffic_shares["x"] = 1.0  # type: ignore[index]
    assert isinstance(snapshot.device_adapters, frozenset) and isinstance(snapshot.merge_events, tuple)
    assert not isinstance(snapshot.merge_events, deque)
