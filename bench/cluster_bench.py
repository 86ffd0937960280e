"""Scale-out on Ray Serve (docs/scale-out.md), in one run:

1. The cost of Ray: the same streaming workload (a random Llama, 8 adapters, concurrent greedy requests)
   against `loraserve serve` alone and against `loraserve cluster` with 1 replica, rounds interleaved;
   tokens/s of the cluster over the single server (goal >= 0.9), and the CPU seconds each process took
   in the best round of each; once with the engines on both cores (the cluster's front and Ray's processes
   share them with the engine), once on one (they get the other, as beside a GPU).
2. Affinity on a real cluster: 2 replicas of 4, 8 and 20 slots, 40 adapters under Zipf traffic, 8 requests
   at once; adapter loads into device slots (cold starts, the engines' own counters) per 1,000 requests
   with the affinity router and with random routing (goal: affinity <= 1/3 of random), and the spread of
   requests over the replicas; beside them, the simulator's figures for the same configuration.
3. The same routing code simulated at 64 replicas x 32 slots x 5,000 adapters (server/cluster/simulate.py):
   cold starts per 1,000 requests and max/mean work of the replicas (goal <= 1.25) at three utilisations.

    python -m bench.cluster_bench                    # about 20 minutes on 2 cores
    python -m bench.cluster_bench --only throughput  # one part (throughput, affinity, simulation)
    python -m bench.cluster_bench --quick            # smaller everything, a smoke test
Runs of one part or --quick write under bench/results/partial/ or bench/results/quick/.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from bench.http_bench import build, log, raw_round, workload
from bench.model_shapes import FULL_MODEL
from server.cluster.launch import SERVE_ENV, init_ray
from server.cluster.simulate import POLICIES, Scenario, run, zipf_weights
from server.config import Settings
from tests.factories import adapter_noise_for, make_adapter
from tests.server_harness import ServerProcess, free_port

RESULTS_DIR = Path(__file__).parent / "results"
GOALS = {"ray_over_serve": 0.9, "affinity_over_random_cold": 1 / 3, "max_over_mean_work": 1.25}
FULL = dict(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=4, adapters=8, requests=32, max_tokens=32,
            repeats=5, throughput_models=("small", "63M"), zipf_adapters=40, zipf_warmup=300, zipf_requests=600,
            slots=(4, 8, 20), sim_requests=100_000)
QUICK = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, adapters=4, requests=8, max_tokens=8,
             repeats=1, throughput_models=("small",), zipf_adapters=12, zipf_warmup=20, zipf_requests=80, slots=(2,),
             sim_requests=10_000)
ZIPF_S = 1.1
ZIPF_CONCURRENCY = 8
ZIPF_MAX_TOKENS = 4
UTILISATIONS = (0.5, 0.7, 0.9)
# The engine on both cores (the cluster's front and Ray's processes compete with it), then on one (they get the
# other, as on a GPU machine, where the model's work is on the accelerator and the hops on the host's cores).
THROUGHPUT_THREADS = (2, 1)
# Ray's hops cost per streamed event, so the smaller the model the larger their share: the benchmark's own
# small model, and the HTTP benchmark's 63M one (~3x the work per token).
THROUGHPUT_MODELS = {"small": {}, "63M": FULL_MODEL}
PARTS = ("throughput", "affinity", "simulation")


def _common(base_dir: Path, store: Path) -> dict:
    return dict(model=base_dir, adapters_dir=store, dtype="float32", device="cpu", kv_cache_memory=512 * 1024**2,
                max_loras=32, max_lora_rank=32, max_num_seqs=64, max_batch_tokens=4096, served_model_name="base",
                cpu_kernel=False, torch_threads=2, log_format="text")


@contextlib.contextmanager
def _cluster(settings: Settings, routing: str) -> Iterator[str]:
    """The application deployed on this process's Ray instance, its front serving from a thread here: the
    front's URL, until the block ends. An earlier application is deleted first: its replicas hold the CPUs the
    new ones need, so a rolling update would wait for them forever on 2 cores."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from server.cluster.deployment import APP_NAME
    from server.cluster.launch import start

    try:
        serve.delete(APP_NAME)
    except RayServeException:  # no Serve instance yet
        pass
    front = start(settings, routing)
    try:
        yield front.url
    finally:
        front.stop()


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and every process under it (the single server,
    the local Ray instance), summed by role."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, used, title = {}, {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            title[stat.parent.name] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # the process ended meanwhile
            continue
        parent[stat.parent.name], used[stat.parent.name] = fields[1], (int(fields[11]) + int(fields[12])) / tick
    mine, found = {str(os.getpid())}, True
    while found:
        found = {pid for pid, ppid in parent.items() if ppid in mine and pid not in mine}
        mine |= found
    roles: dict[str, float] = {}
    for pid in mine:
        roles[_role(title.get(pid, ""))] = roles.get(_role(title.get(pid, "")), 0.0) + used.get(pid, 0.0)
    return roles


