"""Decode attention that reads the paged KV cache in place (a block-table kernel for float32 CPUs).

The torch path (attention.py) gathers every decoding sequence's whole history out of the cache into a
padded (B, L, Hkv, D) copy per layer, then runs SDPA over it: the copy is a third of a decode step's
time at 64 sequences. This op walks each sequence's block table instead, with an online softmax, and
writes only the outputs. For sequence b, query head h (kv head g = h / (H / Hkv)) and n = lengths[b]:

    m = sink_h (or −∞), l = 1 (or 0), acc = 0                      # attention sinks: one logit, no value
    for p in [max(0, n − window) if window else 0, n):
        row = block_table[b, p // block_size] · block_size + p % block_size
        s = scale · q[b, h] · K[row, g];  s = softcap · tanh(s / softcap) if softcap
        m' = max(m, s);  l = l·e^(m − m') + e^(s − m');  acc = acc·e^(m − m') + e^(s − m')·V[row, g];  m = m'
    out[b, h] = acc / l

which is what attention.py computes (tested against it on every traffic shape in
tests/test_paged_decode.py). Work is split over (sequence, kv head); a kv head's query heads are done
together, so each cached row is read once per step.
"""

import functools
from collections.abc import Callable
from concurrent.futures import Future

import torch

from server.native_build import build_in_background, compile_cpu_extension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

void decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                      torch::Tensor block_tables, torch::Tensor lengths, int64_t block_size, double scale,
                      int64_t window, double softcap, torch::Tensor sinks) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && key_cache.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(out.is_contiguous() && query.is_contiguous() && key_cache.is_contiguous() &&
              value_cache.is_contiguous() && block_tables.is_contiguous() && lengths.is_contiguous(),
              "contiguous tensors");
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key_cache.size(1), group = heads / kv_heads, max_blocks = block_tables.size(1);
  const float* q = query.data_ptr<float>();
  const float* keys = key_cache.data_ptr<float>();
  const float* values = value_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  const float* sink = sinks.numel() ? sinks.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const float cap = static_cast<float>(softcap), sc = static_cast<float>(scale);
  const int64_t row_stride = kv_heads * dim;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(group), l(group), acc(group * dim), scores(group * block_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, g = item % kv_heads, n = lens[b];
      for (int64_t k = 0; k < group; ++k) {
        const int64_t h = g * group + k;
        m[k] = sink ? sink[h] : -std::numeric_limits<float>::infinity();
        l[k] = sink ? 1.f : 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      for (int64_t start = first; start < n;) {
        const int64_t block = tables[b * max_blocks + start / block_size];
        const int64_t stop = std::min(n, (start / block_size + 1) * block_size), count = stop - start;
        const int64_t row0 = block * block_size + start % block_size;
        for (int64_t k = 0; k < group; ++k) {
          const float* qh = q + (b * heads + g * group + k) * dim;
          float best = m[k];
          for (int64_t j = 0; j < count; ++j) {
            const float* kr = keys + (row0 + j) * row_stride + g * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qh[d] * kr[d];
            s *= sc;
            if (cap > 0.f) s = cap * std::tanh(s / cap);
            scores[k * block_size + j] = s;
            best = std::max(best, s);
          }
          const float correction = std::exp(m[k] - best);  // 0 when m was −∞ (nothing summed yet)
          float* a = acc.data() + k * dim;
          l[k] *= correction;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
          for (int64_t j = 0; j < count; ++j) {
            const float w = std::exp(scores[k * block_size + j] - best);
            const float* vr = values + (row0 + j) * row_stride + g * dim;
            l[k] += w;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) a[d] += w * vr[d];
          }
          m[k] = best;
        }
        start = stop;
      }
      for (int64_t k = 0; k < group; ++k) {
        float* oh = o + (b * heads + g * group + k) * dim;
        const float inv = 1.f / l[k];
        for (int64_t d = 0; d < dim; ++d) oh[d] = acc[k * dim + d] * inv;
      }
    }
  });
}
"""

DecodeAttentionOp = Callable[..., None]


def build_decode_attention_in_background() -> "Future[DecodeAttentionOp | None]":
    return build_in_background(load_decode_attention)


@functools.cache
def load_decode_attention() -> DecodeAttentionOp | None:
    """The compiled op, or None (logged) when it cannot be built here. Compiles at most once per process."""
    module = compile_cpu_extension("loraserve_paged_decode", _SOURCE, ["decode_attention"], "CPU paged attention")
    return None if module is None else module.decode_attention


def decode_attention(op: DecodeAttentionOp, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int, scaling: float | None,
                     sliding_window: int | None, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """query (B, H, D), one layer's cache keys/values (rows, Hkv, D) -> (B, H, D)."""
    query = query.contiguous()
    out = torch.empty_like(query)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    op(out, query, keys, values, block_tables, lengths.contiguous(), block_size, scale, sliding_window or 0,
       softcap or 0.0, torch.empty(0) if sinks is None else sinks.float().contiguous())
    return out
