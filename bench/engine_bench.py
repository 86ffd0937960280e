"""Engine throughput with many adapters, against PEFT, against the roofline (see docs/bench-engine.md).

One process, one workload (same prompts, same output lengths, greedy, EOS ignored), every
configuration measured side by side on a random Llama and 32 random PEFT adapters of mixed rank:
the engine on the bare base and with requests spread over 1, 8 and 32 adapters, PEFT one request at
a time (set_adapter + generate), and PEFT's mixed-adapter batch (generate(adapter_names=...)).

    python -m bench.engine_bench            # the full run (minutes)
    python -m bench.engine_bench --quick    # tiny model, smoke test (< 1 minute)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import json
import platform
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from bench.roofline import ADAPTED_MODULES, ModelShape, peak_matmul_flops, request_flops
from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.model_loader import load_base_model, load_tokenizer
from server.engine.sequence import SamplingParams
from tests.factories import SPECIAL_TOKENS, VOCAB, byte_tokenizer

RESULTS_DIR = Path(__file__).parent / "results"
NUM_ADAPTERS = 32
RANKS = (8, 16, 32)  # adapter i has rank RANKS[i % 3]
ENGINE_SPREADS = (0, 1, 8, NUM_ADAPTERS)  # distinct adapters per engine configuration (0: bare base)
GOAL_VS_BASE = 0.85  # 32 adapters vs the bare base, same engine
GOAL_VS_PEFT = 1.5  # 32 adapters vs PEFT's best mixed batch

FULL = dict(hidden=768, intermediate=2048, layers=10, heads=12, kv_heads=4, requests=64, max_tokens=32,
            repeats=3, serial_requests=8, batch_sizes="8,16,32,64", matmul_size=2048)
QUICK = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, requests=32, max_tokens=8,
             repeats=2, serial_requests=4, batch_sizes="8,32", matmul_size=512)


@dataclass(frozen=True)
class Options:
    quick: bool
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    requests: int
    prompt_min: int
    prompt_max: int
    max_tokens: int
    repeats: int
    serial_requests: int
    batch_sizes: tuple[int, ...]
    matmul_size: int
    seed: int
    out: Path


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    rank: int


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    adapters: list[str | None]  # per request
    max_tokens: int

    @property
    def distinct_adapters(self) -> int:
        return len({name for name in self.adapters if name is not None})


@dataclass
class Result:
    """One configuration: its workload and the wall time of every timed repetition."""

    label: str
    kind: str  # "engine", "peft-mixed" or "peft-serial"
    workload: Workload
    seconds: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)  # token ids of the last repetition

    @property
    def output_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / min(self.seconds)

    @property
    def spread(self) -> float:
        """(slowest − fastest) / fastest over the repetitions: how noisy this number is."""
        return (max(self.seconds) - min(self.seconds)) / min(self.seconds)


class Clock:
    """Progress lines stamped with the time since start."""

    def __init__(self):
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


# ---- options ------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke test")
    parser.add_argument("--hidden", type=int, help=f"hidden size (default {FULL['hidden']})")
    parser.add_argument("--intermediate", type=int, help=f"MLP size (default {FULL['intermediate']})")
    parser.add_argument("--layers", type=int, help=f"decoder layers (default {FULL['layers']})")
    parser.add_argument("--heads", type=int, help=f"attention heads (default {FULL['heads']})")
    parser.add_argument("--kv-heads", type=int, help=f"key/value heads (default {FULL['kv_heads']})")
    parser.add_argument("--requests", type=int, help=f"concurrent requests (default {FULL['requests']})")
    parser.add_argument("--prompt-min", type=int, default=16, help="shortest prompt in tokens")
    parser.add_argument("--prompt-max", type=int, default=32, help="longest prompt in tokens")
    parser.add_argument("--max-tokens", type=int, help=f"tokens generated per request (default {FULL['max_tokens']})")
    parser.add_argument("--repeats", type=int, help=f"timed rounds, best kept (default {FULL['repeats']})")
    parser.add_argument("--serial-requests", type=int,
                        help=f"requests timed for PEFT one-at-a-time (default {FULL['serial_requests']})")
    parser.add_argument("--batch-sizes", help=f"PEFT mixed batch sizes (default {FULL['batch_sizes']})")
    parser.add_argument("--matmul-size", type=int, help=f"matmul size for the peak (default {FULL['matmul_size']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    values = {key: preset[key] if getattr(args, key) is None else getattr(args, key) for key in preset}
    values["batch_sizes"] = tuple(int(size) for size in str(values["batch_sizes"]).split(","))
    options = Options(quick=args.quick, **values, prompt_min=args.prompt_min, prompt_max=args.prompt_max, seed=args.seed,
                      out=args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR))
    problems = option_problems(options)
    if problems:
        parser.error("; ".join(problems))
    return options


def option_problems(o: Options) -> list[str]:
    problems = []
    if o.requests < NUM_ADAPTERS:
        problems.append(f"--requests must be >= {NUM_ADAPTERS} so every adapter gets requests")
    if not 1 <= o.prompt_min <= o.prompt_max:
        problems.append("need 1 <= --prompt-min <= --prompt-max")
    if not 1 <= o.serial_requests <= o.requests:
        problems.append("need 1 <= --serial-requests <= --requests")
    if o.repeats < 1 or o.max_tokens < 1 or min(o.batch_sizes) < 1:
        problems.append("--repeats, --max-tokens and --batch-sizes must be >= 1")
    return problems


# ---- model, adapters, workloads -----------------------------------------------------------------


def llama_config(o: Options) -> LlamaConfig:
    # eos_token_id=None: PEFT's generate then never stops early, like the engine's ignore_eos=True.
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=o.hidden, intermediate_size=o.intermediate, num_hidden_layers=o.layers,
        num_attention_heads=o.heads, num_key_value_heads=o.kv_heads,
        max_position_embeddings=max(512, o.prompt_max + o.max_tokens),
        bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
    )


def build_base(o: Options, directory: Path) -> PreTrainedModel:
    """A random Llama saved (safetensors + byte tokenizer) where the engine and PEFT both load it."""
    torch.manual_seed(o.seed)
    model = AutoModelForCausalLM.from_config(llama_config(o), dtype=torch.float32).eval()
    model.save_pretrained(directory, safe_serialization=True)
    byte_tokenizer().save_pretrained(directory)
    return model


def make_adapters(base: PreTrainedModel, root: Path, seed: int, clock: Clock) -> dict[str, Adapter]:
    """NUM_ADAPTERS PEFT LoRA adapters of mixed rank on the attention projections, saved with PEFT."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for i in range(NUM_ADAPTERS):
        name, rank = f"a{i:02d}", RANKS[i % len(RANKS)]
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ADAPTED_MODULES), lora_dropout=0.0)
        peft_model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:  # PEFT starts B at zero: every adapter would equal the base
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        peft_model.save_pretrained(root / name)
        adapters[name] = Adapter(name, root / name, rank)
    clock.log(f"made {NUM_ADAPTERS} adapters (ranks {'/'.join(map(str, RANKS))}, {', '.join(ADAPTED_MODULES)})")
    return adapters


