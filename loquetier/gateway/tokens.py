"""Token ids -> their text, for ``logprobs`` answers (the result records carry ids only).

The gateway loads nothing heavy: only the model's ``tokenizer.json`` through the Rust
``tokenizers`` library, when the model directory is readable from the gateway. Without it, a
token shows as ``token_id:<id>``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TokenText:
    def __init__(self, model_dir: Path | None) -> None:
        self._tokenizer: Any = None
        path = model_dir / "tokenizer.json" if model_dir is not None else None
        if path is not None and path.is_file():
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # an unreadable tokenizer only costs token texts
                log.warning("tokenizer not loaded", extra={"path": str(path), "error": str(exc)[:200]})

    def pieces(self, token_ids: list[int]) -> list[str]:
        if self._tokenizer is None:
            return [f"token_id:{t}" for t in token_ids]
        return [self._tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
