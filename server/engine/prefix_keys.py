"""Which sequences may share cached KV blocks: the cache key of a sequence (its tenant and adapter).

Layer l's keys and values are computed from the hidden states entering layer l, by layer l's k and v
projections. So an adapter changes no layer's keys or values iff it adapts nothing before the last
layer and, in the last layer, nothing that produces keys or values: only the last layer's query and
output projections, its MLP, or the LM head. Such an adapter shares the bare base's blocks. Any other
adapter (an MLP or o_proj adapter on an earlier layer changes every later layer's K/V) gets blocks of
its own, keyed by its engine name (`name@version`: a new version never meets the old one's blocks).

Blocks are shared within a tenant only: how fast a first token comes would otherwise tell one tenant
whether another recently sent a prompt that starts the same way (vLLM's `cache_salt` answers the same
leak per request). Without tenants (auth off) every request is one tenant's.
"""

import re
from collections.abc import Callable

from server.lora.adapter import LoraAdapter

BASE_KEY = "base"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Projections that never feed keys or values of their own layer (fused QKV and K/V ones do).
_DOWNSTREAM_OF_KV = frozenset({
    "q_proj", "query", "o_proj", "out_proj", "dense", "c_proj", "wo",
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
    "dense_h_to_4h", "dense_4h_to_h",
})
_AFTER_EVERY_LAYER = frozenset({"lm_head"})


def prefix_cache_key(tenant: str | None, adapter: LoraAdapter | None, num_layers: int) -> tuple[str | None, str]:
    """(tenant, BASE_KEY) for the bare base and for adapters that leave every key and value as the base
    computes them; otherwise (tenant, the adapter's key)."""
    if adapter is None or all(_leaves_kv_alone(module, num_layers) for module in adapter.modules):
        return tenant, BASE_KEY
    return tenant, adapter_cache_key(adapter.name)


def adapter_cache_key(name: str) -> str:
    return f"adapter:{name}"


def is_adapters_key(name: str) -> Callable[[tuple[str | None, str]], bool]:
    """Matches the cache keys of adapter `name`, whatever the tenant."""
    key = adapter_cache_key(name)
    return lambda cache_key: cache_key[1] == key


def _leaves_kv_alone(module: str, num_layers: int) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    layer = _LAYER_INDEX.search(f".{module}.")
    if layer is None:
        return leaf in _AFTER_EVERY_LAYER
    return int(layer.group(1)) == num_layers - 1 and leaf in _DOWNSTREAM_OF_KV
