"""Attention over the engine's paged KV cache, plugged into transformers' attention interface.

transformers' modeling code computes q/k/v and calls the registered function with whatever extra
keyword arguments were given to the model's forward; the runner passes `attn_metadata`. The batch is
packed: all sequences' new tokens along one axis (batch dimension 1), each with its own positions.
Prefills from position 0 attend causally to their own tokens; chunks that continue a prefill (a later
chunk of a long prompt, or the rest of a prompt after a cached prefix) attend to their cached history
and causally to themselves; running sequences (one decode token each) attend to their cached history:
read in place by a block-table op where one is installed (paged_decode.py: float32 CPUs), else gathered
and batched with a padding mask.

For a query at position i of a sequence and that sequence's keys at positions j (what transformers'
eager attention computes from the same arguments):
    s_ij = scaling · q_i·k_j                       (scaling None: 1/√D)
    s_ij = softcap · tanh(s_ij / softcap)          (layers with logit soft-capping: Gemma-2)
    i attends to j  iff  j ≤ i, and j > i − sliding_window in a windowed layer (Mistral, Gemma-2/3 local)
    out_i = Σ_j softmax_j(s_ij) · v_j
    with attention sinks (`s_aux`, one logit per head: GPT-OSS) the softmax runs over [s_i·, sink_h] and
    the sink's share is dropped: out_i = Σ_j exp(s_ij) · v_j / (Σ_j exp(s_ij) + exp(sink_h))
Windows come per call (`sliding_window`), so local and global layers of one model differ. SDPA serves
every layer without soft-capping or sinks (a boolean mask carries the window); the others are computed
explicitly.
"""

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

from server.engine.kv_cache import PagedKVCache
from server.engine.paged_decode import DecodeAttentionOp, decode_attention

ATTENTION_NAME = "loraserve_paged"


