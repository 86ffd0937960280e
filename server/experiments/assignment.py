"""Sticky, weighted assignment of keys to variants: weighted rendezvous (highest random weight) hashing."""

import hashlib
import json
import math
from collections.abc import Sequence

from server.experiments.model import AssignmentKey, Caller, Variant

MAX_KEY_LENGTH = 256


def choose(variants: Sequence[Variant], key: str, salt: str) -> Variant:
    """The variant `key` belongs to. Deterministic: the same key, salt and weights give the same variant
    in every process (no Python hash randomisation).

    For each variant i draw u_i = H(salt, key, name_i) uniform in (0, 1) and score it
        s_i = w_i / -ln(u_i);           the key goes to argmax_i s_i.
    -ln(u_i) ~ Exp(1), so -ln(u_i)/w_i ~ Exp(w_i), and the smallest of independent exponentials is the
    i-th with probability w_i / Σ_j w_j: the split follows the weights.

    Moving the fewest keys: with two variants the key goes to A iff E_A/E_B < w_A/w_B, and the ratio of
    two Exp(1) draws has P(E_A/E_B < t) = t/(1 + t). Changing 50/50 to 60/40 moves exactly the keys with
    1 ≤ E_A/E_B < 1.5, that is 0.6 - 0.5 = 10%, the least any scheme can move. Adding or removing a
    variant moves only the keys it takes or gives back, since every other score stays put. The salt
    (the experiment's name) keeps different experiments' splits independent.
    """
    scored = [(_score(v.weight, _uniform(salt, key, v.name)), v) for v in variants if v.weight > 0]
    if not scored:
        raise ValueError("no variant has a positive weight")
    return max(scored, key=lambda pair: pair[0])[1]


def key_for(source: AssignmentKey, caller: Caller) -> str | None:
    """The key the experiment's assignment key names for this caller; None means draw at random."""
    if source == "user":
        return caller.user or caller.header_key or None
    if source == "header":
        return caller.header_key or None
    return None


def _uniform(salt: str, key: str, name: str) -> float:
    # JSON keeps the three fields apart whatever characters they hold ("a|b","c" differs from "a","b|c").
    digest = hashlib.blake2b(json.dumps([salt, key, name]).encode(), digest_size=8).digest()
    # 52 bits, so (k + 0.5) / 2^52 is exact in a double and strictly inside (0, 1): ln(u) is finite and < 0.
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2**52


def _score(weight: float, u: float) -> float:
    return weight / -math.log(u)
