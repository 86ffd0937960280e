"""Choosing the next token of every sequence from its logits: greedy, or temperature/top-k/top-p sampling."""

from dataclasses import dataclass

import torch

from server.engine.sequence import Sequence


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits (N, V) for seqs in the same order -> one token id per sequence."""
    chosen = logits.argmax(dim=-1)
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            chosen[i] = _sample_one(logits[i], seq)
    return chosen.tolist()


def _sample_one(logits: torch.Tensor, seq: Sequence) -> int:
    params = seq.params
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[0] = False  # even when top_p rounds to 0 in float32
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    generator = seq.generator
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def token_logprobs(logits: torch.Tensor, token_id: int, top: int) -> TokenLogprobs:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0].long())
    return TokenLogprobs(token_id, float(logprobs[token_id]), tuple(zip(ids.tolist(), values.tolist())))
