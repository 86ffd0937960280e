"""Engine outputs in the OpenAI response shapes: whole responses, streamed chunks, logprobs."""

import json
import time

from transformers import PreTrainedTokenizerBase

from server.engine.sampler import TokenLogprobs


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(response_id: str, obj: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    body = {"id": response_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class LogprobFormatter:
    """Token strings for logprobs, decoded one token at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def completion(self, entries: list[TokenLogprobs], text_offset: int, first_token: int | None = None) -> dict:
        """OpenAI's completions logprobs. With `first_token` (echo) the entries start with the prompt's, after
        its first token, which comes first with no logprob (nothing precedes it)."""
        tokens = [self.token(e.token_id) for e in entries]
        logprobs: list[float | None] = [e.logprob for e in entries]
        tops: list[dict | None] = [{self.token(t): lp for t, lp in e.top} for e in entries]
        if first_token is not None:
            tokens, logprobs, tops = [self.token(first_token), *tokens], [None, *logprobs], [None, *tops]
        offsets = []
        for tok in tokens:
            offsets.append(text_offset)
            text_offset += len(tok)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def prompt(self, entries: list[TokenLogprobs]) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: per prompt token (None for the first), token id -> logprob, rank and
        text, for the prompt's own token and the top ones."""
        return [None, *({str(t): {"logprob": lp, "rank": rank, "decoded_token": self.token(t)}
                         for t, lp, rank in [*((t, lp, i + 1) for i, (t, lp) in enumerate(e.top)),
                                             (e.token_id, e.logprob, e.rank)]}
                        for e in entries)]

    def chat(self, entries: list[TokenLogprobs]) -> dict:
        return {"content": [
            {**self._chat_token(e.token_id, e.logprob),
             "top_logprobs": [self._chat_token(t, lp) for t, lp in e.top]}
            for e in entries
        ]}

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
