"""Merged copies under three traffic shapes, merging on against merging off, in one run.

A random Llama (the engine benchmark's shape) and 32 PEFT adapters of mixed rank. Shapes:
  hot90    one adapter gets 90% of requests, the rest spread over the 31 others
  uniform  requests spread evenly over all 32
  shift    the hot adapter (90%) changes midway: does the merged set follow?
Engines with merging off (--merged-budget 0) and on (2 GB) run the same workloads, interleaved,
after warm-up rounds that let the policy see the traffic. The bare base (on the merging-off engine)
is the reference, measured in every round beside the others and kept at its best.

    python -m bench.merge_bench            # about 5 minutes on 2 cores
    python -m bench.merge_bench --quick    # tiny model, smoke test
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.model_loader import load_base_model, load_tokenizer
from server.engine.sequence import SamplingParams
from bench.model_shapes import FULL_MODEL, QUICK_MODEL, base_config
from tests.factories import adapter_noise_for, build_model, make_adapter, save_model

RESULTS_DIR = Path(__file__).parent / "results"
NUM_ADAPTERS = 32
# half_life: the policy's memory in tokens, about two rounds of the workload
FULL = dict(**FULL_MODEL, requests=64, max_tokens=32, repeats=3, half_life=4096)
QUICK = dict(**QUICK_MODEL, requests=32, max_tokens=8, repeats=2, half_life=512)
WARM_UP_ROUNDS = 3  # the policy needs to see a shape's traffic before its steady state is measured
GOAL_HOT_VS_BASE = 0.95


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(root: Path, shape: dict) -> Path:
    config = base_config(shape)
    base_dir = save_model(build_model(config, std=0.02), root / "base")
    for i in range(NUM_ADAPTERS):
        if i % 8 == 0:
            log(f"adapters {i + 1}-{min(i + 8, NUM_ADAPTERS)}/{NUM_ADAPTERS}")
        make_adapter(base_dir, root / f"a{i:02d}", seed=i, r=(8, 16, 32)[i % 3], lora_alpha=16,
                     noise_std=adapter_noise_for(shape["hidden"]),
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return base_dir


def engine(base_dir: Path, merged_budget: int, half_life: int) -> LLMEngine:
    settings = Settings(model=base_dir, dtype="float32", device="cpu", kv_cache_memory=2 * 1024**3, max_loras=32,
                        max_lora_rank=32, max_num_seqs=64, max_batch_tokens=4096, merged_budget=merged_budget,
                        merge_half_life_tokens=half_life)
    llm = LLMEngine(load_base_model(base_dir, torch.float32, torch.device("cpu")), load_tokenizer(base_dir), settings)
    llm.wait_for_cpu_kernel()  # timed runs use the fused CPU op from the first step
    for i in range(NUM_ADAPTERS):
        llm.load_adapter(f"a{i:02d}", base_dir.parent / f"a{i:02d}")
    return llm


def adapters_for(shape_name: str, requests: int, hot: str, rng: random.Random) -> list[str | None]:
    names = [f"a{i:02d}" for i in range(NUM_ADAPTERS)]
    if shape_name == "base":
        return [None] * requests
    if shape_name == "uniform":
        return [names[i % NUM_ADAPTERS] for i in range(requests)]
    others = [n for n in names if n != hot]
    return [hot if rng.random() < 0.9 else rng.choice(others) for _ in range(requests)]


def run(llm: LLMEngine, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> float:
    """Output tokens/s of one round; merged copies queued during it are installed before returning."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    results = llm.generate(prompts, params, adapters)
    elapsed = time.perf_counter() - started
    llm.merges.wait_for_builds()
    return sum(len(r.token_ids) for r in results) / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    out = RESULTS_DIR / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(16, 32))] for _ in range(shape["requests"])]
    with tempfile.TemporaryDirectory() as tmp:
        log("building the model and 32 adapters")
        base_dir = build(Path(tmp), shape)
        engines = {"off": engine(base_dir, 0, shape["half_life"]), "on": engine(base_dir, 2 * 1024**3, shape["half_life"])}
        base = adapters_for("base", shape["requests"], "a00", random.Random(1))
        rounds: dict[str, list[float]] = {}  # "shape/engine" -> tok/s of each timed round
        for name in ("hot90", "uniform"):
            adapters = adapters_for(name, shape["requests"], "a00", random.Random(1))
            for _ in range(WARM_UP_ROUNDS):
                for llm in engines.values():
                    run(llm, prompts, adapters, shape["max_tokens"])
            for r in range(shape["repeats"]):  # the bare base in every round too: noise hits all alike
                for key, llm, work in ((f"{name}/base", engines["off"], base), (f"{name}/off", engines["off"], adapters),
                                       (f"{name}/on", engines["on"], adapters)):
                    rounds.setdefault(key, []).append(run(llm, prompts, work, shape["max_tokens"]))
            log(f"{name}: " + ", ".join(f"{key} {max(rounds[key]):.1f}" for key in rounds if key.startswith(name))
                + f" tok/s, merged now: {sorted(engines['on'].merges.merged)}")
        shift = shift_trace(engines["on"], prompts, shape)
    report = summarize(rounds, shift, shape)
    print_report(report)
    (out / "merge_bench.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "merge_bench.png")
    log(f"wrote {out / 'merge_bench.json'} and {out / 'merge_bench.png'}")


def shift_trace(llm: LLMEngine, prompts: list[list[int]], shape: dict) -> list[dict]:
    """Hot adapter a05 for four rounds, then a09 for six: the merged set after each round."""
    trace = []
    for round_index, hot in enumerate(["a05"] * 4 + ["a09"] * 6):
        adapters = adapters_for("hot90", len(prompts), hot, random.Random(round_index))
        rate = run(llm, prompts, adapters, shape["max_tokens"])
        trace.append({"round": round_index, "hot": hot, "tokens_per_s": rate, "merged": sorted(llm.merges.merged)})
        log(f"shift round {round_index}: hot {hot}, merged {trace[-1]['merged']}")
    return trace


def summarize(rounds: dict[str, list[float]], shift: list[dict], shape: dict) -> dict:
    """Each shape against the bare base timed in the same rounds (best vs best, and round by round)."""
    best = {key: max(values) for key, values in rounds.items()}
    rows = {key: {"tokens_per_s": value, "rounds": rounds[key],
                  "vs_bare_base": value / best[key.split("/")[0] + "/base"]} for key, value in best.items()}
    hot_ratio = rows["hot90/on"]["vs_bare_base"]
    return {
        "command": "python -m bench.merge_bench" + (" --quick" if shape is QUICK else ""),
        "shape": shape,
        "results": rows,
        "shift_trace": shift,
        "goals": {
            "hot90 with merging >= 0.95x bare base": {
                "ratio": hot_ratio, "met": hot_ratio >= GOAL_HOT_VS_BASE,
                "per_round": [on / bare for on, bare in zip(rounds["hot90/on"], rounds["hot90/base"])]},
            "hot90: merging on beats off": {"ratio": best["hot90/on"] / best["hot90/off"],
                                            "met": best["hot90/on"] > best["hot90/off"]},
            "uniform: merging on no slower than off": {"ratio": best["uniform/on"] / best["uniform/off"],
                                                       "met": best["uniform/on"] >= 0.97 * best["uniform/off"]},
            "shift: merged set follows the hot adapter": {"met": shift[-1]["merged"] == ["a09"]},
        },
    }


def print_report(report: dict) -> None:
    print(f"\n{'workload / engine':<22}{'tokens/s':>10}{'vs base':>9}   (base: the bare base in the same rounds)")
    for key, row in report["results"].items():
        print(f"{key:<22}{row['tokens_per_s']:>10.1f}{row['vs_bare_base']:>9.3f}")
    print("\nshift trace (hot adapter -> merged copies):")
    for step in report["shift_trace"]:
        print(f"  round {step['round']}: hot {step['hot']}  merged {step['merged']}  {step['tokens_per_s']:.1f} tok/s")
    print()
    for goal, value in report["goals"].items():
        ratio = f" ({value['ratio']:.3f})" if "ratio" in value else ""
        if "per_round" in value:
            ratio += " [rounds: " + " ".join(f"{r:.3f}" for r in value["per_round"]) + "]"
        print(f"goal: {goal}{ratio}: {'met' if value['met'] else 'NOT met'}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    keys = list(report["results"])
    left.bar(keys, [report["results"][k]["vs_bare_base"] for k in keys],
             color=[{"base": "#999999", "off": "#4c72b0", "on": "#dd8452"}[k.split("/")[1]] for k in keys])
    left.axhline(GOAL_HOT_VS_BASE, color="grey", linestyle="--", label="goal for hot90 (0.95)")
    left.set_ylabel("throughput vs bare base")
    left.tick_params(axis="x", rotation=30)
    left.legend(loc="lower left")
    trace = report["shift_trace"]
    right.plot([t["round"] for t in trace], [t["tokens_per_s"] for t in trace], marker="o")
    for t in trace:
        right.annotate(",".join(t["merged"]) or "-", (t["round"], t["tokens_per_s"]), fontsize=7,
                       textcoords="offset points", xytext=(0, 6), ha="center")
    right.axvline(3.5, color="grey", linestyle=":")
    right.set_xlabel("round (hot adapter a05, then a09)")
    right.set_ylabel("tokens/s (merging on)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