@dataclass(frozen=True)
class DecodeBatch:
    token_index: torch.Tensor  # (B,) positions of the decode tokens in the packed batch
    block_tables: torch.Tensor  # (B, M) each sequence's first M blocks (M covers the longest), 0-padded
    lengths: torch.Tensor  # (B, 1) positions each decode token attends to: its own and all before it
    block_size: int
    op: DecodeAttentionOp | None = None  # reads the cache in place (paged_decode.py); None: gather, then SDPA

    @cached_property
    def kv_rows(self) -> torch.Tensor:
        """(B, L) cache rows of each sequence's history, padded (L = the longest length)."""
        offsets = torch.arange(self.block_size, device=self.block_tables.device)
        rows = (self.block_tables[:, :, None] * self.block_size + offsets).flatten(1)
        return rows[:, :int(self.lengths.max())]

    @cached_property
    def kv_mask(self) -> torch.Tensor:
        """(B, 1, 1, L): True where a row is real."""
        longest = self.kv_rows.shape[1]
        return (torch.arange(longest, device=self.lengths.device)[None, :] < self.lengths)[:, None, None, :]

    def attended(self, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache rows a decode token (position n − 1) attends to, (B, L'), and their mask (B, 1, 1, L'):
        positions j < n, and n − window ≤ j in a windowed layer, where only the window's rows are gathered
        (L' = window: position n − window + k for k < window, masked where it falls outside 0..n−1)."""
        if sliding_window is None or sliding_window >= self.kv_rows.shape[1]:  # n ≤ L ≤ window: no bound
            return self.kv_rows, self.kv_mask
        window = torch.arange(sliding_window, device=self.kv_rows.device)
        positions = (self.lengths - sliding_window).clamp(min=0) + window  # (B, window), all < L
        return self.kv_rows.gather(1, positions), (positions < self.lengths)[:, None, None, :]


@dataclass(frozen=True)
class ChunkWithHistory:
    """Tokens [start, end) of the packed batch, at positions `query_position`…, continuing a sequence
    whose cached positions `first_position`… are at `kv_rows` (the chunk's own rows last)."""

    start: int
    end: int
    query_position: int
    first_position: int
    kv_rows: torch.Tensor  # (L,)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """(n, L): query i (position q) attends to key j (position k) iff k ≤ q, and q − window < k."""
        device = self.kv_rows.device
        queries = torch.arange(self.query_position, self.query_position + self.end - self.start, device=device)
        keys = torch.arange(self.first_position, self.first_position + self.kv_rows.shape[0], device=device)
        distance = queries[:, None] - keys[None, :]
        return (distance >= 0) if sliding_window is None else (distance >= 0) & (distance < sliding_window)


@dataclass(frozen=True)
class AttentionMetadata:
    kv_cache: PagedKVCache
    write_rows: torch.Tensor  # (T,) cache row of every new token
    prefills: tuple[tuple[int, int], ...]  # [start, end) of each sequence prefilled from position 0
    decode: DecodeBatch | None
    chunks: tuple[ChunkWithHistory, ...] = ()


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None,
                    s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (1, H, T, D), key/value (1, Hkv, T, D) -> output (1, T, H, D)."""
    meta: AttentionMetadata = kwargs["attn_metadata"]
    layer = module.layer_idx
    meta.kv_cache.write(layer, meta.write_rows, key[0].transpose(0, 1), value[0].transpose(0, 1))
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])
    for start, end in meta.prefills:
        mask = None if sliding_window is None else _window_mask(end - start, sliding_window, query.device)
        attended = _attend(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], mask, scaling,
                           softcap, s_aux)
        out[start:end] = attended[0].transpose(0, 1)
    for chunk in meta.chunks:
        keys = meta.kv_cache.keys[layer][chunk.kv_rows].transpose(0, 1)[None]  # (1, Hkv, L, D)
        values = meta.kv_cache.values[layer][chunk.kv_rows].transpose(0, 1)[None]
        attended = _attend(query[:, :, chunk.start:chunk.end], keys, values, chunk.mask(sliding_window), scaling,
                           softcap, s_aux)
        out[chunk.start:chunk.end] = attended[0].transpose(0, 1)
    decode = meta.decode
    if decode is not None and decode.op is not None:
        queries = query[0].index_select(1, decode.token_index).transpose(0, 1)  # (B, H, D)
        attended = decode_attention(decode.op, queries, meta.kv_cache.keys[layer], meta.kv_cache.values[layer],
                                    decode.block_tables, decode.lengths[:, 0], decode.block_size, scaling,
                                    sliding_window, softcap, s_aux)
        out.index_copy_(0, decode.token_index, attended)
    elif decode is not None:
        rows, mask = decode.attended(sliding_window)
        keys = meta.kv_cache.keys[layer][rows].transpose(1, 2)  # (B, Hkv, L', D)
        values = meta.kv_cache.values[layer][rows].transpose(1, 2)
        queries = query[0].index_select(1, decode.token_index).transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
        attended = _attend(queries, keys, values, mask, scaling, softcap, s_aux)
        out.index_copy_(0, decode.token_index, attended[:, :, 0])
    return out.unsqueeze(0), None


def _window_mask(length: int, sliding_window: int, device: torch.device) -> torch.Tensor:
    """(n, n) for a prefill from position 0: query i attends to key j iff i − window < j ≤ i."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (distance >= 0) & (distance < sliding_window)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scaling: float | None, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Tq, D) from keys/values (B, Hkv, Tk, D); `mask` (broadcast to (B, H, Tq, Tk)) True where a
    query may attend, None for causal. SDPA unless the scores are soft-capped or compete with sinks (H,),
    which SDPA cannot express."""
    if softcap is None and sinks is None:
        return scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None,
                                            scale=scaling, enable_gqa=True)
    if mask is None:
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), value)
    scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    scores = scores - scores.max(dim=-1, keepdim=True).values  # as transformers' eager does
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32)[..., :-1].to(query.dtype), value)


AttentionInterface.register(ATTENTION_NAME, paged_attention)
