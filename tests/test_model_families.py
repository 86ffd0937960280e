"""Every popular decoder family, each built tiny and random with its own features switched on: greedy
float32 output of the engine equals transformers' eager `generate` (base) and PEFT's (an adapter on every
linear layer), one prompt at a time and in one mixed batch; the families the engine cannot serve exactly
are refused at load, naming the reason. README's "Model families" section is rendered from `FAMILIES`."""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.engine.compatibility import UnsupportedModelError
from server.engine.model_loader import load_base_model
from server.engine.sequence import SamplingParams
from server.errors import AdapterValidationError
from tests.factories import VOCAB, build_model, make_adapter, make_engine, save_model

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_NEW = 10
WINDOW = 5  # smaller than every test context
ORIGINAL_CONTEXT = 12  # LongRoPE's switch from short to long factors
# Lengths 3 (+10 crosses ORIGINAL_CONTEXT while decoding), 9 (crosses early), 14 (long from the start).
PROMPTS = [[5, 40, 77], [120, 7, 7, 64, 33, 90, 18, 4, 61], [200, 15, 88, 31, 45, 46, 47, 12, 3, 9, 150, 22, 71, 8]]
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)

COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
LLAMA_LIKE = dict(COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
ATTENTION_ONLY = ("q_proj", "k_proj", "v_proj", "o_proj")
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=ORIGINAL_CONTEXT,
                short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[3.0 + i for i in range(8)])


@dataclass(frozen=True)
class Family:
    """A family as the matrix builds it: its config with the feature on, and (for the proof that the
    feature matters) the config overrides that switch it off. `refused` is part of the load error."""

    name: str
    config: tf.PreTrainedConfig
    feature: str = ""
    feature_off: dict = field(default_factory=dict)
    refused: str = ""
    std: float = 0.08
    # PEFT's "all-linear" on a MoE model also targets the experts' 3-D parameters (`target_parameters`),
    # which the engine refuses: there the adapter targets every nn.Linear outside the experts by name.
    adapter_targets: str | tuple[str, ...] = "all-linear"

    @property
    def key(self) -> str:
        return self.name.lower().replace(" ", "-")


