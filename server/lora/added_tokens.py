"""Text for adapters with a resized vocabulary: the base's tokenizer cannot name their new token ids.

An adapter may name them in its `adapter_config.json` under `added_tokens` ({token: id}, the shape of
transformers' `added_tokens.json`; a loraserve key, which PEFT ignores). Its requests then encode and
decode with the base's tokenizer plus those tokens. A new id it does not name is written `<|token_ID|>`
(and that text encodes back to it), so no generated token is ever dropped from the text.
"""

import copy
from collections import OrderedDict
from typing import TYPE_CHECKING

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

from server.errors import AdapterValidationError

if TYPE_CHECKING:  # adapter.py checks added_tokens with this module
    from server.lora.adapter import LoraAdapter

# Tokenizers kept for adapters with a resized vocabulary (a copy is small: the base's plus a few tokens).
MAX_KEPT = 64


def added_token_problems(added: dict[str, int] | None, vocabulary: int, base_vocabulary: int) -> list[str]:
    """Why the config's `added_tokens` cannot name the adapter's new ids (`vocabulary` rows, the base's
    `base_vocabulary`)."""
    if not added:
        return []
    if vocabulary <= base_vocabulary:
        return [f"added_tokens: the adapter's vocabulary is the base's ({base_vocabulary} rows): no new ids to name"]
    problems = [f"added_tokens: {token!r} -> {i}: ids name the new rows, {base_vocabulary} to {vocabulary - 1}"
                for token, i in added.items() if not base_vocabulary <= i < vocabulary]
    problems += ["added_tokens: a token is the empty string" for token in added if not token]
    if len(set(added.values())) < len(added):
        problems.append("added_tokens: two tokens name the same id")
    return problems


def placeholder(token_id: int) -> str:
    return f"<|token_{token_id}|>"


def extend_tokenizer(base: PreTrainedTokenizerBase, vocabulary: int, added: dict[str, int]
                     ) -> PreTrainedTokenizerBase:
    """The base's tokenizer with every id from its end up to `vocabulary` named: by `added`, else a
    placeholder. Added tokens take the next ids in order, so the ids match the adapter's rows."""
    names = {i: token for token, i in added.items()}
    tokenizer = copy.deepcopy(base)
    new = [names.get(i, placeholder(i)) for i in range(len(base), vocabulary)]
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in new])
    taken = [f"added_tokens: {token!r} is already the base tokenizer's token {base.convert_tokens_to_ids(token)}"
             for i, token in enumerate(new, start=len(base)) if tokenizer.convert_tokens_to_ids(token) != i]
    if taken:
        raise AdapterValidationError(taken)
    return tokenizer


class AdapterTokenizers:
    """The tokenizer each request encodes and decodes with: the base's, or its adapter's extension."""

    def __init__(self, base: PreTrainedTokenizerBase):
        self.base = base
        self._kept: OrderedDict[str, tuple["LoraAdapter", PreTrainedTokenizerBase]] = OrderedDict()

    def of(self, adapter: "LoraAdapter | None") -> PreTrainedTokenizerBase:
        if adapter is None or adapter.vocabulary is None:
            return self.base
        kept = self._kept.get(adapter.name)
        if kept is None or kept[0] is not adapter:  # a new version under the same name builds anew
            kept = (adapter, extend_tokenizer(self.base, adapter.vocabulary, adapter.spec.added_tokens or {}))
            self._kept[adapter.name] = kept
            if len(self._kept) > MAX_KEPT:
                self._kept.popitem(last=False)
        self._kept.move_to_end(adapter.name)
        return kept[1]
