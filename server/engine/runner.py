"""One forward pass over a scheduled batch: pack tokens, build the step's metadata, return last logits.

Sequences are ordered by adapter slot so each adapter's tokens are contiguous (the batched LoRA
path then needs one matmul pair per long run and one bmm pair per rank among the short runs).
"""

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from server.engine.attention import AttentionMetadata, ChunkWithHistory, DecodeBatch
from server.engine.kv_cache import PagedKVCache
from server.engine.paged_decode import DecodeAttentionOp
from server.engine.rope import PerSequenceRope
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.lora.adapter import LoraAdapter
from server.lora.layer import LoraBatch, mask_past_vocabulary
from server.lora.ops import Run, plan_runs
from server.lora.slots import LoraSlotPool

NO_SLOT = -1
# Runs at least this long get their own matmul pair at their true rank; shorter ones are padded.
LONG_RUN_MIN_TOKENS = 8
# A step with at most this many short-run tokens (adds and subtractions) goes to the fused CPU op, when
# there is one: it beat the bmm groups up to 24 adapters of 1 token and 16 of 2, tied at 32 of 1 and lost
# at 32 adapters of 2 tokens each (docs/bench-merge.md has the table).
FUSED_MAX_TOKENS = 32


@dataclass(frozen=True)
class PromptChunk:
    first_position: int  # of the chunk in the prompt
    logits: torch.Tensor  # (n, vocab) at the chunk's positions