FAMILIES = [
    Family("Llama", tf.LlamaConfig(**LLAMA_LIKE)),
    Family("Mistral", tf.MistralConfig(**LLAMA_LIKE, sliding_window=WINDOW), "sliding window",
           dict(sliding_window=None)),
    Family("Qwen2", tf.Qwen2Config(**LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=1), "sliding window on layer 2",
           dict(sliding_window=4096)),
    Family("Qwen3", tf.Qwen3Config(**LLAMA_LIKE, head_dim=16)),
    Family("Gemma", tf.GemmaConfig(**LLAMA_LIKE, head_dim=16)),
    Family("Gemma-2", tf.Gemma2Config(**LLAMA_LIKE, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=0.5,
                                      query_pre_attn_scalar=16),
           "logit soft-cap, sliding window on layer 1", dict(attn_logit_softcapping=None, sliding_window=4096)),
    Family("Gemma-3", tf.Gemma3TextConfig(**LLAMA_LIKE, head_dim=16, sliding_window=WINDOW,
                                          layer_types=["sliding_attention", "full_attention"]),
           "local/global layers", dict(sliding_window=4096)),
    Family("Phi-3", tf.Phi3Config(**LLAMA_LIKE, original_max_position_embeddings=ORIGINAL_CONTEXT,
                                  rope_parameters=LONGROPE),
           "LongRoPE", dict(rope_parameters=dict(LONGROPE, long_factor=LONGROPE["short_factor"]))),
    Family("StarCoder2", tf.Starcoder2Config(**LLAMA_LIKE, sliding_window=WINDOW), "sliding window",
           dict(sliding_window=None)),
    Family("OLMo-2", tf.Olmo2Config(**LLAMA_LIKE)),
    Family("GPT-NeoX", tf.GPTNeoXConfig(**COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=256), std=0.2),
    Family("GPT-2", tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0), std=0.3),
    Family("GPTBigCode", tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0), std=0.3),
    Family("Mixtral", tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2,
                                       sliding_window=WINDOW), "sliding window, experts",
           dict(sliding_window=None), adapter_targets=ATTENTION_ONLY),
    Family("Qwen3-MoE", tf.Qwen3MoeConfig(**LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32), "experts", adapter_targets=ATTENTION_ONLY),
    Family("Cohere", tf.CohereConfig(**LLAMA_LIKE)),
    Family("Granite", tf.GraniteConfig(**LLAMA_LIKE)),
    Family("Phi", tf.PhiConfig(**dict(LLAMA_LIKE, num_key_value_heads=4))),
    Family("GPT-OSS", tf.GptOssConfig(**LLAMA_LIKE, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
           "attention sinks, sliding window on layer 1", dict(sliding_window=4096), adapter_targets=ATTENTION_ONLY),
    Family("Ministral", tf.MinistralConfig(**LLAMA_LIKE, head_dim=16, sliding_window=WINDOW,
                                           layer_types=["sliding_attention", "full_attention"]),
           "sliding window on layer 1", dict(sliding_window=4096)),
    Family("Cohere2", tf.Cohere2Config(**LLAMA_LIKE, sliding_window=WINDOW,
                                       layer_types=["sliding_attention", "full_attention"]),
           "sliding window on layer 1", dict(sliding_window=4096)),
    Family("OLMo-3", tf.Olmo3Config(**LLAMA_LIKE, sliding_window=WINDOW,
                                    layer_types=["sliding_attention", "full_attention"]),
           "sliding window on layer 1", dict(sliding_window=4096)),
    Family("EXAONE-4", tf.Exaone4Config(**LLAMA_LIKE, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"]),
           "sliding window on layer 1", dict(sliding_window=4096)),
    Family("SmolLM3", tf.SmolLM3Config(**LLAMA_LIKE, no_rope_layers=[1, 0]), "a layer without rope",
           dict(no_rope_layers=[1, 1])),
    Family("Qwen2-MoE", tf.Qwen2MoeConfig(**LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32), "experts",
           adapter_targets=ATTENTION_ONLY),
    Family("PhiMoE", tf.PhimoeConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2), "experts",
           adapter_targets=ATTENTION_ONLY),
    Family("Helium", tf.HeliumConfig(**LLAMA_LIKE, head_dim=16)),
    Family("GLM-4", tf.Glm4Config(**LLAMA_LIKE, head_dim=16)),
    Family("Seed-OSS", tf.SeedOssConfig(**LLAMA_LIKE, head_dim=16)),
    Family("Bloom", tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
           refused="its attention does not go through transformers' attention interface"),
    Family("MPT", tf.MptConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2),
           refused="its attention does not go through transformers' attention interface"),
    Family("Falcon", tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2),
           refused="its attention does not go through transformers' attention interface"),
    Family("StableLM", tf.StableLmConfig(**LLAMA_LIKE),
           refused="its attention does not go through transformers' attention interface"),
    Family("Nemotron", tf.NemotronConfig(**LLAMA_LIKE, head_dim=16),
           refused="its layers do not hand the forward's keyword arguments on to the attention function"),
    Family("GPT-Neo", tf.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                      attention_types=[[["global", "local"], 1]], window_size=WINDOW),
           refused="its attention does not go through transformers' attention interface"),
    Family("DeepSeek-V3", tf.DeepseekV3Config(**dict(LLAMA_LIKE, num_key_value_heads=4), q_lora_rank=None,
                                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                              v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                              first_k_dense_replace=1, moe_intermediate_size=32, n_group=1,
                                              topk_group=1),
           refused="its attention's keys differ from the KV cache's shape"),
    Family("Llama-4", tf.Llama4TextConfig(**LLAMA_LIKE, head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                                          attention_chunk_size=8, no_rope_layers=[1, 0]),
           refused="layer types chunked_attention are not implemented by the engine's paged attention"),
    Family("Gemma-3 bidirectional", tf.Gemma3TextConfig(**LLAMA_LIKE, head_dim=16, use_bidirectional_attention=True),
           refused="bidirectional attention (the engine attends causally)"),
    Family("Llama with LongRoPE", tf.LlamaConfig(**LLAMA_LIKE, rope_parameters=LONGROPE),
           refused="LongRoPE on model type 'llama', whose generate keeps keys computed with the short factors"),
]
SERVED = [f for f in FAMILIES if not f.refused]
WITH_FEATURE = [f for f in SERVED if f.feature_off]
REFUSED = [f for f in FAMILIES if f.refused]


def families_section() -> str:
    """README's "Model families" section (between its heading and the next one)."""
    served = "\n".join(f"| {f.name} | {f.config.model_type} | {f.feature or '-'} |" for f in SERVED)
    refused = "\n".join(f"| {f.name} | {f.config.model_type} | {f.refused} |" for f in REFUSED)
    return (
        "Served exactly (greedy float32 output equal to transformers' and PEFT's, base and an adapter on every\n"
        "linear layer, alone and in a mixed batch; `tests/test_model_families.py`, tiny random models with the\n"
        "feature switched on):\n\n"
        "| family | model_type | feature tested |\n| --- | --- | --- |\n" + served + "\n\n"
        "Refused at load, before the server reports ready (the error names the architecture and the reason):\n\n"
        "| family | model_type | reason |\n| --- | --- | --- |\n" + refused + "\n"
    )