def make_prompts(o: Options) -> list[list[int]]:
    rng = random.Random(o.seed)
    return [[rng.randrange(len(SPECIAL_TOKENS), VOCAB) for _ in range(rng.randint(o.prompt_min, o.prompt_max))]
            for _ in range(o.requests)]


def spread_over(prompts: list[list[int]], names: list[str], max_tokens: int) -> Workload:
    """Request i uses adapter names[i % len(names)]; no names: the bare base."""
    adapters = [names[i % len(names)] if names else None for i in range(len(prompts))]
    return Workload(prompts, adapters, max_tokens)


def shortened(workload: Workload, max_tokens: int) -> Workload:
    return Workload(workload.prompts, workload.adapters, max_tokens)


# ---- the systems under test ---------------------------------------------------------------------


def make_engine(model_dir: Path, o: Options, adapters: dict[str, Adapter]) -> LLMEngine:
    bytes_per_token = 2 * o.layers * o.kv_heads * (o.hidden // o.heads) * 4
    kv_bytes = 2 * o.requests * (o.prompt_max + o.max_tokens) * bytes_per_token  # 2x: never preempts
    settings = Settings(
        model=model_dir, dtype="float32", device="cpu", kv_cache_memory=kv_bytes, max_loras=NUM_ADAPTERS,
        max_lora_rank=max(RANKS), max_num_seqs=o.requests, max_batch_tokens=4096,
    )
    model = load_base_model(model_dir, torch.float32, torch.device("cpu"))
    engine = LLMEngine(model, load_tokenizer(model_dir), settings)
    for adapter in adapters.values():
        engine.load_adapter(adapter.name, adapter.path)
    return engine


def load_peft(model_dir: Path, adapters: dict[str, Adapter]) -> PeftModel:
    """A separate base (the engine wraps its own model's layers) with every adapter loaded."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    first, *rest = adapters.values()
    model = PeftModel.from_pretrained(base, first.path, adapter_name=first.name)
    for adapter in rest:
        model.load_adapter(adapter.path, adapter_name=adapter.name)
    return model.eval()


def engine_generate(engine: LLMEngine, workload: Workload) -> list[list[int]]:
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(workload.prompts, params, adapters=workload.adapters)]


@torch.inference_mode()
def peft_serial(model: PeftModel, workload: Workload) -> list[list[int]]:
    """PEFT's single-adapter path: switch the active adapter, generate one request."""
    outputs = []
    for prompt, adapter in zip(workload.prompts, workload.adapters):
        model.set_adapter(adapter, inference_mode=True)
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=workload.max_tokens, do_sample=False)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