@dataclass
class _Packed:
    """One step's tokens in packed order and where each sequence's rows are."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    write_rows: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int]] = field(default_factory=list)
    chunks: list[ChunkWithHistory] = field(default_factory=list)
    decodes: list[tuple[int, Sequence]] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)  # packed rows whose logits are computed
    kept: list[Sequence] = field(default_factory=list)  # the sequence of each of them
    last_rows: list[int] = field(default_factory=list)  # of `keep`: each sampled sequence's last position
    prompt_rows: dict[Sequence, tuple[int, slice]] = field(default_factory=dict)  # first position, rows of keep
    sampled: list[Sequence] = field(default_factory=list)


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
        self.decode_op: DecodeAttentionOp | None = None  # installed by the engine once built (paged_decode.py)
        self.vocabulary = model.get_input_embeddings().num_embeddings  # the base's; adapters may resize it

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor, dict[Sequence, PromptChunk]]:
        """Computes each sequence's chunk of new tokens. Returns the sequences whose last token was
        computed (to be sampled), in packed order, with their next-token logits (N, vocab), and for the
        sequences whose prompt logprobs are due, the logits at every prompt position of this step's chunk
        (kept in the same forward pass; other sequences keep only their last position, or nothing while
        their prompt is not all computed)."""
        merged = self._choose_merged(batch)
        # The merged adapter's tokens go last, so the tokens that subtract its delta form one run.
        merged_slot = None if merged is None else merged[1]
        seqs = sorted(batch.sequences, key=lambda seq: (self._slot_of(seq) == merged_slot, self._slot_of(seq)))
        self._prepare_rope(seqs, batch)
        packed = self._pack(seqs, batch)
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            write_rows=self._tensor(packed.write_rows),
            prefills=tuple(packed.prefills),
            decode=self._decode_batch(packed.decodes) if packed.decodes else None,
            chunks=tuple(packed.chunks),
        )
        self._prepare_lora(seqs, [batch.num_new_tokens(seq) for seq in seqs], merged, packed.keep)
        widest = self.lora_batch.vocabulary
        try:
            out = self.model(
                input_ids=self._tensor(packed.tokens).unsqueeze(0),
                position_ids=self._tensor(packed.positions).unsqueeze(0),
                logits_to_keep=self._tensor(packed.keep),
                attn_metadata=meta,
                use_cache=False,
            )
        finally:
            self.lora_batch.clear()
        for seq in seqs:
            seq.num_computed += batch.num_new_tokens(seq)
            seq.computed_length = seq.length
        logits = out.logits[0]
        if widest:  # rows of adapters with a resized vocabulary are wider than the others
            logits = mask_past_vocabulary(logits, self._tensor([self.vocabulary_of(seq.adapter) for seq in packed.kept]))
        if not packed.prompt_rows:
            return packed.sampled, logits, {}
        prompt_chunks = {seq: PromptChunk(first, logits[rows, :self.vocabulary_of(seq.adapter)])
                         for seq, (first, rows) in packed.prompt_rows.items()}
        return packed.sampled, logits[self._tensor(packed.last_rows)], prompt_chunks

    def _pack(self, seqs: list[Sequence], batch: ScheduledBatch) -> "_Packed":
        packed = _Packed()
        for seq in seqs:
            start, first = len(packed.tokens), seq.num_computed
            new_positions = range(first, first + batch.num_new_tokens(seq))
            packed.tokens += seq.all_ids[new_positions.start:new_positions.stop]
            packed.positions += new_positions
            packed.write_rows += [self._row(seq, p) for p in new_positions]
            end = len(packed.tokens)
            if first == 0:
                packed.prefills.append((start, end))
            elif end - start == 1:
                packed.decodes.append((start, seq))
            else:
                packed.chunks.append(self._chunk_with_history(seq, start, end))
            completes = new_positions.stop == seq.length
            if seq.wants_prompt_logprobs:
                packed.prompt_rows[seq] = (first, slice(len(packed.keep), len(packed.keep) + end - start))
                packed.keep += range(start, end)
                packed.kept += [seq] * (end - start)
            elif completes:
                packed.keep.append(end - 1)
                packed.kept.append(seq)
            if completes:
                packed.last_rows.append(len(packed.keep) - 1)
                packed.sampled.append(seq)
        return packed

    def _chunk_with_history(self, seq: Sequence, start: int, end: int) -> ChunkWithHistory:
        """Reads from the first position still held (blocks before it went back out of the window)."""
        first_position = seq.dropped_blocks * self.block_size
        last = seq.num_computed + end - start
        return ChunkWithHistory(start, end, seq.num_computed, first_position,
                                self._tensor([self._row(seq, p) for p in range(first_position, last)]))

    def vocabulary_of(self, adapter: LoraAdapter | None) -> int:
        """The token ids a request's model has: its adapter's resized vocabulary, or the base's."""
        return (adapter.vocabulary if adapter is not None else None) or self.vocabulary

    def _slot_of(self, seq: Sequence) -> int:
        slot = self.slots.slot_of(seq.adapter_name) if seq.adapter is not None else None
        return NO_SLOT if slot is None else slot

    def _row(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prepare_rope(self, seqs: list[Sequence], batch: ScheduledBatch) -> None:
        """LongRoPE (rope.py): every token is marked with whether its sequence is past the original context
        (the scheduler has a sequence that crossed it computed again from its first token)."""
        for rope in self.ropes:
            rope.long_tokens = torch.tensor(
                [seq.length > rope.original_context for seq in seqs for _ in range(batch.num_new_tokens(seq))],
                dtype=torch.bool, device=self.device,
            )

    def _decode_batch(self, decode_seqs: list[tuple[int, Sequence]]) -> DecodeBatch:
        """Each decode token (position num_computed, usually the sequence's last) attends to positions
        0 … num_computed."""
        num_blocks = -(-max(seq.num_computed + 1 for _, seq in decode_seqs) // self.block_size)
        tables = [seq.block_table[:num_blocks] for _, seq in decode_seqs]
        return DecodeBatch(
            token_index=self._tensor([start for start, _ in decode_seqs]),
            block_tables=self._tensor([table + [0] * (num_blocks - len(table)) for table in tables]),
            lengths=self._tensor([seq.num_computed + 1 for _, seq in decode_seqs])[:, None],
            block_size=self.block_size,
            op=self.decode_op,
        )

    def _prepare_lora(self, seqs: list[Sequence], tokens_per_seq: list[int], merged: tuple[str, int] | None,
                      keep: list[int]) -> None:
        """The step's LoRA plan; per-token slot rows when an adapter needs them, and those of the positions
        whose logits are kept (`keep`: what the output head sees)."""
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
        widest = max(self.vocabulary_of(seq.adapter) for seq in seqs)
        self.lora_batch.vocabulary = widest if widest > self.vocabulary else 0
        if any(self.slots.needs_rows(seq.adapter_name) for seq in seqs if seq.adapter is not None):
            no_adapter_row = self.slots.num_slots
            rows = [no_adapter_row if s == NO_SLOT else s for s in token_slots]
            self.lora_batch.slot_rows = self._tensor(rows)
            self.lora_batch.head_rows = self.lora_batch.slot_rows[self._tensor(keep)]

    def _choose_merged(self, batch: ScheduledBatch) -> tuple[str, int] | None:
        """The merged adapter this step runs on, with its slot, or None for the base weights.

        A step made only of one merged adapter's tokens runs on its copy with no LoRA work at all. A mixed
        step runs on the copy of its dominant merged adapter when that adapter holds at least half the
        tokens (so subtracting its delta from the others costs less than it saves) and no adapter served
        row by row is in the step (DoRA's per-channel factor does not commute with the subtraction, and a
        full copy of a module replaces the merged weights rather than adding to them)."""
        tokens: Counter[str | None] = Counter()
        for seq in batch.sequences:
            tokens[seq.adapter_name] += batch.num_new_tokens(seq)
        candidates = [name for name in tokens if name in self.merged]
        if not candidates:
            return None
        name = max(candidates, key=tokens.__getitem__)
        slot = self.slots.slot_of(name)  # running sequences hold their adapter's slot
        if len(tokens) == 1:
            return name, slot
        mixed_ok = (2 * tokens[name] >= sum(tokens.values())
                    and not any(self.slots.needs_rows(n) for n in tokens if n is not None))
        return (name, slot) if mixed_ok else None
