"""LongRoPE per sequence: a token's rotary frequencies follow its own sequence's length, never the
longest sequence packed beside it.

transformers (`dynamic_rope_update`) picks LongRoPE's short or long factors for a whole forward pass from
its largest position. In one sequence's `generate` that means, with omp = `original_max_position_embeddings`:
    a step that leaves the sequence with n tokens computes its tokens with the long factors iff n > omp,
    and the step where n first exceeds omp recomputes every token of the sequence with the long factors
    (Phi-3's `prepare_inputs_for_generation` drops the cache there).
The engine does the same per sequence: the runner marks each token with whether its sequence is past omp
(`long_tokens`), the wrapped rotary embedding runs transformers' own forward once per group (with a marker
position at omp added to the long group, so that a prefill chunk of early positions still gets the long
factors), and a sequence crossing omp is computed again from its first token (`crosses_switch`, in chunks). Only model types whose `generate` recomputes at the switch are served
this way; elsewhere transformers keeps the keys computed with the short factors (refused, not matched).
"""

import torch
from torch import nn
from transformers import PreTrainedModel

PER_SEQUENCE_ROPE_TYPES = frozenset({"longrope"})
# Model types whose generate recomputes the whole sequence when it crosses the original context.
RECOMPUTE_AT_SWITCH = frozenset({"phi3", "phimoe"})


class PerSequenceRope(nn.Module):
    """A model's LongRoPE rotary embedding, run per group of tokens that share a factor set."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope
        self.original_context: int = rope.config.rope_parameters["original_max_position_embeddings"]
        self.long_tokens: torch.Tensor | None = None  # (T,) bool, set by the runner around each forward

    def crosses_switch(self, computed_length: int, length: int) -> bool:
        """True when a sequence of `length` tokens, whose cached keys were computed while it was
        `computed_length` long, has grown past the original context since: those keys used the short
        factors, so it is computed again from its first token."""
        return 0 < computed_length <= self.original_context < length

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        long = self.long_tokens
        if long is None or not bool(long.any()):  # short tokens only: their positions are all < omp
            return self.rope(x, position_ids, **kwargs)
        # A chunk of a long sequence may hold only early positions: one extra position at omp makes
        # transformers pick the long factors for the group whatever its own largest position.
        marker = torch.full_like(position_ids[:, :1], self.original_context)
        long_cos, long_sin = self.rope(x, torch.cat([position_ids[:, long], marker], dim=1), **kwargs)
        if bool(long.all()):
            return long_cos[:, :-1], long_sin[:, :-1]
        short_cos, short_sin = self.rope(x, position_ids[:, ~long], **kwargs)
        cos = short_cos.new_empty(*position_ids.shape, short_cos.shape[-1])
        sin = torch.empty_like(cos)
        cos[:, ~long], sin[:, ~long] = short_cos, short_sin
        cos[:, long], sin[:, long] = long_cos[:, :-1], long_sin[:, :-1]
        return cos, sin


def wrap_per_sequence_rope(model: PreTrainedModel) -> list[PerSequenceRope]:
    """Replace each LongRoPE rotary embedding of the model by its per-sequence wrapper; returns them."""
    wrapped = []
    for name, module in list(model.named_modules()):
        rope_type = getattr(module, "rope_type", None)  # a dict per layer type in some models (Gemma-3)
        if isinstance(rope_type, str) and rope_type in PER_SEQUENCE_ROPE_TYPES:
            parent_name, _, child = name.rpartition(".")
            wrapper = PerSequenceRope(module)
            setattr(model.get_submodule(parent_name), child, wrapper)
            wrapped.append(wrapper)
    return wrapped
