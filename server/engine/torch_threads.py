"""One thread runs torch's parallel work: the engine's. Every other thread that touches torch uses one.

libgomp keeps each thread's OpenMP team alive after it first runs a parallel region, and once the
process holds more OpenMP threads than cores it stops spinning idle workers and puts them to sleep
between regions, so every region of the engine's step then pays a futex wake-up. Loading the model,
validating an upload or building a merged copy on another thread was enough: we measured the engine's
steps 5-8% slower on 2 cores (docs/bench-http.md). So the server loads and validates single-threaded
and only the engine thread asks for `threads`.
"""

import torch


def engine_threads(requested: int | None) -> int:
    """The engine's thread count: `requested`, else what torch would use (one per core). Call before
    `use_one_thread` changes this thread's setting."""
    return requested or torch.get_num_threads()


def use_one_thread() -> None:
    """Keep this thread's torch work serial (per-thread setting: the engine thread's stays as it is)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
