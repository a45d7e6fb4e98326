"""Token ids -> their text, for ``logprobs`` answers (the result records carry ids only).

The gateway loads nothing heavy: only the model's ``tokenizer.json`` through the Rust
``tokenizers`` library, when the model directory is readable from the gateway. Without it, a
token shows as ``token_id:<id>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from loquetier.engine.detokenizer import MAX_PENDING

log = logging.getLogger(__name__)


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's, used by Llama 3, Qwen2 and SmolLM): each of the 256
    bytes is written as one printable character in a token's vocabulary entry."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_chars()


def _decoder_types(decoder: Any) -> set[str]:
    if not isinstance(decoder, dict):
        return set()
    found = {str(decoder.get("type"))}
    for inner in decoder.get("decoders") or ():
        found |= _decoder_types(inner)
    return found


class TokenText:
    def __init__(self, model_dir: Path | None) -> None:
        self._tokenizer: Any = None
        self._decoders: set[str] = set()
        path = model_dir / "tokenizer.json" if model_dir is not None else None
        if path is not None and path.is_file():
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(path))
                self._decoders = _decoder_types(json.loads(self._tokenizer.to_str()).get("decoder"))
            except Exception as exc:  # an unreadable tokenizer only costs token texts
                log.warning("tokenizer not loaded", extra={"path": str(path), "error": str(exc)[:200]})

    def pieces(self, token_ids: list[int]) -> list[str]:
        if self._tokenizer is None:
            return [f"token_id:{t}" for t in token_ids]
        return [self._tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    def token_bytes(self, token_ids: list[int], pieces: list[str]) -> list[list[int]]:
        """Each token's own bytes (``pieces``: their texts, as :meth:`pieces` gives them). A token that
        holds part of a character (a byte-level BPE byte, a SentencePiece ``<0xNN>`` fallback) has
        bytes that are no UTF-8 text alone: they are read from its vocabulary entry, not from its
        decoded piece (which shows U+FFFD)."""
        out = []
        for token_id, piece in zip(token_ids, pieces, strict=True):
            entry = self._tokenizer.id_to_token(token_id) if self._tokenizer is not None else None
            out.append(list(self._entry_bytes(entry) or piece.encode()))
        return out

    def _entry_bytes(self, entry: str | None) -> bytes | None:
        if not entry:
            return None
        if "ByteLevel" in self._decoders and all(c in _BYTE_LEVEL for c in entry):
            return bytes(_BYTE_LEVEL[c] for c in entry)
        if "ByteFallback" in self._decoders:  # SentencePiece: "<0xNN>" is one byte, "\u2581" a space
            if len(entry) == 6 and entry.startswith("<0x") and entry.endswith(">"):
                try:
                    return bytes([int(entry[3:5], 16)])
                except ValueError:
                    pass
            return entry.replace("\u2581", " ").encode()
        return None

    def offsets(self, token_ids: list[int]) -> tuple[list[int], str] | None:
        """Where each token's text starts in the output's text, and that text (decoded as the worker
        decodes it: special tokens skipped); None without a tokenizer.

        Decoded window by window as the worker's detokenizer does (the tokens just read as context),
        so the cost per token stays bounded. A character that takes several byte tokens starts at its
        first: the tokens that finish it start there too."""
        if self._tokenizer is None:
            return None

        def decode(ids: list[int]) -> str:
            return str(self._tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""

        text, starts, prefix, read = "", [], 0, 0
        for end in range(1, len(token_ids) + 1):
            starts.append(len(text))
            window = decode(token_ids[prefix:end])
            if window.endswith("\ufffd") and end - read < MAX_PENDING and end < len(token_ids):
                continue  # an unfinished character: its text comes with a later token
            text += window[len(decode(token_ids[prefix:read])):]
            prefix, read = read, end
        return starts, text
