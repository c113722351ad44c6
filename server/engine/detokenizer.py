"""Incremental detokenization and stop-string matching for one sequence."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class Detokenizer:
    """Keeps the text of a sequence's output and yields only what is new and final: text that
    ends in an incomplete UTF-8 character, or that may be the start of a stop string, waits."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], skip_special_tokens: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # final text emitted so far
        self._hold = max((len(s) - 1 for s in stop), default=0)

    def update(self, output_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """-> (new text to emit, whether a stop string matched). After a match the text ends
        just before the stop string."""
        full = self.tokenizer.decode(output_ids, skip_special_tokens=self.skip_special_tokens)
        if not final and full.endswith("\ufffd"):
            return "", False
        for s in self.stop:
            # Only search where a new match can be: from just before the emitted text's end.
            at = full.find(s, max(0, len(self.text) - len(s) + 1))
            if at != -1:
                delta = full[len(self.text) : at]
                self.text = full[:at]
                return delta, True
        ready = full if final else full[: len(full) - self._hold] if self._hold else full
        if len(ready) <= len(self.text):
            return "", False
        delta = ready[len(self.text) :]
        self.text = ready
        return delta, False
