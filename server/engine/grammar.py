"""Structured outputs: a request's grammar (a JSON schema, a regex, a list of choices) compiled by
llguidance, and the per-step token masks that keep its output inside that grammar.

The semantics, per constrained sequence and step:
    allowed = the tokens that extend the output so far to a prefix of some string of the grammar
              (EOS only where the output so far is a whole string of the grammar)
    logits[t] = -inf for t not in allowed;   after sampling: matcher.consume_token(token)
Free sequences' rows are not touched. Compiling happens off the engine thread (the API's worker threads),
bounded in size and in llguidance's fuel (LLParserLimits); results are cached by grammar text, and each
sequence gets its own copy of the compiled matcher.
"""

import copy
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import llguidance
import torch
from llguidance.torch import fill_next_token_bitmask_par
from transformers import PreTrainedTokenizerBase

from server.errors import InvalidRequestError

MAX_GRAMMAR_CHARS = 65_536  # a schema, regex or choice list longer than this is refused
CACHE_SIZE = 256  # compiled grammars kept, by text
# Compact JSON with json.dumps' separators: no free whitespace, so a model cannot pad forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

GrammarKind = Literal["json", "regex", "choice", "lark"]


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asked for, before compiling: `text` is a JSON schema, a regex, a JSON list of
    choices, or an llguidance lark grammar (server/api/tools.py's tool calls); `param` names the request
    field it came from (for errors)."""

    kind: GrammarKind
    text: str
    param: str


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar; `start()` gives each sequence its own state."""

    spec: GrammarSpec
    template: llguidance.LLMatcher
    vocab_size: int  # the tokenizer's: masks are this many bits wide

    def start(self) -> "GrammarState":
        return GrammarState(self.template.deep_copy(), self.vocab_size)


@dataclass(eq=False)
class GrammarState:
    """One sequence's place in its grammar."""

    matcher: llguidance.LLMatcher
    vocab_size: int

    def advance(self, token: int) -> str | None:
        """Consume a sampled token; the error when the grammar cannot take it (None: taken)."""
        return None if self.matcher.consume_token(token) else _message(self.matcher.get_error())

    @property
    def finished(self) -> bool:
        """The output is a whole string of the grammar and nothing may follow it."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles specs for one tokenizer (thread-safe; call it from worker threads, it may take a while)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = ll_tokenizer(tokenizer)
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Grammar:
        key = (spec.kind, spec.text)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = Grammar(spec, self._build(spec), self.tokenizer.vocab_size)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        if len(spec.text) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(f"{spec.param} is too long ({len(spec.text)} characters; at most "
                                      f"{MAX_GRAMMAR_CHARS})", param=spec.param)
        try:
            grammar = _to_llguidance(spec)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"{spec.param} is not valid: {exc}", param=spec.param) from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=llguidance.LLParserLimits())
        if matcher.is_error():
            raise InvalidRequestError(f"{spec.param} is not valid: {_message(matcher.get_error())}",
                                      param=spec.param)
        return matcher


def _to_llguidance(spec: GrammarSpec) -> str:
    if spec.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.text)
    choices = json.loads(spec.text)  # a list of strings: one literal each
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def _message(error: str) -> str:
    """llguidance's message on one line, without the parser state it may append."""
    return " ".join(error.split("<state>", 1)[0].split())[:300]


@lru_cache(maxsize=4)
def compiler_for(tokenizer: PreTrainedTokenizerBase) -> GrammarCompiler:
    """One compiler per tokenizer: building its llguidance vocabulary takes up to a second."""
    return GrammarCompiler(tokenizer)


def ll_tokenizer(tokenizer: PreTrainedTokenizerBase) -> llguidance.LLTokenizer:
    """The tokenizer's vocabulary as llguidance sees it: token id -> bytes, read from the `tokenizers`
    backend (byte-level BPE such as GPT-2's or the byte tokenizer, and byte-fallback BPE such as Llama's);
    special tokens other than EOS are never allowed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InvalidRequestError("structured outputs need a fast (tokenizers) tokenizer; this model's is not",
                                  param="response_format")
    backend = copy.copy(backend)  # padding and truncation off in a copy: the vocabulary is read from its JSON
    backend.no_padding()
    backend.no_truncation()
    return llguidance.LLTokenizer(backend.to_str(), n_vocab=len(tokenizer), eos_token=tokenizer.eos_token_id)


_EXECUTOR = llguidance.LLExecutor(num_threads=1)  # computes masks outside the GIL; one thread per step
_BITS = torch.arange(32, dtype=torch.int32)


def constrain(logits: torch.Tensor, states: list[GrammarState | None]) -> tuple[torch.Tensor, dict[int, str]]:
    """logits (N, V) and each row's grammar state (None: free) -> the logits to sample from (the input
    itself when every row is free; otherwise a float32 copy with the disallowed tokens of the constrained
    rows at -inf), and {row: error} for grammars that failed (their rows are left as they were: the
    caller fails those requests alone)."""
    rows = [i for i, state in enumerate(states) if state is not None]
    if not rows:
        return logits, {}
    width = (states[rows[0]].vocab_size + 31) // 32
    bitmask = torch.full((len(rows), width), -1, dtype=torch.int32)
    fill_next_token_bitmask_par(_EXECUTOR, [(states[row].matcher, k) for k, row in enumerate(rows)], bitmask)
    errors = {row: _message(states[row].matcher.get_error()) for row in rows if states[row].matcher.is_error()}
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).bool().reshape(len(rows), width * 32)
    allowed = _fit(allowed, logits.shape[-1]).to(logits.device)
    masked = [k for k, row in enumerate(rows) if row not in errors]
    index = torch.tensor([rows[k] for k in masked], dtype=torch.long, device=logits.device)
    adjusted = logits.float().clone()
    adjusted[index] = adjusted[index].masked_fill(~allowed[masked], float("-inf"))
    return adjusted, errors


def _fit(allowed: torch.Tensor, vocab: int) -> torch.Tensor:
    """The mask cut or padded (with disallowed tokens: ids the tokenizer does not have) to the logits' width."""
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    return torch.cat([allowed, allowed.new_zeros(allowed.shape[0], vocab - allowed.shape[1])], dim=1)