def _role(cmdline: str) -> str:
    for marker, role in (("server.cli serve", "loraserve serve"), ("EngineReplica", "Ray: engine replica"),
                         ("server.cli cluster", "loraserve cluster (its HTTP front)"),
                         ("bench.cluster_bench", "benchmark client")):
        if marker in cmdline:
            return role
    return "Ray: other processes"


def _spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: round(after[role] - before.get(role, 0.0), 2) for role in after
            if after[role] - before.get(role, 0.0) >= 0.01}


def ray_against_serve(base_dir: Path, store: Path, shape: dict, torch_threads: int) -> dict:
    """The same streams through `loraserve serve` and through 1 replica on Ray, rounds interleaved; both
    engines with `torch_threads` threads (fewer than the cores leaves Ray's hops a core of their own)."""
    work = workload(shape)
    common = {**_common(base_dir, store), "torch_threads": torch_threads}
    env = {k: v for k, v in common.items() if k not in ("model", "adapters_dir", "served_model_name")}
    rounds: dict[str, list[float]] = {"serve": [], "cluster": []}
    tokens: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    cpu: dict[str, dict[str, float]] = {}  # the best round's CPU seconds by role
    import ray

    # `loraserve cluster` itself, joining this process's Ray instance: its front's CPU is its own process's.
    on_ray = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with (ServerProcess(base_dir, store, env) as single,
          ServerProcess(base_dir, store, {**env, "replicas": 1, "replica_cpus": 2}, on_ray, "cluster") as cluster):
        urls = {"serve": single.url, "cluster": cluster.url}
        for url in urls.values():  # warm-up: every adapter into its slot, every code path once
            asyncio.run(raw_round(url, work))
        for r in range(shape["repeats"]):
            for name, url in urls.items():
                before = _cpu_seconds()
                seconds, tokens[name], texts[name] = asyncio.run(raw_round(url, work))
                if seconds < min(rounds[name], default=float("inf")):
                    cpu[name] = _spent(before, _cpu_seconds())
                rounds[name].append(seconds)
            log(f"round {r + 1}/{shape['repeats']}: " + ", ".join(f"{n} {s[-1]:.2f}s" for n, s in rounds.items()))
    rates = {name: tokens[name] / min(seconds) for name, seconds in rounds.items()}
    return {"torch_threads": torch_threads, "tokens_per_s": rates, "ratio": rates["cluster"] / rates["serve"],
            "outputs_equal": texts["serve"] == texts["cluster"], "requests": shape["requests"],
            "max_tokens": shape["max_tokens"], "best_round_s": {n: min(r) for n, r in rounds.items()},
            "cpu_seconds_best_round": cpu, "ray_serve_env": SERVE_ENV}


