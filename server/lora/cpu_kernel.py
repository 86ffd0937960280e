"""A fused CPU op for decode steps whose adapter tokens are few: every token's add (and subtract) in one call.

    for (t, s, sign) in tokens:                       # sorted by t
        out[t] += sign * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :r]       with r = ranks[s]

Why: with a merged copy serving most of a batch, the other adapters have a token or two each, and the
bmm path spends its time in ~8 small torch calls per module (about 20 µs each on a CPU, whatever their
size) rather than in arithmetic. This op makes it one call per module (docs/bench-merge.md has the
figures). It is float32 on CPU only, compiled once per machine with torch's own extension builder
(cached under ~/.cache/torch_extensions) and tested against the per-token reference in ops.py; when
no compiler is available the engine logs it and keeps the torch path.
"""

import functools
from collections.abc import Callable
from concurrent.futures import Future

import torch

from server.native_build import build_in_background, compile_cpu_extension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

void add_lora_tokens(torch::Tensor out, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b,
                     torch::Tensor ranks, torch::Tensor tokens) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(lora_a.is_contiguous() && lora_b.is_contiguous() && tokens.is_contiguous(), "contiguous buffers");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "rows must be contiguous");
  const int64_t n = tokens.size(0), d_in = x.size(1), d_out = out.size(1), max_rank = lora_a.size(1);
  const int64_t* entry = tokens.data_ptr<int64_t>();  // (n, 3): token, slot, sign
  const int64_t* rank_of = ranks.data_ptr<int64_t>();
  const float* xs = x.data_ptr<float>();
  float* outs = out.data_ptr<float>();
  const float* as = lora_a.data_ptr<float>();
  const float* bs = lora_b.data_ptr<float>();
  const int64_t x_row = x.stride(0), out_row = out.stride(0);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // Move both ends to token boundaries: a token's entries all go to one thread, so no row has two writers.
    while (begin > 0 && begin < n && entry[3 * begin] == entry[3 * (begin - 1)]) ++begin;
    while (end > 0 && end < n && entry[3 * end] == entry[3 * (end - 1)]) ++end;
    std::vector<float> shrunk(max_rank);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = entry[3 * i], slot = entry[3 * i + 1], rank = rank_of[slot];
      const float sign = static_cast<float>(entry[3 * i + 2]);
      const float* xt = xs + t * x_row;
      const float* a = as + slot * max_rank * d_in;
      for (int64_t q = 0; q < rank; ++q) {
        const float* row = a + q * d_in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < d_in; ++k) acc += row[k] * xt[k];
        shrunk[q] = sign * acc;
      }
      float* ot = outs + t * out_row;
      const float* b = bs + slot * max_rank * d_out;
      for (int64_t q = 0; q < rank; ++q) {
        const float w = shrunk[q];
        const float* row = b + q * d_out;
#pragma omp simd
        for (int64_t j = 0; j < d_out; ++j) ot[j] += w * row[j];
      }
    }
  });
}
"""

LoraTokensOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def build_cpu_kernel_in_background() -> "Future[LoraTokensOp | None]":
    """`load_cpu_kernel` on the builder thread (server/native_build.py): a server serves through the torch
    path while it compiles."""
    return build_in_background(load_cpu_kernel)


@functools.cache
def load_cpu_kernel() -> LoraTokensOp | None:
    """The compiled op, or None (logged) when it cannot be built here. Compiles at most once per process."""
    module = compile_cpu_extension("loraserve_lora_tokens", _SOURCE, ["add_lora_tokens"], "CPU LoRA kernel")
    return None if module is None else module.add_lora_tokens