@torch.inference_mode()
def peft_mixed(model: PeftModel, workload: Workload, batch_size: int) -> list[list[int]]:
    """PEFT's mixed-adapter batch: fixed batches of `batch_size`, left-padded, one adapter name per row."""
    outputs = []
    for start in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[start:start + batch_size]
        ids, mask = left_pad(prompts)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=workload.max_tokens,
                             do_sample=False, adapter_names=workload.adapters[start:start + batch_size])
        outputs += out[:, ids.shape[1]:].tolist()
    return outputs


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ---- running ------------------------------------------------------------------------------------


@dataclass
class Case:
    """A configuration to time: its result record and how to run a workload on it."""

    result: Result
    run: Callable[[Workload], list[list[int]]]

    def measure(self, clock: Clock, tag: str) -> None:
        start = time.perf_counter()
        outputs = self.run(self.result.workload)
        seconds = time.perf_counter() - start
        self.result.seconds.append(seconds)
        self.result.outputs = outputs
        tokens = sum(len(t) for t in outputs)
        clock.log(f"{tag} {self.result.label:<28} {tokens:5d} tokens in {seconds:6.2f}s = {tokens / seconds:7.1f} tok/s")


def engine_cases(engine: LLMEngine, prompts: list[list[int]], names: list[str], max_tokens: int) -> list[Case]:
    cases = []
    for count in ENGINE_SPREADS:
        label = "engine, bare base" if count == 0 else f"engine, {count} adapter{'s' if count > 1 else ''}"
        workload = spread_over(prompts, names[:count], max_tokens)
        cases.append(Case(Result(label, "engine", workload), lambda w: engine_generate(engine, w)))
    return cases


def peft_cases(model: PeftModel, mixed: Workload, o: Options) -> list[Case]:
    batched = [Case(Result(f"PEFT mixed batch, bs {size}", "peft-mixed", mixed),
                    lambda w, size=size: peft_mixed(model, w, size)) for size in o.batch_sizes]
    subset = Workload(mixed.prompts[:o.serial_requests], mixed.adapters[:o.serial_requests], mixed.max_tokens)
    serial = Case(Result("PEFT one at a time", "peft-serial", subset), lambda w: peft_serial(model, w))
    return batched + [serial]


def warm_up(cases: list[Case], clock: Clock) -> None:
    """Each configuration once with 2 output tokens: kernels, allocator, and every adapter into its slot."""
    for case in cases:
        case.run(shortened(case.result.workload, 2))
    clock.log("warmed up")


def measure_all(cases: list[Case], repeats: int, clock: Clock) -> None:
    """Every round times every configuration once, so slow phases of the machine hit them all alike."""
    for round_index in range(repeats):
        for case in cases:
            case.measure(clock, f"round {round_index + 1}/{repeats}")


# ---- reporting ----------------------------------------------------------------------------------


def result_flops(result: Result, shape: ModelShape, ranks: dict[str, int]) -> float:
    workload = result.workload
    return sum(request_flops(shape, len(prompt), len(output), ranks[name] if name else 0)
               for prompt, output, name in zip(workload.prompts, result.outputs, workload.adapters))


