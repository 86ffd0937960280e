"""The engine on its own thread, fed from asyncio: requests join the running batch between steps.

`AsyncEngine` is the engine's only surface. One thread owns the LLMEngine and runs step() while there
is work; everything else sends it typed commands (submit, abort, warm, cool, retire, pin/unpin a merged
copy) through an inbox, so engine state is only touched by that thread and a forward pass never runs on
the event loop. Outputs come back to each request's asyncio queue. After every step and command the
engine thread publishes a frozen `EngineSnapshot`; routes and metrics read that, never the engine.

Request ids are made here, never taken from clients: a client's X-Request-ID is only a label in logs
and responses, so two clients sending the same one cannot collide inside the engine.
"""

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

import torch

from server.engine.engine import LLMEngine, RequestOutput
from server.engine.sequence import SamplingParams
from server.engine.snapshot import EngineSnapshot
from server.lora.adapter import LoraAdapter

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class AsyncEngine:
    def __init__(self, engine: LLMEngine, threads: int | None = None):
        """`threads`: torch threads of the engine thread (None: leave torch's setting alone)."""
        self._engine = engine
        self._threads = threads
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._snapshot = engine.snapshot()

    @property
    def snapshot(self) -> EngineSnapshot:
        """The engine's state as of its last step or command (immutable: read it from any thread)."""
        return self._snapshot

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort whatever is still running and stop the thread."""
        if self._thread is None:
            return
        self._call(lambda: self._deliver(self._engine.abort_all())).result()
        self._stopping.set()
        self._call(lambda: None)  # wake the loop
        self._thread.join()
        self._thread = None

    # ---- requests -------------------------------------------------------------------------------

    async def submit(self, prompt: str | list[int], params: SamplingParams,
                     adapter: str | LoraAdapter | None = None, tenant: str | None = None) -> "RequestStream":
        """Queue a request under a new engine-made id; raises the engine's refusal (unknown adapter,
        queue full, too long) here, before any output, so the caller can still answer with an error."""
        request_id = f"req-{next(self._ids)}"
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        try:
            await self._run(lambda: self._engine.add_request(request_id, prompt, params, adapter, tenant))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return RequestStream(self, request_id, outputs)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       adapter: str | LoraAdapter | None = None) -> AsyncIterator[RequestOutput]:
        """submit() and iterate; leaving early aborts the request."""
        stream = await self.submit(prompt, params, adapter)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def release_stream(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._call(lambda: self._engine.abort(request_id))

    # ---- adapters -------------------------------------------------------------------------------

    async def warm(self, adapter: LoraAdapter) -> bool:
        """Into a device slot now; False if every slot is held by running requests."""
        return await self._run(lambda: self._engine.warm_adapter(adapter))

    async def cool(self, key: str) -> bool:
        """Out of its slot and merged copy; False (nothing changes) while running requests use it."""
        return await self._run(lambda: self._engine.remove_adapter(key))

    async def retire(self, key: str) -> bool:
        """The adapter was deleted: True if freed now, False if it drains (freed after its last request)."""
        return await self._run(lambda: self._engine.retire_adapter(key))

    async def pin_merged(self, adapter: LoraAdapter) -> None:
        await self._run(lambda: self._engine.pin_merged(adapter))

    async def unpin_merged(self, key: str) -> None:
        await self._run(lambda: self._engine.unpin_merged(key))

    async def wait_for_merges(self) -> None:
        """Until queued merged copies are built and installed (tests, warm-up)."""
        await self._run(self._engine.merges.wait_for_builds)

    # ---- the engine thread ----------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between steps; its result (or exception) lands in the future,
        after the snapshot that shows its effect was published."""
        future: Future = Future()
        self._inbox.put((fn, future))
        return future

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._call(fn))

    def _loop(self) -> None:
        if self._threads is not None:  # a per-thread setting: see server/engine/torch_threads.py
            torch.set_num_threads(self._threads)
        while not self._stopping.is_set():
            self._drain_inbox(block=not self._engine.has_unfinished())
            if self._engine.has_unfinished():
                try:
                    outputs = self._engine.step()
                except Exception:  # a failed step must not kill the thread: end its requests instead
                    log.exception("engine step failed; aborting running requests")
                    outputs = self._engine.abort_all()
                self._snapshot = self._engine.snapshot()
                self._deliver(outputs)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _execute(self, fn: Callable[[], Any], future: Future) -> None:
        try:
            result = fn()
        except Exception as exc:
            future.set_exception(exc)
            return
        self._snapshot = self._engine.snapshot()
        future.set_result(result)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their event loops: one thread-safe wake-up per loop and step, not one
        per token (64 per step at a full batch)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                loop, outputs_queue = stream
                by_loop.setdefault(loop, []).append((outputs_queue, output))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs_queue, output in items:
        outputs_queue.put_nowait(output)


class RequestStream:
    """The outputs of one accepted request, in order; close() before the end aborts it."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: "asyncio.Queue[RequestOutput]"):
        self.request_id = request_id
        self._engine = engine
        self._outputs = outputs
        self._finished = False
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        output = await self._outputs.get()
        if output.finished:
            self._finished = True
            self.close()
        return output

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.release_stream(self.request_id, self._finished)
