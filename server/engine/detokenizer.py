"""Incremental detokenization and stop-string matching for one sequence."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


def rust_decode(tokenizer: PreTrainedTokenizerBase) -> Callable[..., str] | None:
    """The `tokenizers` library's decode where transformers' `decode` would only wrap it (a
    fast tokenizer neither overriding it nor cleaning up spaces): transformers' argument
    handling skipped, twice a token for every sequence at every step (part of what
    bench/host_step.py measures)."""
    cls = type(tokenizer)
    if (
        not isinstance(tokenizer, PreTrainedTokenizerFast)
        or cls.decode is not PreTrainedTokenizerBase.decode
        or cls._decode is not PreTrainedTokenizerFast._decode
        or getattr(tokenizer, "clean_up_tokenization_spaces", False)
    ):
        return None
    return tokenizer.backend_tokenizer.decode


class Detokenizer:
    """Keeps the text of a sequence's output and yields only what is new and final: text that
    ends in an incomplete UTF-8 character, or that may be the start of a stop string, waits.

    Each step decodes only the tokens since the last complete character (and those of the
    step before, so that the window's first token decodes as it does in place): decoding the
    whole output every step cost O(length) per token (0.47 ms at 2,000 tokens here, per
    sequence per step). What each step emits is what decoding the whole output would emit
    (tests/unit/test_detokenizer.py); where a window's decode is not the whole decode's tail
    (a clean-up of spaces around punctuation over the whole text) the whole output is
    decoded, and tokenizers that clean up (clean_up_tokenization_spaces) always decode it."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], skip_special_tokens: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # final text emitted so far
        self._hold = max((len(s) - 1 for s in stop), default=0)
        self._incremental = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._rust_decode = rust_decode(tokenizer)
        self._decoded = ""  # the text of output_ids[:_read], ending in a whole character
        self._prefix = 0  # output_ids[_prefix:_read] decode to the end of _decoded
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        if self._rust_decode is not None:
            return self._rust_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _full(self, ids: list[int], start: int, end: int, final: bool) -> str | None:
        """The whole output's (ids[start:end]) text; None while it ends in an incomplete
        character (not final). The output extends that of the previous call (or is it)."""
        if self._incremental:
            before = self._decode(ids[start + self._prefix : start + self._read])
            after = self._decode(ids[start + self._prefix : end])
            if after.startswith(before):
                new = after[len(before) :]
                if not final and new.endswith("\ufffd"):
                    return None
                if new:
                    self._decoded += new
                    self._prefix, self._read = self._read, end - start
                return self._decoded
        full = self._decode(ids[start:end])
        if not final and full.endswith("\ufffd"):
            return None
        # the next window starts with these tokens, not with the next one (whose decode at a
        # window's start can differ: a leading space stripped)
        self._decoded, self._prefix, self._read = full, self._read, end - start
        return full

    def update(
        self, ids: list[int], final: bool = False, start: int = 0, end: int | None = None
    ) -> tuple[str, bool]:
        """The output is ids[start:end] (a sequence's ids past its prompt, read in place: a
        copy of them every token cost O(length)) -> (new text to emit, whether a stop string
        matched). After a match the text ends just before the stop string."""
        full = self._full(ids, start, len(ids) if end is None else end, final)
        if full is None:
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
