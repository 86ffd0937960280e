"""The host-memory LRU: bounded by adapter bytes, least recently used out first, counted."""

import threading

import torch

from server.lora.adapter import LoraAdapter, LoraModuleWeights
from server.lora.peft_config import LoraSpec
from server.registry.host_cache import HostCache


def _adapter(key: str, kib: int) -> LoraAdapter:
    """An adapter of exactly `kib` KiB: A (1, 128·kib) and B (128·kib, 1) in float32."""
    d = 128 * kib
    weights = LoraModuleWeights(lora_a=torch.zeros(1, d), lora_b=torch.zeros(d, 1), dora_scale=None)
    adapter = LoraAdapter(name=key, spec=LoraSpec(), modules={"m": weights})
    assert adapter.nbytes == kib * 1024
    return adapter


def test_lru_stays_within_the_byte_budget():
    cache = HostCache(capacity_bytes=9 * 1024)
    for key in ("a@1", "b@1", "c@1"):
        assert cache.put(_adapter(key, 3)) == []
    assert cache.get("a@1") is not None  # a is now the most recently used; b is the oldest
    assert cache.put(_adapter("d@1", 4)) == ["b@1", "c@1"]  # 9 KiB + 4 KiB in a 9 KiB budget: two must go
    assert cache.keys() == ["a@1", "d@1"]
    stats = cache.stats()
    assert (stats.used_bytes, stats.entries, stats.evictions) == (7 * 1024, 2, 2)
    assert stats.used_bytes <= stats.capacity_bytes


def test_an_adapter_larger_than_the_budget_is_not_kept():
    cache = HostCache(capacity_bytes=4 * 1024)
    cache.put(_adapter("small@1", 2))
    assert cache.put(_adapter("huge@1", 5)) == []
    assert "huge@1" not in cache and "small@1" in cache


def test_reinserting_a_key_does_not_count_its_bytes_twice():
    cache = HostCache(capacity_bytes=8 * 1024)
    cache.put(_adapter("a@1", 3))
    cache.put(_adapter("a@1", 3))
    assert cache.stats().used_bytes == 3 * 1024 and cache.keys() == ["a@1"]


def test_hits_misses_loads_and_explicit_eviction():
    cache = HostCache(capacity_bytes=8 * 1024)
    cache.put(_adapter("a@1", 1))
    assert cache.get("a@1").name == "a@1" and cache.get("b@1") is None
    assert cache.peek("b@1") is None  # peeking counts nothing
    cache.record_load(0.25)
    cache.record_load(0.5)
    assert cache.evict("a@1") and not cache.evict("a@1")
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.load_seconds) == (1, 1, 2, 0.75)
    assert (stats.entries, stats.used_bytes) == (0, 0)


def test_concurrent_puts_keep_the_accounting_exact():
    cache = HostCache(capacity_bytes=16 * 1024)

    def worker(prefix: str) -> None:
        for i in range(200):
            cache.put(_adapter(f"{prefix}{i % 7}@1", 1 + i % 3))
            cache.get(f"{prefix}{(i + 3) % 7}@1")

    threads = [threading.Thread(target=worker, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert stats.used_bytes == sum(cache.peek(k).nbytes for k in cache.keys()) <= 16 * 1024
