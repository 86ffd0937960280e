"""The LoRA-aware replacements for base layers (linear layers, the output head, the input embedding), and
the per-step context all of them share."""

from dataclasses import dataclass, field

import torch
from torch import nn

from server.lora.cpu_kernel import LoraTokensOp
from server.lora.ops import LoraPlan, add_lora
from server.lora.adapter import LoraModuleWeights
from server.lora.slots import LoraSlotPool
from server.lora.targets import EMBEDDING, HEAD, TargetModule


@dataclass
class LoraBatch:
    """What the runner decided for this forward pass; one object, handed to every LoRA layer at wrap time.

    plan:      which tokens use which slot (None: no adapter anywhere in the batch).
    slot_rows: per-token row into each module's DoRA factors and bias deltas (the slot; `num_slots` for
               none), set only when an adapter of the batch has either or weights served slot by slot.
    head_rows: the same for the rows the output head sees (the positions whose logits are kept).
    merged:    module name -> merged weight (native layout) the whole batch runs on instead of the base.
    vocabulary: the widest vocabulary of the step when an adapter resized the base's (0: the base's): the
               output head then gives that many logits per row, -inf beyond each row's own vocabulary.
    fused_op:  the fused CPU op for plans that carry few tokens (set once by the engine; None: torch path).
    """

    plan: LoraPlan | None = None
    slot_rows: torch.Tensor | None = None
    head_rows: torch.Tensor | None = None
    merged: dict[str, torch.Tensor] = field(default_factory=dict)
    vocabulary: int = 0
    fused_op: LoraTokensOp | None = None

    def clear(self) -> None:
        self.plan, self.slot_rows, self.head_rows, self.merged, self.vocabulary = None, None, None, {}, 0


class LoraLinear(nn.Module):
    """`y = g_s ⊙ (x·Wᵀ) + bias + c_s + (x·A_sᵀ)·B_sᵀ` with each token's own slot s (g = 1 unless DoRA;
    c, the adapter's bias delta, is 0 unless it trained biases).

    A quantized base layer (bitsandbytes) computes `x·Wᵀ + bias` with its own forward, in the compute
    dtype; the low-rank terms are added to its output as on a full-precision base (it is never merged).
    The output head sees only the kept positions (`head_rows`) and takes its adapters slot by slot, as
    does any module an adapter replaces whole (modules_to_save: its rows go through the adapter's copy)."""

    def __init__(self, target: TargetModule, pool: LoraSlotPool, batch: LoraBatch):
        super().__init__()
        self.base_layer = target.module
        self.module_name = target.name
        self.fan_in_fan_out = target.fan_in_fan_out
        self.out_features = target.out_features
        self.quantized = target.quantized
        self.is_head = target.kind == HEAD
        self._pool = pool
        self._batch = batch

    @property
    def weight(self) -> torch.Tensor:  # code that reads the head's (tied) weight still finds it
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self._batch
        slots = self._pool.modules.get(self.module_name)
        merged = batch.merged.get(self.module_name)
        bias = self.base_layer.bias
        flat = x.reshape(-1, x.shape[-1])
        rows = (batch.head_rows if self.is_head else batch.slot_rows) if slots is not None else None
        dora = rows is not None and slots.stacked and self._pool.any_dora
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
        if slots is not None and slots.stacked and batch.plan is not None:
            add_lora(out, flat, slots.lora_a, slots.lora_b, slots.slot_ranks, batch.plan, batch.fused_op,
                     slots.rank_tensor)
        if self.is_head and batch.vocabulary > out.shape[1]:
            out = widen(out, batch.vocabulary)
        if rows is not None and slots.per_slot:
            for slot, index in slot_indices(rows, slots.per_slot):
                rows_out = self._per_slot(flat.index_select(0, index), out.index_select(0, index), slots.per_slot[slot])
                out.index_copy_(0, index, widen(rows_out, out.shape[1]))
        return out.view(*x.shape[:-1], out.shape[1])

    def _per_slot(self, x: torch.Tensor, out: torch.Tensor, weights: LoraModuleWeights) -> torch.Tensor:
        """One adapter's rows: through its full copy (a head's may have more vocabulary rows than the base's)
        and/or plus its low-rank delta; then its token columns."""
        if weights.copy is not None:
            out = self._matmul(x, *weights.copy)
        if weights.rank:
            out = out + (x @ weights.lora_a.T) @ weights.lora_b.T
        if weights.tokens is not None:  # trainable tokens on a head: those vocabulary columns are new
            ids, values = weights.tokens
            out[:, ids] = x @ values.T
        return out

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fan_in_fan_out:  # GPT-2's Conv1D keeps its weight as (in, out)
            return torch.addmm(bias, x, weight) if bias is not None else x @ weight
        return nn.functional.linear(x, weight, bias)


