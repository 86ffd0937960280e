"""Attention over the engine's paged KV cache, plugged into transformers' attention interface.

transformers' modeling code computes q/k/v and calls the registered function with whatever extra
keyword arguments were given to the model's forward; the runner passes `attn_metadata`. The batch is
packed: all sequences' new tokens along one axis (batch dimension 1), each with its own positions.
New sequences (prefills) attend causally to their own tokens; running sequences (one decode token
each) attend to their cached history, batched with a padding mask.
"""

from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

from server.engine.kv_cache import PagedKVCache

ATTENTION_NAME = "loraserve_paged"


@dataclass(frozen=True)
class DecodeBatch:
    token_index: torch.Tensor  # (B,) positions of the decode tokens in the packed batch
    kv_rows: torch.Tensor  # (B, L) cache rows of each sequence's history, padded
    kv_mask: torch.Tensor  # (B, 1, 1, L) True where a row is real


@dataclass(frozen=True)
class AttentionMetadata:
    kv_cache: PagedKVCache
    write_rows: torch.Tensor  # (T,) cache row of every new token
    prefills: tuple[tuple[int, int], ...]  # [start, end) of each new sequence in the packed batch
    decode: DecodeBatch | None


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query (1, H, T, D), key/value (1, Hkv, T, D) -> output (1, T, H, D)."""
    meta: AttentionMetadata = kwargs["attn_metadata"]
    layer = module.layer_idx
    meta.kv_cache.write(layer, meta.write_rows, key[0].transpose(0, 1), value[0].transpose(0, 1))
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])
    for start, end in meta.prefills:
        attended = scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            is_causal=True, scale=scaling, enable_gqa=True,
        )
        out[start:end] = attended[0].transpose(0, 1)
    decode = meta.decode
    if decode is not None:
        keys = meta.kv_cache.keys[layer][decode.kv_rows].transpose(1, 2)  # (B, Hkv, L, D)
        values = meta.kv_cache.values[layer][decode.kv_rows].transpose(1, 2)
        queries = query[0].index_select(1, decode.token_index).transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
        attended = scaled_dot_product_attention(
            queries, keys, values, attn_mask=decode.kv_mask, scale=scaling, enable_gqa=True
        )
        out.index_copy_(0, decode.token_index, attended[:, :, 0])
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
