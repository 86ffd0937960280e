"""Small random models, tokenizers and PEFT adapters built on the spot: nothing is downloaded."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, LlamaConfig, PreTrainedModel

from server.config import Settings
from server.demo.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, byte_tokenizer  # noqa: F401 (re-exported)
from server.engine.engine import LLMEngine
from server.engine.model_loader import load_tokenizer

VOCAB = VOCAB_SIZE


def llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def gpt2_config(**overrides) -> GPT2Config:
    values = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return GPT2Config(**values)


def build_model(config, seed: int = 0, std: float = 0.08) -> PreTrainedModel:
    """A random model from a config, matrices drawn with `std` (GPT-2 needs ~0.3 to not repeat itself)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, std)
    return model.eval()


def save_model(model: PreTrainedModel, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    byte_tokenizer().save_pretrained(directory)
    return directory


ADAPTER_NOISE = 0.3  # the std of A and B at the test models' width (hidden 64)


def adapter_noise_for(hidden: int) -> float:
    """A and B's std at a wider model, keeping the update about as strong as at hidden 64: it grows like
    noise² · √(hidden · r). A fixed 0.3 at hidden 768 made every layer's activations ~100x the base's, and
    float32 rounding alone then changed greedy tokens (fp32 PEFT was 1.0 logprob from fp64 PEFT)."""
    return ADAPTER_NOISE * (64 / hidden) ** 0.75


def make_adapter(model_dir: Path, directory: Path, seed: int, noise_std: float = ADAPTER_NOISE, **lora_kwargs) -> Path:
    """A PEFT adapter on a fresh copy of the base, with non-zero B (PEFT's init makes B = 0): A and B drawn
    with std `noise_std` (see adapter_noise_for)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    config = LoraConfig(**lora_kwargs)
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" not in name:
                continue
            draw = torch.randn(param.shape, generator=generator)
            if "lora_magnitude" in name:  # PEFT starts m at ‖W‖: move it so DoRA's rescaling shows
                param.mul_(1 + 0.2 * draw)
            else:
                param.copy_(noise_std * draw)
    peft_model.save_pretrained(directory, save_embedding_layers=False)
    return directory


def resize_favouring_new_tokens(model: PreTrainedModel, vocabulary: int, seed: int) -> None:
    """Resize the vocabulary as before training with new tokens; each new head row is a stronger copy of the
    row of a token the base emits, so greedy decoding emits the new ids (tests/test_resized_vocabulary.py)."""
    old = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, old, (1, 6), generator=generator)
    with torch.no_grad():
        emitted = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 6:]
    model.resize_token_embeddings(vocabulary, mean_resizing=False)
    source = emitted[torch.randperm(len(emitted), generator=generator)].repeat(vocabulary)[:vocabulary - old]
    with torch.no_grad():
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embed[old:] = embed[source] + 0.05 * torch.randn(len(source), embed.shape[1], generator=generator)
        # Each new head row its own scale: two rows copied from one source would tie exactly, and which of
        # two equal logits a blocked matmul rounds higher differs between implementations.
        head[old:] = head[source] * (2.5 + 0.05 * torch.rand(len(source), 1, generator=generator))


def make_engine(model_dir: Path, **settings) -> LLMEngine:
    from server.engine.model_loader import load_base_model

    values = dict(model=model_dir, dtype="float32", device="cpu", kv_cache_memory=32 * 1024**2, max_loras=16,
                  max_lora_rank=64, max_num_seqs=64, merged_budget=0)
    values.update(settings)
    config = Settings(**values)
    model = load_base_model(model_dir, torch.float32, torch.device("cpu"))
    return LLMEngine(model, load_tokenizer(model_dir), config)
