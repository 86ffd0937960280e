"""The fused CPU op is built off the engine's thread: an engine serves through the torch path at once
and switches to the op between two steps when its build finishes (a first start no longer waits ~25 s
for a C++ compile before it can answer)."""

from concurrent.futures import Future

import pytest

from server.engine import engine as engine_module
from server.engine.sequence import SamplingParams
from server.lora.cpu_kernel import load_cpu_kernel
from tests.factories import make_engine

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_the_engine_serves_before_the_op_is_built_and_uses_it_after(llama_dir, llama_adapters, monkeypatch):
    op = load_cpu_kernel()
    if op is None:
        pytest.skip("no C++ compiler here: the torch path is all there is")
    build: Future = Future()  # a build that finishes when the test says so
    monkeypatch.setattr(engine_module, "build_cpu_kernel_in_background", lambda: build)
    engine = make_engine(llama_dir)
    engine.load_adapter("a", llama_adapters("kernel_build", seed=77, r=8, lora_alpha=16))
    before = engine.generate([[5, 6, 7]], GREEDY, ["a"])[0].token_ids
    assert engine.runner.lora_batch.fused_op is None, "served through the torch path while the op builds"

    build.set_result(op)
    after = engine.generate([[5, 6, 7]], GREEDY, ["a"])[0].token_ids
    assert engine.runner.lora_batch.fused_op is op, "installed between two steps once built"
    assert after == before


def test_a_failed_build_leaves_the_torch_path(llama_dir, monkeypatch):
    build: Future = Future()
    build.set_result(None)  # load_cpu_kernel's answer when no compiler is available (it logs why)
    monkeypatch.setattr(engine_module, "build_cpu_kernel_in_background", lambda: build)
    engine = make_engine(llama_dir)
    assert engine.generate([[5, 6, 7]], GREEDY)[0].token_ids
    assert engine.runner.lora_batch.fused_op is None
