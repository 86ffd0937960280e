"""Per-request logit adjustments for a whole batch, before sampling: min_tokens, logit_bias,
repetition_penalty, frequency and presence penalties.

Only the rows of requests that ask for an adjustment are gathered and changed, each adjustment as one
batched tensor operation over those rows (a neutral value, e.g. a penalty of 0, leaves a row as it is);
the other rows are not touched, so a request without adjustments samples exactly as in a batch without
the others. The formulas, for one row `logits` (V,):
    min_tokens:          logits[eos and stop tokens] = -inf          while len(output) < min_tokens
    logit_bias:          logits[t] += bias[t]
    repetition_penalty:  for t in prompt ∪ output: logits[t] = logits[t] / p if logits[t] > 0 else logits[t] * p
    frequency/presence:  logits[t] -= count_output(t) * frequency + (count_output(t) > 0) * presence
"""

import torch

from server.engine.sequence import Sequence


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int]) -> torch.Tensor:
    """logits (N, V) for seqs in the same order -> the logits to sample from (the input itself when no
    request adjusts anything; otherwise a float32 copy, the input stays as the model gave it)."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.adjusts_logits]
    if not rows:
        return logits
    adjusted = logits.float().clone()
    picked = [seqs[i] for i in rows]
    index = torch.tensor(rows, device=logits.device)
    scores = adjusted[index]
    _ban_stops(scores, picked, eos_ids)
    _bias(scores, picked)
    _repetition_penalty(scores, picked)
    _frequency_presence(scores, picked)
    adjusted[index] = scores
    return adjusted


def _ban_stops(scores: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int]) -> None:
    banned = [(r, t) for r, seq in enumerate(seqs) if len(seq.output_ids) < seq.params.min_tokens
              for t in {*seq.params.stop_token_ids, *(() if seq.params.ignore_eos else eos_ids)}]
    if banned:
        rows, tokens = zip(*banned)
        scores[_long(rows, scores), _long(tokens, scores)] = float("-inf")


def _bias(scores: torch.Tensor, seqs: list[Sequence]) -> None:
    entries = [(r, t, b) for r, seq in enumerate(seqs) for t, b in seq.params.logit_bias]
    if entries:
        rows, tokens, biases = zip(*entries)
        scores.index_put_((_long(rows, scores), _long(tokens, scores)),
                          torch.tensor(biases, dtype=scores.dtype, device=scores.device), accumulate=True)


def _repetition_penalty(scores: torch.Tensor, seqs: list[Sequence]) -> None:
    penalties = [seq.params.repetition_penalty for seq in seqs]
    if all(p == 1.0 for p in penalties):
        return
    seen = token_counts([seq.all_ids for seq in seqs], scores) > 0
    penalty = torch.tensor(penalties, dtype=scores.dtype, device=scores.device)[:, None]
    penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
    scores.copy_(torch.where(seen, penalized, scores))


def _frequency_presence(scores: torch.Tensor, seqs: list[Sequence]) -> None:
    frequency = [seq.params.frequency_penalty for seq in seqs]
    presence = [seq.params.presence_penalty for seq in seqs]
    if not any(frequency) and not any(presence):
        return
    counts = token_counts([seq.output_ids for seq in seqs], scores)
    scores -= counts * torch.tensor(frequency, dtype=scores.dtype, device=scores.device)[:, None]
    scores -= (counts > 0).to(scores.dtype) * torch.tensor(presence, dtype=scores.dtype, device=scores.device)[:, None]


def token_counts(id_lists: list[list[int]], like: torch.Tensor) -> torch.Tensor:
    """(R, V) counts of each token id in each row's list; V = like.shape[-1]."""
    vocab = like.shape[-1]
    longest = max((len(ids) for ids in id_lists), default=0)
    padded = torch.full((len(id_lists), longest), vocab, dtype=torch.long)  # pads land in a dropped column
    for r, ids in enumerate(id_lists):
        padded[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    counts = torch.zeros(len(id_lists), vocab + 1, dtype=like.dtype, device=like.device)
    counts.scatter_add_(1, padded.to(like.device), torch.ones(padded.shape, dtype=like.dtype, device=like.device))
    return counts[:, :vocab]


def _long(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)
