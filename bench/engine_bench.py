"""Engine throughput with many adapters, against PEFT, against the roofline (see docs/bench-engine.md).

One process, one workload (same prompts, same output lengths, greedy, EOS ignored), every
configuration measured side by side on a random Llama and 32 random PEFT adapters of mixed rank:
the engine on the bare base and with requests spread over 1, 8 and 32 adapters (over 32 again with
decodes gathering their history out of the paged cache instead of reading it in place: the decode
op's worth; and with every fourth request constrained by a JSON schema: structured outputs' cost),
PEFT one request at a time (set_adapter + generate), and PEFT's mixed-adapter batch
(generate(adapter_names=...)). `--prompt-min/--prompt-max 512` shows the decode op where histories
are long.

    python -m bench.engine_bench            # the full run (about 5 minutes on 2 cores)
    python -m bench.engine_bench --quick    # tiny model, smoke test (seconds)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import json
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from bench.machine import CONTENDED_CORES, CpuMeter, environment, wait_for_quiet
from bench.model_shapes import FULL_MODEL, QUICK_MODEL, ModelOptions
from bench.roofline import ADAPTED_MODULES, ModelShape, peak_matmul_flops, request_flops
from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.grammar import Grammar, GrammarCompiler, GrammarSpec
from server.engine.model_loader import load_base_model, load_tokenizer
from server.engine.sequence import SamplingParams
from tests.factories import SPECIAL_TOKENS, VOCAB, byte_tokenizer

RESULTS_DIR = Path(__file__).parent / "results"
NUM_ADAPTERS = 32
RANKS = (8, 16, 32)  # adapter i has rank RANKS[i % 3]
ENGINE_SPREADS = (0, 1, 8, NUM_ADAPTERS)  # distinct adapters per engine configuration (0: bare base)
GOAL_VS_BASE = 0.85  # 32 adapters vs the bare base, same engine
GOAL_VS_PEFT = 1.5  # 32 adapters vs PEFT's best mixed batch
GOAL_CONSTRAINED = 0.85  # 32 adapters with a quarter of the requests JSON-constrained vs none constrained
CONSTRAINED_EVERY = 4  # request i is constrained when i % CONSTRAINED_EVERY == 0
# Eight short words: longer than any run's output, so constrained requests run to max_tokens like the others.
JSON_SCHEMA = json.dumps({"type": "object", "required": ["words"], "properties": {"words": {
    "type": "array", "minItems": 8, "maxItems": 8, "items": {"type": "string", "minLength": 6, "maxLength": 6}}}})
MAX_BATCH_TOKENS = 4096

FULL = dict(**FULL_MODEL, requests=64, max_tokens=32, repeats=3, serial_requests=8, batch_sizes="8,16,32,64",
            matmul_size=2048)
QUICK = dict(**QUICK_MODEL, requests=32, max_tokens=8, repeats=2, serial_requests=4, batch_sizes="8,32",
             matmul_size=512)


@dataclass(frozen=True)
class Options(ModelOptions):
    requests: int
    prompt_min: int
    prompt_max: int
    max_tokens: int
    repeats: int
    serial_requests: int
    batch_sizes: tuple[int, ...]
    matmul_size: int
    seed: int
    quiet_wait: float
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

    def head(self, requests: int, max_tokens: int | None = None) -> "Workload":
        """The first `requests` requests, optionally with fewer output tokens."""
        return Workload(self.prompts[:requests], self.adapters[:requests], max_tokens or self.max_tokens)


@dataclass
class Result:
    """One configuration: its workload and, per timed round, the wall time and the competing load."""

    label: str
    kind: str  # "engine", "peft-mixed" or "peft-serial"
    workload: Workload
    seconds: list[float] = field(default_factory=list)
    other_cores: list[float | None] = field(default_factory=list)  # see bench.machine.CpuMeter
    outputs: list[list[int]] = field(default_factory=list)  # token ids of the last round

    @property
    def output_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.outputs)

    @property
    def best(self) -> int:
        """Index of the fastest round: on a shared machine noise only ever slows a run down."""
        return self.seconds.index(min(self.seconds))

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds[self.best]

    @property
    def spread(self) -> float:
        """(slowest − fastest) / fastest over the rounds: how soft this number is."""
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
    for flag, text in [("hidden", "hidden size"), ("intermediate", "MLP size"), ("layers", "decoder layers"),
                       ("heads", "attention heads"), ("kv-heads", "key/value heads"),
                       ("requests", "requests submitted at once"),
                       ("max-tokens", "tokens generated per request"),
                       ("repeats", "timed rounds, the best kept"),
                       ("serial-requests", "requests timed for PEFT one at a time"),
                       ("matmul-size", "matrix size for the peak FLOP rate")]:
        key = flag.replace("-", "_")
        parser.add_argument(f"--{flag}", type=int, help=f"{text} (default {FULL[key]}, --quick {QUICK[key]})")
    parser.add_argument("--batch-sizes", help=f"PEFT mixed batch sizes (default {FULL['batch_sizes']})")
    parser.add_argument("--prompt-min", type=int, default=16, help="shortest prompt in tokens (default 16)")
    parser.add_argument("--prompt-max", type=int, default=32, help="longest prompt in tokens (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="seconds, in all, that timed runs may wait for other busy processes to finish "
                             "(default 120)")
    parser.add_argument("--out", type=Path,
                        help="results directory (default bench/results; --quick: bench/results/quick)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    values = {key: preset[key] if getattr(args, key) is None else getattr(args, key) for key in preset}
    values["batch_sizes"] = tuple(int(size) for size in str(values["batch_sizes"]).split(","))
    out = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    options = Options(quick=args.quick, **values, prompt_min=args.prompt_min, prompt_max=args.prompt_max,
                      seed=args.seed, quiet_wait=args.quiet_wait, out=out)
    problems = option_problems(options)
    if problems:
        parser.error("; ".join(problems))
    return options


def option_problems(o: Options) -> list[str]:
    problems = []
    if o.requests < NUM_ADAPTERS:
        problems.append(f"--requests must be >= {NUM_ADAPTERS} so that every adapter gets requests")
    if not 1 <= o.prompt_min <= o.prompt_max:
        problems.append("need 1 <= --prompt-min <= --prompt-max")
    if not 1 <= o.serial_requests <= o.requests:
        problems.append("need 1 <= --serial-requests <= --requests")
    if min(o.repeats, o.max_tokens, *o.batch_sizes) < 1:
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


def make_adapters(base: PreTrainedModel, root: Path, seed: int) -> dict[str, Adapter]:
    """NUM_ADAPTERS PEFT LoRA adapters of mixed rank on the attention projections, saved by PEFT."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for i in range(NUM_ADAPTERS):
        name, rank = f"a{i:02d}", RANKS[i % len(RANKS)]
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ADAPTED_MODULES),
                            lora_dropout=0.0)
        peft_model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:  # PEFT starts B at zero: every adapter would equal the base
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        peft_model.save_pretrained(root / name)
        adapters[name] = Adapter(name, root / name, rank)
    return adapters


