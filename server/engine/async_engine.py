"""The engine on its own thread, fed from asyncio: requests join the running batch between steps.

One thread owns the LLMEngine and runs step() while there is work. Everything else talks to it
through a command inbox (add, abort, any callable), so engine state is only touched by that thread
and a forward pass never runs on the event loop. Outputs come back to each request's asyncio queue.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

import torch

from server.engine.engine import LLMEngine, RequestOutput
from server.engine.sequence import SamplingParams
from server.lora.adapter import LoraAdapter

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class AsyncEngine:
    def __init__(self, engine: LLMEngine, threads: int | None = None):
        """`threads`: torch threads of the engine thread (None: leave torch's setting alone)."""
        self.engine = engine
        self._threads = threads
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort whatever is still running and stop the thread."""
        if self._thread is None:
            return
        self.call(lambda: self._deliver(self.engine.abort_all())).result()
        self._stopping.set()
        self.call(lambda: None)  # wake the loop
        self._thread.join()
        self._thread = None

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between steps; its result (or exception) lands in the future."""
        future: Future = Future()
        self._inbox.put((fn, future))
        return future

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    async def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                     adapter: str | LoraAdapter | None = None, tenant: str | None = None) -> "RequestStream":
        """Queue a request; raises the engine's refusal (unknown adapter, queue full, too long) here,
        before any output, so the caller can still answer with an error status."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        try:
            await self.run(lambda: self.engine.add_request(request_id, prompt, params, adapter, tenant))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return RequestStream(self, request_id, outputs)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       adapter: str | LoraAdapter | None = None) -> AsyncIterator[RequestOutput]:
        """submit() and iterate; leaving early aborts the request."""
        stream = await self.submit(request_id, prompt, params, adapter)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def release_stream(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self.call(lambda: self.engine.abort(request_id))

    def _loop(self) -> None:
        if self._threads is not None:  # a per-thread setting: see server/engine/torch_threads.py
            torch.set_num_threads(self._threads)
        while not self._stopping.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception:  # a failed step must not kill the thread: end its requests instead
                    log.exception("engine step failed; aborting running requests")
                    outputs = self.engine.abort_all()
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

    @staticmethod
    def _execute(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)

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