def summarize(results: list[Result], shape: ModelShape, ranks: dict[str, int], peak: float) -> list[dict]:
    """One JSON-ready row per configuration, with the ratios and the roofline fraction."""
    engine = [r for r in results if r.kind == "engine"]
    bare = next(r for r in engine if r.workload.distinct_adapters == 0)
    reference = next(r for r in engine if r.workload.distinct_adapters == NUM_ADAPTERS)
    peft_best = max((r for r in results if r.kind == "peft-mixed"), key=lambda r: r.tokens_per_s)
    rows = []
    for r in results:
        flops = result_flops(r, shape, ranks)
        same = sum(a == b for a, b in zip(r.outputs, reference.outputs))  # PEFT runs a prefix of it
        rows.append({
            "configuration": r.label, "kind": r.kind, "requests": len(r.workload.prompts),
            "distinct_adapters": r.workload.distinct_adapters, "output_tokens": r.output_tokens,
            "seconds": r.seconds, "best_seconds": min(r.seconds), "tokens_per_s": r.tokens_per_s,
            "spread": r.spread, "vs_bare_base": r.tokens_per_s / bare.tokens_per_s,
            "vs_peft_best_mixed": r.tokens_per_s / peft_best.tokens_per_s, "workload_flops": flops,
            "achieved_flops_per_s": flops / min(r.seconds), "roofline_fraction": flops / min(r.seconds) / peak,
            "same_tokens_as_engine": None if r.kind == "engine" else f"{same}/{len(r.outputs)}",
        })
    return rows


def per_round_ratios(a: dict, b: dict) -> list[float]:
    """Throughput of a over b within each round: runs next to each other in time share the machine's state."""
    return [(a["output_tokens"] / sa) / (b["output_tokens"] / sb) for sa, sb in zip(a["seconds"], b["seconds"])]


def check_goals(rows: list[dict]) -> dict[str, dict]:
    engine = [row for row in rows if row["kind"] == "engine"]
    bare = next(row for row in engine if row["distinct_adapters"] == 0)
    all_adapters = next(row for row in engine if row["distinct_adapters"] == NUM_ADAPTERS)
    peft_best = max((row for row in rows if row["kind"] == "peft-mixed"), key=lambda row: row["tokens_per_s"])
    vs_base, vs_peft = all_adapters["vs_bare_base"], all_adapters["vs_peft_best_mixed"]
    return {
        f"{NUM_ADAPTERS} adapters vs engine bare base": {
            "ratio": vs_base, "goal": GOAL_VS_BASE, "met": vs_base >= GOAL_VS_BASE,
            "per_round": per_round_ratios(all_adapters, bare),
        },
        f"{NUM_ADAPTERS} adapters vs PEFT best mixed batch": {
            "ratio": vs_peft, "goal": GOAL_VS_PEFT, "met": vs_peft >= GOAL_VS_PEFT,
            "per_round": per_round_ratios(all_adapters, peft_best), "peft_best": peft_best["configuration"],
        },
    }


def print_report(rows: list[dict], goals: dict[str, dict], peak: float, repeats: int) -> None:
    print(f"\nthroughput: output tokens / best wall time of {repeats} round(s); roofline: {peak / 1e9:.1f} GFLOP/s "
          "(best float32 matmul)")
    header = (f"{'configuration':<26} {'reqs':>4} {'tokens':>6} {'best s':>7} {'tok/s':>7} {'spread':>6} "
              f"{'x bare':>6} {'x PEFT':>6} {'GFLOP/s':>7} {'roof':>6}  same as engine")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['configuration']:<26} {row['requests']:>4} {row['output_tokens']:>6} {row['best_seconds']:>7.2f} "
              f"{row['tokens_per_s']:>7.1f} {row['spread']:>6.0%} {row['vs_bare_base']:>6.2f} "
              f"{row['vs_peft_best_mixed']:>6.2f} {row['achieved_flops_per_s'] / 1e9:>7.1f} "
              f"{row['roofline_fraction']:>6.1%}  {row['same_tokens_as_engine'] or ''}")
    print()
    print("goals (best vs best; in brackets the same ratio within each round)")
    for name, goal in goals.items():
        rounds = " ".join(f"{ratio:.2f}" for ratio in goal["per_round"])
        extra = f"  PEFT best: {goal['peft_best']}" if "peft_best" in goal else ""
        verdict = "MET" if goal["met"] else "MISSED"
        print(f"  {name:<40} >= {goal['goal']:.2f}x : {goal['ratio']:.2f}x [{rounds}]  {verdict}{extra}")


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment() -> dict:
    return {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()}


