"""Base layers quantized by bitsandbytes (4-bit NF4/FP4, 8-bit LLM.int8()): what they are and their weights.

bitsandbytes' `Linear4bit` and `Linear8bitLt` subclass `nn.Linear` but override `forward`: their
`weight` holds packed codes, not the matrix. The LoRA path keeps calling their own forward (so the base
computes exactly what transformers and PEFT compute on the same model) and adds its low-rank terms in
the compute dtype; only merging and DoRA's column norm need the matrix itself, dequantized here.
"""

import torch
from torch import nn

try:  # an optional dependency: without it no model is quantized and nothing here is reached
    import bitsandbytes as bnb
except ImportError:  # pragma: no cover - bitsandbytes is installed wherever quantization is used
    bnb = None

QUANTIZED_LINEAR_TYPES: tuple[type, ...] = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


def is_quantized_linear(module: nn.Module) -> bool:
    return bool(QUANTIZED_LINEAR_TYPES) and isinstance(module, QUANTIZED_LINEAR_TYPES)


def dense_weight(module: nn.Module, chunk: int = 1024) -> torch.Tensor:
    """The (out, in) matrix a layer multiplies by, in float32: a quantized layer's is read through its own
    forward on the identity (chunk by chunk), so it is exactly what serving multiplies by. (bitsandbytes
    repacks 4-bit weights for AVX512-BF16 CPUs at the first forward, with bf16 block scales that
    `dequantize_4bit` does not read; one-hot rows are exact in every compute dtype.)"""
    if not is_quantized_linear(module):
        return module.weight.detach().float()
    bias = module.bias
    dtype = module.compute_dtype if isinstance(module, bnb.nn.Linear4bit) and module.compute_dtype else torch.float32
    columns = []
    with torch.inference_mode():
        for first in range(0, module.in_features, chunk):
            rows = min(chunk, module.in_features - first)
            eye = torch.zeros(rows, module.in_features, dtype=dtype, device=module.weight.device)
            eye[:, first:first + rows].fill_diagonal_(1.0)
            out = module(eye).float()
            columns.append(out - bias.float() if bias is not None else out)
    return torch.cat(columns).T.contiguous()
