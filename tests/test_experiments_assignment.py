"""Sticky weighted assignment: the split follows the weights, keys stay put, weight changes move few keys."""

import pytest
from scipy.stats import chisquare

from server.experiments.assignment import choose, key_for
from server.experiments.model import Caller, Variant

KEYS = [f"user-{i}" for i in range(10_000)]


def _variants(*weights: float) -> list[Variant]:
    return [Variant(name, f"{name}@1", w) for name, w in zip("ABCD", weights)]


def _assign(variants: list[Variant], salt: str = "exp") -> dict[str, str]:
    return {key: choose(variants, key, salt).name for key in KEYS}


@pytest.mark.parametrize("weights", [(50, 50), (60, 40), (5, 3, 2), (1, 1, 1, 7)])
def test_split_matches_the_weights(weights):
    assigned = _assign(_variants(*weights))
    observed = [sum(1 for v in assigned.values() if v == name) for name in "ABCD"[: len(weights)]]
    expected = [len(KEYS) * w / sum(weights) for w in weights]
    # Pearson's chi-square against the weights: a biased hash would fail this by a wide margin (p << 1e-3).
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_the_same_key_always_lands_on_the_same_variant():
    variants = _variants(50, 50)
    first = _assign(variants)
    assert _assign(list(variants)) == first
    assert all(choose(variants, "user-7", "exp").name == first["user-7"] for _ in range(100))
    # the salt (the experiment's name) draws an independent split
    other = _assign(variants, salt="another-exp")
    assert 0.4 < sum(first[k] != other[k] for k in KEYS) / len(KEYS) < 0.6


def test_50_50_to_60_40_moves_about_a_tenth_of_the_keys():
    before, after = _assign(_variants(50, 50)), _assign(_variants(60, 40))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert 0.08 <= len(moved) / len(KEYS) <= 0.12
    assert all(before[k] == "B" and after[k] == "A" for k in moved)  # only towards the variant that grew


def test_adding_a_variant_moves_only_keys_to_it_and_zero_weight_gets_none():
    before, after = _assign(_variants(1, 1)), _assign(_variants(1, 1, 1))
    assert all(after[k] == "C" for k in KEYS if before[k] != after[k])
    assert "B" not in _assign(_variants(1, 0)).values()
    with pytest.raises(ValueError):
        choose(_variants(0, 0), "k", "exp")


def test_the_key_comes_from_the_user_then_the_header():
    assert key_for("user", Caller("r", user="u", header_key="h")) == "u"
    assert key_for("user", Caller("r", header_key="h")) == "h"
    assert key_for("header", Caller("r", user="u", header_key="h")) == "h"
    assert key_for("header", Caller("r", user="u")) is None
    assert key_for("random", Caller("r", user="u", header_key="h")) is None
    assert key_for("user", Caller("r", user="")) is None
