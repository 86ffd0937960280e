"""The batched low-rank path: each token adds its own adapter's `(x·Aᵀ)·B'ᵀ`, many adapters per call.

Semantics (the reference below is this loop, and the oracle for every faster version):

    for t in range(T):
        s = token_slots[t]
        if s >= 0:
            out[t] += (x[t] @ lora_a[s].T) @ lora_b[s]      # lora_a: (S, R, d_in), lora_b: (S, R, d_out)

`B·A` is never materialised: the cost is O(T·r·(d_in + d_out)), not O(d_in·d_out).
The fast path relies on the runner having placed each adapter's tokens next to each other:
long runs (prefills, a popular adapter) get one pair of matmuls at their true rank. Short runs (decode
tokens of many adapters) go through one batched matmul pair per *slot group*, so the number of kernel
launches grows with the number of distinct ranks in the step, not with the number of adapters (on a
CPU each call costs microseconds whatever its size, and a step makes these calls in every adapted module):

* a group is a range of slots whose adapters share a rank (the slot pool keeps residents sorted by
  rank), read as a view of the stacked buffers at that rank: the bytes read are the adapters' true
  bytes, not every adapter padded to the largest rank;
* slots scattered too thinly for a range view are gathered into one group, padded to its largest rank;
* when a group's tokens are contiguous with the same count per slot (decode, where each adapter's
  sequences sit side by side), its grid is a view of `x` and its delta is added into `out` in place:
  no gather, no scatter; a group of one such slot is just a run (a matmul pair is cheaper than bmm).

When a step has only a few such tokens (the rare adapters beside a merged one), the plan also lists
them one by one for the fused CPU op (`cpu_kernel.py`): one call per module instead of a few per group.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.lora.cpu_kernel import LoraTokensOp


@dataclass(frozen=True)
class Run:
    """Tokens [start, end) all use slot `slot`."""

    start: int
    end: int
    slot: int


@dataclass(frozen=True)
class SlotGroup:
    """Short runs served by one bmm pair: a (len(slots) × max_len) grid of tokens against the slots' weights.

    Weights: `slot_index` None means `slots` is the contiguous range slots[0]..slots[-1], read as a view
    (idle slots inside the range get zero rows); otherwise the slots are gathered by index.
    Tokens: `token_index` None means tokens [token_start, token_start + len(slots) * max_len) hold
    exactly max_len tokens of each slot in grid order, so the grid is a view of x. Otherwise token
    token_index[i] goes to row pad_index[i] of the flattened grid.
    """

    slots: tuple[int, ...]
    used_slots: tuple[int, ...]  # the slots that have tokens: the rank to read is their largest
    max_len: int
    slot_index: torch.Tensor | None
    token_start: int
    token_index: torch.Tensor | None
    pad_index: torch.Tensor | None

    @property
    def num_rows(self) -> int:
        return len(self.slots) * self.max_len


@dataclass(frozen=True)
class FusedTokens:
    """The same step for the fused op: long runs (and long subtractions) still by matmul, every other
    token's add and subtract one row of `tokens`: (token, slot, sign), sorted by token."""

    runs: tuple[Run, ...]
    subtract: tuple[Run, ...]
    tokens: torch.Tensor


@dataclass(frozen=True)
class LoraPlan:
    """How one forward pass applies adapters; built once per step, read by every LoRA layer.

    `subtract` runs take their slot's delta away: when the step runs on a merged copy W + Δm, the
    other tokens get W + Δs by adding their own Δs and subtracting Δm (both low rank).
    """

    runs: tuple[Run, ...]  # each served by its own matmul pair
    groups: tuple[SlotGroup, ...]
    subtract: tuple[Run, ...] = ()
    fused: FusedTokens | None = None  # set when the step has few short tokens and a fused op may serve them

    @property
    def has_lora(self) -> bool:
        return bool(self.runs or self.groups or self.subtract)