def _replica_counters(url: str) -> dict[str, int]:
    """Each replica's slot loads: /v1/server/state answered by each (X-Replica) at least once."""
    seen: dict[str, int] = {}
    for _ in range(200):
        answer = httpx.get(url + "/v1/server/state", timeout=30)
        seen[answer.headers["x-replica"]] = answer.json()["counters"]["slot_loads"]
        if len(seen) == 2:
            return seen
    raise RuntimeError(f"only {len(seen)} replica(s) answered")


def zipf_on_the_cluster(base_dir: Path, store: Path, shape: dict, port: int) -> dict:
    rng = np.random.default_rng(7)
    names = [f"z{i:02d}" for i in range(shape["zipf_adapters"])]
    # The first `zipf_warmup` requests are not counted: each adapter's first load is a cost of starting, not
    # of routing (the simulator's 20,000 requests make it negligible; in 600 real ones it was half the loads).
    picks = [names[i] for i in rng.choice(len(names), size=shape["zipf_warmup"] + shape["zipf_requests"],
                                          p=zipf_weights(len(names), ZIPF_S))]
    runs = []
    for slots in shape["slots"]:
        row: dict = {"slots_per_replica": slots}
        for routing in ("affinity", "random"):
            settings = Settings(**{**_common(base_dir, store), "max_loras": slots, "torch_threads": 1},
                                replicas=2, replica_cpus=1, port=port)
            with _cluster(settings, routing) as url:
                row[routing] = _zipf_round(url, picks[:shape["zipf_warmup"]], picks[shape["zipf_warmup"]:])
            log(f"{slots} slots, {routing}: {row[routing]}")
        row["ratio"] = row["affinity"]["cold_starts_per_1000"] / row["random"]["cold_starts_per_1000"]
        row["simulated"] = _simulated_twin(slots, len(names))
        runs.append(row)
    return {"runs": runs, "adapters": len(names), "warmup_requests": shape["zipf_warmup"],
            "requests": shape["zipf_requests"], "zipf_s": ZIPF_S,
            "concurrency": ZIPF_CONCURRENCY}


def _simulated_twin(slots: int, adapters: int) -> dict:
    """The simulator on the real run's configuration: 2 replicas of `slots` slots and max_num_seqs 64,
    `adapters` under the same Zipf, about ZIPF_CONCURRENCY requests in flight, ZIPF_MAX_TOKENS tokens each."""
    scenario = Scenario(replicas=2, slots=slots, adapters=adapters, zipf_s=ZIPF_S, requests=20_000,
                        utilisation=ZIPF_CONCURRENCY / (2 * 64), max_num_seqs=64, tokens=ZIPF_MAX_TOKENS)
    cold = {policy: run(scenario, policy).cold_starts_per_1000 for policy in ("affinity", "random")}
    return {**cold, "ratio": cold["affinity"] / cold["random"]}


def _zipf_round(url: str, warmup: list[str], picks: list[str]) -> dict:
    """`warmup`, then `picks` counted: slot loads per 1,000 of them and how they spread over the replicas."""

    def one(model: str) -> str:
        answer = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": "zipf", "max_tokens": ZIPF_MAX_TOKENS, "temperature": 0, "ignore_eos": True})
        answer.raise_for_status()
        return answer.headers["x-replica"]

    with concurrent.futures.ThreadPoolExecutor(ZIPF_CONCURRENCY) as pool:
        list(pool.map(one, warmup))
        before = _replica_counters(url)
        started = time.perf_counter()
        replicas = list(pool.map(one, picks))
        seconds = time.perf_counter() - started
    after = _replica_counters(url)
    loads = sum(after[r] - before.get(r, 0) for r in after)
    counts = [replicas.count(r) for r in set(replicas)]
    return {"cold_starts_per_1000": 1000 * loads / len(picks),
            "max_over_mean_requests": max(counts) / (sum(counts) / 2), "seconds": seconds}


