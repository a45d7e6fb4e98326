"""A model directory's tokenizer, loaded the same way everywhere (engine, worker, demo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def tokenizer_options(model_dir: Path) -> dict[str, Any]:
    """``AutoTokenizer.from_pretrained`` options: a BPE tokenizer is loaded with
    ``clean_up_tokenization_spaces=False``. transformers skips that clean-up for BPE anyway (it would
    strip spaces before punctuation) but warns on every load of a config that asks for it; the
    decoded text is the same either way."""
    try:
        model = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {"clean_up_tokenization_spaces": False} if model == "BPE" else {}


def load_tokenizer(model_dir: Path) -> Any:
    """The model directory's tokenizer (None when it ships none)."""
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), **tokenizer_options(model_dir))
