"""Incremental detokenization and stop-string matching for one request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; finds stop strings.

    Decodes the whole output each time it grows (outputs are short next to the model step) and
    holds back text that may still change: a trailing replacement char (an unfinished UTF-8
    sequence) or a suffix that could be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # text emitted so far
        self.stopped = False

    def update(self, token_ids: Sequence[int]) -> str:
        """Feed the full output so far; return the new text that is safe to emit."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        for stop in self.stop:
            at = full.find(stop)
            if at != -1:
                self.stopped = True
                return self._emit(full[:at])
        safe = full
        if safe.endswith("\ufffd"):
            safe = safe.rstrip("\ufffd")
        if self._hold and self.stop:
            safe = safe[: max(len(self.text), len(safe) - self._hold)]
        return self._emit(safe)

    def finish(self, token_ids: Sequence[int]) -> str:
        """Flush: everything left (minus a stop string) once the request is done."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return self._emit(full)

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta
