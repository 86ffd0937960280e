"""Streaming text one token at a time equals decoding the whole output, however the bytes fall."""

import pytest

from server.engine.detokenizer import IncrementalDetokenizer
from tests.factories import byte_tokenizer

TEXT = "héllo wörld ✓ 日本語 and plain ascii, then 🎉 at the end"


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.update(ids[:n]) for n in range(1, len(ids))]
    return deltas + [detok.update(ids, final=True)]


def test_token_by_token_text_equals_the_whole_decode():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT), "multi-byte characters must span several tokens for this test to mean anything"
    deltas = _stream(IncrementalDetokenizer(tokenizer, ()), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in d for d in deltas), "half a character must never be streamed"


@pytest.mark.parametrize("stop", ["日本", "ascii,", "🎉"])
def test_a_stop_string_is_cut_and_never_streamed_in_part(stop):
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, (stop,))
    streamed = ""
    for n in range(1, len(ids) + 1):
        streamed += detok.update(ids[:n], final=n == len(ids))
        assert stop not in streamed
        if detok.stopped:
            break
    assert detok.stopped and streamed == TEXT[:TEXT.index(stop)]
