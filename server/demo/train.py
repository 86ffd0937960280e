"""Build the demo: train a tiny byte-level Llama to copy text, then one LoRA adapter per transformation.

Every model learns both ways a client asks: the completion prompt (`text\n`) and the chat template's
(`<|user|>\ntext\n<|assistant|>\n`); each batch holds both, half and half. Everything runs on the CPU
from fixed seeds; `loraserve build-demo` calls `main`.
"""

import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from server.demo import tasks
from server.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, demo_tokenizer

EVAL_SIZE = 50
TARGET = 0.9  # exact match each model must reach on its own task (tests/test_demo.py checks it over HTTP)
OWN_TASK = {"base": tasks.BASE_TASK, **{name: name for name in tasks.ADAPTER_TASKS}}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# rot13 swaps letters: on the input embedding a per-token offset does it, where through the linear layers
# alone training stayed at chance (rank 16 to 64, learning rates 1e-3 to 1e-2, also with the output head).
EXTRA_TARGETS = {"rot13": ["embed_tokens"]}
# reverse needs attention to count positions back: with half of each batch in each format, 800 steps
# reached 80% on completion prompts (copy and upper, 90%+); it trains twice as long.
ADAPTER_STEP_FACTOR = {"reverse": 2}


@dataclass(frozen=True)
class BuildPlan:
    base_dir: Path = Path("demo/base")
    adapters_dir: Path = Path("adapters")
    base_steps: int = 2000
    adapter_steps: int = 800
    batch_size: int = 32
    base_lr: float = 2e-3
    adapter_lr: float = 3e-3
    lora_rank: int = 16
    seed: int = 0


def model_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )


def prompt_text(tokenizer: PreTrainedTokenizerFast, fmt: str, text: str) -> str:
    """The prompt a client's request for `text` becomes: as sent (completions) or through the chat template."""
    if fmt == "chat":
        return tokenizer.apply_chat_template(tasks.messages(text), add_generation_prompt=True, tokenize=False)
    return tasks.prompt(text)


def encode_batch(tokenizer: PreTrainedTokenizerFast, task: str,
                 rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(format, text) rows as prompt + answer + EOS, right-padded; labels only on the answer and EOS."""
    encoded = []
    for fmt, text in rows:
        prompt_ids = tokenizer.encode(prompt_text(tokenizer, fmt, text))
        answer_ids = tokenizer.encode(tasks.answer(task, text)) + [EOS_ID]
        encoded.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded])
    return input_ids, labels


def _batches(tokenizer, task: str, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Both formats in every batch: alternating whole batches let one format drift while the other trained.
    stream = tasks.training_texts(task, seed)
    while True:
        rows = [(tasks.FORMATS[i % len(tasks.FORMATS)], next(stream)) for i in range(batch_size)]
        yield encode_batch(tokenizer, task, rows)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(model: PreTrainedModel, tokenizer, task: str, steps: int, lr: float, batch_size: int,
          seed: int) -> None:
    """Plain AdamW loop on the parameters that require gradients; loss only on the answer tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup))
    model.train()
    batches = _batches(tokenizer, task, batch_size, seed)
    with tqdm(range(steps), desc=f"train {task}", unit="step") as progress:
        for _ in progress:
            input_ids, labels = next(batches)
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()


@torch.inference_mode()
def greedy_answers(model: PreTrainedModel, tokenizer, texts: list[str], fmt: str) -> list[str | None]:
    """Greedy completions of each text's prompt in `fmt` (None where no EOS came), batched by prompt length
    so no row needs padding."""
    by_length: dict[int, list[int]] = {}
    for i, text in enumerate(texts):
        by_length.setdefault(len(text), []).append(i)
    answers: list[str | None] = [None] * len(texts)
    for length, indices in by_length.items():
        input_ids = torch.tensor([tokenizer.encode(prompt_text(tokenizer, fmt, texts[i])) for i in indices])
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=length + 4, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        for i, row in zip(indices, out[:, input_ids.shape[1]:].tolist()):
            if EOS_ID in row:
                answers[i] = tokenizer.decode(row[: row.index(EOS_ID)])
    return answers


def scores(model: PreTrainedModel, tokenizer, texts: list[str]) -> dict[str, dict[str, float]]:
    """Exact-match share (the answer, then EOS) per task judged, per format; one generation per format."""
    answers = {fmt: greedy_answers(model, tokenizer, texts, fmt) for fmt in tasks.FORMATS}
    return {task: {fmt: sum(a == tasks.answer(task, t) for a, t in zip(answers[fmt], texts)) / len(texts)
                   for fmt in tasks.FORMATS}
            for task in tasks.TASKS}


