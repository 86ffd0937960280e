"""Running one API request through the engine: every (prompt × n) choice as its own engine request,
their outputs merged into one stream, with the per-adapter metrics (and an experiment's outcome) recorded
on the way."""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from server.api.errors import domain_error_status
from server.api.metrics import Metrics
from server.engine.async_engine import AsyncEngine, RequestStream
from server.engine.engine import RequestOutput
from server.engine.sequence import FinishReason, SamplingParams
from server.experiments.model import Assignment, Outcome
from server.experiments.service import ExperimentService
from server.errors import InferenceFailedError
from server.lora.adapter import LoraAdapter


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to."""

    model: str  # as the caller wrote it; echoed in responses
    adapter: LoraAdapter | None  # None: the bare base
    label: str  # metrics label: the base's name or "adapter@version"
    experiment: Assignment | None = None  # set when `model` named an experiment


@dataclass(frozen=True)
class ChoiceOutput:
    index: int
    output: RequestOutput


class InferenceService:
    def __init__(self, engine: AsyncEngine, metrics: Metrics, experiments: ExperimentService):
        self.engine = engine
        self.metrics = metrics
        self.experiments = experiments

    async def run(self, prompts: list[str | list[int]], params: SamplingParams, n: int,
                  target: Target, endpoint: str, tenant: str | None = None) -> AsyncIterator[ChoiceOutput]:
        """Submit every choice (refusals raise here, before any output), then stream their outputs."""
        try:
            streams = await self._submit_all(prompts, params, n, target, tenant)
        except Exception as exc:
            if target.experiment is not None:
                await self.experiments.record_outcome(target.experiment, refusal(exc))
            raise
        return self._merged(streams, target, endpoint)

    async def _submit_all(self, prompts: list[str | list[int]], params: SamplingParams, n: int,
                          target: Target, tenant: str | None) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for prompt in prompts:
                for i in range(n):
                    choice_params = params
                    if params.seed is not None and n > 1:  # distinct but reproducible choices
                        choice_params = replace(params, seed=params.seed + i)
                    streams.append(await self.engine.submit(prompt, choice_params, target.adapter, tenant))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    async def _merged(self, streams: list[RequestStream], target: Target, endpoint: str) -> AsyncIterator[ChoiceOutput]:
        started = time.monotonic()
        queue: asyncio.Queue[ChoiceOutput | None] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    await queue.put(ChoiceOutput(index, output))
            finally:
                await queue.put(None)

        # One choice (the usual case) is read directly: no task and no second queue per token.
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)] if len(streams) > 1 else []
        timing = _Timing(self.metrics, target.label, started)
        last: dict[int, RequestOutput] = {}  # each choice's latest output
        try:
            items = _direct(streams[0]) if not tasks else _until_all_done(queue, len(tasks))
            async for item in items:
                timing.observe(item.output)
                last[item.index] = item.output
                if item.output.finished:
                    self._record_finish(item.output, target.label, endpoint)
                if item.output.error is not None:
                    raise InferenceFailedError(item.output.error)
                yield item
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.close()
            timing.finish()
            if target.experiment is not None:
                await self.experiments.record_outcome(target.experiment, _outcome(last, len(streams), timing))

    def _record_finish(self, output: RequestOutput, label: str, endpoint: str) -> None:
        reason = output.finish_reason or FinishReason.ABORT
        self.metrics.requests.labels(label, endpoint, reason.value).inc()
        self.metrics.prompt_tokens.labels(label).inc(output.prompt_tokens)
        self.metrics.output_tokens.labels(label).inc(output.completion_tokens)


def refusal(exc: Exception) -> Outcome:
    """The outcome of an experiment request refused before any output: the error's code."""
    status = domain_error_status(exc)
    return Outcome(error=status[1] if status else "internal_error")


def _outcome(last: dict[int, RequestOutput], choices: int, timing: "_Timing") -> Outcome:
    """An experiment request's outcome: "abort" if the engine aborted a choice, "cancelled" if the client
    left before every choice finished."""
    finished = [o for o in last.values() if o.finished]
    if any(o.finish_reason is FinishReason.ABORT for o in finished):
        error = "abort"
    else:
        error = None if len(finished) == choices else "cancelled"
    return Outcome(error, sum(o.completion_tokens for o in last.values()), timing.ttft, timing.total)


class _Timing:
    """Time to first token, inter-token latency and total latency of one API request."""

    def __init__(self, metrics: Metrics, label: str, started: float):
        self._metrics, self._label, self._started = metrics, label, started
        self._first: float | None = None
        self._last: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self._first is None else self._first - self._started

    @property
    def total(self) -> float | None:
        return None if self._last is None else self._last - self._started

    def observe(self, output: RequestOutput) -> None:
        if not output.token_ids:
            return
        now = time.monotonic()
        if self._last is None:
            self._first = now
            self._metrics.ttft.labels(self._label).observe(now - self._started)
        else:
            self._metrics.itl.labels(self._label).observe(now - self._last)
        self._last = now

    def finish(self) -> None:
        if self._last is not None:
            self._metrics.e2e.labels(self._label).observe(self.total)


async def _direct(stream: RequestStream) -> AsyncIterator[ChoiceOutput]:
    async for output in stream:
        yield ChoiceOutput(0, output)


async def _until_all_done(queue: "asyncio.Queue[ChoiceOutput | None]", producers: int) -> AsyncIterator[ChoiceOutput]:
    """Items from the queue until each producer has sent its end marker (None)."""
    while producers:
        item = await queue.get()
        if item is None:
            producers -= 1
        else:
            yield item
