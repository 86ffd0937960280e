"""Choosing the next token of every sequence from its logits: greedy, or temperature/top-k/top-p/min-p
sampling; and the logprobs reported for chosen and prompt tokens."""

from dataclasses import dataclass

import torch

from server.engine.sequence import SamplingParams, Sequence


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first
    rank: int | None = None  # 1 + how many tokens were more likely (given for prompt tokens)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits (N, V) for seqs in the same order -> one token id per sequence."""
    chosen = logits.argmax(dim=-1)
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            chosen[i] = _sample_one(logits[i], seq)
    return chosen.tolist()


def _sample_one(logits: torch.Tensor, seq: Sequence) -> int:
    probs = sampling_probs(logits, seq.params)
    generator = seq.generator
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The (unnormalised) distribution one row is sampled from: temperature, top-k, top-p, min-p, in
    transformers' order."""
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
    if params.min_p > 0:  # relative to the most likely token, which always stays
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


def token_logprobs(logits: torch.Tensor, token_id: int, top: int) -> TokenLogprobs:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0].long())
    return TokenLogprobs(token_id, float(logprobs[token_id]), tuple(zip(ids.tolist(), values.tolist())))


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int) -> list[TokenLogprobs]:
    """logits (P, V) at every prompt position -> the logprobs of prompt tokens 1..P-1, each given the
    tokens before it (the first token has none; the last position predicts the first output token)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(prompt_ids[1:], device=logits.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:, :0], logprobs[:, :0].long())
    return [TokenLogprobs(t, lp, tuple(zip(i, v)), r) for t, lp, i, v, r in
            zip(prompt_ids[1:], chosen.tolist(), ids.tolist(), values.tolist(), ranks.tolist())]
