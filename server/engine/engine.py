"""The synchronous engine: requests in, one batched step at a time, token outputs out.

Not thread-safe on purpose: exactly one thread drives it (AsyncEngine's loop, or a test/benchmark).
"""

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.config import Settings
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.grammar import constrain
from server.engine.kv_cache import PagedKVCache
from server.engine.merging import MergeManager, MergePolicy
from server.engine.paged_decode import build_decode_attention_in_background
from server.engine.prefix_keys import is_adapters_key, prefix_cache_key
from server.engine.model_loader import (
    kv_shape,
    kv_window,
    load_base_model,
    load_tokenizer,
    max_context,
    resolve_device,
    resolve_dtype,
)
from server.engine.rope import PerSequenceRope
from server.engine.runner import ModelRunner, PromptChunk
from server.engine.logits_processors import adjust_logits
from server.engine.sampler import TokenLogprobs, prompt_logprobs, sample, token_logprobs
from server.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.engine.snapshot import EngineSnapshot
from server.errors import CapacityError, InvalidRequestError, RequestTooLargeError, UnknownAdapterError
from server.lora.adapter import LoraAdapter, load_lora_adapter
from server.lora.added_tokens import AdapterTokenizers
from server.lora.cpu_kernel import build_cpu_kernel_in_background
from server.lora.layer import LoraBatch, past_vocabulary, wrap_target_modules
from server.lora.slots import LoraSlotPool
from server.lora.targets import find_target_modules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (a streaming chunk); the last one has `finished` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None  # in the first output, when asked for
    error: str | None = None  # set when this request alone failed (finish_reason is then "abort")
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class Completion:
    """A whole finished request, as `generate` returns it."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int


@dataclass
class _Tracked:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    prompt_chunks: list[PromptChunk] = field(default_factory=list)  # prompt logits so far, chunk by chunk

    def add_prompt_chunk(self, chunk: PromptChunk) -> None:
        if chunk.first_position == 0:  # a prefill started over (preemption): the earlier chunks are stale
            self.prompt_chunks.clear()
        self.prompt_chunks.append(chunk)

    def prompt_logits(self) -> torch.Tensor:
        return torch.cat([chunk.logits for chunk in self.prompt_chunks])


class LLMEngine:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizers = AdapterTokenizers(tokenizer)  # adapters with a resized vocabulary name their new ids
        self.settings = settings
        self.device = model.device
        self.dtype = model.dtype
        self.max_context = max_context(model)
        self.targets = find_target_modules(model)
        self.slots = LoraSlotPool(self.targets, settings.max_loras, settings.max_lora_rank, self.dtype, self.device,
                                  int(settings.slot_copy_memory))
        lora_batch = LoraBatch()
        # The fused CPU LoRA op and the paged decode attention op are built (or loaded from the cache) off
        # this thread; steps use the torch paths until they are installed between two steps.
        use_kernel = settings.cpu_kernel and self.device.type == "cpu" and self.dtype == torch.float32
        self._kernel_build = build_cpu_kernel_in_background() if use_kernel else None
        self._attention_build = build_decode_attention_in_background() if use_kernel else None
        wrap_target_modules(model, self.targets, self.slots, lora_batch)
        ropes = [m for m in model.modules() if isinstance(m, PerSequenceRope)]
        # LongRoPE keys depend on the length a sequence reaches, not only on its tokens: never shared.
        self.prefix_caching = settings.enable_prefix_caching and not ropes
        shape = kv_shape(model)
        self.num_layers = shape.num_layers
        self.kv_cache = PagedKVCache.from_budget(
            shape, int(settings.kv_cache_memory), settings.kv_block_size, self.dtype, self.device, self.prefix_caching
        )
        limits = SchedulerLimits(settings.max_num_seqs, settings.max_batch_tokens, settings.max_queue)
        restarts = None if not ropes else (lambda seq: ropes[0].crosses_switch(seq.computed_length, seq.length))
        self.scheduler = Scheduler(limits, self.kv_cache.allocator, self.slots, kv_window(model), restarts)
        self.merges = MergeManager(
            MergePolicy(int(settings.merged_budget), settings.merge_promote_share, settings.merge_demote_share,
                        settings.merge_half_life_tokens),
            self.targets,
        )
        self.runner = ModelRunner(model, self.kv_cache, self.slots, lora_batch, self.merges.merged, self.device)
        self.adapters: dict[str, LoraAdapter] = {}
        self.retiring: set[str] = set()  # deleted adapters still used by running requests
        self._requests: dict[str, _Tracked] = {}
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self.tokens_generated = 0
        self.steps = 0  # forward passes run
        self.step_seconds = 0.0  # time spent in them, scheduling and sampling included

    @classmethod
    def from_settings(cls, settings: Settings) -> "LLMEngine":
        device = resolve_device(settings.device)
        model = load_base_model(settings.model, resolve_dtype(settings.dtype, device), device, settings.quantization)
        return cls(model, load_tokenizer(settings.model), settings)

    # ---- adapters -------------------------------------------------------------------------------

    def load_adapter(self, name: str, directory: Path) -> LoraAdapter:
        """Read, validate and register a PEFT adapter directory under `name`."""
        adapter = load_lora_adapter(
            directory, self.targets, name=name, max_rank=self.settings.max_lora_rank, dtype=self.dtype
        )
        self.add_adapter(adapter)
        return adapter

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Register an adapter; one already under its name is replaced (its slot, merged copy and cached KV
        blocks dropped), which running requests must not be using."""
        if adapter.name in self.adapters and not self.remove_adapter(adapter.name):
            raise ValueError(f"adapter {adapter.name!r} is in use by running requests and cannot be replaced")
        self.adapters[adapter.name] = adapter

    def adapter_in_use(self, name: str) -> bool:
        return any(t.seq.adapter_name == name for t in self._requests.values())

    def remove_adapter(self, name: str) -> bool:
        """Forget an adapter; False (and nothing changes) while running requests still use it."""
        if self.adapter_in_use(name):
            return False
        self.slots.evict(name)
        self.merges.forget(name)
        self.kv_cache.allocator.forget(is_adapters_key(name))
        self.adapters.pop(name, None)
        self.retiring.discard(name)
        return True

    def retire_adapter(self, name: str) -> bool:
        """The adapter was deleted: refuse new requests for it and free its slot and merged copy once its
        last running request ends (now, if none runs). True if it is gone already, False if it drains."""
        if self.remove_adapter(name):
            return True
        self.retiring.add(name)
        self.merges.forget(name)  # its budget is free now; its running requests go through the LoRA path
        return False

    def warm_adapter(self, adapter: LoraAdapter) -> bool:
        """Load an adapter into a device slot now; False if every slot is held by running requests."""
        if self.slots.acquire(adapter) is None:
            return False
        self.slots.release(adapter.name)
        return True

    def pin_merged(self, adapter: str | LoraAdapter) -> None:
        """Keep a merged copy of this adapter whatever its traffic (built off the serving loop)."""
        self.merges.pin(self._adapter(adapter) if isinstance(adapter, str) else adapter)

    def unpin_merged(self, name: str) -> None:
        """Let traffic decide again; the copy is dropped now if the adapter is not hot enough."""
        self.merges.unpin(name)
        if self.merges.traffic.share(name) < self.merges.policy.promote_share:
            self.merges.demote(name, "unpinned")

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter: str | LoraAdapter | None = None, tenant: str | None = None) -> None:
        """Queue a request. `adapter` is a registered name, an adapter object (the server's registry
        hands those over, so the engine need not hold every adapter), or None for the bare base.
        `tenant` names whose request it is, for the scheduler's fair share."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        lora = self._adapter(adapter) if isinstance(adapter, str) else adapter
        if lora is not None and lora.name in self.retiring:
            raise UnknownAdapterError(f"adapter {lora.name!r} was deleted")
        if lora is not None and not self.slots.fits(lora):
            raise InvalidRequestError(f"adapter {lora.name!r} holds {self.slots.slot_bytes(lora)} bytes of full copies "
                                      f"and head/embedding weights, more than slot_copy_memory "
                                      f"({self.slots.per_slot_budget})", param="model")
        tokenizer = self.tokenizers.of(lora)
        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if params.max_tokens_fits_context:
            room = min(self.max_context, self.kv_cache.capacity_tokens) - len(prompt_ids)
            params = replace(params, max_tokens=max(min(params.max_tokens, room), params.min_tokens, 1))
        self._check_fits(prompt_ids, params, lora)
        if len(self.scheduler.waiting) >= self.settings.max_queue:
            raise CapacityError(f"the queue is full ({self.settings.max_queue} requests waiting)")
        seq = Sequence(request_id=request_id, prompt_ids=prompt_ids, params=params, adapter=lora, tenant=tenant,
                       prefix_key=prefix_cache_key(tenant, lora, self.num_layers) if self.prefix_caching else None)
        self._requests[request_id] = _Tracked(seq, IncrementalDetokenizer(tokenizer, params.stop))
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return None
        self.scheduler.finish(tracked.seq, FinishReason.ABORT)
        self._finish_retirements()
        return self._output(tracked, [], "", [])

    def abort_all(self) -> list[RequestOutput]:
        return [self.abort(request_id) for request_id in list(self._requests)]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one forward pass over everything scheduled; return what each request gained.

        A request that makes the step fail (its forward pass raises, or its logits are not finite) is
        failed alone, with an error in its output; the others in the step go on as if it had not been
        there. Only a failure no single request explains propagates."""
        started = time.perf_counter()
        self._install_cpu_kernel()
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        seqs, logits, prompt_chunks, outputs = self._forward(batch)
        if logits is None:
            return outputs
        for seq in batch.sequences:
            if seq.request_id in self._requests:  # not failed this step
                self.scheduler.name_computed_blocks(seq)
        prompt_logits = self._prompt_logits(seqs, prompt_chunks)
        finite = [ok and (seq not in prompt_logits or bool(torch.isfinite(prompt_logits[seq]).all()))
                  for seq, ok in zip(seqs, self._finite_rows(logits, seqs))]
        served = [seq for seq, ok in zip(seqs, finite) if ok]
        outputs += [self._fail(seq, "the model produced non-finite logits for this request")
                    for seq, ok in zip(seqs, finite) if not ok]
        logits = logits[torch.tensor(finite, device=logits.device)] if len(served) < len(seqs) else logits
        scores, broken = constrain(adjust_logits(logits, served, self._eos_ids), [seq.grammar for seq in served])
        for i, (seq, token) in enumerate(zip(served, sample(scores, served))):
            error = broken.get(i) or (seq.grammar.advance(token) if seq.grammar is not None else None)
            if error is not None:
                outputs.append(self._fail(seq, f"the structured output's grammar failed: {error}"))
                continue
            seq.output_ids.append(token)
            logprobs = [token_logprobs(logits[i], token, seq.params.logprobs)] if seq.params.logprobs is not None else []
            prompt = (prompt_logprobs(prompt_logits[seq], seq.prompt_ids, seq.params.prompt_logprobs)
                      if seq in prompt_logits else None)
            outputs.append(self._postprocess(self._requests[seq.request_id], token, logprobs, prompt))
        self.tokens_generated += len(served)
        self._observe_traffic(served)
        self._finish_retirements()
        self.steps += 1
        self.step_seconds += time.perf_counter() - started
        return outputs

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | LoraAdapter | None] | None = None) -> list[Completion]:
        """Run requests to completion together (tests, benchmarks, offline use)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p, adapter in zip(ids, prompts, params_list, adapters):
            self.add_request(request_id, prompt, p, adapter)
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        texts: dict[str, str] = {i: "" for i in ids}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                tokens[out.request_id] += out.token_ids
                texts[out.request_id] += out.text
                if out.finished:
                    done[out.request_id] = out
        return [Completion(tokens[i], texts[i], done[i].finish_reason, done[i].prompt_tokens) for i in ids]

    def snapshot(self) -> EngineSnapshot:
        """A frozen copy of the state that other threads may see (see server/engine/snapshot.py)."""
        merges, slots, allocator = self.merges, self.slots, self.kv_cache.allocator
        return EngineSnapshot(
            waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
            kv_blocks=allocator.num_blocks, kv_free_blocks=allocator.num_free,
            device_adapters=frozenset(slots.resident), merged=frozenset(merges.merged),
            merged_bytes=merges.used_bytes, merge_pending=merges.pending, pinned=frozenset(merges.pinned),
            retiring=frozenset(self.retiring), traffic_shares=MappingProxyType(merges.traffic.shares),
            merge_events=tuple(merges.events),
            slot_loads=slots.loads, slot_evictions=slots.evictions, slot_moves=slots.moves,
            slot_load_seconds=slots.load_seconds, merge_promotions=merges.promotions,
            merge_demotions=merges.demotions, merge_failures=merges.failures,
            preemptions=self.scheduler.preemptions, steps=self.steps, step_seconds=self.step_seconds,
            prefix_cached_blocks=allocator.num_cached, prefix_queried_tokens=self.scheduler.prefix_queried_tokens,
            prefix_hit_tokens=self.scheduler.prefix_hit_tokens, prefix_evictions=allocator.evictions,
            tokens_generated=self.tokens_generated, merged_steps=self.runner.merged_steps,
            mixed_merged_steps=self.runner.mixed_merged_steps,
        )

    def wait_for_cpu_kernel(self) -> None:
        """Block until the CPU ops' background builds are done and the ops installed (benchmarks)."""
        for build in (self._kernel_build, self._attention_build):
            if build is not None:
                build.result()
        self._install_cpu_kernel()

    # ---- internals ------------------------------------------------------------------------------

    def _install_cpu_kernel(self) -> None:
        """Between steps: use each CPU op from now on if its background build has finished."""
        if self._kernel_build is not None and self._kernel_build.done():
            self.runner.lora_batch.fused_op = self._kernel_build.result()
            self._kernel_build = None
            if self.runner.lora_batch.fused_op is not None:
                log.info("the fused CPU LoRA op is ready: decode steps with few adapter tokens use it now")
        if self._attention_build is not None and self._attention_build.done():
            self.runner.decode_op = self._attention_build.result()
            self._attention_build = None
            if self.runner.decode_op is not None:
                log.info("the paged decode attention op is ready: decodes read the KV cache in place now")

    def _forward(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None,
                                                        dict[Sequence, PromptChunk], list[RequestOutput]]:
        """runner.run(batch); when it raises, each sequence is tried alone, those that fail alone are
        failed (their outputs returned) and the rest runs. A forward that raises leaves no trace in a
        sequence (its computed count moves only on success); a trial that succeeds is undone by resetting
        that count, and its cache rows are written again by the real run. When no sequence fails alone,
        or the rest fails again, the step's sequences are failed (never the requests outside the step),
        and every failed request gets its output."""
        try:
            return *self.runner.run(batch), []
        except Exception as error:
            failures = {seq: self._fails_alone(seq, batch) for seq in batch.sequences}
            culprits = {seq: failure for seq, failure in failures.items() if failure is not None}
            log.error("a step failed; failing the %d request(s) that fail alone", len(culprits), exc_info=error)
            culprits = culprits or dict.fromkeys(batch.sequences, error)  # none alone: the step together
        outputs = [self._fail(seq, f"the forward pass failed for this request ({type(failure).__name__})")
                   for seq, failure in culprits.items()]
        remaining = batch.only(lambda seq: seq not in culprits)
        if remaining.is_empty:
            return [], None, {}, outputs
        try:
            return *self.runner.run(remaining), outputs
        except Exception as error:
            log.error("the step failed again without its culprits; failing its other requests", exc_info=error)
            return [], None, {}, outputs + [
                self._fail(seq, f"the forward pass failed for this request ({type(error).__name__})")
                for seq in remaining.sequences]

    def _fails_alone(self, seq: Sequence, batch: ScheduledBatch) -> Exception | None:
        computed = seq.num_computed, seq.computed_length
        alone = batch.only(lambda other: other is seq)
        try:
            self.runner.run(alone)
        except Exception as error:
            return error
        finally:
            seq.num_computed, seq.computed_length = computed
        return None

    def _prompt_logits(self, sampled: list[Sequence], chunks: dict[Sequence, PromptChunk]) -> dict[Sequence, torch.Tensor]:
        """The logits at every prompt position of the sampled sequences that asked for prompt logprobs,
        gathered from the chunks their prompt was prefilled in."""
        for seq, chunk in chunks.items():
            self._requests[seq.request_id].add_prompt_chunk(chunk)
        return {seq: self._requests[seq.request_id].prompt_logits() for seq in sampled if seq.wants_prompt_logprobs}

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        """End one request with an error; the rest of the batch is unaffected."""
        tracked = self._requests.pop(seq.request_id)
        self.scheduler.finish(seq, FinishReason.ABORT)
        return replace(self._output(tracked, [], "", []), error=error)

    def _finish_retirements(self) -> None:
        for name in [n for n in self.retiring if not self.adapter_in_use(n)]:
            self.remove_adapter(name)

    def _adapter(self, name: str) -> LoraAdapter:
        try:
            return self.adapters[name]
        except KeyError:
            raise UnknownAdapterError(f"unknown adapter {name!r}") from None

    def _finite_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[bool]:
        """Whether each row is finite over its own vocabulary (a batch with an adapter that resized the
        vocabulary pads the other rows with -inf)."""
        if logits.shape[-1] == self.runner.vocabulary:
            return torch.isfinite(logits).all(dim=-1).tolist()
        own = torch.tensor([self.runner.vocabulary_of(seq.adapter) for seq in seqs], device=logits.device)
        return (torch.isfinite(logits) | past_vocabulary(logits, own)).all(dim=-1).tolist()

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams, lora: LoraAdapter | None = None) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.runner.vocabulary_of(lora)
        outside = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if outside is not None:
            raise InvalidRequestError(f"token id {outside} is outside the vocabulary [0, {vocab})", param="prompt")
        biased = next((t for t, _ in params.logit_bias if not 0 <= t < vocab), None)
        if biased is not None:
            raise InvalidRequestError(f"logit_bias names token id {biased}, outside the vocabulary [0, {vocab})",
                                      param="logit_bias")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_context:
            raise RequestTooLargeError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_context}"
            )
        if total > self.kv_cache.capacity_tokens:
            raise RequestTooLargeError(
                f"prompt + max_tokens ({total} tokens) exceeds the KV cache ({self.kv_cache.capacity_tokens} tokens)"
            )

    def _observe_traffic(self, seqs: list[Sequence]) -> None:
        tokens: dict[str | None, int] = {}
        adapters = {}
        for seq in seqs:
            tokens[seq.adapter_name] = tokens.get(seq.adapter_name, 0) + 1
            if seq.adapter is not None and seq.adapter.name not in self.retiring:  # never merge a deleted one
                adapters[seq.adapter.name] = seq.adapter
        self.merges.observe(tokens, adapters)

    def _postprocess(self, tracked: _Tracked, token: int, logprobs: list[TokenLogprobs],
                     prompt: list[TokenLogprobs] | None = None) -> RequestOutput:
        seq = tracked.seq
        params = seq.params
        reason = None
        stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self._eos_ids)
        if stop_token or (seq.grammar is not None and seq.grammar.finished):  # whole: only EOS could follow
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= params.max_tokens or seq.length >= self.max_context:
            reason = FinishReason.LENGTH
        text_ids = seq.output_ids
        if stop_token:  # the stop token is not in the text, so not in the logprobs either
            text_ids, logprobs = seq.output_ids[:-1], []
        text = tracked.detokenizer.update(text_ids, final=reason is not None,
                                          stop_allowed=len(seq.output_ids) >= params.min_tokens)
        if tracked.detokenizer.stopped:
            reason = FinishReason.STOP
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._requests[seq.request_id]
        return self._output(tracked, [token], text, logprobs, prompt)

    def _output(self, tracked: _Tracked, token_ids: list[int], text: str,
                logprobs: list[TokenLogprobs], prompt: list[TokenLogprobs] | None = None) -> RequestOutput:
        seq = tracked.seq
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=token_ids,
            text=text,
            finished=seq.finish_reason is not None,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            logprobs=logprobs,
            prompt_logprobs=prompt,
            cached_tokens=seq.cached_tokens,
        )


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
