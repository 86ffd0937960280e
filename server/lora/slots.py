"""Device slots: fixed, zero-initialised stacked buffers that hold the adapters the batch can use.

Each module that any adapter has adapted owns `lora_a (S, d_in, R)` and `lora_b (S, R, d_out)`, allocated once and padded to
the maximum rank, so a freed slot is inert, mixed ranks are harmless, and the buffers never move.
An adapter is resident in one slot for all modules at once. Residents that no running sequence uses
are evicted least recently used first when a new adapter needs a slot.
"""

import time
from collections import Counter, OrderedDict

import torch

from server.lora.adapter import LoraAdapter, LoraModuleWeights
from server.lora.targets import TargetModule


class ModuleSlots:
    """The stacked adapter weights of one base module."""

    def __init__(self, target: TargetModule, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.lora_a = torch.zeros(num_slots, target.in_features, max_rank, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, max_rank, target.out_features, dtype=dtype, device=device)
        # Row `num_slots` is all ones: the DoRA factor of tokens without an adapter (or plain LoRA).
        self.dora_scale = torch.ones(num_slots + 1, target.out_features, dtype=dtype, device=device)
        self.slot_ranks = [0] * num_slots

    def write(self, slot: int, weights: LoraModuleWeights | None) -> None:
        """Put one adapter's weights for this module in `slot` (None: the adapter leaves it alone)."""
        if weights is None and self.slot_ranks[slot] == 0:
            return
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.dora_scale[slot].fill_(1.0)
        rank = 0
        if weights is not None:
            rank = weights.rank
            self.lora_a[slot, :, :rank].copy_(weights.lora_a.T)
            self.lora_b[slot, :rank].copy_(weights.lora_b.T)
            if weights.dora_scale is not None:
                self.dora_scale[slot].copy_(weights.dora_scale)
        self.slot_ranks[slot] = rank


class LoraSlotPool:
    """Which adapter sits in which slot, who is using it, and which to evict."""

    def __init__(self, targets: dict[str, TargetModule], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self._targets = targets
        self._buffer_args = (num_slots, max_rank, dtype, device)
        # Buffers exist only for modules some adapter has adapted: all-linear buffers for every slot
        # at the maximum rank would cost as much memory as a small base model.
        self.modules: dict[str, ModuleSlots] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recent first
        self._dora: set[str] = set()
        self._users: Counter[str] = Counter()
        self.loads = 0
        self.evictions = 0
        self.load_seconds = 0.0

    def slot_of(self, name: str) -> int | None:
        return self._resident.get(name)

    def uses_dora(self, name: str) -> bool:
        return name in self._dora

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def can_acquire(self, name: str) -> bool:
        return name in self._resident or len(self._resident) < self.num_slots or self._evictable() is not None

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """A slot holding `adapter`, loading it (and evicting an idle resident) if needed; None if all busy."""
        slot = self._resident.get(adapter.name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._load(adapter, slot)
        self._resident.move_to_end(adapter.name)
        self._users[adapter.name] += 1
        return slot

    def release(self, name: str) -> None:
        self._users[name] -= 1
        if self._users[name] <= 0:
            del self._users[name]

    def evict(self, name: str) -> bool:
        """Drop an idle adapter from its slot now (e.g. it was deleted); False if running requests use it."""
        if name not in self._resident or self._users[name] > 0:
            return False
        self._clear(self._resident.pop(name), name)
        return True

    def _free_slot(self) -> int | None:
        used = set(self._resident.values())
        free = next((s for s in range(self.num_slots) if s not in used), None)
        if free is not None:
            return free
        victim = self._evictable()
        if victim is None:
            return None
        slot = self._resident.pop(victim)
        self._clear(slot, victim)
        self.evictions += 1
        return slot

    def _evictable(self) -> str | None:
        return next((name for name in self._resident if self._users[name] == 0), None)

    def _load(self, adapter: LoraAdapter, slot: int) -> None:
        started = time.perf_counter()
        for name in adapter.modules.keys() - self.modules.keys():
            self.modules[name] = ModuleSlots(self._targets[name], *self._buffer_args)
        for name, module in self.modules.items():
            module.write(slot, adapter.modules.get(name))
        self._resident[adapter.name] = slot
        if any(w.dora_scale is not None for w in adapter.modules.values()):
            self._dora.add(adapter.name)
        self.loads += 1
        self.load_seconds += time.perf_counter() - started

    def _clear(self, slot: int, name: str) -> None:
        for module in self.modules.values():
            module.write(slot, None)
        self._dora.discard(name)
