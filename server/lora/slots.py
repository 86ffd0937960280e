"""Device slots: fixed, zero-initialised stacked buffers that hold the adapters the batch can use.

Each module that any adapter has adapted owns `lora_a (S, R, d_in)` and `lora_b (S, R, d_out)`, allocated
once and padded to the maximum rank, so a freed slot is inert, mixed ranks are harmless, and the buffers
never move. Both keep rank as the middle axis, so the first r rows of a range of slots are a strided view
that reads exactly those adapters' bytes.

An adapter is resident in one slot for all modules at once. Residents are kept sorted by rank (moving
a few between steps when a new one arrives), so that adapters of one rank sit side by side and the
batched op reads them as one range at their true rank. Residents that no running sequence uses are
evicted least recently used first when a new adapter needs a slot. Slot numbers are looked up every
step (`slot_of`), never kept across steps, which is what makes moving residents safe.
"""

import time
from collections import Counter, OrderedDict
from dataclasses import replace

import torch

from server.lora.adapter import LoraAdapter, LoraModuleWeights
from server.lora.targets import LINEAR, TargetModule

FREE = 0  # the rank recorded for an empty slot


class ModuleSlots:
    """The adapter weights of one base module: stacked buffers for linear layers, served by the batched
    op; per-slot weights, served slot by slot by the module's wrapper, for the output head and the input
    embedding (their vocabulary-sized factors stacked for every slot at the maximum rank would cost
    gigabytes) and for full copies and token rows on any module."""

    def __init__(self, target: TargetModule, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.stacked = target.kind == LINEAR
        shape = (num_slots, max_rank) if self.stacked else (0, 0)
        self.lora_a = torch.zeros(*shape, target.in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(*shape, target.out_features, dtype=dtype, device=device)
        # Row `num_slots` is all ones: the DoRA factor of tokens without an adapter (or plain LoRA).
        self.dora_scale = torch.ones(num_slots + 1, target.out_features, dtype=dtype, device=device)
        # Per-slot bias deltas (PEFT's bias="lora_only"/"all", lora_bias); row `num_slots` stays zero.
        # Allocated when the first adapter with one arrives: most adapters change no bias.
        self.bias: torch.Tensor | None = None
        self._bias_shape = (num_slots + 1, target.out_features, dtype, device)
        self.per_slot: dict[int, LoraModuleWeights] = {}  # slot -> weights served slot by slot (on the device)
        self._device = device
        self.slot_ranks = [0] * num_slots
        self.rank_tensor = torch.zeros(num_slots, dtype=torch.long)  # the same, for the fused CPU op

    @property
    def per_slot_tensors(self) -> list[torch.Tensor]:
        return [t for w in self.per_slot.values() for t in w.tensors]

    def write(self, slot: int, weights: LoraModuleWeights | None, moved: dict[int, torch.Tensor] | None = None) -> None:
        """Put one adapter's weights for this module in `slot` (None: the adapter leaves it alone); `moved`
        holds the adapter's tensors already on the device (a tied head shares the embedding's copy)."""
        self._clear(slot)
        if weights is None:
            return
        if weights.dora_scale is not None:
            self.dora_scale[slot].copy_(weights.dora_scale)
        if weights.bias is not None:
            self._bias_buffer()[slot].copy_(weights.bias)
        if not self.stacked or weights.per_token:
            self.per_slot[slot] = _to_device(weights, self._device, {} if moved is None else moved)
        if self.stacked:
            rank = weights.rank
            self.lora_a[slot, :rank].copy_(weights.lora_a)
            self.lora_b[slot, :rank].copy_(weights.lora_b.T)
            self._set_rank(slot, rank)

    def move(self, source: int, target: int) -> None:
        """Move the contents of `source` to the empty slot `target`, leaving `source` empty."""
        rank = self.slot_ranks[source]  # 0 for weights held slot by slot
        if rank:
            self.lora_a[target, :rank].copy_(self.lora_a[source, :rank])
            self.lora_b[target, :rank].copy_(self.lora_b[source, :rank])
        self.dora_scale[target].copy_(self.dora_scale[source])
        if self.bias is not None:
            self.bias[target].copy_(self.bias[source])
        if source in self.per_slot:
            self.per_slot[target] = self.per_slot.pop(source)
        self._set_rank(target, rank)
        self._clear(source)

    def _clear(self, slot: int) -> None:
        rank = self.slot_ranks[slot]  # rows beyond a slot's rank are zero already
        if rank:
            self.lora_a[slot, :rank].zero_()
            self.lora_b[slot, :rank].zero_()
            self._set_rank(slot, 0)
        self.dora_scale[slot].fill_(1.0)  # a module without factors has rank 0: clear these whatever the rank
        if self.bias is not None:
            self.bias[slot].zero_()
        self.per_slot.pop(slot, None)

    def _bias_buffer(self) -> torch.Tensor:
        if self.bias is None:
            rows, width, dtype, device = self._bias_shape
            self.bias = torch.zeros(rows, width, dtype=dtype, device=device)
        return self.bias

    def _set_rank(self, slot: int, rank: int) -> None:
        self.slot_ranks[slot] = rank
        self.rank_tensor[slot] = rank


def _to_device(weights: LoraModuleWeights, device: torch.device, moved: dict[int, torch.Tensor]) -> LoraModuleWeights:
    def move(t):
        if t is not None and id(t) not in moved:
            moved[id(t)] = t.to(device)
        return None if t is None else moved[id(t)]

    return replace(weights, lora_a=move(weights.lora_a), lora_b=move(weights.lora_b), dora_scale=None, bias=None,
                   copy=tuple(map(move, weights.copy)) if weights.copy else None,
                   tokens=tuple(map(move, weights.tokens)) if weights.tokens else None)


class LoraSlotPool:
    """Which adapter sits in which slot, who is using it, and which to evict."""

    def __init__(self, targets: dict[str, TargetModule], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, per_slot_budget: int = 0):
        self.num_slots = num_slots
        # Bytes of weights held slot by slot (full copies above all) the residents may hold together; 0: no
        # limit. Idle residents are evicted to make room, as for a slot.
        self.per_slot_budget = per_slot_budget
        self._per_slot_bytes: dict[str, int] = {}  # resident adapter -> its bytes held slot by slot
        self._targets = targets
        self._buffer_args = (num_slots, max_rank, dtype, device)
        # Buffers exist only for modules some adapter has adapted: all-linear buffers for every slot
        # at the maximum rank would cost as much memory as a small base model.
        self.modules: dict[str, ModuleSlots] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recent first
        self.adapter_ranks = [FREE] * num_slots  # per slot, its adapter's largest rank: non-decreasing
        self._dora: set[str] = set()
        self._per_row: set[str] = set()  # adapters with a bias or weights served slot by slot
        self._users: Counter[str] = Counter()
        self.loads = 0
        self.evictions = 0
        self.moves = 0
        self.load_seconds = 0.0

    def slot_of(self, name: str) -> int | None:
        return self._resident.get(name)

    @property
    def any_dora(self) -> bool:
        """A DoRA adapter is resident: layers then apply the per-token factor when rows are set."""
        return bool(self._dora)

    def needs_rows(self, name: str) -> bool:
        """Whether the adapter's tokens need their slot row in every module (a DoRA factor, a bias, or
        weights served slot by slot)."""
        return name in self._dora or name in self._per_row

    @property
    def per_slot_bytes(self) -> int:
        """Bytes of weights held slot by slot (full copies, head and embedding factors, token rows)."""
        unique = {t.data_ptr(): t for module in self.modules.values() for t in module.per_slot_tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def can_acquire(self, name: str) -> bool:
        return name in self._resident or len(self._resident) < self.num_slots or self._evictable() is not None

    def fits(self, adapter: LoraAdapter) -> bool:
        """Whether the adapter's weights held slot by slot fit the budget at all (with every slot empty)."""
        return not self.per_slot_budget or self.slot_bytes(adapter) <= self.per_slot_budget

    def slot_bytes(self, adapter: LoraAdapter) -> int:
        """The bytes the adapter holds slot by slot once resident: its full copies, token rows, and the head's
        and embedding's factors (a tensor two modules share, once)."""
        held = [w for m, w in adapter.modules.items() if self._targets[m].kind != LINEAR or w.per_token]
        unique = {id(t): t for w in held for t in (w.lora_a, w.lora_b, *(w.copy or ()), *(w.tokens or ()))
                  if t is not None}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """A slot holding `adapter`, loading it (and evicting idle residents for a slot and for the bytes it
        holds slot by slot) if needed; None if the residents in use leave no room."""
        if adapter.name not in self._resident:
            need = self.slot_bytes(adapter)
            while len(self._resident) == self.num_slots or self._over_budget(need):
                if not self._evict_one():
                    return None
            self._load(adapter)
            self._per_slot_bytes[adapter.name] = need
        self._resident.move_to_end(adapter.name)
        self._users[adapter.name] += 1
        return self._resident[adapter.name]

    def release(self, name: str) -> None:
        self._users[name] -= 1
        if self._users[name] <= 0:
            del self._users[name]

    def evict(self, name: str) -> bool:
        """Drop an idle adapter from its slot now (e.g. it was deleted); False if running requests use it."""
        if name not in self._resident or self._users[name] > 0:
            return False
        self._clear(name)
        return True

    def _over_budget(self, need: int) -> bool:
        return bool(self.per_slot_budget) and sum(self._per_slot_bytes.values()) + need > self.per_slot_budget

    def _evict_one(self) -> bool:
        victim = self._evictable()
        if victim is None:
            return False
        self._clear(victim)
        self.evictions += 1
        return True

    def _evictable(self) -> str | None:
        return next((name for name in self._resident if self._users[name] == 0), None)

    def _load(self, adapter: LoraAdapter) -> None:
        started = time.perf_counter()
        for name in adapter.modules.keys() - self.modules.keys():
            self.modules[name] = ModuleSlots(self._targets[name], *self._buffer_args)
        slot = self._place(adapter.max_rank)
        moved: dict[int, torch.Tensor] = {}
        for name, module in self.modules.items():
            module.write(slot, adapter.modules.get(name), moved)
        self._resident[adapter.name] = slot
        self.adapter_ranks[slot] = adapter.max_rank
        if any(w.dora_scale is not None for w in adapter.modules.values()):
            self._dora.add(adapter.name)
        if any(w.bias is not None or not self.modules[m].stacked or w.per_token for m, w in adapter.modules.items()):
            self._per_row.add(adapter.name)
        self.loads += 1
        self.load_seconds += time.perf_counter() - started

    def _clear(self, name: str) -> None:
        slot = self._resident.pop(name)
        self._per_slot_bytes.pop(name, None)
        for module in self.modules.values():
            module.write(slot, None)
        self.adapter_ranks[slot] = FREE
        self._dora.discard(name)
        self._per_row.discard(name)

    # ---- keeping residents sorted by rank -------------------------------------------------------

    def _place(self, rank: int) -> int:
        """An empty slot for an adapter of `rank` where residents stay sorted, moving some if needed.

        Residents of equal rank bound a region [lo, hi] where the new one fits without moves; inside it,
        take the empty slot nearest to its own rank's residents (or the middle, leaving room on both
        sides). With no empty slot there, shift residents toward the nearest empty slot outside, one
        resident per rank in between."""
        lower = [s for s, r in enumerate(self.adapter_ranks) if FREE < r < rank]
        higher = [s for s, r in enumerate(self.adapter_ranks) if r > rank]
        lo = lower[-1] + 1 if lower else 0
        hi = higher[0] - 1 if higher else self.num_slots - 1
        empty = [s for s in range(lo, hi + 1) if self.adapter_ranks[s] == FREE]
        if empty:
            same = [s for s in range(lo, hi + 1) if self.adapter_ranks[s] == rank]
            anchors = same or [(lo + hi) // 2]
            return min(empty, key=lambda s: min(abs(s - a) for a in anchors))
        left = next((s for s in range(lo - 1, -1, -1) if self.adapter_ranks[s] == FREE), None)
        right = next((s for s in range(hi + 1, self.num_slots) if self.adapter_ranks[s] == FREE), None)
        options = [(self._shift_cost(start, end), start, end) for start, end in ((lo - 1, left), (hi + 1, right))
                   if end is not None]
        _, start, end = min(options)
        self._shift(start, end)
        return start

    def _shift_cost(self, start: int, empty: int) -> int:
        """Moves needed to empty `start` by shifting residents toward the empty slot: one per rank between."""
        step = 1 if empty > start else -1
        return len({self.adapter_ranks[s] for s in range(start, empty, step)})

    def _shift(self, start: int, empty: int) -> None:
        """Empty `start` (occupied, as is everything up to the empty slot): each rank block between
        passes its first resident to the slot just past its last one."""
        step = 1 if empty > start else -1
        chain, position = [], start
        while position != empty:
            end = position
            while end + step != empty and self.adapter_ranks[end + step] == self.adapter_ranks[position]:
                end += step
            chain.append((position, end + step))
            position = end + step
        for source, target in reversed(chain):
            self._move(source, target)

    def _move(self, source: int, target: int) -> None:
        name = next(n for n, s in self._resident.items() if s == source)
        for module in self.modules.values():
            module.move(source, target)
        self._resident[name] = target  # keeps its place in the LRU order
        self.adapter_ranks[target], self.adapter_ranks[source] = self.adapter_ranks[source], FREE
        self.moves += 1
