"""Prefix caching: outputs with it on equal outputs with it off (and PEFT's), token for token; cached KV
blocks are shared only where the keys and values are equal, never across adapter versions, and survive
neither eviction nor preemption wrongly."""

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.kv_cache import KVShape
from server.engine.model_loader import kv_shape
from server.engine.prefix_keys import BASE_KEY, prefix_cache_key
from server.engine.sequence import SamplingParams
from server.lora.adapter import load_lora_adapter
from tests.conftest import reference_greedy
from tests.factories import make_engine
from tests.server_harness import RunningServer

BLOCK = 4
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SYSTEM = [(7 * i + 3) % 250 + 3 for i in range(37)]  # a shared "system prompt": 9 full blocks and a bit
TURNS = [[11, 12, 13], [40, 41], [99, 98, 97, 96, 95], [5]]

ADAPTERS = {
    # q/v on every layer: every later layer's keys and values change
    "qv": dict(seed=61, target_modules=["q_proj", "v_proj"]),
    # the first layer's MLP only: layer 1's keys and values change (its input does)
    "mlp0": dict(seed=62, target_modules=r".*layers\.0\.mlp\.(gate_proj|up_proj|down_proj)"),
    # the last layer's q/o projections and MLP: no key or value changes, so the base's blocks serve it
    "last": dict(seed=63, target_modules=r".*layers\.1\.(self_attn\.(q_proj|o_proj)|mlp\.down_proj)"),
    # LoRA on the LM head: after every layer, so the base's blocks serve it too
    "head": dict(seed=65, target_modules=["lm_head"]),
    # LoRA on the embeddings: every layer's input changes
    "embed": dict(seed=66, target_modules=["embed_tokens"]),
}


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {name: llama_adapters(f"prefix-{name}", r=4, lora_alpha=8, **kw) for name, kw in ADAPTERS.items()}


def _engine(llama_dir, adapter_dirs, **settings):
    engine = make_engine(llama_dir, kv_block_size=BLOCK, **settings)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    return engine


def _workload() -> list[tuple[list[int], str | None]]:
    """Every adapter and the base, each with every turn after the shared system prompt."""
    return [(SYSTEM + turn, adapter) for turn in TURNS for adapter in (None, *ADAPTERS)]


def _run_waves(engine, cases, waves: int = 2) -> list[list[int]]:
    """Each wave one batch (the blocks a wave fills are cached for the next); returns every output."""
    outputs = []
    for _ in range(waves):
        outputs += [c.token_ids for c in engine.generate([p for p, _ in cases], GREEDY, [a for _, a in cases])]
    return outputs


def test_the_rule_of_which_adapters_share_the_bases_blocks(llama_dir, adapter_dirs):
    engine = _engine(llama_dir, adapter_dirs)
    layers = kv_shape(engine.model).num_layers
    keys = {name: prefix_cache_key("t", engine.adapters[name], layers)[1] for name in ADAPTERS}
    assert keys == {"qv": "adapter:qv", "mlp0": "adapter:mlp0", "last": BASE_KEY, "head": BASE_KEY,
                    "embed": "adapter:embed"}


