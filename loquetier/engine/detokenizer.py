"""Incremental detokenization and stop-string matching for one request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Tokens that may wait for visible text before a window is read anyway. A UTF-8 character takes at
# most 4 byte tokens; the bound keeps a degenerate run (skipped special tokens, invalid bytes) from
# growing the window, and with it the cost per token, without end.
MAX_PENDING = 16


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; finds stop strings.

    Each update decodes only a short window: the tokens not yet read plus, as context, the ones read
    by the previous update; the new text is the difference between the window's text and the
    context's (both decoded from the same start, so start-of-window effects such as SentencePiece
    dropping a leading space cancel).
    A window whose text ends in a replacement char (an unfinished UTF-8 sequence) or shows nothing
    new waits for more tokens, up to 16. The cost per token is therefore bounded, not the length of
    the output so far. Text that could be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # text emitted so far
        self.stopped = False
        # A fast tokenizer that cleans up nothing decodes through its Rust backend directly (the
        # transformers wrapper costs several times the decode itself on these short windows).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", True) else backend
        self._decoded = ""  # text of token_ids[:_read] (what the windows have settled)
        self._prefix = 0  # the context window starts here
        self._read = 0  # tokens before this are in _decoded

    def update(self, token_ids: Sequence[int]) -> str:
        """Feed the full output so far; return the new text that is safe to emit."""
        if self.stopped:
            return ""
        self._advance(token_ids, final=False)
        return self._settle()

    def finish(self, token_ids: Sequence[int]) -> str:
        """Flush: everything left (minus a stop string) once the request is done."""
        if self.stopped:
            return ""
        self._advance(token_ids, final=True)
        return self._settle(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(list(ids), skip_special_tokens=True))
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _advance(self, token_ids: Sequence[int], final: bool) -> None:
        if len(token_ids) <= self._read:
            return
        context = self._decode(token_ids[self._prefix : self._read]) if self._read > self._prefix else ""
        window = self._decode(token_ids[self._prefix :])
        waiting = window.endswith("\ufffd") or len(window) <= len(context)
        if not final and waiting and len(token_ids) - self._read < MAX_PENDING:
            # an unfinished character, or nothing visible yet (a skipped special token, a lone
            # SentencePiece space that decodes to nothing at a window's start): wait for more
            return
        self._decoded += window[len(context) :]
        self._prefix = self._read  # the next window's context: the tokens just read
        self._read = len(token_ids)

    def _settle(self, final: bool = False) -> str:
        full = self._decoded
        start = max(0, len(self.text) - self._hold)  # a stop string may straddle emitted text
        hits = [at for at in (full.find(stop, start) for stop in self.stop) if at != -1]
        if hits:  # the earliest stop string ends the text
            self.stopped = True
            return self._emit(full[: min(hits)])
        if final:
            return self._emit(full)
        safe = full.rstrip("\ufffd")
        if self._hold and self.stop:
            safe = safe[: max(len(self.text), len(safe) - self._hold)]
        return self._emit(safe)

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta
