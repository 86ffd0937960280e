"""Which modules of a base model a LoRA adapter may adapt, and their shapes."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from server.lora.quantized import dense_weight, is_quantized_linear


LINEAR, HEAD, EMBEDDING = "linear", "head", "embedding"


@dataclass(frozen=True)
class TargetModule:
    """One adaptable map of the base: `y = x·Wᵀ + b` (Linear) or `y = x·W + b` (GPT-2's Conv1D); the
    output head (a Linear that sees only the positions whose logits are kept); or the input embedding
    (in_features = vocabulary, out_features = width: PEFT's embedding LoRA has A (r, vocab))."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # True for Conv1D, whose weight is stored (in, out)
    kind: str = LINEAR

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
        return self.weight.T if self.fan_in_fan_out or self.kind == EMBEDDING else self.weight


def find_target_modules(model: nn.Module) -> dict[str, TargetModule]:
    """Every Linear and Conv1D of the model by dotted name, the output head and the input embedding. A
    subclass that overrides `forward` computes something else than `x·Wᵀ + b` (PhiMoE's router returns
    routing weights and expert indices), so it is not an adaptable linear map, unless it is a bitsandbytes
    layer, which computes `x·dequant(W)ᵀ + b`."""
    found = {}
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if module is input_embedding and type(module) is nn.Embedding:
            found[name] = TargetModule(name, module, module.num_embeddings, module.embedding_dim, False, EMBEDDING)
        elif isinstance(module, nn.Linear) and (type(module).forward is nn.Linear.forward or is_quantized_linear(module)):
            kind = HEAD if module is output_head else LINEAR
            found[name] = TargetModule(name, module, module.in_features, module.out_features, False, kind)
        elif isinstance(module, Conv1D) and type(module).forward is Conv1D.forward:
            d_in, d_out = module.weight.shape
            found[name] = TargetModule(name, module, d_in, d_out, True)
    return found
