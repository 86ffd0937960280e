"""The device slot pool: residents stay sorted by rank through loads, evictions and moves, and every
resident's slot holds exactly its own weights (the batched op reads whatever the slot holds)."""

import random

import pytest
import torch
from torch import nn

from server.lora.adapter import LoraAdapter, LoraModuleWeights
from server.lora.slots import FREE, LoraSlotPool
from server.lora.targets import TargetModule

D_IN, D_OUT, MAX_RANK = 12, 20, 16
TARGETS = {name: TargetModule(name, nn.Linear(D_IN, D_OUT), D_IN, D_OUT, False) for name in ("q", "v")}


def _adapter(name: str, rank: int, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {m: LoraModuleWeights(torch.randn(rank, D_IN, generator=gen), torch.randn(D_OUT, rank, generator=gen),
                                    None) for m in TARGETS}
    return LoraAdapter(name=name, spec=None, modules=modules)


def _check(pool: LoraSlotPool, adapters: dict[str, LoraAdapter]) -> None:
    ranks = [r for r in pool.adapter_ranks if r != FREE]
    assert ranks == sorted(ranks), f"residents out of rank order: {pool.adapter_ranks}"
    occupied = {slot for slot, r in enumerate(pool.adapter_ranks) if r != FREE}
    assert occupied == {pool.slot_of(name) for name in pool.resident}
    for name in pool.resident:
        slot, adapter = pool.slot_of(name), adapters[name]
        for module, weights in adapter.modules.items():
            held = pool.modules[module]
            assert torch.equal(held.lora_a[slot, :weights.rank], weights.lora_a)
            assert torch.equal(held.lora_b[slot, :weights.rank], weights.lora_b.T)
            assert not held.lora_a[slot, weights.rank:].any() and not held.lora_b[slot, weights.rank:].any()
    for slot in set(range(pool.num_slots)) - occupied:
        assert all(not m.lora_a[slot].any() and not m.lora_b[slot].any() for m in pool.modules.values())


@pytest.mark.parametrize("seed", range(6))
def test_random_loads_and_evictions_keep_ranks_sorted_and_weights_intact(seed):
    rng = random.Random(seed)
    adapters = {f"a{i}": _adapter(f"a{i}", rng.choice([2, 4, 8, 16]), seed=100 * seed + i) for i in range(20)}
    pool = LoraSlotPool(TARGETS, num_slots=8, max_rank=MAX_RANK, dtype=torch.float32, device=torch.device("cpu"))
    running: list[str] = []
    for _ in range(200):
        if running and rng.random() < 0.4:
            pool.release(running.pop(rng.randrange(len(running))))
        else:
            adapter = adapters[rng.choice(list(adapters))]
            if pool.acquire(adapter) is not None:
                running.append(adapter.name)
        _check(pool, adapters)
    assert pool.moves > 0, "the trace must make the pool move residents, or the test proves little"


def test_adapters_of_one_rank_end_up_side_by_side_whatever_the_load_order():
    """Interleaved ranks (8, 16, 32, 8, 16, 32, ...) as the engine benchmark loads them."""
    pool = LoraSlotPool(TARGETS, num_slots=12, max_rank=32, dtype=torch.float32, device=torch.device("cpu"))
    adapters = {f"a{i}": _adapter(f"a{i}", (8, 16, 32)[i % 3], seed=i) for i in range(12)}
    for adapter in adapters.values():
        pool.acquire(adapter)
    assert pool.adapter_ranks == [8] * 4 + [16] * 4 + [32] * 4
    _check(pool, adapters)
