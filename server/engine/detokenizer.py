"""Turning output tokens into streamed text, and finding stop strings without ever streaming part of one."""

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Per sequence: the text emitted so far, and what the newest tokens add to it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stop = stop
        # A stop string may straddle tokens: hold back that many characters until it is decided.
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.stopped = False
        # Only the newest tokens are decoded each step (whole-output decoding grows with the square of the
        # length), next to the tokens before them: decoders strip a sequence's leading space and merge
        # bytes across tokens, and the context makes both come out as in a whole decode.
        self._decoded = ""  # the text of output_ids[:_read_offset]
        self._prefix_offset = 0
        self._read_offset = 0

    def update(self, output_ids: list[int], final: bool = False, stop_allowed: bool = True) -> str:
        """The new text to emit; sets `stopped` (and cuts the text) when a stop string appears in the text
        added while `stop_allowed` (false until a request's min_tokens were generated, as in vLLM)."""
        full = self._decode_new(output_ids, final)
        end = len(full)
        if self._stop and stop_allowed:
            hit = self._find_stop(full)
            if hit is not None:
                end, final, self.stopped = hit, True, True
        if not final:
            end = min(end, len(full) - self._holdback)
        delta = full[len(self.text):end] if end > len(self.text) else ""
        self.text += delta
        return delta

    def _decode_new(self, output_ids: list[int], final: bool) -> str:
        """All the text so far; tokens that end in an incomplete UTF-8 sequence wait for the next one."""
        decode = self._tokenizer.decode
        context = decode(output_ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        window = decode(output_ids[self._prefix_offset:], skip_special_tokens=True)
        if len(window) > len(context) and (final or not window.endswith("\ufffd")):
            self._decoded += window[len(context):]
            self._prefix_offset, self._read_offset = self._read_offset, len(output_ids)
        return self._decoded

    def _find_stop(self, full: str) -> int | None:
        search_from = max(0, len(self.text) - self._holdback)
        hits = [i for i in (full.find(s, search_from) for s in self._stop) if i >= 0]
        return min(hits) if hits else None
