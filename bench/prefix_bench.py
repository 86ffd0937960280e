"""Prefix caching and chunked prefill, measured side by side in one run (see docs/bench-prefix.md).

On the engine benchmark's random Llama (bench/engine_bench.py) with 8 PEFT adapters on the attention
projections (adapters that change keys and values, so each keeps blocks of its own):
  1. shared prefix: 8 adapters × requests sharing a 1,000-token system prompt, short user turns, 4 in
     flight at a time: time to first token (TTFT) and throughput, prefix caching on vs off;
  2. multi-turn chat replay: conversations whose every turn resends the history: TTFT and throughput,
     caching on vs off;
  3. a 4,000-token prompt arriving while 8 streams decode: the inter-token latency (ITL) of the streams,
     p99, with chunked prefill (512-token steps) vs the whole prompt in one step.
Each pair runs in the same process on the same engine build, alternating, `--repeats` times after a
warm-up round that is not counted.

    python -m bench.prefix_bench            # the full run (about 10 minutes on 2 cores)
    python -m bench.prefix_bench --quick    # tiny model, smoke test (seconds)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.engine_bench import NUM_ADAPTERS, Clock, build_base, make_adapters, quiet_libraries
from bench.engine_bench import Options as EngineOptions
from bench.machine import CpuMeter, environment, wait_for_quiet
from bench.model_shapes import FULL_MODEL, QUICK_MODEL, ModelOptions
from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.model_loader import load_base_model, load_tokenizer
from server.engine.sequence import SamplingParams
from tests.factories import SPECIAL_TOKENS, VOCAB

RESULTS_DIR = Path(__file__).parent / "results"
ADAPTERS = 8
GOAL_TTFT = 5.0  # shared prefix: median TTFT without caching / with
GOAL_ITL = 3.0  # p99 ITL of running streams while a long prompt arrives: unchunked / chunked
CHUNK = 512  # max_batch_tokens of the chunked configuration

FULL = dict(**FULL_MODEL, system=1000, turn=20, per_adapter=3, in_flight=4, max_tokens=16, conversations=4,
            turns=4, chat_system=200, long_prompt=4000, streams=8, stream_tokens=400, repeats=2)
QUICK = dict(**QUICK_MODEL, system=200, turn=8, per_adapter=2, in_flight=4, max_tokens=4, conversations=2,
             turns=3, chat_system=40, long_prompt=600, streams=4, stream_tokens=120, repeats=1)


@dataclass(frozen=True)
class Options(ModelOptions):
    system: int
    turn: int
    per_adapter: int
    in_flight: int
    max_tokens: int
    conversations: int
    turns: int
    chat_system: int
    long_prompt: int
    streams: int
    stream_tokens: int
    repeats: int
    seed: int
    out: Path


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and workload (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default bench/results; --quick: bench/results/quick)")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    values = dict(QUICK if args.quick else FULL)
    values.update({k: v for k, v in vars(args).items() if k in FULL and v is not None})
    out = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    return Options(quick=args.quick, seed=args.seed, out=out, **values)


# ---- workloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    adapter: str | None
    max_tokens: int


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(len(SPECIAL_TOKENS), VOCAB) for _ in range(n)]


def shared_prefix_requests(o: Options, names: list[str]) -> list[Request]:
    rng = random.Random(o.seed)
    system = tokens(rng, o.system)
    requests = [Request(system + tokens(rng, o.turn), name, o.max_tokens) for _ in range(o.per_adapter)
                for name in names]
    return requests


# ---- driving the engine -------------------------------------------------------------------------


@dataclass
class Timings:
    ttft: list[float]  # per request: seconds from submission to its first token
    itl: list[float]  # per stream: seconds between consecutive tokens
    seconds: float
    tokens: int
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_closed_loop(engine: LLMEngine, requests: list[Request], in_flight: int,
                    follow_up: Callable[[int, list[int]], Request | None] | None = None) -> Timings:
    """Keep `in_flight` requests running: each one that finishes makes room for the next, or for its
    `follow_up` (a chat's next turn, built from the answer of request `key`), which goes first."""
    queue = list(enumerate(requests))  # (key, request)
    running: dict[str, tuple[int, float]] = {}  # request id -> key, submission time
    got: dict[str, list[int]] = {}
    ttft, generated = [], 0
    started = time.perf_counter()

    def submit(key: int, request: Request) -> None:
        request_id = f"r{len(got)}"
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0, ignore_eos=True)
        engine.add_request(request_id, request.prompt, params, request.adapter)
        running[request_id], got[request_id] = (key, time.perf_counter()), []

    while queue and len(running) < in_flight:
        submit(*queue.pop(0))
    while engine.has_unfinished():
        for out in engine.step():
            key, submitted = running[out.request_id]
            if not got[out.request_id]:
                ttft.append(time.perf_counter() - submitted)
            got[out.request_id] += out.token_ids
            generated += len(out.token_ids)
            if not out.finished:
                continue
            del running[out.request_id]
            after = follow_up(key, got[out.request_id]) if follow_up else None
            if after is not None:
                queue.insert(0, (key, after))
            if queue:
                submit(*queue.pop(0))
    return Timings(ttft, [], time.perf_counter() - started, generated, list(got.values()))


