"""A frozen picture of the engine's state, made by the engine thread after each step or command.

The engine is single-threaded on purpose; routes and the metrics scrape run on other threads. They never
read the engine: they read the latest `EngineSnapshot`, which the engine thread builds from its own state
and publishes by swapping one reference (atomic in Python). Every field is immutable (tuples, frozensets,
read-only mappings), so a reader can iterate it while the engine moves on.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class MergeEvent:
    adapter: str
    action: str  # "promote" | "demote" | "failed"
    reason: str
    at: float  # unix time


@dataclass(frozen=True)
class EngineSnapshot:
    # Requests
    waiting: int = 0
    running: int = 0
    # The KV cache
    kv_blocks: int = 0
    kv_free_blocks: int = 0
    # Adapters: device slots, merged copies, deletions waiting for their last request
    device_adapters: frozenset[str] = frozenset()
    merged: frozenset[str] = frozenset()
    merged_bytes: int = 0
    merge_pending: frozenset[str] = frozenset()
    pinned: frozenset[str] = frozenset()
    retiring: frozenset[str] = frozenset()
    traffic_shares: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    merge_events: tuple[MergeEvent, ...] = ()
    # Counters since start
    slot_loads: int = 0
    slot_evictions: int = 0
    slot_moves: int = 0
    slot_load_seconds: float = 0.0
    merge_promotions: int = 0
    merge_demotions: int = 0
    merge_failures: int = 0
    preemptions: int = 0
    prefix_cached_blocks: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_evictions: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    tokens_generated: int = 0
    merged_steps: int = 0
    mixed_merged_steps: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_free_blocks / self.kv_blocks if self.kv_blocks else 0.0

    def residency(self, key: str) -> str | None:
        """'merged' or 'device' where the engine holds the adapter `key`; None if it holds neither."""
        if key in self.merged:
            return "merged"
        if key in self.device_adapters:
            return "device"
        return None

    def events_of(self, key: str) -> tuple[MergeEvent, ...]:
        return tuple(e for e in self.merge_events if e.adapter == key)