def simulation(shape: dict) -> dict:
    out = {}
    for utilisation in UTILISATIONS:
        scenario = Scenario(requests=shape["sim_requests"], utilisation=utilisation)
        for policy in POLICIES:
            outcome = run(scenario, policy)
            out.setdefault(policy, []).append({"utilisation": utilisation,
                                               "cold_starts_per_1000": outcome.cold_starts_per_1000,
                                               "max_over_mean_work": outcome.max_over_mean_work,
                                               "mean_latency_s": outcome.mean_latency_s})
            log(f"simulated {policy} at {utilisation:.0%}: {outcome}")
    scenario = Scenario(requests=shape["sim_requests"])
    return {"scenario": {k: getattr(scenario, k) for k in scenario.__dataclass_fields__ if k != "utilisation"},
            "policies": out}


def print_report(result: dict) -> None:
    for ray_part in result.get("ray_vs_serve", []):
        print(f"\n1 replica through Ray, {ray_part['model']} model, {ray_part['torch_threads']} torch thread(s) on "
              f"{os.cpu_count()} cores: "
              f"{ray_part['tokens_per_s']['cluster']:.0f} tok/s vs loraserve serve "
              f"{ray_part['tokens_per_s']['serve']:.0f} tok/s = {ray_part['ratio']:.2f}x "
              f"(goal >= {GOALS['ray_over_serve']}); outputs equal: {ray_part['outputs_equal']}")
        for name, roles in ray_part["cpu_seconds_best_round"].items():
            print(f"  CPU seconds in {name}'s best round ({ray_part['best_round_s'][name]:.2f} s): "
                  + ", ".join(f"{role} {seconds:.2f}" for role, seconds in sorted(roles.items())))
    if zipf := result.get("zipf"):
        print(f"2 replicas, {zipf['adapters']} adapters, Zipf {zipf['zipf_s']}, {zipf['concurrency']} requests at "
              f"once, {zipf['requests']} counted after {zipf['warmup_requests']}:")
        for row in zipf["runs"]:
            for routing in ("affinity", "random"):
                print(f"  {row['slots_per_replica']:2d} slots {routing:8s} cold starts/1000: "
                      f"{row[routing]['cold_starts_per_1000']:6.1f}   max/mean requests per replica: "
                      f"{row[routing]['max_over_mean_requests']:.2f}")
            twin = row["simulated"]
            print(f"  {row['slots_per_replica']:2d} slots affinity / random = {row['ratio']:.2f} "
                  f"(goal <= {GOALS['affinity_over_random_cold']:.2f}); simulated: {twin['affinity']:.0f} / "
                  f"{twin['random']:.0f} = {twin['ratio']:.2f}")
    if sim := result.get("simulation"):
        print("simulated 64 replicas x 32 slots x 5,000 adapters (cold starts/1000, max/mean work):")
        for policy, rows in sim["policies"].items():
            print(f"  {policy:12s} " + "  ".join(f"{r['utilisation']:.0%}: {r['cold_starts_per_1000']:5.0f}, "
                                               f"{r['max_over_mean_work']:.2f}" for r in rows))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zipf, sim = result["zipf"], result["simulation"]["policies"]
    throughput = result.get("ray_vs_serve", [])
    fig, axes = plt.subplots(1, 4 if throughput else 3, figsize=(20 if throughput else 15, 4))
    width = 0.2
    rows = zipf["runs"]
    bars = [("affinity", lambda row: row["affinity"]["cold_starts_per_1000"]),
            ("random", lambda row: row["random"]["cold_starts_per_1000"]),
            ("affinity, simulated", lambda row: row["simulated"]["affinity"]),
            ("random, simulated", lambda row: row["simulated"]["random"])]
    for i, (label, value) in enumerate(bars):
        axes[0].bar([j + i * width for j in range(len(rows))], [value(row) for row in rows], width, label=label,
                    hatch="//" if "simulated" in label else None)
    axes[0].set_xticks([j + 1.5 * width for j in range(len(rows))], [f"{row['slots_per_replica']} slots" for row in rows])
    axes[0].set_title(f"2 replicas, {zipf['adapters']} adapters (Zipf): cold starts / 1000")
    axes[0].legend(fontsize=8)
    for policy, points in sim.items():
        x = [r["utilisation"] for r in points]
        axes[1].plot(x, [r["cold_starts_per_1000"] for r in points], marker="o", label=policy)
        axes[2].plot(x, [r["max_over_mean_work"] for r in points], marker="o", label=policy)
    axes[1].set_title("simulated 64 x 32 slots x 5,000 adapters: cold starts / 1000")
    axes[2].set_title("simulated: max / mean work of the replicas")
    axes[2].axhline(GOALS["max_over_mean_work"], color="red", linestyle="--", label="goal")
    for ax in axes[1:3]:
        ax.set_xlabel("utilisation")
        ax.legend()
    if throughput:
        labels = [f"{row['model']}\n{row['torch_threads']} thread(s)" for row in throughput]
        axes[3].bar(labels, [row["ratio"] for row in throughput])
        axes[3].axhline(GOALS["ray_over_serve"], color="red", linestyle="--", label="goal")
        axes[3].set_title("1 replica through Ray: tokens/s over loraserve serve")
        axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _on_ray(shape: dict, parts: set[str]) -> dict:
    """The parts that need a local Ray instance (1 and 2)."""
    from ray import serve

    init_ray(num_cpus=2, object_store_memory=128 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    port = free_port()
    result = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log("building the model and adapters")
            base_dir, store = build(Path(tmp), shape)
            if "throughput" in parts:
                log("1. one replica through Ray against loraserve serve")
                result["ray_vs_serve"] = []
                for model in shape["throughput_models"]:
                    sized = {**shape, **THROUGHPUT_MODELS[model]}
                    built = build(Path(tmp) / model, sized) if THROUGHPUT_MODELS[model] else (base_dir, store)
                    result["ray_vs_serve"] += [{"model": model, **ray_against_serve(*built, sized, threads)}
                                               for threads in THROUGHPUT_THREADS]
            if "affinity" in parts:
                zipf_store = Path(tmp) / "zipf"
                for i in range(shape["zipf_adapters"]):
                    make_adapter(base_dir, zipf_store / f"z{i:02d}", seed=100 + i, r=8, lora_alpha=16,
                                 noise_std=adapter_noise_for(shape["hidden"]),
                                 target_modules=["q_proj", "v_proj"])
                log("2. two replicas, Zipf traffic, affinity against random routing")
                result["zipf"] = zipf_on_the_cluster(base_dir, zipf_store, shape, port)
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller everything: a smoke test")
    parser.add_argument("--only", choices=PARTS, action="append", help="run this part (repeatable); default: all")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    parts = set(args.only or PARTS)
    out = RESULTS_DIR / ("quick" if args.quick else "partial" if parts != set(PARTS) else "")
    out.mkdir(parents=True, exist_ok=True)
    with open("/proc/loadavg") as loadavg:
        load_before = float(loadavg.read().split()[0])
    result = _on_ray(shape, parts) if parts & {"throughput", "affinity"} else {}
    if "simulation" in parts:
        log("3. the simulation")
        result["simulation"] = simulation(shape)
    with open("/proc/loadavg") as loadavg:
        result["machine"] = {"cpus": os.cpu_count(), "load_average_1min": {"before": load_before,
                                                                            "after": float(loadavg.read().split()[0])}}
    result["goals"] = GOALS
    print_report(result)
    (out / "cluster_bench.json").write_text(json.dumps(result, indent=2))
    if {"affinity", "simulation"} <= parts:
        plot(result, out / "cluster_bench.png")
    log(f"wrote {out / 'cluster_bench.json'}")


if __name__ == "__main__":
    main()
