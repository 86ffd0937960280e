"""A quantized base: resident bytes and throughput with 32 adapters, against PEFT on the same quantized model.

The engine benchmark's random Llama and 32 PEFT adapters (bench/engine_bench.py), loaded three ways:
float32 (`none`), bitsandbytes NF4 and int8 (`--quantization`, server/engine/model_loader.py). For each,
in one process and interleaved round by round: the base's resident bytes, the engine's tokens/s with
requests spread over the 32 adapters, and PEFT's mixed-adapter batch on the same quantized model (the
best batch size). Goals: NF4 resident base <= 0.30x float32; the engine >= 1.5x PEFT's best on NF4.

    python -m bench.quant_bench            # the full run (about 10 minutes on 2 cores)
    python -m bench.quant_bench --quick    # tiny model, smoke test
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from bench import engine_bench as eb
from bench.machine import environment
from server.config import Settings
from server.engine.engine import LLMEngine
from server.engine.model_loader import _bnb_config, base_footprint, load_base_model, load_tokenizer

METHODS = ("none", "bnb-nf4", "bnb-int8")
GOAL_NF4_BYTES = 0.30  # NF4 resident base vs float32
GOAL_VS_PEFT = eb.GOAL_VS_PEFT  # the engine with 32 adapters vs PEFT's best mixed batch, on NF4
DOC = Path(__file__).resolve().parents[1] / "docs" / "bench-quant.md"


def parse_options(argv: list[str] | None) -> tuple[eb.Options, bool]:
    parser = argparse.ArgumentParser(prog="python -m bench.quant_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke test")
    parser.add_argument("--repeats", type=int, help="timed rounds, the best kept (default 3, --quick 2)")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="seconds, in all, that timed runs may wait for other busy processes (default 120)")
    parser.add_argument("--no-doc", action="store_true", help=f"do not rewrite {DOC.name}")
    args = parser.parse_args(argv)
    base = ["--quick"] if args.quick else []
    base += ["--repeats", str(args.repeats)] if args.repeats else []
    options = eb.parse_options([*base, "--quiet-wait", str(args.quiet_wait)])
    out = eb.RESULTS_DIR / "quick" if args.quick else eb.RESULTS_DIR
    return replace(options, out=out), not args.no_doc and not args.quick


def make_engine(model_dir: Path, o: eb.Options, adapters: dict[str, eb.Adapter], method: str) -> LLMEngine:
    bytes_per_token = 2 * o.layers * o.kv_heads * (o.hidden // o.heads) * torch.float32.itemsize
    settings = Settings(
        model=model_dir, dtype="float32", device="cpu", quantization=method, max_loras=eb.NUM_ADAPTERS,
        kv_cache_memory=2 * o.requests * (o.prompt_max + o.max_tokens) * bytes_per_token,
        max_lora_rank=max(eb.RANKS), max_num_seqs=o.requests, max_batch_tokens=eb.MAX_BATCH_TOKENS,
    )
    engine = LLMEngine(load_base_model(model_dir, torch.float32, torch.device("cpu"), method),
                       load_tokenizer(model_dir), settings)
    engine.wait_for_cpu_kernel()
    for adapter in adapters.values():
        engine.load_adapter(adapter.name, adapter.path)
    return engine


def load_peft(model_dir: Path, adapters: dict[str, eb.Adapter], method: str) -> PeftModel:
    quantized = {} if method == "none" else {
        "quantization_config": _bnb_config(method, torch.float32), "device_map": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **quantized)
    first, *rest = adapters.values()
    model = PeftModel.from_pretrained(base, first.path, adapter_name=first.name)
    for adapter in rest:
        model.load_adapter(adapter.path, adapter_name=adapter.name)
    return model.eval()


def cases_for(method: str, engine: LLMEngine, peft: PeftModel, workload: eb.Workload, o: eb.Options) -> list[eb.Case]:
    cases = [eb.Case(eb.Result(f"{method}: engine, {eb.NUM_ADAPTERS} ad.", "engine", workload),
                     lambda w: eb.engine_generate(engine, w))]
    cases += [eb.Case(eb.Result(f"{method}: PEFT mixed, bs {size}", "peft-mixed", workload),
                      lambda w, size=size: eb.peft_mixed(peft, w, size)) for size in o.batch_sizes]
    return cases


def summarize(method: str, cases: list[eb.Case], resident: int, float_bytes: int) -> dict:
    engine = next(c.result for c in cases if c.result.kind == "engine")
    peft_best = max((c.result for c in cases if c.result.kind == "peft-mixed"), key=lambda r: r.tokens_per_s)
    same = sum(a == b for a, b in zip(engine.outputs, peft_best.outputs))
    return {
        "quantization": method, "resident_base_bytes": resident, "vs_float32_bytes": resident / float_bytes,
        "engine_tokens_per_s": engine.tokens_per_s, "engine_seconds": engine.seconds,
        "peft_best": peft_best.label, "peft_best_tokens_per_s": peft_best.tokens_per_s,
        "peft_seconds": peft_best.seconds, "vs_peft_best_mixed": engine.tokens_per_s / peft_best.tokens_per_s,
        "per_round_vs_peft": [(engine.output_tokens / a) / (peft_best.output_tokens / b)
                              for a, b in zip(engine.seconds, peft_best.seconds)],
        "same_tokens_as_peft_best": f"{same}/{len(engine.outputs)}",
        "other_cores_in_best": engine.other_cores[engine.best],
    }


def print_table(rows: list[dict]) -> str:
    lines = ["| quantization | resident base | × float32 | engine tok/s (32 adapters) | PEFT best mixed tok/s | "
             "engine × PEFT (per round) | same tokens |", "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        rounds = " ".join(f"{x:.2f}" for x in r["per_round_vs_peft"])
        lines.append(f"| {r['quantization']} | {r['resident_base_bytes'] / 2**20:.1f} MiB | "
                     f"{r['vs_float32_bytes']:.2f} | {r['engine_tokens_per_s']:.1f} | "
                     f"{r['peft_best_tokens_per_s']:.1f} ({r['peft_best'].split(', ')[-1]}) | "
                     f"{r['vs_peft_best_mixed']:.2f} ({rounds}) | {r['same_tokens_as_peft_best']} |")
    table = "\n".join(lines)
    print("\n" + table)
    return table


def goals(rows: list[dict]) -> dict[str, dict]:
    nf4 = next(r for r in rows if r["quantization"] == "bnb-nf4")
    return {
        "NF4 resident base vs float32": {"ratio": nf4["vs_float32_bytes"], "goal": f"<= {GOAL_NF4_BYTES}",
                                         "met": nf4["vs_float32_bytes"] <= GOAL_NF4_BYTES},
        "NF4: engine with 32 adapters vs PEFT best mixed": {
            "ratio": nf4["vs_peft_best_mixed"], "goal": f">= {GOAL_VS_PEFT}", "met": nf4["vs_peft_best_mixed"] >= GOAL_VS_PEFT},
    }


def main(argv: list[str] | None = None) -> None:
    o, write_doc = parse_options(argv)
    eb.quiet_libraries()
    clock, env = eb.Clock(), environment()
    clock.log(f"{env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, torch {env['torch']}")
    with tempfile.TemporaryDirectory(prefix="quant_bench-") as tmp:
        model_dir = Path(tmp) / "base"
        base = eb.build_base(o, model_dir)
        params = sum(p.numel() for p in base.parameters())
        adapters = eb.make_adapters(base, Path(tmp) / "adapters", o.seed)
        del base
        workload = eb.spread_over(eb.make_prompts(o), list(adapters), o.max_tokens)
        by_method, resident = {}, {}
        for method in METHODS:
            engine = make_engine(model_dir, o, adapters, method)
            resident[method] = base_footprint(engine.model).resident_bytes
            by_method[method] = cases_for(method, engine, load_peft(model_dir, adapters, method), workload, o)
            clock.log(f"{method}: resident base {resident[method] / 2**20:.1f} MiB; engine and PEFT loaded")
        cases = [case for method in METHODS for case in by_method[method]]
        eb.warm_up(cases)
        eb.measure_all(cases, o, clock)
    rows = [summarize(m, by_method[m], resident[m], resident["none"]) for m in METHODS]
    table = print_table(rows)
    met = goals(rows)
    for name, goal in met.items():
        print(f"  {name:<48} {goal['goal']}: {goal['ratio']:.2f}  {'MET' if goal['met'] else 'MISSED'}")
    command = " ".join(["python -m bench.quant_bench", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "environment": env, "options": vars(o), "model_parameters": params,
              "results": rows, "goals": met}
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "quant_bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if write_doc:
        DOC.write_text(f"# Quantized base: bytes and throughput\n\n`{command}` on {env['cpu']} "
                       f"({env['torch_threads']} threads), random Llama {params / 1e6:.1f}M, {o.requests} requests "
                       f"x {o.max_tokens} tokens over {eb.NUM_ADAPTERS} adapters, best of {o.repeats} interleaved "
                       f"rounds (bench/results/quant_bench.json).\n\n{table}\n\n"
                       + "\n".join(f"- {n}: {g['ratio']:.2f} (goal {g['goal']}): {'met' if g['met'] else 'missed'}"
                                   for n, g in met.items()) + "\n")
    clock.log(f"wrote {o.out / 'quant_bench.json'}" + (f" and {DOC}" if write_doc else ""))


if __name__ == "__main__":
    main()
