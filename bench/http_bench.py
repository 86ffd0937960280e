"""The HTTP layer's cost: the same workload through the engine directly and through a real server.

One run, side by side and interleaved: a random Llama and 8 PEFT adapters; 64 concurrent greedy
requests over the adapters, measured (a) with LLMEngine.generate in this process and (b) as streaming
/v1/completions against `loraserve serve` in a subprocess on loopback, sent from this process (on the
same cores) by a minimal raw-socket client, whose text must equal the engine's, and (c) by the httpx
client, for comparison: its own CPU costs the server's cores, and (d) by the raw client again while a
console is open on every page, polling what its pages poll at their refresh intervals. Then the time
from uploading a new adapter to its first served token. See docs/bench-http.md.

    python -m bench.http_bench            # about 3 minutes on 2 cores
    python -m bench.http_bench --quick    # tiny model, smoke test
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.model_loader import load_base_model, load_tokenizer
from server.engine.sequence import SamplingParams
from tests.server_harness import ServerProcess
from bench.sse_client import fetch_stream, parse_completion_stream
from bench.model_shapes import FULL_MODEL, QUICK_MODEL, base_config
from tests.factories import adapter_noise_for, build_model, make_adapter, save_model

RESULTS_DIR = Path(__file__).parent / "results"
GOAL_MAX_LOSS = 0.10  # HTTP may cost at most 10% of the engine's throughput
FULL = dict(**FULL_MODEL, adapters=8, requests=64, max_tokens=32, repeats=3)
QUICK = dict(**QUICK_MODEL, adapters=4, requests=16, max_tokens=8, repeats=2)


@dataclass(frozen=True)
class Workload:
    prompts: list[str]
    models: list[str]  # adapter names, per request
    max_tokens: int


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(root: Path, shape: dict) -> tuple[Path, Path]:
    """A random base and `adapters` PEFT adapters (ranks 8/16/32, q/k/v/o) in an adapters directory."""
    config = base_config(shape)
    base_dir = save_model(build_model(config, std=0.02), root / "base")
    store = root / "adapters"
    for i in range(shape["adapters"]):
        log(f"adapter {i + 1}/{shape['adapters']}")
        make_adapter(base_dir, store / f"a{i:02d}", seed=i, r=(8, 16, 32)[i % 3], lora_alpha=16,
                     noise_std=adapter_noise_for(shape["hidden"]),
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return base_dir, store


def workload(shape: dict) -> Workload:
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(16, 32)))
               for _ in range(shape["requests"])]
    models = [f"a{i % shape['adapters']:02d}" for i in range(shape["requests"])]
    return Workload(prompts, models, shape["max_tokens"])


def settings(base_dir: Path, store: Path, port: int = 8000) -> Settings:
    return Settings(model=base_dir, adapters_dir=store, dtype="float32", device="cpu", port=port,
                    kv_cache_memory=2 * 1024**3, max_loras=32, max_lora_rank=32, max_num_seqs=64,
                    max_batch_tokens=4096, served_model_name="base", log_format="text")


def engine_round(engine: LLMEngine, work: Workload) -> tuple[float, int, list[str]]:
    params = SamplingParams(max_tokens=work.max_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    results = engine.generate(work.prompts, params, work.models)
    return time.perf_counter() - started, sum(len(r.token_ids) for r in results), [r.text for r in results]


def _stream_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def raw_round(url: str, work: Workload) -> tuple[float, int, list[str]]:
    """The workload through the raw-socket client: responses are parsed after the clock stops."""
    started = time.perf_counter()
    raw = await asyncio.gather(*(fetch_stream(url + "/v1/completions", _stream_body(m, p, work.max_tokens))
                                 for m, p in zip(work.models, work.prompts)))
    seconds = time.perf_counter() - started
    completions = [parse_completion_stream(r) for r in raw]
    return seconds, sum(c.completion_tokens for c in completions), [c.text for c in completions]


async def _stream_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> int:
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=_stream_body(model, prompt, max_tokens)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


async def httpx_round(url: str, work: Workload) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=len(work.prompts) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*(_stream_one(client, m, p, work.max_tokens)
                                        for m, p in zip(work.models, work.prompts)))
        return time.perf_counter() - started, sum(counts)


async def upload_to_first_token(url: str, adapter_dir: Path) -> dict:
    """Upload a PEFT adapter the server has never seen, then time its first streamed token."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        files = {name: (name, (adapter_dir / name).read_bytes())
                 for name in ("adapter_config.json", "adapter_model.safetensors")}
        started = time.perf_counter()
        response = await client.post("/v1/adapters", data={"name": "cold"}, files=files)
        response.raise_for_status()
        uploaded = time.perf_counter()
        body = {"model": "cold", "prompt": "cold start", "max_tokens": 4, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: {"):
                    break
        first = time.perf_counter()
    return {"upload_s": uploaded - started, "first_token_after_upload_s": first - uploaded,
            "upload_to_first_token_s": first - started}


# One open tab of each console page: what it polls and how often (`every(...)` in server/api/console/static/*.js;
# the Experiments page follows the selected experiment, the Keys page is an admin's).
CONSOLE_EXPERIMENT = "bench-ab"
CONSOLE_POLLS = {
    2.0: ["/v1/server/state"],
    3.0: ["/v1/experiments", f"/v1/experiments/{CONSOLE_EXPERIMENT}/results", f"/v1/experiments/{CONSOLE_EXPERIMENT}"],
    5.0: ["/v1/adapters?limit=500", "/v1/aliases"],
    10.0: ["/v1/admin/tenants", "/v1/admin/keys"],
}


async def _poll(client: httpx.AsyncClient, interval: float, paths: list[str], stop: asyncio.Event,
                loaded: asyncio.Event) -> list[float]:
    """One page's refresh loop: its calls together, then the interval after they answer (as `every` does).
    Returns when each refresh was sent."""
    sent = []
    while not stop.is_set():
        sent.append(time.perf_counter())
        for response in await asyncio.gather(*(client.get(path) for path in paths)):
            response.raise_for_status()
            response.json()  # the page parses every answer
        loaded.set()
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass
    return sent


async def console_round(url: str, work: Workload) -> tuple[float, int, list[str], int]:
    """The raw client's workload while the console's pages poll the same server, timed once every page has
    loaded (its steady refreshing, not the first load); also the console requests sent while timed."""
    stop = asyncio.Event()
    loaded = {interval: asyncio.Event() for interval in CONSOLE_POLLS}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        pollers = [asyncio.create_task(_poll(client, interval, paths, stop, loaded[interval]))
                   for interval, paths in CONSOLE_POLLS.items()]
        await asyncio.gather(*(event.wait() for event in loaded.values()))
        started = time.perf_counter()
        seconds, tokens, texts = await raw_round(url, work)
        stop.set()
        sent = await asyncio.gather(*pollers)
    polls = sum(len(paths) * sum(t >= started for t in times) for paths, times in zip(CONSOLE_POLLS.values(), sent))
    return seconds, tokens, texts, polls


async def create_console_experiment(url: str) -> None:
    """The experiment the Experiments page follows (its results are read, no request goes through it)."""
    body = {"name": CONSOLE_EXPERIMENT, "status": "running",
            "variants": [{"name": "A", "adapter": "a00"}, {"name": "B", "adapter": "a01"}]}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        (await client.post("/v1/experiments", json=body)).raise_for_status()


LABELS = {"engine": "engine, direct", "http": "HTTP streaming, raw client", "httpx": "HTTP streaming, httpx client",
          "console": "raw client, console open"}


def report(rounds: dict[str, list[tuple[float, int]]], cold: dict, shape: dict, outputs_match: bool,
           console_polls: int) -> dict:
    best = {name: max(tokens / seconds for seconds, tokens in runs) for name, runs in rounds.items()}
    ratio = best["http"] / best["engine"]
    return {
        "command": "python -m bench.http_bench" + (" --quick" if shape is QUICK else ""),
        "shape": shape,
        "rounds": {name: [{"seconds": s, "tokens": t, "tokens_per_s": t / s} for s, t in runs]
                   for name, runs in rounds.items()},
        "tokens_per_s": best,
        "vs_engine": {name: value / best["engine"] for name, value in best.items()},
        "http_outputs_equal_engine": outputs_match,
        "console": {"polls": CONSOLE_POLLS, "requests_sent": console_polls,
                    "open_vs_closed": best["console"] / best["http"]},
        "goal": {"max_loss": GOAL_MAX_LOSS, "ratio": ratio, "met": ratio >= 1 - GOAL_MAX_LOSS},
        "cold_adapter": cold,
    }


def print_report(result: dict) -> None:
    print()
    print(f"{'configuration':<32}{'tokens/s':>10}{'ratio':>8}")
    for name, label in LABELS.items():
        print(f"{label:<32}{result['tokens_per_s'][name]:>10.1f}{result['vs_engine'][name]:>8.3f}")
    print(f"HTTP texts equal the engine's: {result['http_outputs_equal_engine']}")
    console = result["console"]
    print(f"console open vs closed (raw client): {console['open_vs_closed']:.3f} "
          f"({console['requests_sent']} console requests during the measured rounds)")
    goal = result["goal"]
    print(f"goal: HTTP >= {1 - goal['max_loss']:.2f}x the engine (raw client): {'met' if goal['met'] else 'NOT met'}")
    cold = result["cold_adapter"]
    print(f"cold adapter: upload {cold['upload_s'] * 1000:.0f} ms, first token {cold['first_token_after_upload_s'] * 1000:.0f} ms "
          f"after it, {cold['upload_to_first_token_s'] * 1000:.0f} ms in all")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    values = [result["tokens_per_s"][name] for name in LABELS]
    ax.bar([label.replace(", ", ",\n") for label in LABELS.values()], values,
           color=["#4c72b0", "#dd8452", "#c4ad66", "#55a868"])
    ax.axhline(values[0] * (1 - GOAL_MAX_LOSS), color="grey", linestyle="--", label="goal: 0.90x engine")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"HTTP overhead: {result['vs_engine']['http']:.3f}x the engine")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds instead of minutes")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    out = RESULTS_DIR / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log("building the model and adapters")
        base_dir, store = build(Path(tmp), shape)
        cold_dir = make_adapter(base_dir, Path(tmp) / "cold", seed=999, r=16, lora_alpha=16,
                                noise_std=adapter_noise_for(shape["hidden"]))
        work = workload(shape)
        engine = LLMEngine(load_base_model(base_dir, torch.float32, torch.device("cpu")), load_tokenizer(base_dir),
                           settings(base_dir, store))
        engine.wait_for_cpu_kernel()  # the direct engine uses the fused CPU op from the first step, as the server will
        for i in range(shape["adapters"]):
            engine.load_adapter(f"a{i:02d}", store / f"a{i:02d}")
        rounds: dict[str, list[tuple[float, int]]] = {name: [] for name in LABELS}
        server_settings = {"kv_cache_memory": 2 * 1024**3, "max_loras": 32, "max_lora_rank": 32, "max_num_seqs": 64,
                           "max_batch_tokens": 4096, "dtype": "float32", "device": "cpu", "log_format": "text"}
        console_polls = 0
        with ServerProcess(base_dir, store, server_settings) as server:
            log("warming up every path")
            asyncio.run(create_console_experiment(server.url))
            *_, engine_texts = engine_round(engine, work)
            asyncio.run(raw_round(server.url, work))
            asyncio.run(httpx_round(server.url, work))
            asyncio.run(console_round(server.url, work))
            texts_equal = True
            for r in range(shape["repeats"]):  # interleaved: noise hits all alike
                rounds["engine"].append(engine_round(engine, work)[:2])
                seconds, tokens, http_texts = asyncio.run(raw_round(server.url, work))
                rounds["http"].append((seconds, tokens))
                rounds["httpx"].append(asyncio.run(httpx_round(server.url, work)))
                seconds, tokens, console_texts, polls = asyncio.run(console_round(server.url, work))
                rounds["console"].append((seconds, tokens))
                console_polls += polls
                texts_equal = texts_equal and http_texts == engine_texts and console_texts == engine_texts
                log(f"round {r + 1}/{shape['repeats']}: " + ", ".join(
                    f"{name} {runs[-1][0]:.2f}s" for name, runs in rounds.items()))
            cold = asyncio.run(upload_to_first_token(server.url, cold_dir))
    result = report(rounds, cold, shape, outputs_match=texts_equal, console_polls=console_polls)
    print_report(result)
    (out / "http_bench.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "http_bench.png")
    log(f"wrote {out / 'http_bench.json'} and {out / 'http_bench.png'}")


if __name__ == "__main__":
    main()
