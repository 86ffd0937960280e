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

    def update(self, output_ids: list[int], final: bool = False) -> str:
        """The new text to emit; sets `stopped` (and cuts the text) when a stop string appears."""
        full = self._tokenizer.decode(output_ids, skip_special_tokens=True)
        end = len(full)
        if self._stop:
            hit = self._find_stop(full)
            if hit is not None:
                end, final, self.stopped = hit, True, True
        if not final:
            if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                end = len(full.rstrip("\ufffd"))
            end = min(end, len(full) - self._holdback)
        delta = full[len(self.text):end] if end > len(self.text) else ""
        self.text += delta
        return delta

    def _find_stop(self, full: str) -> int | None:
        search_from = max(0, len(self.text) - self._holdback)
        hits = [i for i in (full.find(s, search_from) for s in self._stop) if i >= 0]
        return min(hits) if hits else None
