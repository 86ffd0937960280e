"""Which modules of a base model a LoRA adapter may adapt, and their shapes."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from server.lora.quantized import dense_weight, is_quantized_linear


@dataclass(frozen=True)
class TargetModule:
    """One adaptable linear map of the base: `y = x·Wᵀ + b` (Linear) or `y = x·W + b` (GPT-2's Conv1D)."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # True for Conv1D, whose weight is stored (in, out)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def quantized(self) -> bool:
        """A bitsandbytes layer: its `weight` holds packed codes, its forward dequantizes."""
        return is_quantized_linear(self.module)

    def weight_out_in(self) -> torch.Tensor:
        """The weight as (out, in), the layout LoRA's B·A has (dequantized to float32 when quantized)."""
        if self.quantized:
            return dense_weight(self.module)
        return self.weight.T if self.fan_in_fan_out else self.weight


def find_target_modules(model: nn.Module) -> dict[str, TargetModule]:
    """Every Linear and Conv1D of the model by dotted name, except the output head. A subclass that
    overrides `forward` computes something else than `x·Wᵀ + b` (PhiMoE's router returns routing weights
    and expert indices), so it is not an adaptable linear map, unless it is a bitsandbytes layer, which
    computes `x·dequant(W)ᵀ + b`."""
    found = {}
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is output_head:
            continue
        if isinstance(module, nn.Linear) and (type(module).forward is nn.Linear.forward or is_quantized_linear(module)):
            found[name] = TargetModule(name, module, module.in_features, module.out_features, False)
        elif isinstance(module, Conv1D) and type(module).forward is Conv1D.forward:
            d_in, d_out = module.weight.shape
            found[name] = TargetModule(name, module, d_in, d_out, True)
    return found
