"""Deciding what runs each step: continuous batching over a paged KV cache and a pool of adapter slots.

Every step, running sequences get room for their next token (preempting the newest by recompute if
the cache is full), then waiting sequences are admitted while the batch, the token budget, the KV
cache and the adapter slots allow: round-robin across tenants (each tenant's own in arrival order,
starting after the tenant admitted last), so one tenant's burst cannot starve the others; with one
tenant that is first come, first served. A waiting request whose adapter cannot get a slot now lets
later requests for resident adapters go ahead of it.
"""

from collections import deque
from dataclasses import dataclass

from server.engine.kv_cache import BlockAllocator
from server.engine.sequence import FinishReason, Sequence, SequenceStatus
from server.lora.slots import LoraSlotPool


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_batch_tokens: int
    max_queue: int


@dataclass(frozen=True)
class ScheduledBatch:
    prefills: list[Sequence]
    decodes: list[Sequence]

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefills + self.decodes

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockAllocator, slots: LoraSlotPool,
                 kv_window: int | None = None):
        """`kv_window`: when every layer of the model attends only to its last `kv_window` positions, a
        running sequence's blocks that lie wholly before that window are given back before it grows."""
        self.limits = limits
        self.blocks = blocks
        self.slots = slots
        self.kv_window = kv_window
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._last_tenant: str | None = None  # the round-robin's position

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        decodes = self._schedule_running()
        prefills = self._admit_waiting(token_budget=self.limits.max_batch_tokens - len(decodes))
        return ScheduledBatch(prefills=prefills, decodes=decodes)

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
        scheduled = []
        queue = sorted(self.running, key=lambda s: s.arrival)
        while queue:
            seq = queue.pop(0)
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
        admitted = []
        for seq in self._fair_order():
            if len(self.running) >= self.limits.max_num_seqs:
                break
            tokens = seq.length
            if tokens > token_budget and (admitted or self.running):
                break
            needed = self.blocks.blocks_for(tokens)
            if not self.blocks.can_allocate(needed + self._watermark()):
                break
            if seq.adapter is not None and self.slots.acquire(seq.adapter) is None:
                continue  # every slot busy with running adapters: let others go ahead, it keeps its place
            self.waiting.remove(seq)
            seq.block_table = self.blocks.allocate(needed)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            token_budget -= tokens
            self._last_tenant = seq.tenant
        return admitted

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
        """Give back the blocks whose every position precedes the window of the token decoded now
        (position n − 1 reads positions n − window … n − 1, and later tokens read less). Their ids stay in
        the table, so positions keep mapping to rows, but no layer reads those rows again."""
        if self.kv_window is None:
            return
        keep_from = max(0, seq.length - self.kv_window) // self.blocks.block_size
        if keep_from > seq.dropped_blocks:
            self.blocks.free(seq.block_table[seq.dropped_blocks:keep_from])
            seq.dropped_blocks = keep_from

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table[seq.dropped_blocks:])
        seq.block_table = []
        seq.dropped_blocks = 0
        if seq.adapter is not None:
            self.slots.release(seq.adapter.name)
