"""Base layers quantized by bitsandbytes (4-bit NF4/FP4, 8-bit LLM.int8()): what they are and their weights.

bitsandbytes' `Linear4bit` and `Linear8bitLt` subclass `nn.Linear` but override `forward`: their
`weight` holds packed codes, not the matrix. The LoRA path keeps calling their own forward (so the base
computes exactly what transformers and PEFT compute on the same quantized model) and adds its low-rank
terms in the compute dtype; only DoRA's column norm needs the matrix itself (`dense_weight`).
bitsandbytes is imported only when a model is quantized: importing it costs time and logs a notice.
"""

import torch
from torch import nn

_QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (subclasses included), told without importing it."""
    return any(c.__module__.startswith("bitsandbytes.") and c.__name__ in _QUANTIZED_LINEARS
               for c in type(module).__mro__)


def dense_weight(module: nn.Module, chunk: int = 1024) -> torch.Tensor:
    """The (out, in) matrix a layer multiplies by, in float32: a quantized layer's is read through its own
    forward on the identity (chunk by chunk), so it is exactly what serving multiplies by. (bitsandbytes
    repacks 4-bit weights for AVX512-BF16 CPUs at the first forward, with bf16 block scales that
    `dequantize_4bit` does not read; one-hot rows are exact in every compute dtype.)"""
    if not is_quantized_linear(module):
        return module.weight.detach().float()
    bias = module.bias
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    columns = []
    with torch.inference_mode():
        for first in range(0, module.in_features, chunk):
            rows = min(chunk, module.in_features - first)
            eye = torch.zeros(rows, module.in_features, dtype=dtype, device=module.weight.device)
            eye[:, first:first + rows].fill_diagonal_(1.0)
            out = module(eye).float()
            columns.append(out - bias.float() if bias is not None else out)
    return torch.cat(columns).T.contiguous()