def plan_runs(token_slots: list[int], long_run_min: int, device: torch.device, subtract: tuple[Run, ...] = (),
              adapter_ranks: Sequence[int] | None = None, fused_max_tokens: int = 0) -> LoraPlan:
    """Split the per-token slots (adapter tokens contiguous; -1 = no adapter) into runs and slot groups.

    `adapter_ranks[s]` is the (largest) rank of the adapter in slot s; slots of different rank go to
    different groups (None: one rank for all). With at most `fused_max_tokens` tokens outside long runs
    (adds and subtractions counted), the plan also carries them for the fused op."""
    runs = []
    start = 0
    for t in range(1, len(token_slots) + 1):
        if t == len(token_slots) or token_slots[t] != token_slots[start]:
            if token_slots[start] >= 0:
                runs.append(Run(start, t, token_slots[start]))
            start = t
    matmul_runs = [r for r in runs if r.end - r.start >= long_run_min]
    short = [r for r in runs if r.end - r.start < long_run_min]
    fused = _fused_tokens(matmul_runs, short, subtract, long_run_min, fused_max_tokens, device)
    groups = []
    for group in _group_short_runs(short, adapter_ranks, device):
        if len(group.slots) == 1 and group.token_index is None:  # one slot's contiguous tokens: a run
            matmul_runs.append(Run(group.token_start, group.token_start + group.max_len, group.slots[0]))
        else:
            groups.append(group)
    return LoraPlan(runs=tuple(matmul_runs), groups=tuple(groups), subtract=subtract, fused=fused)


def _fused_tokens(long_runs: list[Run], short: list[Run], subtract: tuple[Run, ...], long_run_min: int,
                  max_tokens: int, device: torch.device) -> FusedTokens | None:
    short_subtract = [r for r in subtract if r.end - r.start < long_run_min]
    entries = [(t, r.slot, 1) for r in short for t in range(r.start, r.end)]
    entries += [(t, r.slot, -1) for r in short_subtract for t in range(r.start, r.end)]
    if not entries or len(entries) > max_tokens:
        return None
    return FusedTokens(runs=tuple(long_runs), subtract=tuple(r for r in subtract if r not in short_subtract),
                       tokens=torch.tensor(sorted(entries), dtype=torch.long, device=device))


def _group_short_runs(runs: list[Run], adapter_ranks: Sequence[int] | None, device: torch.device
                      ) -> tuple[SlotGroup, ...]:
    tokens_of: dict[int, list[int]] = {}  # a slot may have several short runs (split by a long run)
    for r in runs:
        tokens_of.setdefault(r.slot, []).extend(range(r.start, r.end))
    groups, scattered = [], []
    for same_rank in _split_by_rank(sorted(tokens_of), adapter_ranks):
        if same_rank[-1] - same_rank[0] + 1 <= 2 * len(same_rank):  # dense enough to read as a range
            span = tuple(range(same_rank[0], same_rank[-1] + 1))
            groups.append(_slot_group(span, tokens_of, gathered=False, device=device))
        else:
            scattered += same_rank
    if scattered:  # one gathered group: copying a few adapters costs less than a bmm pair per rank
        groups.append(_slot_group(tuple(scattered), tokens_of, gathered=True, device=device))
    return tuple(groups)


def _split_by_rank(slots: list[int], adapter_ranks: Sequence[int] | None) -> list[list[int]]:
    """Consecutive (in slot order) slots of equal rank, each list one candidate group."""
    classes: list[list[int]] = []
    for slot in slots:
        if classes and (adapter_ranks is None or adapter_ranks[slot] == adapter_ranks[classes[-1][-1]]):
            classes[-1].append(slot)
        else:
            classes.append([slot])
    return classes