def plot(rows: list[dict], goals: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6))
    colors = ["tab:blue" if row["kind"] == "engine" else "tab:orange" for row in rows]
    bars = ax.bar(range(len(rows)), [row["tokens_per_s"] for row in rows], color=colors)
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['tokens_per_s']:.0f}\n{row['roofline_fraction']:.0%} roof",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    bare = next(row for row in rows if row["kind"] == "engine" and row["distinct_adapters"] == 0)
    peft_best = max((row for row in rows if row["kind"] == "peft-mixed"), key=lambda row: row["tokens_per_s"])
    ax.axhline(GOAL_VS_BASE * bare["tokens_per_s"], color="tab:blue", linestyle="--", linewidth=1,
               label=f"goal for {NUM_ADAPTERS} adapters: {GOAL_VS_BASE}x engine bare base")
    ax.axhline(GOAL_VS_PEFT * peft_best["tokens_per_s"], color="tab:orange", linestyle=":", linewidth=1,
               label=f"goal for {NUM_ADAPTERS} adapters: {GOAL_VS_PEFT}x PEFT best mixed batch")
    ax.set_xticks(range(len(rows)), [row["configuration"] for row in rows], rotation=25, ha="right")
    ax.set_ylabel("output tokens/s (best round)")
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(o: Options, report: dict, title: str) -> None:
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "engine_bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(report["results"], report["goals"], o.out / "engine_bench.png", title)
    print(f"\nwrote {o.out / 'engine_bench.json'} and {o.out / 'engine_bench.png'}")


# ---- main ---------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """Progress bars and deprecation notices of transformers/PEFT would bury the benchmark's own lines."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def main(argv: list[str] | None = None) -> None:
    o = parse_options(argv)
    quiet_libraries()
    clock = Clock()
    env = environment()
    clock.log(f"{env['cpu']}, {env['torch_threads']} torch threads, torch {env['torch']}")
    peak_before = peak_matmul_flops(o.matmul_size)
    with tempfile.TemporaryDirectory(prefix="engine_bench-") as tmp:
        model_dir = Path(tmp) / "base"
        base = build_base(o, model_dir)
        params = sum(p.numel() for p in base.parameters())
        clock.log(f"random Llama: {params / 1e6:.1f}M parameters, {o.layers} layers, hidden {o.hidden}")
        adapters = make_adapters(base, Path(tmp) / "adapters", o.seed, clock)
        del base
        engine = make_engine(model_dir, o, adapters)
        peft_model = load_peft(model_dir, adapters)
        clock.log("engine and PEFT model loaded")
        prompts, names = make_prompts(o), list(adapters)
        cases = engine_cases(engine, prompts, names, o.max_tokens)
        cases += peft_cases(peft_model, spread_over(prompts, names, o.max_tokens), o)
        warm_up(cases, clock)
        measure_all(cases, o.repeats, clock)
    # The best of two measurements: a slow moment of the machine must not flatter the roofline fraction.
    peak = max(peak_before, peak_matmul_flops(o.matmul_size))
    shape = ModelShape.from_config(llama_config(o))
    rows = summarize([case.result for case in cases], shape, {a.name: a.rank for a in adapters.values()}, peak)
    goals = check_goals(rows)
    print_report(rows, goals, peak, o.repeats)
    if o.quick:
        print("--quick is a smoke test: on a tiny model per-step overheads dominate, so its ratios say nothing "
              "about the goals")
    if engine.scheduler.preemptions:
        print(f"warning: the engine preempted {engine.scheduler.preemptions} sequences; its numbers include recompute")
    report = {
        "command": " ".join(["python -m bench.engine_bench", *(argv if argv is not None else sys.argv[1:])]),
        "environment": env, "options": vars(o) | {"out": str(o.out)},
        "model": {"parameters": params, "linear_parameters": shape.linear_params, "shape": vars(shape)},
        "adapters": {a.name: a.rank for a in adapters.values()}, "adapted_modules": list(ADAPTED_MODULES),
        "peak_flops_per_s": peak, "engine_preemptions": engine.scheduler.preemptions,
        "results": rows, "goals": goals,
    }
    title = (f"loraserve engine vs PEFT: random Llama {params / 1e6:.1f}M, {o.requests} requests x {o.max_tokens} "
             f"tokens, float32, {env['cpu']} ({env['torch_threads']} threads)")
    write_outputs(o, report, title)
    clock.log("done")


if __name__ == "__main__":
    main()
