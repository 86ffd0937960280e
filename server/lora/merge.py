"""Merged copies: an adapter folded into a copy of the weights it adapts, built from the untouched base.

W' = g ⊙ W + B'·A with B' = g ⊙ scale·B (see adapter.py), i.e. W + scale·B·A for plain LoRA and
m ⊙ (W + scale·B·A) / ‖W + scale·B·A‖ for DoRA. Only adapted matrices are copied; the rest is shared.
A quantized base gets no merged copies (docs/quantization.md): a dense copy multiplies in the serving
dtype what the quantized kernel computes otherwise (bf16 on AVX512-BF16 CPUs for 4-bit, int8 activations
for int8), which moved next-token logprobs by 6.5e-3 (nf4) and 7.8e-3 (int8), beyond their tolerances.
"""

import torch

from server.lora.adapter import LoraAdapter
from server.lora.targets import LINEAR, TargetModule


def merge_adapter(adapter: LoraAdapter, targets: dict[str, TargetModule]) -> dict[str, torch.Tensor]:
    """Module name -> merged weight in the module's native layout (computed in float32, checked finite)."""
    quantized = sorted(name for name in adapter.modules if targets[name].quantized)
    if quantized:
        raise ValueError(f"no merged copy on a quantized base ({quantized[0]} is quantized): served unmerged")
    per_slot = sorted(n for n, w in adapter.modules.items() if targets[n].kind != LINEAR or w.per_token)
    if per_slot:  # its other tokens' rows would lose them: the merged adapter's tokens carry no slot
        raise ValueError(f"no merged copy of {adapter.name}: {per_slot[0]} is served slot by slot")
    if any(w.bias is not None for w in adapter.modules.values()):
        # A step on a merged copy gives the merged adapter's tokens no slot row, so no bias delta.
        raise ValueError(f"no merged copy of {adapter.name}: it changes biases, which a copy of weights omits")
    merged = {}
    for name, weights in adapter.modules.items():
        target = targets[name]
        base = target.weight_out_in().detach()
        a = weights.lora_a.to(base.device, torch.float32)
        b = weights.lora_b.to(base.device, torch.float32)
        weight = base.float()
        if weights.dora_scale is not None:
            weight = weight * weights.dora_scale.to(base.device, torch.float32)[:, None]
        weight = torch.addmm(weight, b, a)
        if not torch.isfinite(weight).all():
            raise ValueError(f"merging {adapter.name} into {name} produced non-finite weights")
        weight = weight.to(base.dtype)
        merged[name] = (weight.T if target.fan_in_fan_out else weight).contiguous()
    return merged


def merged_nbytes(merged: dict[str, torch.Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in merged.values())