def make_prompts(o: Options) -> list[list[int]]:
    rng = random.Random(o.seed)
    lengths = [rng.randint(o.prompt_min, o.prompt_max) for _ in range(o.requests)]
    return [[rng.randrange(len(SPECIAL_TOKENS), VOCAB) for _ in range(n)] for n in lengths]


def spread_over(prompts: list[list[int]], names: list[str], max_tokens: int) -> Workload:
    """Request i uses adapter names[i % len(names)]; no names: the bare base."""
    adapters = [names[i % len(names)] if names else None for i in range(len(prompts))]
    return Workload(prompts, adapters, max_tokens)


# ---- the systems under test ---------------------------------------------------------------------


def make_engine(model_dir: Path, o: Options, adapters: dict[str, Adapter]) -> LLMEngine:
    bytes_per_token = 2 * o.layers * o.kv_heads * (o.hidden // o.heads) * torch.float32.itemsize
    kv_bytes = 2 * o.requests * (o.prompt_max + o.max_tokens) * bytes_per_token  # 2x: never preempts
    settings = Settings(
        model=model_dir, dtype="float32", device="cpu", kv_cache_memory=kv_bytes, max_loras=NUM_ADAPTERS,
        max_lora_rank=max(RANKS), max_num_seqs=o.requests, max_batch_tokens=MAX_BATCH_TOKENS,
    )
    model = load_base_model(model_dir, torch.float32, torch.device("cpu"))
    engine = LLMEngine(model, load_tokenizer(model_dir), settings)
    engine.wait_for_cpu_kernel()  # timed runs use the fused CPU op from the first step
    for adapter in adapters.values():
        engine.load_adapter(adapter.name, adapter.path)
    return engine


def load_peft(model_dir: Path, adapters: dict[str, Adapter]) -> PeftModel:
    """A separate base (the engine wraps its own model's layers in place) with every adapter loaded."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    first, *rest = adapters.values()
    model = PeftModel.from_pretrained(base, first.path, adapter_name=first.name)
    for adapter in rest:
        model.load_adapter(adapter.path, adapter_name=adapter.name)
    return model.eval()


def engine_generate(engine: LLMEngine, workload: Workload, grammar: Grammar | None = None) -> list[list[int]]:
    """Greedy, EOS ignored; with `grammar`, every CONSTRAINED_EVERY-th request is held to it instead
    (the grammar decides where EOS may come, so those do not ignore it)."""
    free = SamplingParams(max_tokens=workload.max_tokens, temperature=0, ignore_eos=True)
    params: SamplingParams | list[SamplingParams] = free
    if grammar is not None:
        constrained = SamplingParams(max_tokens=workload.max_tokens, temperature=0, grammar=grammar)
        params = [constrained if i % CONSTRAINED_EVERY == 0 else free for i in range(len(workload.prompts))]
    return [c.token_ids for c in engine.generate(workload.prompts, params, adapters=workload.adapters)]


def without_decode_op(engine: LLMEngine, workload: Workload) -> list[list[int]]:
    """The same run with decodes gathering their history out of the paged cache (the torch path) instead
    of reading it in place (server/engine/paged_decode.py): what the op is worth, side by side."""
    op, engine.runner.decode_op = engine.runner.decode_op, None
    try:
        return engine_generate(engine, workload)
    finally:
        engine.runner.decode_op = op


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
        ids, mask = left_pad(workload.prompts[start:start + batch_size])
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
        meter, start = CpuMeter(), time.perf_counter()
        outputs = self.run(self.result.workload)
        seconds, others = time.perf_counter() - start, meter.others()
        self.result.seconds.append(seconds)
        self.result.other_cores.append(others)
        self.result.outputs = outputs
        tokens = sum(len(t) for t in outputs)
        load = "" if others is None else f"  (other processes: {others:.1f} cores)"
        clock.log(f"{tag} {self.result.label:<26} {tokens:5d} tokens in {seconds:6.2f}s "
                  f"= {tokens / seconds:7.1f} tok/s{load}")


def engine_cases(engine: LLMEngine, prompts: list[list[int]], names: list[str], o: Options) -> list[Case]:
    cases = []
    for count in ENGINE_SPREADS:
        label = "engine, bare base" if count == 0 else f"engine, {count} adapter{'s' if count > 1 else ''}"
        workload = spread_over(prompts, names[:count], o.max_tokens)
        cases.append(Case(Result(label, "engine", workload), lambda w: engine_generate(engine, w)))
    label = f"engine, {NUM_ADAPTERS} ad., gather attn"
    workload = spread_over(prompts, names, o.max_tokens)
    cases.append(Case(Result(label, "engine-gather", workload), lambda w: without_decode_op(engine, w)))
    grammar = GrammarCompiler(engine.tokenizer).compile(GrammarSpec("json", JSON_SCHEMA, "bench"))
    label = f"engine, {NUM_ADAPTERS} ad., 1/{CONSTRAINED_EVERY} JSON"
    workload = spread_over(prompts, names, o.max_tokens)
    cases.append(Case(Result(label, "engine-json", workload), lambda w: engine_generate(engine, w, grammar)))
    return cases


def peft_cases(model: PeftModel, mixed: Workload, o: Options) -> list[Case]:
    cases = [Case(Result(f"PEFT mixed batch, bs {size}", "peft-mixed", mixed),
                  lambda w, size=size: peft_mixed(model, w, size)) for size in o.batch_sizes]
    serial = Result("PEFT one at a time", "peft-serial", mixed.head(o.serial_requests))
    return cases + [Case(serial, lambda w: peft_serial(model, w))]


def warm_up(cases: list[Case]) -> None:
    """Each configuration once with 2 output tokens: kernels, allocator, and every adapter into its slot."""
    for case in cases:
        workload = case.result.workload
        case.run(workload.head(len(workload.prompts), max_tokens=2))


def measure_all(cases: list[Case], o: Options, clock: Clock) -> None:
    """Every round times every configuration once, so slow phases of the machine hit them all alike.
    Before each run, wait for other busy processes to finish, within a budget for the whole benchmark."""
    wait_budget = o.quiet_wait
    for round_index in range(o.repeats):
        for case in cases:
            wait_budget -= wait_for_quiet(wait_budget, clock.log)
            case.measure(clock, f"round {round_index + 1}/{o.repeats}")


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
        flops, best_seconds = result_flops(r, shape, ranks), r.seconds[r.best]
        same = sum(a == b for a, b in zip(r.outputs, reference.outputs))  # PEFT runs a prefix of it
        rows.append({
            "configuration": r.label, "kind": r.kind, "requests": len(r.workload.prompts),
            "distinct_adapters": r.workload.distinct_adapters, "output_tokens": r.output_tokens,
            "seconds": r.seconds, "other_cores": r.other_cores, "other_cores_in_best": r.other_cores[r.best],
            "best_seconds": best_seconds, "tokens_per_s": r.tokens_per_s, "spread": r.spread,
            "vs_bare_base": r.tokens_per_s / bare.tokens_per_s,
            "vs_peft_best_mixed": r.tokens_per_s / peft_best.tokens_per_s,
            "workload_flops": flops, "achieved_flops_per_s": flops / best_seconds,
            "roofline_fraction": flops / best_seconds / peak,
            "same_tokens_as_engine": None if r.kind == "engine" else f"{same}/{len(r.outputs)}",
        })
    return rows


def per_round_ratios(a: dict, b: dict) -> list[float]:
    """Throughput of a over b within each round: runs close in time share the machine's state."""
    rounds = zip(a["seconds"], b["seconds"])
    return [(a["output_tokens"] / sa) / (b["output_tokens"] / sb) for sa, sb in rounds]


def check_goals(rows: list[dict]) -> dict[str, dict]:
    engine = [row for row in rows if row["kind"] == "engine"]
    bare = next(row for row in engine if row["distinct_adapters"] == 0)
    all_adapters = next(row for row in engine if row["distinct_adapters"] == NUM_ADAPTERS)
    peft_best = max((row for row in rows if row["kind"] == "peft-mixed"), key=lambda row: row["tokens_per_s"])
    constrained = next(row for row in rows if row["kind"] == "engine-json")
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
        f"{NUM_ADAPTERS} adapters, 1/{CONSTRAINED_EVERY} JSON-constrained vs none": {
            "ratio": constrained["tokens_per_s"] / all_adapters["tokens_per_s"], "goal": GOAL_CONSTRAINED,
            "met": constrained["tokens_per_s"] / all_adapters["tokens_per_s"] >= GOAL_CONSTRAINED,
            "per_round": per_round_ratios(constrained, all_adapters),
        },
    }


