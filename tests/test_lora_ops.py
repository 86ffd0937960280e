"""The fast batched LoRA op against its plain per-token reference, over many traffic shapes."""

import random

import pytest
import torch

from server.lora.ops import Run, add_lora, add_lora_reference, plan_runs

NUM_SLOTS, D_IN, D_OUT, MAX_RANK = 8, 24, 40, 16
RANKS = [4, 16, 8, 2, 16, 8, 4, 12]


def _traffic(shape: str, tokens: int, rng: random.Random) -> list[int]:
    """Per-token adapter slot (-1 = base), shaped like the Punica kernel tests' traffic."""
    if shape == "identical":
        return [3] * tokens
    if shape == "distinct":
        return [i % NUM_SLOTS for i in range(tokens)]
    if shape == "uniform":
        return [rng.randrange(-1, NUM_SLOTS) for _ in range(tokens)]
    if shape == "zipf":
        weights = [1 / (k + 1) for k in range(NUM_SLOTS + 1)]
        return [s - 1 for s in rng.choices(range(NUM_SLOTS + 1), weights, k=tokens)]
    if shape == "skewed":
        return [5 if rng.random() < 0.9 else rng.randrange(NUM_SLOTS) for _ in range(tokens)]
    if shape == "base_only":
        return [-1] * tokens
    raise ValueError(shape)


def _slot_buffers(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked weights zero-padded beyond each slot's rank, as the slot pool stores them."""
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.zeros(NUM_SLOTS, MAX_RANK, D_IN)
    lora_b = torch.zeros(NUM_SLOTS, MAX_RANK, D_OUT)
    for slot, rank in enumerate(RANKS):
        lora_a[slot, :rank] = torch.randn(rank, D_IN, generator=gen)
        lora_b[slot, :rank] = torch.randn(rank, D_OUT, generator=gen)
    return lora_a, lora_b


@pytest.mark.parametrize("shape", ["identical", "distinct", "uniform", "zipf", "skewed", "base_only"])
@pytest.mark.parametrize("tokens", [1, 7, 64, 200])
@pytest.mark.parametrize("long_run_min", [1, 8, 10_000])
@pytest.mark.parametrize("by_rank", [False, True], ids=["one-group", "rank-groups"])
def test_fast_path_matches_reference(shape, tokens, long_run_min, by_rank):
    rng = random.Random(hash((shape, tokens)) & 0xFFFF)
    slots = sorted(_traffic(shape, tokens, rng))  # the runner groups each adapter's tokens
    lora_a, lora_b = _slot_buffers(seed=tokens)
    x = torch.randn(tokens, D_IN)
    base = torch.randn(tokens, D_OUT)
    expected, got = base.clone(), base.clone()
    add_lora_reference(expected, x, lora_a, lora_b, slots)
    plan = plan_runs(slots, long_run_min, x.device, adapter_ranks=RANKS if by_rank else None)
    add_lora(got, x, lora_a, lora_b, RANKS, plan)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    if any(s >= 0 for s in slots):
        assert not torch.allclose(got, base), "the adapters must change something for this test to mean anything"


def test_unsorted_slots_are_still_correct():
    """Grouping is a speed matter only: a slot split into several runs must still get its own delta."""
    slots = [2, 2, 5, -1, 2, 5, 5, 5, 5, 5, 5, 5, 5, 5, 1, 2]
    lora_a, lora_b = _slot_buffers(seed=3)
    x = torch.randn(len(slots), D_IN)
    expected, got = torch.zeros(len(slots), D_OUT), torch.zeros(len(slots), D_OUT)
    add_lora_reference(expected, x, lora_a, lora_b, slots)
    add_lora(got, x, lora_a, lora_b, RANKS, plan_runs(slots, 4, x.device))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_plan_splits_long_and_short_runs():
    plan = plan_runs([-1, -1, 0, 0, 0, 3, 3, 3, 3, 3, 1], long_run_min=4, device=torch.device("cpu"))
    assert [(r.start, r.end, r.slot) for r in plan.runs] == [(5, 10, 3)]
    (group,) = plan.groups
    assert group.token_index.tolist() == [2, 3, 4, 10]
    assert (group.slots, group.slot_index, group.max_len) == ((0, 1), None, 3)
    assert group.pad_index.tolist() == [0, 1, 2, 3]
    assert not plan_runs([-1, -1], 4, torch.device("cpu")).has_lora


def test_decode_tokens_of_equal_rank_are_read_as_views():
    """Two tokens for each of slots 0-3 (rank 8) and 4-5 (rank 16): two groups, each grid a view of x and
    each weight block a view of the buffers, so the step copies nothing."""
    slots = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    ranks = [8, 8, 8, 8, 16, 16, 0, 0]
    plan = plan_runs(slots, long_run_min=8, device=torch.device("cpu"), adapter_ranks=ranks)
    assert [(g.slots, g.max_len, g.token_start) for g in plan.groups] == [((0, 1, 2, 3), 2, 0), ((4, 5), 2, 8)]
    assert all(g.slot_index is None and g.token_index is None for g in plan.groups)


def test_uneven_token_counts_fall_back_to_a_gathered_grid():
    plan = plan_runs([0, 0, 1, 2, 2], long_run_min=8, device=torch.device("cpu"))
    (group,) = plan.groups
    assert group.token_index.tolist() == [0, 1, 2, 3, 4] and group.pad_index.tolist() == [0, 1, 2, 4, 5]


def test_scattered_slots_are_gathered_not_spanned():
    """Slots 0 and 7 in use: the grid holds 2 slots, not the 8 of their range, and the result is exact."""
    slots = [0, 0, 7, 7, 7]
    plan = plan_runs(slots, long_run_min=8, device=torch.device("cpu"))
    (group,) = plan.groups
    assert group.slots == (0, 7) and group.slot_index.tolist() == [0, 7]
    lora_a, lora_b = _slot_buffers(seed=5)
    x = torch.randn(len(slots), D_IN)
    expected, got = torch.zeros(len(slots), D_OUT), torch.zeros(len(slots), D_OUT)
    add_lora_reference(expected, x, lora_a, lora_b, slots)
    add_lora(got, x, lora_a, lora_b, RANKS, plan)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_padding_uses_the_largest_rank_in_the_step():
    """Slots of rank 4 and 2 only: a rank-16 resident elsewhere must not widen the bmm (it would still be
    exact, zeros times zeros, so check the plan's effect through a poisoned padding column)."""
    slots = [0, 0, 3, 3]  # ranks 4 and 2
    lora_a, lora_b = _slot_buffers(seed=6)
    lora_a[0, 4:] = float("nan")  # beyond slot 0's rank: must never be read
    x = torch.randn(len(slots), D_IN)
    expected, got = torch.zeros(len(slots), D_OUT), torch.zeros(len(slots), D_OUT)
    add_lora_reference(expected, x, torch.nan_to_num(lora_a), lora_b, slots)
    add_lora(got, x, lora_a, lora_b, RANKS, plan_runs(slots, 8, x.device))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_low_precision_dtypes_stay_close(dtype, tol):
    slots = sorted(_traffic("uniform", 48, random.Random(1)))
    lora_a, lora_b = _slot_buffers(seed=1)
    x = torch.randn(48, D_IN) * 0.1
    expected = torch.zeros(48, D_OUT)
    add_lora_reference(expected, x, lora_a, lora_b, slots)
    got = torch.zeros(48, D_OUT, dtype=dtype)
    add_lora(got, x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), RANKS,
             plan_runs(slots, 8, x.device))
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.fixture(scope="module")
def fused_op():
    from server.lora.cpu_kernel import load_cpu_kernel

    op = load_cpu_kernel()
    if op is None:
        pytest.skip("no C++ toolchain here: the fused CPU op could not be built")
    return op


