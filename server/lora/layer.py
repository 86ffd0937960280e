"""The LoRA-aware replacement for a base linear layer, and the per-step context all of them share."""

from dataclasses import dataclass, field

import torch
from torch import nn

from server.lora.cpu_kernel import LoraTokensOp
from server.lora.ops import LoraPlan, add_lora
from server.lora.slots import LoraSlotPool
from server.lora.targets import TargetModule


@dataclass
class LoraBatch:
    """What the runner decided for this forward pass; one object, handed to every LoRA layer at wrap time.

    plan:      which tokens use which slot (None: no adapter anywhere in the batch).
    slot_rows: per-token row into each module's DoRA factors and bias deltas (the slot; `num_slots` for
               none), set only when an adapter of the batch has either.
    merged:    module name -> merged weight (native layout) the whole batch runs on instead of the base.
    fused_op:  the fused CPU op for plans that carry few tokens (set once by the engine; None: torch path).
    """

    plan: LoraPlan | None = None
    slot_rows: torch.Tensor | None = None
    merged: dict[str, torch.Tensor] = field(default_factory=dict)
    fused_op: LoraTokensOp | None = None

    def clear(self) -> None:
        self.plan, self.slot_rows, self.merged = None, None, {}


class LoraLinear(nn.Module):
    """`y = g_s ⊙ (x·Wᵀ) + bias + c_s + (x·A_sᵀ)·B_sᵀ` with each token's own slot s (g = 1 unless DoRA;
    c, the adapter's bias delta, is 0 unless it trained biases).

    A quantized base layer (bitsandbytes) computes `x·Wᵀ + bias` with its own forward, in the compute
    dtype; the low-rank terms are added to its output as on a full-precision base (it is never merged)."""

    def __init__(self, target: TargetModule, pool: LoraSlotPool, batch: LoraBatch):
        super().__init__()
        self.base_layer = target.module
        self.module_name = target.name
        self.fan_in_fan_out = target.fan_in_fan_out
        self.out_features = target.out_features
        self.quantized = target.quantized
        self._pool = pool
        self._batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self._batch
        slots = self._pool.modules.get(self.module_name)
        merged = batch.merged.get(self.module_name)
        bias = self.base_layer.bias
        flat = x.reshape(-1, x.shape[-1])
        rows = batch.slot_rows if slots is not None else None
        dora = rows is not None and self._pool.any_dora
        if self.quantized and merged is None:
            out = self.base_layer(flat)
            if dora and bias is not None:  # the factor g scales x·Wᵀ only
                out = out - bias
        else:
            out = self._matmul(flat, self.base_layer.weight if merged is None else merged, None if dora else bias)
        if dora:
            out = out * slots.dora_scale.index_select(0, rows)
            if bias is not None:
                out = out + bias
        if rows is not None and slots.bias is not None:
            out = out + slots.bias.index_select(0, rows)
        if slots is not None and batch.plan is not None:
            add_lora(out, flat, slots.lora_a, slots.lora_b, slots.slot_ranks, batch.plan, batch.fused_op,
                     slots.rank_tensor)
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fan_in_fan_out:  # GPT-2's Conv1D keeps its weight as (in, out)
            return torch.addmm(bias, x, weight) if bias is not None else x @ weight
        return nn.functional.linear(x, weight, bias)


def wrap_target_modules(model: nn.Module, targets: dict[str, TargetModule], pool: LoraSlotPool,
                        batch: LoraBatch) -> None:
    """Replace every target module of `model` by a LoraLinear around it (in place)."""
    for name, target in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(target, pool, batch))