def run_chat_replay(engine: LLMEngine, o: Options, names: list[str]) -> Timings:
    """Conversations of `turns` turns, each prompt the whole history plus a new user message."""
    rng = random.Random(o.seed + 1)
    system = tokens(rng, o.chat_system)
    messages = [[tokens(rng, o.turn) for _ in range(o.turns)] for _ in range(o.conversations)]
    history = [system + messages[c][0] for c in range(o.conversations)]
    turns = [0] * o.conversations

    def follow_up(c: int, answer: list[int]) -> Request | None:
        turns[c] += 1
        if turns[c] == o.turns:
            return None
        history[c] += answer + messages[c][turns[c]]
        return Request(history[c], names[c % len(names)], o.max_tokens)

    first_turns = [Request(history[c], names[c % len(names)], o.max_tokens) for c in range(o.conversations)]
    return run_closed_loop(engine, first_turns, o.conversations, follow_up)


def run_long_arrival(engine: LLMEngine, o: Options, names: list[str]) -> Timings:
    """`streams` requests decode; once each has a few tokens, a long prompt arrives. Returns the streams'
    inter-token latencies from the arrival until the long prompt's first token."""
    rng = random.Random(o.seed + 2)
    params = SamplingParams(max_tokens=o.stream_tokens, temperature=0, ignore_eos=True)
    for i in range(o.streams):
        engine.add_request(f"s{i}", tokens(rng, 16), params, names[i % len(names)])
    last: dict[str, float] = {}
    for _ in range(3):  # prefills done, streams decoding
        for out in engine.step():
            last[out.request_id] = time.perf_counter()
    engine.add_request("long", tokens(rng, o.long_prompt), SamplingParams(max_tokens=1, temperature=0))
    arrived, itl, long_first = time.perf_counter(), [], None
    while long_first is None:
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id == "long":
                long_first = now
            elif out.request_id in last:
                itl.append(now - last[out.request_id])
                last[out.request_id] = now
    for request_id in list(last):
        engine.abort(request_id)
    return Timings([long_first - arrived], itl, long_first - arrived, len(itl), [])


# ---- the engines ----------------------------------------------------------------------------------


def make_engine(model_dir: Path, adapters: dict, *, caching: bool, max_batch_tokens: int) -> LLMEngine:
    settings = Settings(model=model_dir, dtype="float32", device="cpu", kv_cache_memory=1024**3,
                        max_loras=NUM_ADAPTERS, max_lora_rank=32, max_num_seqs=64, merged_budget=0,
                        max_batch_tokens=max_batch_tokens, enable_prefix_caching=caching)
    engine = LLMEngine(load_base_model(model_dir, torch.float32, torch.device("cpu")), load_tokenizer(model_dir),
                       settings)
    engine.wait_for_cpu_kernel()
    for adapter in adapters.values():
        engine.load_adapter(adapter.name, adapter.path)
    return engine


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def compare(label: str, runs: dict[str, list[Timings]]) -> dict:
    """Medians over repeats of each configuration's figures."""
    row = {"workload": label}
    for config, timings in runs.items():
        row[config] = {
            "ttft_median_s": statistics.median(statistics.median(t.ttft) for t in timings),
            "tokens_per_s": statistics.median(t.tokens_per_s for t in timings),
            "itl_p99_s": statistics.median(percentile(t.itl, 0.99) for t in timings) if timings[0].itl else None,
            "itl_median_s": statistics.median(statistics.median(t.itl) for t in timings) if timings[0].itl else None,
        }
    return row


