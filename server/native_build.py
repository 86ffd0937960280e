"""Compiling the server's small C++ ops for the CPU, once per machine, off the serving thread.

torch's extension builder compiles a source on first use (~25 s on 2 cores) and caches the result under
~/.cache/torch_extensions; later starts load it in a second. A server must not wait for the compile
before it serves, so builds run on one worker thread and the engine installs each op between two steps
when it is ready (the torch path serves meanwhile). Without a compiler the op is None (logged).
"""

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraserve-cpu-kernel")


def build_in_background(load: Callable[[], T]) -> "Future[T]":
    return _BUILDER.submit(load)


def compile_cpu_extension(name: str, source: str, functions: list[str], what: str) -> ModuleType | None:
    """The compiled module, or None (logged) when it cannot be built here."""
    from torch.utils.cpp_extension import load_inline

    vector_flags = ["-mavx2", "-mfma"] if _cpu_has("avx2", "fma") else []
    # The name carries the instruction set: a cache built with AVX2 is never loaded on a CPU without it.
    name += "_avx2" if vector_flags else ""
    started = time.perf_counter()
    log.info("loading the %s %s (compiled on first use on this machine, ~30 s)", what, name)
    try:
        module = load_inline(name, cpp_sources=source, functions=functions,
                             extra_cflags=["-O3", "-fopenmp-simd"] + vector_flags)
    except Exception as exc:  # no compiler, no ninja, headers missing: the torch path serves instead
        log.warning("%s unavailable (%s); using the torch path", what, exc)
        return None
    log.info("%s ready in %.1f s", what, time.perf_counter() - started)
    return module


def _cpu_has(*features: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(feature in flags for feature in features)