def _peft_keys_and_values(llama_dir, adapter_dir) -> list[torch.Tensor]:
    """Per layer, the keys and values transformers (with PEFT) computes for SYSTEM."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.inference_mode():
        cache = model.eval()(input_ids=torch.tensor([SYSTEM]), use_cache=True).past_key_values
    return [torch.cat([layer.keys, layer.values]) for layer in cache.layers]


def test_the_rule_holds_in_transformers_own_keys_and_values(llama_dir, adapter_dirs):
    """The proof of the rule, from transformers' cache: the 'last' adapter's keys and values equal the
    base's in every layer (so serving it from the base's blocks is exact); 'mlp0' leaves layer 0 alone and
    changes layer 1; 'qv' changes layer 0 already."""
    base = _peft_keys_and_values(llama_dir, None)
    kv = {name: _peft_keys_and_values(llama_dir, path) for name, path in adapter_dirs.items()}
    assert all(torch.equal(a, b) for a, b in zip(kv["last"], base))
    assert all(torch.equal(a, b) for a, b in zip(kv["head"], base))
    assert not torch.allclose(kv["embed"][0], base[0])
    assert torch.equal(kv["mlp0"][0], base[0]) and not torch.allclose(kv["mlp0"][1], base[1])
    assert not torch.allclose(kv["qv"][0], base[0])


def test_outputs_equal_with_caching_on_and_off(llama_dir, adapter_dirs):
    cases = _workload()
    on = _engine(llama_dir, adapter_dirs)
    off = _engine(llama_dir, adapter_dirs, enable_prefix_caching=False)
    with_cache = _run_waves(on, cases)
    assert with_cache == _run_waves(off, cases)
    assert len({tuple(t) for t in with_cache}) > len(cases) // 2, "the adapters and turns change the outputs"
    snapshot = on.snapshot()
    assert snapshot.prefix_hit_tokens >= len(cases) * (len(SYSTEM) // BLOCK) * BLOCK  # the second wave at least
    assert off.snapshot().prefix_hit_tokens == 0


def test_outputs_equal_peft_when_served_from_shared_blocks(llama_dir, adapter_dirs):
    """The 'last' and 'head' adapters served on the base's cached blocks, against PEFT."""
    engine = _engine(llama_dir, adapter_dirs)
    engine.generate([SYSTEM + TURNS[0]], GREEDY, [None])
    prompt = SYSTEM + TURNS[1]
    for adapter in ("last", "head"):
        engine.add_request(adapter, prompt, GREEDY, adapter)
        outputs = [out for _ in range(GREEDY.max_tokens) for out in engine.step()]
        assert outputs[-1].finished and outputs[0].cached_tokens == len(SYSTEM) // BLOCK * BLOCK
        tokens = [t for out in outputs for t in out.token_ids]
        assert tokens == reference_greedy(llama_dir, prompt, GREEDY.max_tokens, adapter_dirs[adapter]), adapter
        assert tokens != reference_greedy(llama_dir, prompt, GREEDY.max_tokens), adapter


def test_adapters_that_change_keys_never_use_the_bases_blocks(llama_dir, adapter_dirs):
    engine = _engine(llama_dir, adapter_dirs)
    engine.generate([SYSTEM + TURNS[0]], GREEDY, [None])
    for adapter in ("qv", "mlp0", "embed"):
        hits = engine.snapshot().prefix_hit_tokens
        got = engine.generate([SYSTEM + TURNS[1]], GREEDY, [adapter])[0].token_ids
        assert engine.snapshot().prefix_hit_tokens == hits, adapter
        assert got == reference_greedy(llama_dir, SYSTEM + TURNS[1], GREEDY.max_tokens, adapter_dirs[adapter])


def test_a_new_version_never_reuses_the_old_ones_blocks(llama_dir, llama_adapters, adapter_dirs):
    """Versions are distinct engine names (name@1, name@2); a name given other weights (an engine-level
    replace, or a deleted name coming back) forgets its cached blocks."""
    engine = make_engine(llama_dir, kv_block_size=BLOCK)
    targets = engine.targets
    v1, v2 = adapter_dirs["qv"], llama_adapters("prefix-qv-v2", seed=64, r=4, lora_alpha=8,
                                               target_modules=["q_proj", "v_proj"])
    prompt = SYSTEM + TURNS[2]

    def load(name, path):
        return load_lora_adapter(path, targets, name=name, max_rank=64, dtype=torch.float32)

    engine.add_adapter(load("tuned@1", v1))
    assert engine.generate([prompt], GREEDY, ["tuned@1"])[0].token_ids == reference_greedy(llama_dir, prompt, 8, v1)
    for replacement in ("tuned@2", "tuned@1"):  # a new version; then the old name with the new weights
        engine.add_adapter(load(replacement, v2))
        hits = engine.snapshot().prefix_hit_tokens
        got = engine.generate([prompt], GREEDY, [replacement])[0].token_ids
        assert engine.snapshot().prefix_hit_tokens == hits, replacement
        assert got == reference_greedy(llama_dir, prompt, 8, v2), replacement
    assert engine.generate([prompt], GREEDY, ["tuned@2"])[0].token_ids == reference_greedy(llama_dir, prompt, 8, v2)
    assert engine.snapshot().prefix_hit_tokens > hits  # its own blocks are found again


