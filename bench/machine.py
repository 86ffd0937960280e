"""The machine a benchmark runs on: what it is, and whether other processes are competing for it.

The development machines are shared. Another process on the same cores slows a run far more than
its share of the CPU (torch keeps one thread per core, and they wait for each other at every op),
and nothing in the timing itself would say so; hence `CpuMeter` and `wait_for_quiet`.
"""

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

CONTENDED_CORES = 0.25  # other processes busier than this during a run: its timing is suspect


class CpuMeter:
    """Cores that other processes kept busy on average since construction (Linux; None elsewhere)."""

    def __init__(self):
        self._busy0, self._own0, self._wall0 = _machine_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()

    def others(self) -> float | None:
        busy, own, wall = _machine_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        if busy is None or self._busy0 is None:
            return None
        return max(0.0, (busy - self._busy0) - (own - self._own0)) / (wall - self._wall0)


def wait_for_quiet(limit_s: float, log: Callable[[str], None]) -> float:
    """Hold off, at most limit_s, while other processes keep more than CONTENDED_CORES busy.

    Returns the seconds spent waiting.
    """
    start = time.perf_counter()
    announced = False
    while time.perf_counter() - start < limit_s:
        meter = CpuMeter()
        time.sleep(0.5)
        others = meter.others()
        if others is None or others <= CONTENDED_CORES:
            break
        if not announced:
            log(f"other processes use {others:.1f} cores: waiting (at most {limit_s:.0f}s) for them")
            announced = True
    return time.perf_counter() - start


def _machine_cpu_seconds() -> float | None:
    """CPU seconds spent by everything on the machine: user, nice, system, irq, softirq."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict[str, str | int]:
    import peft
    import transformers

    return {"cpu": cpu_name(), "cores": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}