def showcase_misses(model: PreTrainedModel, tokenizer, task: str) -> list[str]:
    """README's example strings this model does not answer exactly, per format (the quickstart must)."""
    return [f"{text!r} ({fmt})" for fmt in tasks.FORMATS
            for text, got in zip(tasks.SHOWCASE, greedy_answers(model, tokenizer, list(tasks.SHOWCASE), fmt))
            if got != tasks.answer(task, text)]


def build_base(plan: BuildPlan, tokenizer) -> PreTrainedModel:
    torch.manual_seed(plan.seed)
    model = LlamaForCausalLM(model_config())
    train(model, tokenizer, tasks.BASE_TASK, plan.base_steps, plan.base_lr, plan.batch_size, seed=plan.seed)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    plan.base_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(plan.base_dir, safe_serialization=True)
    tokenizer.save_pretrained(plan.base_dir)
    return model


def build_adapter(plan: BuildPlan, tokenizer, base: PreTrainedModel, task: str):
    """A LoRA adapter for `task` on the frozen base, saved in PEFT format under adapters_dir/task."""
    from peft import LoraConfig, get_peft_model

    seed = plan.seed + 1 + tasks.ADAPTER_TASKS.index(task)
    torch.manual_seed(seed)
    config = LoraConfig(r=plan.lora_rank, lora_alpha=2 * plan.lora_rank, lora_dropout=0.0,
                        target_modules=LORA_TARGETS + EXTRA_TARGETS.get(task, []), task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    steps = plan.adapter_steps * ADAPTER_STEP_FACTOR.get(task, 1)
    train(model, tokenizer, task, steps, plan.adapter_lr, plan.batch_size, seed=seed * 1000)
    # Ship only the two files the server reads (PEFT also writes a model card README).
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch, save_embedding_layers=False)
        target = plan.adapters_dir / task
        target.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(Path(scratch) / name, target / name)
    return model


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise SystemExit("build-demo trains LoRA adapters with peft, which is not installed: "
                         "pip install -e '.[demo]'") from None


def main(plan: BuildPlan = BuildPlan()) -> int:
    _require_peft()
    # Matrices this small gain nothing from more threads, which would only fight other work on the machine.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.monotonic()
    tokenizer = demo_tokenizer()
    held_out = tasks.held_out_texts(EVAL_SIZE)
    base = build_base(plan, tokenizer)
    results = {"base": scores(base, tokenizer, held_out)}
    misses = {"base": showcase_misses(base, tokenizer, tasks.BASE_TASK)}
    print(_row("base", results["base"]), flush=True)
    for task in tasks.ADAPTER_TASKS:
        # Each adapter trains on a fresh copy of the saved base so no PEFT wiring leaks between them.
        fresh = LlamaForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32)
        model = build_adapter(plan, tokenizer, fresh, task)
        results[task] = scores(model, tokenizer, held_out)
        misses[task] = showcase_misses(model, tokenizer, task)
        print(_row(task, results[task]), flush=True)
    print(_table(results, time.monotonic() - started))
    short = [f"{model} ({fmt})" for model, task in OWN_TASK.items() for fmt in tasks.FORMATS
             if results[model][task][fmt] < TARGET]
    if short:
        print(f"below {TARGET:.0%} on their own task: {', '.join(short)} "
              "(train longer: --base-steps, --adapter-steps)")
        return 1
    wrong = [f"{model}: {', '.join(texts)}" for model, texts in misses.items() if texts]
    if wrong:
        print(f"README's examples answered wrongly: {'; '.join(wrong)} (train longer: --base-steps, --adapter-steps)")
        return 1
    return 0


def _row(model: str, scores: dict[str, dict[str, float]]) -> str:
    cells = (f"{by_format['completion']:>5.0%} {by_format['chat']:>4.0%}" for by_format in scores.values())
    return f"{model:<10}" + "".join(f"{cell:>17}" for cell in cells)


def _table(results: dict[str, dict[str, dict[str, float]]], seconds: float) -> str:
    """Rows: the model served; columns: the task judged; cells: exact match on the held-out strings,
    through the completion prompt, then the chat template."""
    header = f"{'model':<10}" + "".join(f"{name + ' cmp/chat':>17}" for name in tasks.TASKS)
    rows = [_row(model, scores) for model, scores in results.items()]
    return "\n".join([f"exact match, greedy, {EVAL_SIZE} held-out strings ({seconds:.0f} s):", header, *rows])