def print_report(rows: list[dict], goals: dict[str, dict], peak: float, repeats: int) -> None:
    print(f"\ntok/s: output tokens / wall time of the best of {repeats} round(s). roof: useful FLOP/s / "
          f"{peak / 1e9:.1f} GFLOP/s (best float32 matmul). others: cores other processes used in that run.")
    header = (f"{'configuration':<26} {'reqs':>4} {'tokens':>6} {'best s':>7} {'tok/s':>7} {'spread':>6} "
              f"{'x bare':>6} {'x PEFT':>6} {'GFLOP/s':>7} {'roof':>6} {'others':>6}  same as engine")
    print(header)
    print("-" * len(header))
    for row in rows:
        others = "n/a" if row["other_cores_in_best"] is None else f"{row['other_cores_in_best']:.1f}"
        print(f"{row['configuration']:<26} {row['requests']:>4} {row['output_tokens']:>6} "
              f"{row['best_seconds']:>7.2f} {row['tokens_per_s']:>7.1f} {row['spread']:>6.0%} "
              f"{row['vs_bare_base']:>6.2f} {row['vs_peft_best_mixed']:>6.2f} "
              f"{row['achieved_flops_per_s'] / 1e9:>7.1f} {row['roofline_fraction']:>6.1%} {others:>6}  "
              f"{row['same_tokens_as_engine'] or ''}")
    contended = [row["configuration"] for row in rows if (row["other_cores_in_best"] or 0) > CONTENDED_CORES]
    if contended:
        print(f"warning: other processes used > {CONTENDED_CORES} cores even in the best run of "
              f"{', '.join(contended)}: those numbers are too low; rerun on a quiet machine")
    print("\ngoals (best vs best; in brackets the same ratio within each round)")
    for name, goal in goals.items():
        rounds = " ".join(f"{ratio:.2f}" for ratio in goal["per_round"])
        extra = f"  PEFT best: {goal['peft_best']}" if "peft_best" in goal else ""
        verdict = "MET" if goal["met"] else "MISSED"
        print(f"  {name:<40} >= {goal['goal']:.2f}x : {goal['ratio']:.2f}x [{rounds}]  {verdict}{extra}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6))
    colors = ["tab:blue" if row["kind"] == "engine" else "tab:orange" for row in rows]
    bars = ax.bar(range(len(rows)), [row["tokens_per_s"] for row in rows], color=colors)
    for bar, row in zip(bars, rows):
        label = f"{row['tokens_per_s']:.0f}\n{row['roofline_fraction']:.0%} roof"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
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
    plot(report["results"], o.out / "engine_bench.png", title)
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
    clock, env = Clock(), environment()
    clock.log(f"{env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, "
              f"torch {env['torch']}")
    peak_before = peak_matmul_flops(o.matmul_size)
    with tempfile.TemporaryDirectory(prefix="engine_bench-") as tmp:
        model_dir = Path(tmp) / "base"
        base = build_base(o, model_dir)
        params = sum(p.numel() for p in base.parameters())
        clock.log(f"random Llama: {params / 1e6:.1f}M parameters, {o.layers} layers, hidden {o.hidden}")
        adapters = make_adapters(base, Path(tmp) / "adapters", o.seed)
        del base
        clock.log(f"{NUM_ADAPTERS} adapters, ranks {RANKS}, on {'/'.join(ADAPTED_MODULES)}")
        engine = make_engine(model_dir, o, adapters)
        peft_model = load_peft(model_dir, adapters)
        prompts, names = make_prompts(o), list(adapters)
        cases = engine_cases(engine, prompts, names, o)
        cases += peft_cases(peft_model, spread_over(prompts, names, o.max_tokens), o)
        warm_up(cases)
        clock.log("engine and PEFT loaded and warmed up")
        measure_all(cases, o, clock)
    # The better of two: a slow moment of the machine must not flatter the roofline fractions.
    peak = max(peak_before, peak_matmul_flops(o.matmul_size))
    shape = ModelShape.from_config(llama_config(o))
    ranks = {a.name: a.rank for a in adapters.values()}
    rows = summarize([case.result for case in cases], shape, ranks, peak)
    goals = check_goals(rows)
    print_report(rows, goals, peak, o.repeats)
    if o.quick:
        print("--quick is a smoke test: on a tiny model per-step overheads dominate, so its ratios say "
              "nothing about the goals")
    if engine.scheduler.preemptions:
        print(f"warning: the engine preempted {engine.scheduler.preemptions} sequences (recompute included)")
    report = {
        "command": " ".join(["python -m bench.engine_bench", *(sys.argv[1:] if argv is None else argv)]),
        "environment": env, "options": vars(o),
        "model": {"parameters": params, "linear_parameters": shape.linear_params, "shape": vars(shape)},
        "adapters": ranks, "adapted_modules": list(ADAPTED_MODULES),
        "peak_flops_per_s": peak, "engine_preemptions": engine.scheduler.preemptions,
        "results": rows, "goals": goals,
    }
    title = (f"loraserve engine vs PEFT: random Llama {params / 1e6:.1f}M, {o.requests} requests x "
             f"{o.max_tokens} tokens, float32, {env['cpu']} ({env['torch_threads']} threads)")
    write_outputs(o, report, title)
    clock.log("done")


if __name__ == "__main__":
    main()
