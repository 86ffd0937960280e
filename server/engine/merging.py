"""Which adapters deserve a merged copy of their weights, decided from measured traffic.

Each adapter's share of recent tokens is a decaying average (token-weighted, half-life in tokens).
An adapter is promoted when its share reaches `promote_share` and demoted when it falls below
`demote_share` (lower): the gap is hysteresis, so a fluctuating workload does not thrash. Merged
copies live within a byte budget; a promotion that does not fit displaces copies of adapters with a
smaller share, never a pinned one. Copies are built on a worker thread, so the serving loop never
waits for one; the engine installs finished copies between steps. A build that fails (a merged weight
that overflows to inf, say) is logged and recorded as a "failed" event; serving goes on unmerged.
"""

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

import torch

from server.engine.snapshot import MergeEvent
from server.engine.torch_threads import use_one_thread
from server.lora.adapter import LoraAdapter
from server.lora.merge import merge_adapter, merged_nbytes
from server.lora.targets import TargetModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergePolicy:
    budget_bytes: int
    promote_share: float = 0.5
    demote_share: float = 0.25
    half_life_tokens: int = 4096
    min_tokens: int = 512  # no decision before this much traffic has been seen

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0


class TrafficShares:
    """Each adapter's share of recent tokens: decayed token counts over the decayed total (so shares are
    true fractions from the first step on). The bare base counts as traffic but is never merged."""

    def __init__(self, half_life_tokens: int):
        self._half_life = half_life_tokens
        self._counts: dict[str, float] = {}
        self._total = 0.0
        self.tokens_seen = 0

    def update(self, tokens_by_adapter: dict[str | None, int]) -> None:
        step_tokens = sum(tokens_by_adapter.values())
        if step_tokens == 0:
            return
        keep = 0.5 ** (step_tokens / self._half_life)
        self._total = self._total * keep + step_tokens
        counts = {name: count * keep for name, count in self._counts.items()}
        for name, count in tokens_by_adapter.items():
            if name is not None:
                counts[name] = counts.get(name, 0.0) + count
        self._counts = {name: c for name, c in counts.items() if c / self._total > 1e-4}
        self.tokens_seen += step_tokens

    @property
    def shares(self) -> dict[str, float]:
        return {name: count / self._total for name, count in self._counts.items()}

    def share(self, name: str) -> float:
        return self._counts.get(name, 0.0) / self._total if self._total else 0.0


class MergeManager:
    def __init__(self, policy: MergePolicy, targets: dict[str, TargetModule]):
        # A quantized base is never merged (server/lora/merge.py says why): traffic promotes nothing, and
        # a pin records a failed build with the reason.
        self.policy = replace(policy, budget_bytes=0) if any(t.quantized for t in targets.values()) else policy
        self.traffic = TrafficShares(policy.half_life_tokens)
        self.merged: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> module -> merged weight
        self._sizes: dict[str, int] = {}  # adapter -> bytes of its copy (read after every step)
        self.pinned: set[str] = set()
        self.events: deque[MergeEvent] = deque(maxlen=256)
        self.promotions = 0
        self.demotions = 0
        self.failures = 0
        self._targets = targets
        self._pending: dict[str, tuple[Future, str]] = {}
        self._failed: set[str] = set()  # adapters are immutable: a build that failed would fail again
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraserve-merge",
                                           initializer=use_one_thread)  # the engine's cores stay its own

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def observe(self, tokens_by_adapter: dict[str | None, int], adapters: dict[str, LoraAdapter]) -> None:
        """After each step: update traffic, install finished copies, start or drop copies per the policy."""
        self.traffic.update(tokens_by_adapter)
        self._install_finished()
        if not self.policy.enabled or self.traffic.tokens_seen < self.policy.min_tokens:
            return
        for name in list(self.merged):
            if name not in self.pinned and self.traffic.share(name) < self.policy.demote_share:
                self.demote(name, f"share {self.traffic.share(name):.2f} < {self.policy.demote_share}")
        for name, share in sorted(self.traffic.shares.items(), key=lambda kv: -kv[1]):
            if share >= self.policy.promote_share and name in adapters and not self._has(name):
                self._start(adapters[name], f"share {share:.2f} >= {self.policy.promote_share}")

    def pin(self, adapter: LoraAdapter) -> None:
        """Keep a merged copy whatever the traffic (within the budget)."""
        self.pinned.add(adapter.name)
        if not self._has(adapter.name):
            self._start(adapter, "pinned")

    def unpin(self, name: str) -> None:
        self.pinned.discard(name)

    def demote(self, name: str, reason: str) -> None:
        if self.merged.pop(name, None) is not None:
            del self._sizes[name]
            self.demotions += 1
            self.events.append(MergeEvent(name, "demote", reason, time.time()))

    def forget(self, name: str) -> None:
        """The adapter is gone (deleted): drop its copy, pin and pending build."""
        self.pinned.discard(name)
        self._pending.pop(name, None)
        self._failed.discard(name)
        self.demote(name, "adapter removed")

    def wait_for_builds(self) -> None:
        """Block until queued copies are built and installed (tests, benchmarks, warm-up)."""
        wait([future for future, _ in self._pending.values()])
        self._install_finished()

    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._pending)

    def _has(self, name: str) -> bool:
        """A copy exists, is being built, or cannot be built: nothing to start."""
        return name in self.merged or name in self._pending or name in self._failed

    def _start(self, adapter: LoraAdapter, reason: str) -> None:
        self._pending[adapter.name] = (self._builder.submit(merge_adapter, adapter, self._targets), reason)

    def _install_finished(self) -> None:
        for name, (future, reason) in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[name]
            if future.exception() is not None:
                self._record_failure(name, future.exception())
                continue
            weights = future.result()
            size = merged_nbytes(weights)
            if self._make_room(name, size):
                self.merged[name] = weights
                self._sizes[name] = size
                self.promotions += 1
                self.events.append(MergeEvent(name, "promote", reason, time.time()))

    def _record_failure(self, name: str, error: BaseException) -> None:
        log.error("merged copy of %s not built: %s", name, error, exc_info=error)
        self.failures += 1
        self._failed.add(name)
        self.events.append(MergeEvent(name, "failed", str(error), time.time()))

    def _make_room(self, name: str, size: int) -> bool:
        """Free budget for `size` bytes by demoting copies with a smaller share; False if impossible."""
        if size > self.policy.budget_bytes:
            return False
        share = float("inf") if name in self.pinned else self.traffic.share(name)
        victims = sorted((n for n in self.merged if n not in self.pinned and self.traffic.share(n) < share),
                         key=self.traffic.share)
        while self.used_bytes + size > self.policy.budget_bytes:
            if not victims:
                return False
            victim = victims.pop(0)
            self.demote(victim, f"displaced by {name} (budget)")
        return True