def main(argv: list[str] | None = None) -> None:
    o = parse_options(argv)
    quiet_libraries()
    clock, env = Clock(), environment()
    clock.log(f"{env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, torch {env['torch']}")
    wait_for_quiet(120, clock.log)
    meter = CpuMeter()
    engine_options = EngineOptions(
        quick=o.quick, hidden=o.hidden, intermediate=o.intermediate, layers=o.layers, heads=o.heads,
        kv_heads=o.kv_heads, requests=0, prompt_min=0, prompt_max=o.long_prompt + 64, max_tokens=o.stream_tokens,
        repeats=o.repeats, serial_requests=0, batch_sizes=(), matmul_size=0, seed=o.seed, quiet_wait=0, out=o.out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefix_bench-") as tmp:
        model_dir = Path(tmp) / "base"
        base = build_base(engine_options, model_dir)
        adapters = dict(list(make_adapters(base, Path(tmp) / "adapters", o.seed).items())[:ADAPTERS])
        del base
        names = list(adapters)
        clock.log(f"random Llama ({o.layers} layers, hidden {o.hidden}), {ADAPTERS} adapters")
        engines = {
            "caching on": make_engine(model_dir, adapters, caching=True, max_batch_tokens=2048),
            "caching off": make_engine(model_dir, adapters, caching=False, max_batch_tokens=2048),
        }
        shared, chat = {k: [] for k in engines}, {k: [] for k in engines}
        for repeat in range(o.repeats + 1):  # round 0 warms up (first calls of every shape) and is dropped
            for config, engine in engines.items():
                engine.kv_cache.allocator.forget_all()  # every round starts cold
                timings = run_closed_loop(engine, shared_prefix_requests(o, names), o.in_flight)
                chats = run_chat_replay(engine, o, names)
                if repeat:
                    shared[config].append(timings)
                    chat[config].append(chats)
                clock.log(f"round {repeat}/{o.repeats}, {config}: shared prefix and chat replay done")
        same = shared["caching on"][0].outputs == shared["caching off"][0].outputs
        same_chat = chat["caching on"][0].outputs == chat["caching off"][0].outputs
        rows.append(compare(f"shared {o.system}-token prefix, {ADAPTERS} adapters x {o.per_adapter}", shared))
        rows.append(compare(f"chat replay, {o.conversations} conversations x {o.turns} turns", chat))
        del engines
        chunked = {
            f"chunked ({CHUNK}-token steps)": make_engine(model_dir, adapters, caching=False, max_batch_tokens=CHUNK),
            "unchunked": make_engine(model_dir, adapters, caching=False, max_batch_tokens=o.long_prompt + 64),
        }
        arrivals = {k: [] for k in chunked}
        for repeat in range(o.repeats + 1):
            for config, engine in chunked.items():
                timings = run_long_arrival(engine, o, names)
                if repeat:
                    arrivals[config].append(timings)
                clock.log(f"round {repeat}/{o.repeats}, {config}: long prompt arrival done")
        rows.append(compare(f"{o.long_prompt}-token prompt arriving beside {o.streams} streams", arrivals))
    others = meter.others()
    report = build_report(o, env, rows, same, same_chat, others, argv)
    print_report(report)
    write_outputs(o, report)
    clock.log("done")


def build_report(o: Options, env: dict, rows: list[dict], same: bool, same_chat: bool, others: float | None,
                 argv: list[str] | None) -> dict:
    shared, chat, arrival = rows
    ttft_ratio = shared["caching off"]["ttft_median_s"] / shared["caching on"]["ttft_median_s"]
    chat_ratio = chat["caching off"]["ttft_median_s"] / chat["caching on"]["ttft_median_s"]
    chunked_key = next(k for k in arrival if k.startswith("chunked"))
    itl_ratio = arrival["unchunked"]["itl_p99_s"] / arrival[chunked_key]["itl_p99_s"]
    goals = {
        "shared prefix TTFT, off/on": {"value": ttft_ratio, "goal": GOAL_TTFT, "met": ttft_ratio >= GOAL_TTFT},
        "streams' ITL p99, unchunked/chunked": {"value": itl_ratio, "goal": GOAL_ITL, "met": itl_ratio >= GOAL_ITL},
    }
    return {
        "command": " ".join(["python -m bench.prefix_bench", *(sys.argv[1:] if argv is None else argv)]),
        "environment": env, "options": {k: str(v) for k, v in vars(o).items()}, "rows": rows, "goals": goals,
        "chat_ttft_ratio": chat_ratio, "outputs_equal_with_caching_on_and_off": same and same_chat,
        "other_processes_cores": others,
    }


def print_report(report: dict) -> None:
    print()
    print("| workload | configuration | median TTFT (s) | tokens/s | ITL p99 (s) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in report["rows"]:
        for config, figures in row.items():
            if config == "workload":
                continue
            itl = "-" if figures["itl_p99_s"] is None else f"{figures['itl_p99_s']:.3f}"
            print(f"| {row['workload']} | {config} | {figures['ttft_median_s']:.3f} | {figures['tokens_per_s']:.1f} "
                  f"| {itl} |")
    print()
    for name, goal in report["goals"].items():
        print(f"{name}: {goal['value']:.2f}x (goal >= {goal['goal']}x) {'met' if goal['met'] else 'NOT met'}")
    print(f"chat replay TTFT, off/on: {report['chat_ttft_ratio']:.2f}x")
    print(f"outputs equal with caching on and off: {report['outputs_equal_with_caching_on_and_off']}")
    if report["other_processes_cores"] is not None:
        print(f"other processes kept {report['other_processes_cores']:.2f} cores busy on average during the run")


def write_outputs(o: Options, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "prefix_bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    shared, chat, arrival = report["rows"]
    for ax, row, metric, label in ((axes[0], shared, "ttft_median_s", "median TTFT (s)"),
                                   (axes[1], chat, "ttft_median_s", "median TTFT (s)"),
                                   (axes[2], arrival, "itl_p99_s", "streams' ITL p99 (s)")):
        configs = [k for k in row if k != "workload"]
        ax.bar(configs, [row[k][metric] for k in configs], color=["tab:green", "tab:gray"])
        ax.set_title(row["workload"], fontsize=9)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("loraserve: prefix caching and chunked prefill (lower is better)")
    fig.tight_layout()
    fig.savefig(o.out / "prefix_bench.png", dpi=110)
    print(f"\nwrote {o.out / 'prefix_bench.json'} and {o.out / 'prefix_bench.png'}")


if __name__ == "__main__":
    main()
