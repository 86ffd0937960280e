"""Does the engine give a request the same greedy tokens whatever it is batched with? A probe, not a benchmark.

`python -m bench.batch_probe [--no-cpu-kernel]` builds the HTTP benchmark's model and adapters, generates its
64 requests all at once and then 8 at a time, and for the first requests whose tokens differ prints PEFT's
logits (transformers + PEFT on the same history) for the two tokens chosen at the divergence. A near tie
(a gap of ~1e-5) is float rounding; a larger gap means the engine computed that row wrongly.
Found on 2026-12-02: about half of the 64 differ after ~23 tokens, with gaps up to 0.39 (see the session
note and docs/bench-http.md); open.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from bench import http_bench
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams

SHOWN = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cpu-kernel", action="store_true", help="the torch path only")
    args = parser.parse_args()
    shape = http_bench.FULL
    with tempfile.TemporaryDirectory() as tmp:
        base, store = http_bench.build(Path(tmp), shape)
        settings = http_bench.settings(base, store).model_copy(update={"cpu_kernel": not args.no_cpu_kernel})
        engine = LLMEngine.from_settings(settings)
        engine.wait_for_cpu_kernel()
        for directory in sorted(store.iterdir()):
            engine.load_adapter(directory.name, directory)
        work = http_bench.workload(shape)
        params = SamplingParams(max_tokens=work.max_tokens, temperature=0, ignore_eos=True)
        together = engine.generate(work.prompts, params, work.models)
        by_eight = [out for i in range(0, len(work.prompts), 8)
                    for out in engine.generate(work.prompts[i:i + 8], params, work.models[i:i + 8])]
        same = sum(a.token_ids == b.token_ids for a, b in zip(together, by_eight))
        print(f"equal token ids, 64 at once vs 8 at a time: {same}/{len(together)}")
        tokenizer = engine.tokenizers.of(None)
        shown = 0
        for index, (a, b) in enumerate(zip(together, by_eight)):
            step = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
            if step is None or shown == SHOWN:
                continue
            shown += 1
            reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                                  store / work.models[index]).eval()
            history = torch.tensor([tokenizer.encode(work.prompts[index]) + a.token_ids[:step]])
            with torch.inference_mode():
                logits = reference(input_ids=history).logits[0, -1]
            print(f"request {index}, token {step}: 64 at once chose {a.token_ids[step]} "
                  f"(PEFT logit {logits[a.token_ids[step]].item():.6f}), 8 at a time {b.token_ids[step]} "
                  f"({logits[b.token_ids[step]].item():.6f}); PEFT's argmax {logits.argmax().item()}")


if __name__ == "__main__":
    main()
