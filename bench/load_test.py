"""A bounded load test on loopback: several tenants at once, mixed uploads and streaming inference,
some clients disconnecting mid-stream, for a fixed time; then requests served, errors (anything but the
expected 429s), latency percentiles per kind, and the server's resident memory before and after.

    python -m bench.load_test                      # 4 tenants x 4 clients, 60 s, tiny random model
    python -m bench.load_test --duration 20 --tenants 3 --clients 3
    python -m bench.load_test --model demo/base    # on another base (adapters are built for it)

Exit status 1 if any unexpected error happened or the resident memory after the run (once idle) is more
than --max-rss-growth above its level after warm-up. Writes bench/results/load_test.json.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.factories import build_model, llama_config, make_adapter, save_model
from tests.server_harness import ServerProcess

RESULTS = Path(__file__).parent / "results" / "load_test.json"
ADMIN_KEY = "load-test-admin-" + os.urandom(8).hex()
FILES = ("adapter_config.json", "adapter_model.safetensors")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    disconnects: int = 0

    def record(self, kind: str, status: int, seconds: float) -> None:
        counts = self.statuses.setdefault(kind, {})
        counts[status] = counts.get(status, 0) + 1
        if status < 300:
            self.latencies.setdefault(kind, []).append(seconds)
        elif status != 429:
            self.errors.append(f"{kind}: HTTP {status}")


def build(root: Path, model: Path | None, adapters: int) -> tuple[Path, list[Path]]:
    base = model or save_model(build_model(llama_config(hidden_size=128, intermediate_size=256,
                                                         max_position_embeddings=512)), root / "base")
    dirs = [make_adapter(base, root / "src" / f"a{i}", seed=i, r=(4, 8, 16)[i % 3], lora_alpha=16,
                         target_modules=["q_proj", "v_proj"]) for i in range(adapters)]
    return base, dirs


def start_server(base: Path, store: Path, args: argparse.Namespace) -> ServerProcess:
    settings = {"admin_key": ADMIN_KEY, "tenant_requests_per_minute": args.rpm, "dtype": "float32", "device": "cpu",
                "kv_cache_memory": 256 * 1024**2, "log_format": "text", "tenant_max_concurrent": args.clients + 2}
    return ServerProcess(base, store, settings, extra_env={"OMP_NUM_THREADS": "1"})


def _files(directory: Path) -> dict:
    return {f: (f, (directory / f).read_bytes()) for f in FILES}


async def _stream(client: httpx.AsyncClient, model: str, stats: Stats, rng: random.Random, max_tokens: int) -> None:
    disconnect = rng.random() < 0.15
    body = {"model": model, "prompt": "load " * rng.randint(2, 12), "max_tokens": max_tokens, "temperature": 0.7,
            "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            stats.record("stream", response.status_code, time.perf_counter() - started)
            if response.status_code == 429:
                await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), 2.0))
            return
        async for line in response.aiter_lines():
            if disconnect and line.startswith("data: {"):
                stats.disconnects += 1
                stats.record("stream_disconnected", 200, time.perf_counter() - started)
                return  # leaving the block closes the connection mid-stream
    stats.record("stream", 200, time.perf_counter() - started)


async def _upload(client: httpx.AsyncClient, name: str, source: Path, stats: Stats) -> None:
    started = time.perf_counter()
    response = await client.post("/v1/adapters", data={"name": name}, files=_files(source))
    stats.record("upload", response.status_code, time.perf_counter() - started)


async def client_loop(url: str, key: str, tenant: str, sources: list[Path], until: float, stats: Stats,
                      seed: int, max_tokens: int) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        while time.monotonic() < until:
            try:
                if rng.random() < 0.1:
                    await _upload(client, f"{tenant}-bot", rng.choice(sources), stats)
                else:
                    await _stream(client, rng.choice([f"{tenant}-bot", "base"]), stats, rng, max_tokens)
            except httpx.HTTPError as exc:
                stats.errors.append(f"transport: {type(exc).__name__}: {exc}")


async def setup_tenants(url: str, tenants: int, sources: list[Path]) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = {}
    async with httpx.AsyncClient(base_url=url, headers=admin, timeout=120) as client:
        for i in range(tenants):
            tenant = f"tenant{i}"
            (await client.post("/v1/admin/tenants", json={"name": tenant})).raise_for_status()
            created = await client.post("/v1/admin/keys", json={"role": "tenant", "tenant": tenant})
            created.raise_for_status()
            keys[tenant] = created.json()["key"]
            upload = await client.post("/v1/adapters", data={"name": f"{tenant}-bot"}, files=_files(sources[i % len(sources)]),
                                       headers={"Authorization": f"Bearer {keys[tenant]}"})
            upload.raise_for_status()
    return keys


async def warm_up(url: str, keys: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for tenant, key in keys.items():
            body = {"model": f"{tenant}-bot", "prompt": "warm", "max_tokens": 4}
            (await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})).raise_for_status()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"count": len(values), "p50_ms": round(pick(0.5) * 1000, 1), "p90_ms": round(pick(0.9) * 1000, 1),
            "p99_ms": round(pick(0.99) * 1000, 1), "mean_ms": round(statistics.fmean(values) * 1000, 1)}


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log("building the base and adapters")
        base, sources = build(root, args.model, adapters=3)
        store = root / "store"
        store.mkdir()
        with start_server(base, store, args) as server:
            keys = await setup_tenants(server.url, args.tenants, sources)
            await warm_up(server.url, keys)
            rss_before = server.rss_bytes()
            log(f"{args.tenants} tenants x {args.clients} clients for {args.duration:.0f} s; RSS {rss_before / 2**20:.0f} MiB")
            stats = Stats()
            until = time.monotonic() + args.duration
            started = time.perf_counter()
            await asyncio.gather(*(client_loop(server.url, key, tenant, sources, until, stats, seed=t * 100 + c,
                                               max_tokens=args.max_tokens)
                                   for t, (tenant, key) in enumerate(keys.items()) for c in range(args.clients)))
            elapsed = time.perf_counter() - started
            await asyncio.sleep(args.settle)  # disconnected streams and uploads finish; caches settle
            rss_after = server.rss_bytes()
    served = sum(n for counts in stats.statuses.values() for status, n in counts.items() if status < 300)
    limited = sum(counts.get(429, 0) for counts in stats.statuses.values())
    growth = rss_after / rss_before - 1
    report = {
        "tenants": args.tenants, "clients_per_tenant": args.clients, "duration_s": round(elapsed, 1),
        "served": served, "rate_limited_429": limited, "disconnects": stats.disconnects,
        "unexpected_errors": len(stats.errors), "error_samples": stats.errors[:10],
        "statuses": {k: {str(s): n for s, n in v.items()} for k, v in stats.statuses.items()},
        "latency": {kind: percentiles(values) for kind, values in stats.latencies.items()},
        "rss_before_mib": round(rss_before / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_growth": round(growth, 3),
    }
    print(json.dumps(report, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    ok = not stats.errors and growth <= args.max_rss_growth
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients per tenant")
    parser.add_argument("--max-tokens", type=int, default=16, dest="max_tokens")
    parser.add_argument("--rpm", type=int, default=240, help="requests per minute per tenant (some 429s expected)")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before the last RSS reading")
    parser.add_argument("--max-rss-growth", type=float, default=0.25, dest="max_rss_growth")
    parser.add_argument("--model", type=Path, help="base model directory (default: a tiny random Llama)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
