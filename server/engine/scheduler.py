"""Deciding what runs each step: continuous batching over a paged KV cache and a pool of adapter slots.

Every step holds at most `max_batch_tokens` tokens, spent in this order: running sequences that decode
get room for their next token (preempting the newest by recompute if the cache is full); running
sequences still prefilling get the next chunk of their prompt; then waiting sequences are admitted
while the batch, the token budget, the KV cache and the adapter slots allow, each with a first chunk.
So a long prompt is prefilled over several steps alongside the decodes instead of stalling them, and a
prompt longer than a step is served. Admission is round-robin across tenants (each tenant's own in
arrival order, starting after the tenant admitted last), so one tenant's burst cannot starve the
others; with one tenant that is first come, first served. A waiting request whose adapter cannot get a
slot now lets later requests for resident adapters go ahead of it.

With prefix caching, an admitted sequence takes the cached blocks of its prompt's longest cached
prefix (block_manager.py) and prefills only the rest; the blocks it completes are named for later
requests after each step (`name_computed_blocks`).
"""

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.engine.block_manager import BlockAllocator, chain_hashes
from server.engine.sequence import FinishReason, Sequence, SequenceStatus
from server.lora.slots import LoraSlotPool


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_batch_tokens: int
    max_queue: int


@dataclass(frozen=True)
class ScheduledBatch:
    prefills: list[Sequence]  # computing a whole prompt or a chunk of one
    decodes: list[Sequence]  # computing their one newest token
    chunks: Mapping[Sequence, int]  # tokens each prefill computes this step

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefills + self.decodes

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    def num_new_tokens(self, seq: Sequence) -> int:
        return self.chunks.get(seq, 1)

    def only(self, keep: Callable[[Sequence], bool]) -> "ScheduledBatch":
        """The same step for the sequences `keep` accepts (each with its own chunk)."""
        prefills = [seq for seq in self.prefills if keep(seq)]
        return ScheduledBatch(prefills, [seq for seq in self.decodes if keep(seq)],
                              {seq: self.chunks[seq] for seq in prefills})


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockAllocator, slots: LoraSlotPool,
                 kv_window: int | None = None, restarts: Callable[[Sequence], bool] | None = None):
        """`kv_window`: when every layer of the model attends only to its last `kv_window` positions, a
        running sequence's blocks that lie wholly before that window are given back before it grows.
        `restarts`: whether a running sequence must be computed again from its first token before its
        next step (LongRoPE at the original context: rope.py); it is then prefilled in chunks again."""
        self.limits = limits
        self.blocks = blocks
        self.slots = slots
        self.kv_window = kv_window
        self.restarts = restarts
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_queried_tokens = 0  # prompt tokens of first admissions looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of those, found there
        self._last_tenant: str | None = None  # the round-robin's position

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        running = self._schedule_running()
        decodes = [seq for seq in running if seq.num_uncomputed == 1 and seq.num_computed > 0]
        budget = self.limits.max_batch_tokens - len(decodes)
        chunks: dict[Sequence, int] = {}
        for seq in [seq for seq in running if seq not in decodes]:  # prefills under way, oldest first
            if budget <= 0:
                break
            chunks[seq] = min(seq.num_uncomputed, budget)
            budget -= chunks[seq]
        for seq in self._admit_waiting(budget):  # admitted only while the budget leaves them a token
            chunks[seq] = min(seq.num_uncomputed, budget)
            budget -= chunks[seq]
        return ScheduledBatch(prefills=list(chunks), decodes=decodes, chunks=chunks)

    def name_computed_blocks(self, seq: Sequence) -> None:
        """After a step: enter the blocks `seq` filled into the prefix cache (blocks given back to the
        window's end are skipped: others may hold them now)."""
        full = seq.num_computed // self.blocks.block_size
        if seq.prefix_key is None or not self.blocks.caching or full <= seq.named_blocks:
            return
        seq.block_hashes = chain_hashes(seq.all_ids, self.blocks.block_size, seq.prefix_key, seq.block_hashes)
        for index in range(max(seq.named_blocks, seq.dropped_blocks), full):
            self.blocks.name(seq.block_table[index], seq.block_hashes[index], seq.prefix_key)
        seq.named_blocks = full

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take a sequence out (finished or aborted) and give back its blocks and adapter slot."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _schedule_running(self) -> list[Sequence]:
        """The running sequences that keep their blocks this step, in arrival order."""
        scheduled = []
        queue = sorted(self.running, key=lambda s: s.arrival)
        while queue:
            seq = queue.pop(0)
            if self.restarts is not None and self.restarts(seq):
                seq.num_computed = seq.computed_length = 0
            while not self._grow(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        return scheduled

    def _grow(self, seq: Sequence) -> bool:
        """Make room in the cache for all of seq's tokens (the newest one is written this step)."""
        self._drop_out_of_window(seq)
        missing = self.blocks.blocks_for(seq.length) - len(seq.block_table)
        if missing <= 0:
            return True
        if not self.blocks.can_allocate(missing):
            return False
        seq.block_table += self.blocks.allocate(missing)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _admit_waiting(self, token_budget: int) -> list[Sequence]:
        """Admit waiting sequences (all their blocks allocated, cached ones taken) while `token_budget`
        leaves room for at least one token of each."""
        admitted = []
        for seq in self._fair_order():
            if len(self.running) >= self.limits.max_num_seqs or token_budget <= 0:
                break
            cached = self._cached_prefix(seq)
            needed = self.blocks.blocks_for(seq.length) - len(cached)
            if not self.blocks.can_allocate(needed + self.blocks.blocks_to_take(cached) + self._watermark()):
                break
            if seq.adapter is not None and self.slots.acquire(seq.adapter) is None:
                continue  # every slot busy with running adapters: let others go ahead, it keeps its place
            self.waiting.remove(seq)
            self.blocks.take(cached)
            seq.block_table = cached + self.blocks.allocate(needed)
            seq.named_blocks = len(cached)
            seq.num_computed = len(cached) * self.blocks.block_size
            if not seq.output_ids:  # a first prefill (or one cut short by preemption), not a recompute
                seq.cached_tokens = seq.num_computed
                self.prefix_queried_tokens += seq.length
                self.prefix_hit_tokens += seq.num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            token_budget -= seq.num_uncomputed
            self._last_tenant = seq.tenant
        return admitted

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks `seq` may start from: its longest cached prefix of full blocks, short of its
        last token (which is computed, for its logits). None for requests asking for prompt logprobs,
        which need the logits at every prompt position."""
        if not self.blocks.caching or seq.prefix_key is None or seq.wants_prompt_logprobs:
            return []
        seq.block_hashes = chain_hashes(seq.all_ids, self.blocks.block_size, seq.prefix_key, seq.block_hashes)
        return self.blocks.cached_prefix(seq.block_hashes[:(seq.length - 1) // self.blocks.block_size])

    def _fair_order(self) -> list[Sequence]:
        """The waiting queue interleaved by tenant: one of each tenant's in turn, the tenants in order of
        their first waiting sequence, rotated to start after the tenant admitted last."""
        queues: dict[str | None, list[Sequence]] = {}
        for seq in self.waiting:
            queues.setdefault(seq.tenant, []).append(seq)
        if len(queues) <= 1:
            return list(self.waiting)
        tenants = list(queues)
        if self._last_tenant in queues:
            start = tenants.index(self._last_tenant) + 1
            tenants = tenants[start:] + tenants[:start]
        order = []
        for turn in range(max(len(q) for q in queues.values())):
            order += [queues[t][turn] for t in tenants if turn < len(queues[t])]
        return order

    def _watermark(self) -> int:
        """Blocks kept free at admission so running sequences can grow without preempting the newcomer
        at once (admit, preempt, re-admit would thrash). Nothing is held back for the first sequence."""
        return max(1, self.blocks.num_blocks // 100) if self.running else 0

    def _drop_out_of_window(self, seq: Sequence) -> None:
        """Give back the blocks whose every position precedes the window of the first token computed now
        (position c reads positions c + 1 − window … c, and later tokens read less). Their ids stay in
        the table, so positions keep mapping to rows, but no layer reads those rows again."""
        if self.kv_window is None:
            return
        keep_from = max(0, seq.num_computed + 1 - self.kv_window) // self.blocks.block_size
        if keep_from > seq.dropped_blocks:
            self.blocks.free(seq.block_table[seq.dropped_blocks:keep_from])
            seq.dropped_blocks = keep_from

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table[seq.dropped_blocks:])
        seq.block_table = []
        seq.dropped_blocks = 0
        if seq.adapter is not None:
            self.slots.release(seq.adapter.name)
