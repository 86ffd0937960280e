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
from tests.factories import VOCAB, byte_tokenizer

RESULTS_DIR = Path(__file__).parent / "results"
NUM_ADAPTERS = 32
RANKS = (8, 16, 32)  # adapter i has rank RANKS[i % 3]
ENGINE_SPREADS = (0, 1, 8, NUM_ADAPTERS)  # distinct adapters per engine configuration (0: bare base)
GOAL_VS_BASE = 0.85  # 32 adapters vs the bare base, same engine
GOAL_VS_PEFT = 1.5  # 32 adapters vs PEFT's best mixed batch
FIRST_TOKEN_ID = 3  # prompts avoid the byte tokenizer's special tokens

FULL = dict(hidden=768, intermediate=2048, layers=10, heads=12, kv_heads=4, requests=64, max_tokens=32,
            repeats=3, serial_requests=8, batch_sizes="8,16,32,64", matmul_size=2048)
QUICK = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, requests=32, max_tokens=8,
             repeats=1, serial_requests=4, batch_sizes="8,32", matmul_size=512)


@dataclass(frozen=True)
class Options:
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


@dataclass
class Result:
    """One configuration: its workload and the wall time of every timed repetition."""

    label: str
    kind: str  # "engine" or "peft"
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
    options = Options(**values, prompt_min=args.prompt_min, prompt_max=args.prompt_max, seed=args.seed,
                      out=args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR))
    check_options(options)
    return options


def check_options(o: Options) -> None:
    problems = []
    if o.requests < NUM_ADAPTERS:
        problems.append(f"--requests must be >= {NUM_ADAPTERS} so every adapter gets requests")
    if not 1 <= o.prompt_min <= o.prompt_max:
        problems.append("need 1 <= --prompt-min <= --prompt-max")
    if not 1 <= o.serial_requests <= o.requests:
        problems.append("need 1 <= --serial-requests <= --requests")
    if o.repeats < 1 or o.max_tokens < 1 or min(o.batch_sizes) < 1:
        problems.append("--repeats, --max-tokens and --batch-sizes must be >= 1")
    if problems:
        sys.exit("engine_bench: " + "; ".join(problems))


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
    return [[rng.randrange(FIRST_TOKEN_ID, VOCAB) for _ in range(rng.randint(o.prompt_min, o.prompt_max))]
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
    kv_bytes = 2 * o.requests * (o.prompt_max + o.max_tokens) * bytes_per_token  # 2×: no preemption
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


def timed(run: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = run()
    return time.perf_counter() - start, outputs


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
        seconds, outputs = timed(lambda: self.run(self.result.workload))
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


def peft_cases(model: PeftModel, mixed: Workload, o: Options) -> tuple[list[Case], Case]:
    batched = [Case(Result(f"PEFT mixed batch, bs {size}", "peft", mixed),
                    lambda w, size=size: peft_mixed(model, w, size)) for size in o.batch_sizes]
    subset = Workload(mixed.prompts[:o.serial_requests], mixed.adapters[:o.serial_requests], mixed.max_tokens)
    serial = Case(Result("PEFT one at a time", "peft", subset), lambda w: peft_serial(model, w))
    return batched, serial


def warm_up(cases: list[Case], clock: Clock) -> None:
    """One short pass of each configuration: kernels, allocator, and the engine's adapter slots."""
    for case in cases:
        workload = case.result.workload
        case.run(Workload(workload.prompts[:8], workload.adapters[:8], 2))
    clock.log("warmed up")


def measure_all(engine_side: list[Case], peft_batched: list[Case], serial: Case, o: Options, clock: Clock) -> None:
    """Rounds interleave every engine configuration (so drift hits all alike); PEFT's batches run once,
    between rounds, and one-at-a-time last (the slowest)."""
    for round_index in range(o.repeats):
        tag = f"round {round_index + 1}/{o.repeats}"
        for case in engine_side:
            case.measure(clock, tag)
        if round_index < len(peft_batched):
            peft_batched[round_index].measure(clock, tag)
    for case in peft_batched[o.repeats:]:
        case.measure(clock, "peft")
    serial.measure(clock, "peft")
