"""The block-table decode op (server/engine/paged_decode.py) against the torch path it replaces (gather the
history out of the paged cache, then SDPA or the explicit softmax), on every traffic shape."""

from types import SimpleNamespace

import pytest
import torch

from server.engine.attention import AttentionMetadata, DecodeBatch, paged_attention
from server.engine.paged_decode import load_decode_attention

BLOCK = 4
NUM_BLOCKS = 96

# Lengths of the decoding sequences (their decode token included): the shapes of real traffic.
SHAPES = {
    "one": [1],
    "uniform": [17] * 6,
    "distinct": [1, 2, 3, 5, 8, 13, 21, 34],
    "one long, many short": [90] + [2] * 7,
    "block edges": [4, 8, 12, 5, 9],
}


@pytest.fixture(scope="module")
def op():
    compiled = load_decode_attention()
    if compiled is None:
        pytest.skip("no C++ compiler here: the torch path is all there is")
    return compiled


def _decode(op, lengths, heads, kv_heads, dim=16, window=None, softcap=None, sinks=False, seed=0):
    """Both paths' outputs (B, H, D) for one layer with random keys, values and scattered block tables."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(NUM_BLOCKS * BLOCK, kv_heads, dim, generator=generator)
    values = torch.randn(NUM_BLOCKS * BLOCK, kv_heads, dim, generator=generator)
    cache = SimpleNamespace(keys=[keys], values=[values], write=lambda *args: None)
    order = torch.randperm(NUM_BLOCKS, generator=generator).tolist()  # blocks scattered across the cache
    width = -(-max(lengths) // BLOCK)
    tables, taken = [], 0
    for n in lengths:
        own = order[taken:taken + -(-n // BLOCK)]
        taken += len(own)
        tables.append(own + [0] * (width - len(own)))
    query = torch.randn(1, heads, len(lengths), dim, generator=generator)
    sink_logits = torch.randn(heads, generator=generator) if sinks else None
    outputs = []
    for decode_op in (None, op):
        decode = DecodeBatch(token_index=torch.arange(len(lengths)), block_tables=torch.tensor(tables),
                             lengths=torch.tensor(lengths)[:, None], block_size=BLOCK, op=decode_op)
        meta = AttentionMetadata(kv_cache=cache, write_rows=torch.empty(0, dtype=torch.long), prefills=(),
                                 decode=decode)
        out, _ = paged_attention(SimpleNamespace(layer_idx=0), query, query[:, :kv_heads], query[:, :kv_heads],
                                 None, scaling=0.3, sliding_window=window, softcap=softcap, s_aux=sink_logits,
                                 attn_metadata=meta)
        outputs.append(out[0])
    return outputs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_equals_the_torch_path(op, shape, heads, kv_heads):
    torch_path, kernel = _decode(op, SHAPES[shape], heads, kv_heads)
    torch.testing.assert_close(kernel, torch_path, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("feature", [dict(window=5), dict(window=16), dict(softcap=2.0), dict(sinks=True),
                                     dict(window=3, softcap=1.5, sinks=True)], ids=str)
def test_equals_the_torch_path_with_windows_softcap_and_sinks(op, shape, feature):
    torch_path, kernel = _decode(op, SHAPES[shape], 4, 2, **feature)
    torch.testing.assert_close(kernel, torch_path, rtol=1e-5, atol=1e-5)


def test_the_features_change_the_output(op):
    """Without this the equalities above would prove nothing about windows, soft-capping and sinks."""
    plain = _decode(op, SHAPES["distinct"], 4, 2)[1]
    for feature in (dict(window=5), dict(softcap=0.5), dict(sinks=True)):
        assert not torch.allclose(_decode(op, SHAPES["distinct"], 4, 2, **feature)[1], plain), feature
