"""Merged copies: policy on synthetic traffic, the byte budget, and mixed steps that stay exact."""

import pytest

from server.engine.merging import MergeManager, MergePolicy, TrafficShares
from server.engine.sequence import SamplingParams
from server.lora.targets import find_target_modules
from tests.factories import make_engine

ADAPTERS = {
    "hot": dict(seed=501, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "cold1": dict(seed=502, r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"]),
    "cold2": dict(seed=503, r=16, lora_alpha=16, target_modules=["q_proj", "up_proj"]),
    "dora": dict(seed=504, r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"]),
}
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapter_dirs(llama_adapters):
    return {name: llama_adapters(f"merge_{name}", **kw) for name, kw in ADAPTERS.items()}


def _engine(llama_dir, adapter_dirs, **settings):
    engine = make_engine(llama_dir, **settings)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    return engine


def _workload():
    prompts = [[10 + i, 20 + 2 * i, 30, 40 + i] for i in range(10)]
    names = ["hot"] * 6 + ["cold1", "cold2", None, "hot"]
    return prompts, names


@pytest.fixture(scope="module")
def unmerged(llama_dir, adapter_dirs):
    engine = _engine(llama_dir, adapter_dirs)
    prompts, names = _workload()
    return [engine.generate([p], GREEDY, [n])[0].token_ids for p, n in zip(prompts, names)]


def test_mixed_steps_on_a_merged_copy_give_each_request_its_own_result(llama_dir, adapter_dirs, unmerged):
    engine = _engine(llama_dir, adapter_dirs, merged_budget=64 * 1024**2, merge_promote_share=2.0)
    engine.pin_merged("hot")
    engine.merges.wait_for_builds()
    prompts, names = _workload()
    results = engine.generate(prompts, GREEDY, names)
    assert engine.runner.mixed_merged_steps > 0, "hot, cold and base tokens should have shared merged steps"
    assert [r.token_ids for r in results] == unmerged


def test_dora_in_the_step_falls_back_to_the_base_weights(llama_dir, adapter_dirs, unmerged):
    engine = _engine(llama_dir, adapter_dirs, merged_budget=64 * 1024**2, merge_promote_share=2.0)
    engine.pin_merged("hot")
    engine.merges.wait_for_builds()
    prompts, names = _workload()
    results = engine.generate(prompts[:7] + [prompts[0]], GREEDY, names[:7] + ["dora"])
    assert engine.runner.mixed_merged_steps == 0
    assert [r.token_ids for r in results[:7]] == unmerged[:7]


def test_switching_a_running_adapter_to_its_merged_copy_changes_nothing(llama_dir, adapter_dirs, unmerged):
    engine = _engine(llama_dir, adapter_dirs, merged_budget=64 * 1024**2, merge_promote_share=2.0)
    prompts, names = _workload()
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        engine.add_request(f"r{i}", prompt, GREEDY, name)
    produced = {f"r{i}": [] for i in range(len(prompts))}
    for step in range(12):
        if step == 3:
            engine.pin_merged("hot")
            engine.merges.wait_for_builds()
        if step == 7:
            engine.unpin_merged("hot")
        for out in engine.step():
            produced[out.request_id] += out.token_ids
    assert engine.runner.mixed_merged_steps > 0
    assert [produced[f"r{i}"] for i in range(len(prompts))] == unmerged


def test_automatic_promotion_follows_traffic(llama_dir, adapter_dirs):
    engine = _engine(llama_dir, adapter_dirs, merged_budget=64 * 1024**2)
    prompts, _ = _workload()
    for _ in range(8):  # all traffic on one adapter: it earns a merged copy
        engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), ["hot"] * 10)
        engine.merges.wait_for_builds()
    assert "hot" in engine.merges.merged and engine.merges.events[-1].action == "promote"
    assert engine.runner.merged_steps > 0



@pytest.fixture(scope="module")
def targets(llama_dir):
    from transformers import AutoModelForCausalLM

    return find_target_modules(AutoModelForCausalLM.from_pretrained(llama_dir))


def _adapters(llama_dir, adapter_dirs, names):
    engine = _engine(llama_dir, adapter_dirs)
    return {n: engine.adapters[n] for n in names}


def _drive(manager: MergeManager, adapters: dict, trace: list[dict], steps_each: int) -> list[set[str]]:
    """Feed a trace of per-step token counts; return the merged set after each phase."""
    states = []
    for phase in trace:
        for _ in range(steps_each):
            manager.observe(phase, adapters)
            manager.wait_for_builds()
            assert manager.used_bytes <= manager.policy.budget_bytes
        states.append(set(manager.merged))
    return states


def test_policy_promotes_demotes_with_hysteresis(targets, llama_dir, adapter_dirs):
    adapters = _adapters(llama_dir, adapter_dirs, ["hot", "cold1", "cold2"])
    manager = MergeManager(MergePolicy(64 * 1024**2, half_life_tokens=256, min_tokens=64), targets)
    states = _drive(manager, adapters, [
        {"hot": 90, "cold1": 5, "cold2": 5},      # hot dominates: promoted
        {"hot": 40, "cold1": 30, "cold2": 30},    # 0.40: between the thresholds, kept (hysteresis)
        {"hot": 10, "cold1": 80, "cold2": 10},    # traffic moved: hot demoted, cold1 promoted
        {"hot": 45, "cold1": 10, "cold2": 45},    # nobody reaches 0.5: nothing new promoted
    ], steps_each=40)
    assert states == [{"hot"}, {"hot"}, {"cold1"}, set()]
    history = {name: [e.action for e in manager.events if e.adapter == name] for name in adapters}
    assert history == {"hot": ["promote", "demote"], "cold1": ["promote", "demote"], "cold2": []}
    assert all("share" in e.reason for e in manager.events)


def test_budget_is_never_exceeded_and_pins_hold(targets, llama_dir, adapter_dirs):
    adapters = _adapters(llama_dir, adapter_dirs, ["hot", "cold1", "cold2"])
    from server.lora.merge import merge_adapter, merged_nbytes

    sizes = {name: merged_nbytes(merge_adapter(a, targets)) for name, a in adapters.items()}
    assert sizes["cold1"] < sizes["cold2"] < sizes["hot"]
    manager = MergeManager(MergePolicy(sizes["cold2"] + 1024, promote_share=0.3, demote_share=0.1,
                                       half_life_tokens=128, min_tokens=16), targets)
    manager.pin(adapters["cold2"])
    manager.wait_for_builds()
    states = _drive(manager, adapters, [{"hot": 100}, {"cold1": 100}, {"hot": 50, "cold1": 50}], steps_each=30)
    assert all(state == {"cold2"} for state in states), "only one copy fits, and the pinned one stays"
    manager.unpin("cold2")
    assert _drive(manager, adapters, [{"cold1": 100}], steps_each=30) == [{"cold1"}]  # unpinned: cold2 fades out, cold1 in


def test_merging_off_with_a_zero_budget(targets, llama_dir, adapter_dirs):
    adapters = _adapters(llama_dir, adapter_dirs, ["hot"])
    manager = MergeManager(MergePolicy(0, min_tokens=1), targets)
    manager.pin(adapters["hot"])
    assert _drive(manager, adapters, [{"hot": 100}], steps_each=10) == [set()]


def test_traffic_shares_decay():
    shares = TrafficShares(half_life_tokens=100)
    shares.update({"a": 100})
    assert shares.share("a") == pytest.approx(1.0)
    shares.update({"b": 100})  # a's 100 tokens are now worth 50: a = 50/150, b = 100/150
    assert shares.share("a") == pytest.approx(1 / 3) and shares.share("b") == pytest.approx(2 / 3)
    shares.update({None: 1000})  # the bare base takes the traffic: adapters fade
    assert shares.share("b") < 0.01 and sum(shares.shares.values()) < 0.01
