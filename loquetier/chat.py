"""Chat formatting for the demo and examples, and the demo's shipped data (``loquetier/data``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
PIRATE_ADAPTER = DATA_DIR / "pirate-adapter"  # made by examples/train_adapter.py


def chat_prompt(tokenizer: Any, question: str) -> str:
    """The model's own chat template around one user turn, ready for the assistant's answer."""
    messages = [{"role": "user", "content": question}]
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def chat_examples(tokenizer: Any, name: str) -> list[dict[str, str]]:
    """loquetier/data/<name>.jsonl as {prompt, completion} text examples in chat format.

    The engine appends the EOS token (``<|im_end|>`` for SmolLM2) after each completion.
    """
    rows = [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines() if line]
    return [{"prompt": chat_prompt(tokenizer, r["prompt"]), "completion": r["completion"]} for r in rows]
