"""When every layer of a model attends to a sliding window, the KV blocks that fell out of the window are
given back while the sequence runs, and other sequences reuse them; outputs stay equal to transformers'.
A model with a global layer (Gemma-2/3) or a LongRoPE recompute keeps every block."""

import pytest
import torch
import transformers as tf
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.engine.model_loader import kv_shape, kv_window
from server.engine.sequence import SamplingParams
from tests.factories import VOCAB, build_model, make_adapter, make_engine, save_model

WINDOW = 5
BLOCK = 2
NEW_TOKENS = 34
PROMPTS = [[5, 40, 77, 9], [120, 7, 7, 64, 33, 90], [200, 15, 88]]
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
              hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    root = tmp_path_factory.mktemp("window_blocks")
    base = save_model(build_model(tf.MistralConfig(**COMMON, sliding_window=WINDOW)), root / "base")
    adapter = make_adapter(base, root / "adapter", seed=5, r=4, lora_alpha=8, target_modules="all-linear")
    return base, adapter


def _reference(base, adapter, prompt):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        out = model.eval().generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                    max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_blocks_out_of_the_window_are_reused_and_outputs_stay_exact(mistral):
    base, adapter = mistral
    shape = kv_shape(make_engine(base).model)
    bytes_per_block = shape.bytes_per_token(torch.float32) * BLOCK
    # 24 blocks of 2 tokens: one sequence of 4 + 34 tokens fits, the three together (about 120 tokens,
    # 60 blocks) only if the blocks behind the window come back.
    engine = make_engine(base, kv_cache_memory=24 * bytes_per_block, kv_block_size=BLOCK)
    engine.load_adapter("all-linear", adapter)
    assert kv_window(engine.model) == WINDOW and engine.scheduler.kv_window == WINDOW
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    adapters = [None, "all-linear", None]
    for i, (prompt, name) in enumerate(zip(PROMPTS, adapters)):
        engine.add_request(f"r{i}", prompt, params, name)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    most_dropped = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        most_dropped = max([most_dropped, *(s.dropped_blocks for s in engine.scheduler.running)])
    assert most_dropped >= 10, "blocks behind the window should have gone back to the allocator"
    assert engine.scheduler.preemptions == 0, "with the blocks back, the three sequences fit side by side"
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.allocator.num_blocks, "every block returned once"
    expected = [_reference(base, adapter if name else None, prompt) for prompt, name in zip(PROMPTS, adapters)]
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == expected


def test_a_global_layer_keeps_every_block(tmp_path):
    config = tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW)  # local and global layers alternate
    base = save_model(build_model(config), tmp_path / "base")
    engine = make_engine(base)
    assert kv_window(engine.model) is None and engine.scheduler.kv_window is None


def test_a_longrope_model_keeps_every_block(tmp_path):
    """Its sequences are computed again from the first token when they cross the original context."""
    longrope = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=12,
                    short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[3.0 + i for i in range(8)])
    config = tf.Phi3Config(**COMMON, sliding_window=WINDOW, rope_parameters=longrope,
                           original_max_position_embeddings=12)
    base = save_model(build_model(config), tmp_path / "base")
    assert kv_window(make_engine(base).model) is None