@pytest.mark.parametrize("shape", ["identical", "distinct", "uniform", "zipf", "skewed"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_fused_cpu_op_matches_reference(fused_op, shape, tokens):
    rng = random.Random(hash((shape, tokens, "fused")) & 0xFFFF)
    slots = sorted(_traffic(shape, tokens, rng))
    lora_a, lora_b = _slot_buffers(seed=tokens)
    x = torch.randn(tokens, D_IN)
    expected, got = torch.zeros(tokens, D_OUT), torch.zeros(tokens, D_OUT)
    add_lora_reference(expected, x, lora_a, lora_b, slots)
    plan = plan_runs(slots, 10_000, x.device, adapter_ranks=RANKS, fused_max_tokens=10_000)  # no long runs
    assert (plan.fused is not None) == any(s >= 0 for s in slots)
    add_lora(got, x, lora_a, lora_b, RANKS, plan, fused_op, torch.tensor(RANKS))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_fused_cpu_op_subtracts_a_merged_adapter(fused_op):
    """A mixed merged step: slot 5's tokens run on a merged copy (NO_SLOT here, packed last); every other
    token adds its own delta and subtracts slot 5's, some through a long run, the rest through the op."""
    slots = [0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3] + [-1] * 6
    subtract = (Run(0, 13, 5),)
    lora_a, lora_b = _slot_buffers(seed=11)
    x = torch.randn(len(slots), D_IN)
    expected, got = torch.zeros(len(slots), D_OUT), torch.zeros(len(slots), D_OUT)
    add_lora_reference(expected, x, lora_a, lora_b, slots)
    negated = torch.zeros_like(expected)
    add_lora_reference(negated, x, lora_a, lora_b, [5] * 13 + [-1] * 6)
    plan = plan_runs(slots, 8, x.device, subtract, adapter_ranks=RANKS, fused_max_tokens=16)
    assert [(r.start, r.end) for r in plan.fused.runs] == [(3, 12)] and plan.fused.subtract == (Run(0, 13, 5),)
    add_lora(got, x, lora_a, lora_b, RANKS, plan, fused_op, torch.tensor(RANKS))
    torch.testing.assert_close(got, expected - negated, rtol=1e-5, atol=1e-4)


def test_plans_with_many_short_tokens_leave_the_fused_op_out():
    plan = plan_runs([s for s in range(8) for _ in range(3)], 8, torch.device("cpu"), fused_max_tokens=16)
    assert plan.fused is None and plan.groups