class FamilyModels:
    """Each family's saved base, adapter, engine and reference models, built once per test session."""

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[str, tuple[Path, Path]] = {}
        self._engines: dict = {}
        self._references: dict = {}
        self._greedy: dict = {}

    def dirs(self, family: Family) -> tuple[Path, Path]:
        if family.key not in self._dirs:
            base = save_model(build_model(family.config, std=family.std), self.root / family.key / "base")
            adapter = make_adapter(base, self.root / family.key / "adapter", seed=3, r=4, lora_alpha=8,
                                   target_modules=family.adapter_targets)
            self._dirs[family.key] = base, adapter
        return self._dirs[family.key]

    def engine(self, family: Family):
        if family.key not in self._engines:
            base, adapter = self.dirs(family)
            engine = make_engine(base)
            engine.load_adapter("all-linear", adapter)
            self._engines[family.key] = engine
        return self._engines[family.key]

    def reference(self, family: Family, with_adapter: bool, feature_on: bool = True):
        key = family.key, with_adapter, feature_on
        if key not in self._references:
            base, adapter = self.dirs(family)
            overrides = {} if feature_on else family.feature_off
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager",
                                                         **overrides)
            self._references[key] = (PeftModel.from_pretrained(model, adapter) if with_adapter else model).eval()
        return self._references[key]

    def greedy(self, family: Family, prompt: list[int], with_adapter: bool, feature_on: bool = True) -> list[int]:
        key = family.key, tuple(prompt), with_adapter, feature_on
        if key not in self._greedy:
            self._greedy[key] = _greedy(self.reference(family, with_adapter, feature_on), prompt)
        return self._greedy[key]


def _greedy(model, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> FamilyModels:
    return FamilyModels(tmp_path_factory.mktemp("families"))


def _ids(families):
    return [f.key for f in families]


@pytest.mark.parametrize("family", WITH_FEATURE, ids=_ids(WITH_FEATURE))
def test_feature_changes_transformers_output(models, family):
    """Without this the equalities below would prove nothing about the feature."""
    on = [models.greedy(family, p, False) for p in PROMPTS]
    off = [models.greedy(family, p, False, feature_on=False) for p in PROMPTS]
    assert on != off


@pytest.mark.parametrize("family", SERVED, ids=_ids(SERVED))
def test_base_matches_transformers(models, family):
    engine = models.engine(family)
    for prompt in PROMPTS:
        assert engine.generate([prompt], GREEDY, [None])[0].token_ids == models.greedy(family, prompt, False)


@pytest.mark.parametrize("family", SERVED, ids=_ids(SERVED))
def test_all_linear_adapter_matches_peft(models, family):
    engine = models.engine(family)
    assert models.greedy(family, PROMPTS[2], True) != models.greedy(family, PROMPTS[2], False)
    for prompt in PROMPTS:
        assert engine.generate([prompt], GREEDY, ["all-linear"])[0].token_ids == models.greedy(family, prompt, True)


@pytest.mark.parametrize("family", SERVED, ids=_ids(SERVED))
def test_mixed_batch_matches_each_alone(models, family):
    """Prompts of different lengths, with and without the adapter, in one batch: each as if alone."""
    cases = [(p, a) for p in PROMPTS for a in (None, "all-linear")]
    got = models.engine(family).generate([p for p, _ in cases], GREEDY, [a for _, a in cases])
    for (prompt, adapter), completion in zip(cases, got):
        assert completion.token_ids == models.greedy(family, prompt, adapter is not None), (len(prompt), adapter)


def test_attention_sinks_change_transformers_output(models):
    """GPT-OSS's sinks are not a config switch: a sink at −∞ takes no share, which is attention without one."""
    gpt_oss = next(f for f in SERVED if f.name == "GPT-OSS")
    with_sinks = models.greedy(gpt_oss, PROMPTS[2], False)
    model = AutoModelForCausalLM.from_pretrained(models.dirs(gpt_oss)[0], dtype=torch.float32,
                                                 attn_implementation="eager")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))
    assert _greedy(model.eval(), PROMPTS[2]) != with_sinks


def test_longrope_short_request_ignores_a_long_neighbour(models):
    """A sequence that stays within LongRoPE's original context keeps the short factors while a long one
    shares its steps (packed naively, the batch's largest position would pick the long factors for both)."""
    phi3 = next(f for f in SERVED if f.name == "Phi-3")
    short = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert len(PROMPTS[0]) + short.max_tokens <= ORIGINAL_CONTEXT < len(PROMPTS[2])
    engine = models.engine(phi3)
    alone = engine.generate([PROMPTS[0]], short, [None])[0].token_ids
    beside_long = engine.generate([PROMPTS[0], PROMPTS[2]], short, [None, None])[0].token_ids
    assert alone == beside_long == models.greedy(phi3, PROMPTS[0], False)[:short.max_tokens]