def _slot_group(slots: tuple[int, ...], tokens_of: dict[int, list[int]], gathered: bool,
                device: torch.device) -> SlotGroup:
    counts = [len(tokens_of.get(slot, ())) for slot in slots]
    max_len = max(counts)
    tokens = [t for slot in slots for t in tokens_of.get(slot, ())]
    as_view = min(counts) == max_len and tokens == list(range(tokens[0], tokens[0] + len(tokens)))
    rows = [i * max_len + k for i, count in enumerate(counts) for k in range(count)]

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return SlotGroup(
        slots=slots,
        used_slots=tuple(slot for slot, count in zip(slots, counts) if count),
        max_len=max_len,
        slot_index=tensor(slots) if gathered else None,
        token_start=tokens[0],
        token_index=None if as_view else tensor(tokens),
        pad_index=None if as_view else tensor(rows),
    )


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             slot_ranks: list[int], plan: LoraPlan, fused_op: LoraTokensOp | None = None,
             rank_tensor: torch.Tensor | None = None) -> None:
    """out (T, d_out) += each token's own low-rank delta, in place. `slot_ranks`: this module's ranks
    (`rank_tensor`: the same as a tensor, for `fused_op`, which serves the plan's fused tokens if both
    are given)."""
    if fused_op is not None and plan.fused is not None:
        _add_runs(out, x, lora_a, lora_b, slot_ranks, plan.fused.runs, plan.fused.subtract)
        fused_op(out, x if x.stride(1) == 1 else x.contiguous(), lora_a, lora_b, rank_tensor, plan.fused.tokens)
        return
    _add_runs(out, x, lora_a, lora_b, slot_ranks, plan.runs, plan.subtract)
    for group in plan.groups:
        # Read only up to the largest rank among the group's slots for this module, not the buffers' maximum.
        rank = max(slot_ranks[slot] for slot in group.used_slots)
        if rank:
            _add_group(out, x, lora_a, lora_b, rank, group)


def _add_runs(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_ranks: list[int],
              runs: tuple[Run, ...], subtract: tuple[Run, ...]) -> None:
    for run_list, sign in ((runs, 1), (subtract, -1)):
        for run in run_list:
            rank = slot_ranks[run.slot]
            if rank:
                shrunk = x[run.start:run.end] @ lora_a[run.slot, :rank].T
                out[run.start:run.end].addmm_(shrunk, lora_b[run.slot, :rank], alpha=sign)


def _add_group(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int,
               group: SlotGroup) -> None:
    n, length = len(group.slots), group.max_len
    if group.slot_index is None:  # one strided view each: this runs per module per step, so calls count
        a_t = _rows_view(lora_a, group.slots[0], n, rank).transpose(1, 2)
        b = _rows_view(lora_b, group.slots[0], n, rank)
    else:
        a_t = lora_a[group.slot_index, :rank].transpose(1, 2)
        b = lora_b[group.slot_index, :rank]
    if group.token_index is None:
        _rows_view(out, group.token_start, n, length).baddbmm_(
            torch.bmm(_rows_view(x, group.token_start, n, length), a_t), b)
        return
    grid = x.new_zeros(group.num_rows, x.shape[1])
    grid.index_copy_(0, group.pad_index, x.index_select(0, group.token_index))
    delta = torch.bmm(torch.bmm(grid.view(n, length, -1), a_t), b)
    out.index_add_(0, group.token_index, delta.view(group.num_rows, -1).index_select(0, group.pad_index))


def _rows_view(t: torch.Tensor, first: int, blocks: int, rows: int) -> torch.Tensor:
    """t[first : first + blocks * rows] as (blocks, rows, width) for a 2-D t, or t[first : first + blocks, :rows]
    for a 3-D stack of (rows_max, width) blocks: a view either way, made in one call."""
    if t.dim() == 2:
        row, col = t.stride()
        return t.as_strided((blocks, rows, t.shape[1]), (rows * row, row, col), t.storage_offset() + first * row)
    block, row, col = t.stride()
    return t.as_strided((blocks, rows, t.shape[2]), (block, row, col), t.storage_offset() + first * block)


def add_lora_reference(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       token_slots: list[int]) -> None:
    """The semantics above as a plain per-token loop: slow, obviously right."""
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            out[t] += (x[t] @ lora_a[slot].T) @ lora_b[slot]
