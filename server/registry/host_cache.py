"""The host-memory tier: validated adapters kept in an LRU bounded by their bytes (`adapter.nbytes`)."""

import threading
from collections import OrderedDict
from dataclasses import dataclass

from server.lora.adapter import LoraAdapter


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    loads: int  # reads from the blob store (misses that did the work)
    load_seconds: float  # their total latency
    evictions: int
    entries: int
    used_bytes: int
    capacity_bytes: int


class HostCache:
    """LRU of LoraAdapter objects keyed by `adapter.name` ("name@version"), at most `capacity_bytes` in
    all. Thread-safe: every method holds one lock, and none of them does I/O."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()  # oldest use first
        self._used = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._loads = self._evictions = 0
        self._load_seconds = 0.0

    def get(self, key: str) -> LoraAdapter | None:
        """The adapter, now the most recently used, or None (counted as a miss)."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            return adapter

    def peek(self, key: str) -> LoraAdapter | None:
        """The adapter or None, leaving the order and the statistics alone."""
        with self._lock:
            return self._entries.get(key)

    def put(self, adapter: LoraAdapter) -> list[str]:
        """Insert (or refresh) an adapter as most recently used; evict the least recently used until it
        fits and return their keys. An adapter larger than the whole budget is not kept."""
        with self._lock:
            self._remove(adapter.name)
            if adapter.nbytes > self.capacity_bytes:
                return []
            evicted = []
            while self._used + adapter.nbytes > self.capacity_bytes:
                key, oldest = self._entries.popitem(last=False)
                self._used -= oldest.nbytes
                self._evictions += 1
                evicted.append(key)
            self._entries[adapter.name] = adapter
            self._used += adapter.nbytes
            return evicted

    def evict(self, key: str) -> bool:
        """Drop one entry (e.g. its version was deleted); False if it was not cached."""
        with self._lock:
            return self._remove(key)

    def record_load(self, seconds: float) -> None:
        with self._lock:
            self._loads += 1
            self._load_seconds += seconds

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._loads, self._load_seconds, self._evictions,
                              len(self._entries), self._used, self.capacity_bytes)

    def _remove(self, key: str) -> bool:
        adapter = self._entries.pop(key, None)
        if adapter is None:
            return False
        self._used -= adapter.nbytes
        return True