def test_expert_lora_is_refused_by_name(models, tmp_path):
    """PEFT's all-linear on Mixtral carries `target_parameters` (LoRA on the experts' 3-D weights): refused
    with the field named, not served wrong."""
    mixtral = next(f for f in SERVED if f.name == "Mixtral")
    base, _ = models.dirs(mixtral)
    experts = make_adapter(base, tmp_path / "experts", seed=4, r=4, lora_alpha=8, target_modules="all-linear")
    with pytest.raises(AdapterValidationError, match="target_parameters"):
        models.engine(mixtral).load_adapter("experts", experts)


@pytest.mark.parametrize("family", SERVED, ids=_ids(SERVED))
def test_late_arrivals_prefill_beside_running_decodes(models, family):
    """Requests that arrive while others decode: prefills and decodes share steps (for LongRoPE, short and
    long factors share them too); each still as if alone."""
    engine = models.engine(family)
    arrivals = {0: (PROMPTS[2], "all-linear"), 3: (PROMPTS[0], None), 5: (PROMPTS[1], "all-linear")}
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    step = 0
    while len(finished) < len(arrivals):
        if step in arrivals:
            prompt, adapter = arrivals[step]
            engine.add_request(f"late-{step}", prompt, GREEDY, adapter)
            tokens[f"late-{step}"] = []
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            finished |= {out.request_id} if out.finished else set()
        step += 1
    for step, (prompt, adapter) in arrivals.items():
        assert tokens[f"late-{step}"] == models.greedy(family, prompt, adapter is not None), step


@pytest.mark.parametrize("family", REFUSED, ids=_ids(REFUSED))
def test_refused_at_load_with_the_reason(tmp_path, family):
    base = save_model(build_model(family.config), tmp_path / "base")
    with pytest.raises(UnsupportedModelError) as refusal:
        load_base_model(base, torch.float32, torch.device("cpu"))
    architecture = json.loads((base / "config.json").read_text())["architectures"][0]
    assert str(refusal.value).startswith(f"{architecture}: ")
    assert family.refused in str(refusal.value)


def test_readme_lists_the_families_of_this_matrix():
    text = README.read_text()
    section = text.split("## Model families\n\n", 1)[1].split("\n## ", 1)[0]
    assert section == families_section()


@pytest.mark.parametrize("family", SERVED, ids=_ids(SERVED))
def test_chunked_prefill_and_prefix_cache_match_transformers(models, family):
    """Prompts prefilled 4 tokens a step beside running decodes, then sent again and continued (a chat's
    next turn: the earlier answer inside the new prompt), with 4-token blocks cached in between: every
    output as transformers' (LongRoPE models chunk but never share blocks: their keys depend on the
    length a sequence reaches)."""
    base, adapter = models.dirs(family)
    engine = make_engine(base, kv_block_size=4)
    engine.load_adapter("all-linear", adapter)
    engine.scheduler.limits = replace(engine.scheduler.limits, max_batch_tokens=4)
    first = [(p, a) for p in PROMPTS for a in (None, "all-linear")]
    answers = engine.generate([p for p, _ in first], GREEDY, [a for _, a in first])
    follow_ups = [(p + answer.token_ids + [9, 10, 11], a) for (p, a), answer in zip(first, answers)]
    again = engine.generate([p for p, _ in first + follow_ups], GREEDY, [a for _, a in first + follow_ups])
    for (prompt, adapter_name), completion in zip(first + first + follow_ups, answers + again):
        assert completion.token_ids == models.greedy(family, prompt, adapter_name is not None), (len(prompt), adapter_name)
    hits = engine.snapshot().prefix_hit_tokens
    assert hits == 0 if engine.runner.ropes else hits > 0


@pytest.mark.parametrize("family", SERVED, ids=_ids(SERVED))
def test_decodes_through_the_paged_op_match_transformers(models, family):
    """With the C++ decode op installed (decodes read the paged cache in place), a mixed batch still gives
    transformers' and PEFT's tokens."""
    base, adapter = models.dirs(family)
    engine = make_engine(base)
    engine.load_adapter("all-linear", adapter)
    engine.wait_for_cpu_kernel()
    if engine.runner.decode_op is None:
        pytest.skip("no C++ compiler here: the torch path is all there is")
    cases = [(p, a) for p in PROMPTS for a in (None, "all-linear")]
    got = engine.generate([p for p, _ in cases], GREEDY, [a for _, a in cases])
    for (prompt, adapter_name), completion in zip(cases, got):
        assert completion.token_ids == models.greedy(family, prompt, adapter_name is not None), (len(prompt), adapter_name)
