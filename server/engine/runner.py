"""One forward pass over a scheduled batch: pack tokens, build the step's metadata, return last logits.

Sequences are ordered by adapter slot so each adapter's tokens are contiguous (the batched LoRA
path then needs one matmul pair per long run and one bmm pair for all short runs).
"""

import torch
from torch import nn

from server.engine.attention import AttentionMetadata, DecodeBatch
from server.engine.kv_cache import PagedKVCache
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.lora.layer import LoraBatch
from server.lora.ops import plan_runs
from server.lora.slots import LoraSlotPool

NO_SLOT = -1
# Runs at least this long get their own matmul pair at their true rank; shorter ones are padded.
LONG_RUN_MIN_TOKENS = 8


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: PagedKVCache, slots: LoraSlotPool, lora_batch: LoraBatch,
                 device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.slots = slots
        self.lora_batch = lora_batch
        self.device = device
        self.block_size = kv_cache.allocator.block_size
        # Merged copies the runner may use: adapter name -> module name -> merged weight.
        self.merged: dict[str, dict[str, torch.Tensor]] = {}
        self.merged_steps = 0  # forward passes served entirely from a merged copy

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Returns the sequences in packed order and their next-token logits (N, vocab)."""
        seqs = sorted(batch.sequences, key=self._slot_of)
        tokens, positions, write_rows, prefills, decode_seqs, last_index = [], [], [], [], [], []
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
            last_index.append(len(tokens) - 1)
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            write_rows=self._tensor(write_rows),
            prefills=tuple(prefills),
            decode=self._decode_batch(decode_seqs) if decode_seqs else None,
        )
        self._prepare_lora(seqs, tokens_per_seq=[seq.length - seq.num_computed for seq in seqs])
        try:
            out = self.model(
                input_ids=self._tensor(tokens).unsqueeze(0),
                position_ids=self._tensor(positions).unsqueeze(0),
                logits_to_keep=self._tensor(last_index),
                attn_metadata=meta,
                use_cache=False,
            )
        finally:
            self.lora_batch.clear()
        for seq in seqs:
            seq.num_computed = seq.length
        return seqs, out.logits[0]

    def _slot_of(self, seq: Sequence) -> int:
        slot = self.slots.slot_of(seq.adapter_name) if seq.adapter is not None else None
        return NO_SLOT if slot is None else slot

    def _row(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _decode_batch(self, decode_seqs: list[tuple[int, Sequence]]) -> DecodeBatch:
        longest = max(seq.length for _, seq in decode_seqs)
        num_blocks = -(-longest // self.block_size)
        tables = self._tensor([seq.block_table[:num_blocks] + [0] * (num_blocks - len(seq.block_table[:num_blocks]))
                               for _, seq in decode_seqs])
        offsets = torch.arange(self.block_size, device=self.device)
        rows = (tables[:, :, None] * self.block_size + offsets).flatten(1)[:, :longest]
        lengths = self._tensor([seq.length for _, seq in decode_seqs])
        mask = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
        return DecodeBatch(
            token_index=self._tensor([start for start, _ in decode_seqs]),
            kv_rows=rows,
            kv_mask=mask[:, None, None, :],
        )

    def _prepare_lora(self, seqs: list[Sequence], tokens_per_seq: list[int]) -> None:
        adapters = {seq.adapter_name for seq in seqs}
        if len(adapters) == 1 and (name := adapters.pop()) in self.merged:
            self.lora_batch.merged = self.merged[name]  # one merged adapter: plain base-speed forward
            self.merged_steps += 1
            return
        token_slots = [slot for seq, n in zip(seqs, tokens_per_seq) for slot in [self._slot_of(seq)] * n]
        plan = plan_runs(token_slots, LONG_RUN_MIN_TOKENS, self.device)
        self.lora_batch.plan = plan if plan.has_lora else None
        if any(self.slots.uses_dora(seq.adapter_name) for seq in seqs if seq.adapter is not None):
            no_adapter_row = self.slots.num_slots
            rows = [no_adapter_row if s == NO_SLOT else s for s in token_slots]
            self.lora_batch.dora_rows = self._tensor(rows)
