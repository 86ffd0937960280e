"""Engine outputs in the OpenAI response shapes: whole responses, streamed chunks, logprobs."""

import json
import time

from transformers import PreTrainedTokenizerBase

from server.engine.sampler import TokenLogprobs


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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

    def completion(self, entries: list[TokenLogprobs], text_offset: int) -> dict:
        tokens = [self.token(e.token_id) for e in entries]
        offsets = []
        for tok in tokens:
            offsets.append(text_offset)
            text_offset += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def chat(self, entries: list[TokenLogprobs]) -> dict:
        return {"content": [
            {**self._chat_token(e.token_id, e.logprob),
             "top_logprobs": [self._chat_token(t, lp) for t, lp in e.top]}
            for e in entries
        ]}

    def _chat_token(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
