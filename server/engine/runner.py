"""One forward pass over a scheduled batch: pack tokens, build the step's metadata, return last logits.

Sequences are ordered by adapter slot so each adapter's tokens are contiguous (the batched LoRA
path then needs one matmul pair per long run and one bmm pair per rank among the short runs).
"""

from collections import Counter

import torch
from torch import nn

from server.engine.attention import AttentionMetadata, DecodeBatch
from server.engine.kv_cache import PagedKVCache
from server.engine.rope import PerSequenceRope
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.lora.layer import LoraBatch
from server.lora.ops import Run, plan_runs
from server.lora.slots import LoraSlotPool

NO_SLOT = -1
# Runs at least this long get their own matmul pair at their true rank; shorter ones are padded.
LONG_RUN_MIN_TOKENS = 8
# A step with at most this many short-run tokens (adds and subtractions) goes to the fused CPU op, when
# there is one: it beat the bmm groups up to 24 adapters of 1 token and 16 of 2, tied at 32 of 1 and lost
# at 32 adapters of 2 tokens each (docs/bench-merge.md has the table).
FUSED_MAX_TOKENS = 32


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: PagedKVCache, slots: LoraSlotPool, lora_batch: LoraBatch,
                 merged: dict[str, dict[str, torch.Tensor]], device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.slots = slots
        self.lora_batch = lora_batch
        self.device = device
        self.block_size = kv_cache.allocator.block_size
        # Merged copies the runner may use (owned by the engine's MergeManager): adapter -> module -> weight.
        self.merged: dict[str, dict[str, torch.Tensor]] = merged
        self.merged_steps = 0  # forward passes served entirely from a merged copy
        self.mixed_merged_steps = 0  # on a merged copy, other adapters' tokens corrected by ±Δ
        self.ropes = [m for m in model.modules() if isinstance(m, PerSequenceRope)]  # LongRoPE models only

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor, dict[Sequence, torch.Tensor]]:
        """Returns the sequences in packed order, their next-token logits (N, vocab), and the logits at
        every prompt position (P, vocab) of the sequences whose prompt logprobs are due (kept in the same
        forward pass; other sequences keep only their last position)."""
        merged = self._choose_merged(batch.sequences)
        # The merged adapter's tokens go last, so the tokens that subtract its delta form one run.
        merged_slot = None if merged is None else merged[1]
        seqs = sorted(batch.sequences, key=lambda seq: (self._slot_of(seq) == merged_slot, self._slot_of(seq)))
        self._prepare_rope(seqs)
        tokens, positions, write_rows, prefills, decode_seqs, keep, last_rows = [], [], [], [], [], [], []
        prompt_rows: dict[Sequence, slice] = {}  # rows of the kept logits at every prompt position
        for seq in seqs:
            start = len(tokens)
            new_positions = range(seq.num_computed, seq.length)
            tokens += seq.all_ids[seq.num_computed:]
            positions += new_positions
            write_rows += [self._row(seq, p) for p in new_positions]
            if seq.is_prefill:
                prefills.append((start, len(tokens)))
            else:
                decode_seqs.append((start, seq))
            if seq.wants_prompt_logprobs:
                prompt_rows[seq] = slice(len(keep), len(keep) + len(tokens) - start)
                keep += range(start, len(tokens))
            else:
                keep.append(len(tokens) - 1)
            last_rows.append(len(keep) - 1)
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            write_rows=self._tensor(write_rows),
            prefills=tuple(prefills),
            decode=self._decode_batch(decode_seqs) if decode_seqs else None,
        )
        self._prepare_lora(seqs, [seq.length - seq.num_computed for seq in seqs], merged)
        try:
            out = self.model(
                input_ids=self._tensor(tokens).unsqueeze(0),
                position_ids=self._tensor(positions).unsqueeze(0),
                logits_to_keep=self._tensor(keep),
                attn_metadata=meta,
                use_cache=False,
            )
        finally:
            self.lora_batch.clear()
        for seq in seqs:
            seq.num_computed = seq.length
        logits = out.logits[0]
        if not prompt_rows:
            return seqs, logits, {}
        return seqs, logits[self._tensor(last_rows)], {seq: logits[rows] for seq, rows in prompt_rows.items()}

    def _slot_of(self, seq: Sequence) -> int:
        slot = self.slots.slot_of(seq.adapter_name) if seq.adapter is not None else None
        return NO_SLOT if slot is None else slot

    def _row(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prepare_rope(self, seqs: list[Sequence]) -> None:
        """LongRoPE (rope.py): a sequence crossing the original context is computed again from its first
        token, and every token is marked with whether its sequence ends this step past that context."""
        for rope in self.ropes:
            for seq in seqs:
                if rope.crosses_switch(seq.num_computed, seq.length):
                    seq.num_computed = 0
            rope.long_tokens = torch.tensor(
                [seq.length > rope.original_context for seq in seqs for _ in range(seq.num_computed, seq.length)],
                dtype=torch.bool, device=self.device,
            )

    def _decode_batch(self, decode_seqs: list[tuple[int, Sequence]]) -> DecodeBatch:
        longest = max(seq.length for _, seq in decode_seqs)
        num_blocks = -(-longest // self.block_size)
        tables = self._tensor([seq.block_table[:num_blocks] + [0] * (num_blocks - len(seq.block_table[:num_blocks]))
                               for _, seq in decode_seqs])
        offsets = torch.arange(self.block_size, device=self.device)
        rows = (tables[:, :, None] * self.block_size + offsets).flatten(1)[:, :longest]
        lengths = self._tensor([seq.length for _, seq in decode_seqs])[:, None]
        mask = torch.arange(longest, device=self.device)[None, :] < lengths
        return DecodeBatch(
            token_index=self._tensor([start for start, _ in decode_seqs]),
            kv_rows=rows,
            lengths=lengths,
            kv_mask=mask[:, None, None, :],
        )

    def _prepare_lora(self, seqs: list[Sequence], tokens_per_seq: list[int], merged: tuple[str, int] | None) -> None:
        token_slots = [slot for seq, n in zip(seqs, tokens_per_seq) for slot in [self._slot_of(seq)] * n]
        subtract: tuple[Run, ...] = ()
        if merged is not None:
            name, merged_slot = merged
            self.lora_batch.merged = self.merged[name]
            others = token_slots.index(merged_slot)  # its tokens are last: everything before subtracts
            subtract = (Run(0, others, merged_slot),) if others else ()
            token_slots = token_slots[:others] + [NO_SLOT] * (len(token_slots) - others)
            self.merged_steps += not subtract
            self.mixed_merged_steps += bool(subtract)
        plan = plan_runs(token_slots, LONG_RUN_MIN_TOKENS, self.device, subtract, self.slots.adapter_ranks,
                         fused_max_tokens=FUSED_MAX_TOKENS if self.lora_batch.fused_op is not None else 0)
        self.lora_batch.plan = plan if plan.has_lora else None
        if any(self.slots.uses_dora(seq.adapter_name) for seq in seqs if seq.adapter is not None):
            no_adapter_row = self.slots.num_slots
            rows = [no_adapter_row if s == NO_SLOT else s for s in token_slots]
            self.lora_batch.dora_rows = self._tensor(rows)

    def _choose_merged(self, seqs: list[Sequence]) -> tuple[str, int] | None:
        """The merged adapter this step runs on, with its slot, or None for the base weights.

        A step made only of one merged adapter's tokens runs on its copy with no LoRA work at all. A mixed
        step runs on the copy of its dominant merged adapter when that adapter holds at least half the
        tokens (so subtracting its delta from the others costs less than it saves) and no DoRA adapter
        is in the step (DoRA's per-channel factor does not commute with the subtraction)."""
        tokens: Counter[str | None] = Counter()
        for seq in seqs:
            tokens[seq.adapter_name] += seq.length - seq.num_computed
        candidates = [name for name in tokens if name in self.merged]
        if not candidates:
            return None
        name = max(candidates, key=tokens.__getitem__)
        slot = self.slots.slot_of(name)  # running sequences hold their adapter's slot
        if len(tokens) == 1:
            return name, slot
        mixed_ok = (2 * tokens[name] >= sum(tokens.values())
                    and not any(self.slots.uses_dora(n) for n in tokens if n is not None))
        return (name, slot) if mixed_ok else None
