"""The batched low-rank path: each token adds its own adapter's `(x·Aᵀ)·B'ᵀ`, many adapters per call.

Semantics (the reference below is this loop, and the oracle for every faster version):

    for t in range(T):
        s = token_slots[t]
        if s >= 0:
            out[t] += (x[t] @ lora_a[s]) @ lora_b[s]      # lora_a: (S, d_in, R), lora_b: (S, R, d_out)

`B·A` is never materialised: the cost is O(T·r·(d_in + d_out)), not O(d_in·d_out).
The fast path relies on the runner having placed each adapter's tokens next to each other:
long runs (prefills, a popular adapter) get one pair of matmuls at their true rank; the short runs of
many adapters are padded into one batched matmul pair over the slot range, so the number of kernel
launches does not grow with the number of adapters in the batch.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Run:
    """Tokens [start, end) all use slot `slot`."""

    start: int
    end: int
    slot: int


@dataclass(frozen=True)
class PaddedRuns:
    """Short runs gathered into a (slots in use × max_len) grid for one bmm pair.

    token_index[i] is a token of the batch; pad_index[i] its row in the flattened grid:
    (position of its slot in `slots`) * max_len + position within that slot's tokens.
    When the slots in use fill most of their range, the grid spans the whole range [slot_lo, slot_hi]
    and the stacked weights are read as a view; when they are sparse (LRU leaves residents scattered),
    only the slots in use are gathered, so idle slots cost nothing.
    """

    token_index: torch.Tensor
    pad_index: torch.Tensor
    slots: tuple[int, ...]  # the grid's slots, in grid order
    used_slots: tuple[int, ...]  # the slots that have tokens (a dense grid may span idle ones)
    slot_index: torch.Tensor | None  # None: `slots` is the contiguous range, read as a view
    max_len: int

    @property
    def num_rows(self) -> int:
        return len(self.slots) * self.max_len


@dataclass(frozen=True)
class LoraPlan:
    """How one forward pass applies adapters; built once per step, read by every LoRA layer.

    `subtract` runs take their slot's delta away: when the step runs on a merged copy W + Δm, the
    other tokens get W + Δs by adding their own Δs and subtracting Δm (both low rank).
    """

    long_runs: tuple[Run, ...]
    padded: PaddedRuns | None
    subtract: tuple[Run, ...] = ()

    @property
    def has_lora(self) -> bool:
        return bool(self.long_runs) or self.padded is not None or bool(self.subtract)


def plan_runs(token_slots: list[int], long_run_min: int, device: torch.device,
              subtract: tuple[Run, ...] = ()) -> LoraPlan:
    """Split the per-token slots (adapter tokens contiguous; -1 = no adapter) into long and padded runs."""
    runs = []
    start = 0
    for t in range(1, len(token_slots) + 1):
        if t == len(token_slots) or token_slots[t] != token_slots[start]:
            if token_slots[start] >= 0:
                runs.append(Run(start, t, token_slots[start]))
            start = t
    long_runs = tuple(r for r in runs if r.end - r.start >= long_run_min)
    short = [r for r in runs if r.end - r.start < long_run_min]
    return LoraPlan(long_runs=long_runs, padded=_pad_short_runs(short, device) if short else None,
                    subtract=subtract)


def _pad_short_runs(runs: list[Run], device: torch.device) -> PaddedRuns:
    per_slot: dict[int, list[int]] = {}  # a slot may have several short runs (split by a long run)
    for r in runs:
        per_slot.setdefault(r.slot, []).extend(range(r.start, r.end))
    slot_lo, slot_hi = min(per_slot), max(per_slot)
    dense = slot_hi - slot_lo + 1 <= 2 * len(per_slot)
    slots = tuple(range(slot_lo, slot_hi + 1)) if dense else tuple(sorted(per_slot))
    position = {slot: i for i, slot in enumerate(slots)}
    max_len = max(len(tokens) for tokens in per_slot.values())
    tokens, rows = [], []
    for slot, slot_tokens in per_slot.items():
        tokens.extend(slot_tokens)
        rows.extend(position[slot] * max_len + k for k in range(len(slot_tokens)))
    return PaddedRuns(
        token_index=torch.tensor(tokens, dtype=torch.long, device=device),
        pad_index=torch.tensor(rows, dtype=torch.long, device=device),
        slots=slots,
        used_slots=tuple(sorted(per_slot)),
        slot_index=None if dense else torch.tensor(slots, dtype=torch.long, device=device),
        max_len=max_len,
    )


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             slot_ranks: list[int], plan: LoraPlan) -> None:
    """out (T, d_out) += each token's own low-rank delta, in place."""
    for runs, sign in ((plan.long_runs, 1), (plan.subtract, -1)):
        for run in runs:
            rank = slot_ranks[run.slot]
            if rank:
                shrunk = x[run.start:run.end] @ lora_a[run.slot, :, :rank]
                out[run.start:run.end].addmm_(shrunk, lora_b[run.slot, :rank], alpha=sign)
    padded = plan.padded
    if padded is None:
        return
    # Pad only to the largest rank among this step's slots for this module, not the buffers' maximum.
    rank = max(slot_ranks[slot] for slot in padded.used_slots)
    if not rank:
        return
    if padded.slot_index is None:
        a = lora_a[padded.slots[0]:padded.slots[-1] + 1, :, :rank]
        b = lora_b[padded.slots[0]:padded.slots[-1] + 1, :rank]
    else:
        a = lora_a[padded.slot_index, :, :rank]
        b = lora_b[padded.slot_index, :rank]
    grid = x.new_zeros(padded.num_rows, x.shape[1])
    grid.index_copy_(0, padded.pad_index, x.index_select(0, padded.token_index))
    delta = torch.bmm(torch.bmm(grid.view(len(padded.slots), padded.max_len, -1), a), b)
    out.index_add_(0, padded.token_index, delta.view(padded.num_rows, -1).index_select(0, padded.pad_index))


def add_lora_reference(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       token_slots: list[int]) -> None:
    """The semantics above as a plain per-token loop: slow, obviously right."""
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            out[t] += (x[t] @ lora_a[slot]) @ lora_b[slot]