def test_tenants_never_share_cached_blocks(llama_dir, adapter_dirs):
    """One tenant's cached prompt is found by that tenant only (a first token that comes faster would tell
    another tenant what the prompt begins with)."""
    engine = _engine(llama_dir, adapter_dirs)
    prompt = SYSTEM + TURNS[0]

    def cached(request_id: str, tenant: str | None) -> int:
        engine.add_request(request_id, prompt, GREEDY, None, tenant=tenant)
        outputs = [out for _ in range(GREEDY.max_tokens) for out in engine.step()]
        assert outputs[-1].finished
        return outputs[0].cached_tokens

    assert cached("a1", "tenant-a") == 0
    assert cached("b1", "tenant-b") == 0 and cached("n1", None) == 0
    assert cached("a2", "tenant-a") == cached("b2", "tenant-b") == cached("n2", None) == len(SYSTEM) // BLOCK * BLOCK


def test_outputs_stay_exact_after_eviction(llama_dir, adapter_dirs):
    """A cache of 40 blocks: every wave evicts what the previous one cached."""
    bytes_per_block = KVShape(2, 2, 16).bytes_per_token(torch.float32) * BLOCK
    cases = _workload()
    small = _engine(llama_dir, adapter_dirs, kv_cache_memory=40 * bytes_per_block, max_num_seqs=2)
    assert small.kv_cache.allocator.num_blocks == 40
    big = _engine(llama_dir, adapter_dirs, enable_prefix_caching=False)
    assert _run_waves(small, cases, waves=3) == _run_waves(big, cases, waves=3)
    snapshot = small.snapshot()
    assert snapshot.prefix_evictions > 0 and snapshot.prefix_hit_tokens > 0
    assert small.kv_cache.allocator.num_free == 40, "every block free (cached or not) once the work is done"


def test_outputs_stay_exact_under_preemption(llama_dir, adapter_dirs):
    """Twelve long generations sharing a prefix in a cache that holds a few of them: sequences are preempted,
    recomputed (finding their own cached blocks again) and still give what an unconstrained engine does."""
    bytes_per_block = KVShape(2, 2, 16).bytes_per_token(torch.float32) * BLOCK
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    cases = [(SYSTEM + [i + 3], (None, *ADAPTERS)[i % 4]) for i in range(12)]
    tight = _engine(llama_dir, adapter_dirs, kv_cache_memory=60 * bytes_per_block)
    roomy = _engine(llama_dir, adapter_dirs, enable_prefix_caching=False)
    got = tight.generate([p for p, _ in cases], long, [a for _, a in cases])
    want = roomy.generate([p for p, _ in cases], long, [a for _, a in cases])
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert tight.snapshot().preemptions > 0 and tight.snapshot().prefix_hit_tokens > 0


def test_prompt_logprobs_requests_compute_their_whole_prompt(llama_dir, adapter_dirs):
    """They need the logits at every prompt position: no cached prefix is used, the logprobs equal the
    ones without caching."""
    engine = _engine(llama_dir, adapter_dirs)
    off = _engine(llama_dir, adapter_dirs, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    engine.generate([SYSTEM], GREEDY, [None])
    engine.add_request("p", SYSTEM, params)
    off.add_request("p", SYSTEM, params)
    first, reference = engine.step()[0], off.step()[0]
    assert first.cached_tokens == 0
    assert [round(e.logprob, 4) for e in first.prompt_logprobs] == [round(e.logprob, 4) for e in reference.prompt_logprobs]


def test_usage_reports_cached_tokens_and_metrics_the_hit_rate(llama_dir, adapter_dirs, tmp_path):
    settings = Settings(model=llama_dir, adapters_dir=tmp_path, dtype="float32", device="cpu",
                        kv_cache_memory=16 * 1024**2, kv_block_size=BLOCK, served_model_name="tiny")
    prompt = SYSTEM + TURNS[0]
    with RunningServer(settings) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
        second = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 20}],
                                              max_tokens=2, temperature=0)
        chat_again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 20}],
                                                    max_tokens=2, temperature=0)
        metrics = httpx.get(server.url + "/metrics").text
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK
    assert second.choices[0].text == first.choices[0].text
    assert chat_again.usage.prompt_tokens_details.cached_tokens > chat.usage.prompt_tokens_details.cached_tokens
    hit_rate = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("loraserve_prefix_cache_hit_rate "))
    assert 0 < hit_rate < 1
    assert "loraserve_prefix_cache_blocks " in metrics