class LoraEmbedding(nn.Module):
    """The input embedding, each token's row from its adapter: `E[id] + A_s[:, id]ᵀ·B_sᵀ` (PEFT's embedding
    LoRA, B scaled), the row of its full copy (modules_to_save), or its trained row (trainable tokens)."""

    def __init__(self, target: TargetModule, pool: LoraSlotPool, batch: LoraBatch):
        super().__init__()
        self.base_layer = target.module
        self.module_name = target.name
        self._pool = pool
        self._batch = batch

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Ids past the base's rows belong to adapters with a resized vocabulary, whose copy replaces the row.
        out = self.base_layer(ids.clamp_max(self.num_embeddings - 1) if self._batch.vocabulary else ids)
        slots = self._pool.modules.get(self.module_name)
        rows = self._batch.slot_rows
        if slots is None or rows is None or not slots.per_slot:
            return out
        flat, flat_ids = out.view(-1, out.shape[-1]), ids.reshape(-1)
        for slot, index in slot_indices(rows, slots.per_slot):
            flat.index_copy_(0, index, _embed(flat_ids.index_select(0, index), flat.index_select(0, index),
                                              slots.per_slot[slot]))
        return out


def _embed(ids: torch.Tensor, rows: torch.Tensor, weights: LoraModuleWeights) -> torch.Tensor:
    if weights.copy is not None:
        rows = nn.functional.embedding(ids, weights.copy[0])
    if weights.rank:
        rows = rows + weights.lora_a.T.index_select(0, ids) @ weights.lora_b.T
    if weights.tokens is not None:
        trained, values = weights.tokens
        match = ids[:, None] == trained[None, :]
        hit = match.any(dim=1)
        rows = torch.where(hit[:, None], values.index_select(0, match.int().argmax(dim=1)), rows)
    return rows


def widen(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of logits padded with -inf to `width` columns: tokens past a row's vocabulary are never chosen."""
    missing = width - logits.shape[1]
    return logits if missing == 0 else nn.functional.pad(logits, (0, missing), value=float("-inf"))


def mask_past_vocabulary(logits: torch.Tensor, vocabularies: torch.Tensor) -> torch.Tensor:
    """-inf past each row's own vocabulary (rows (N, width), vocabularies (N,)), again after the model's own
    processing of the logits (a soft cap makes -inf finite)."""
    return logits.masked_fill(past_vocabulary(logits, vocabularies), float("-inf"))


def past_vocabulary(logits: torch.Tensor, vocabularies: torch.Tensor) -> torch.Tensor:
    """True at the columns of each row (N, width) past that row's own vocabulary (N,)."""
    return torch.arange(logits.shape[-1], device=logits.device)[None, :] >= vocabularies[:, None]


def slot_indices(rows: torch.Tensor, held: dict[int, object]) -> list[tuple[int, torch.Tensor]]:
    """(slot, positions of its rows) for each slot of the step that holds weights served slot by slot."""
    return [(slot, (rows == slot).nonzero().squeeze(1)) for slot in rows.unique().tolist() if slot in held]


def wrap_target_modules(model: nn.Module, targets: dict[str, TargetModule], pool: LoraSlotPool,
                        batch: LoraBatch) -> None:
    """Replace every target module of `model` by its LoRA-aware wrapper (in place)."""
    for name, target in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = LoraEmbedding if target.kind == EMBEDDING else LoraLinear
        setattr(parent, child, wrapper(target, pool, batch))
