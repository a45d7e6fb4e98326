"""Chat turns -> token ids through the model's own chat template, and the demo's shipped data.

A request's ``messages`` become the prompt for the assistant's next turn
(:func:`chat_prompt_ids`); a chat training example becomes token segments where only the
assistant turns carry loss (:func:`chat_segments`). Both tokenize the rendered text without
adding special tokens: a chat template writes its own BOS and turn markers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loquetier.engine.errors import EngineError

DATA_DIR = Path(__file__).resolve().parent / "data"
PIRATE_ADAPTER = DATA_DIR / "pirate-adapter"  # made by examples/train_adapter.py
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name; chat templates know "system"

Turns = Sequence[Mapping[str, Any]]


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


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat_prompt_ids(tokenizer: Any, messages: Turns) -> list[int]:
    """The token ids of ``messages`` followed by the template's opening of an assistant turn.

    Raises EngineError ``no_chat_template`` (the model has none: send ``prompt`` or
    ``prompt_token_ids``) or ``invalid_request`` (the template refused these turns).
    """
    _check_template(tokenizer)
    return _ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


TURN_KEYS = frozenset({"role", "content", "name", "weight"})


def turn_problem(index: int, message: Any, roles: frozenset[str]) -> str | None:
    """What is wrong with one turn of a chat training example (None: nothing). A turn is
    ``{"role", "content"}``, with OpenAI's optional ``name`` (kept out of the template) and, on an
    assistant turn, ``weight`` 0 (context only, not learned) or 1 (learned, the default)."""
    if not isinstance(message, Mapping) or not {"role", "content"} <= set(message) or not set(message) <= TURN_KEYS:
        return f"messages[{index}] must be an object with 'role' and 'content' (and optionally 'name', 'weight')"
    if message["role"] not in roles or not isinstance(message["content"], str):
        return f"messages[{index}]: 'role' must be one of {sorted(roles)} and 'content' a string"
    if "name" in message and not isinstance(message["name"], str):
        return f"messages[{index}]: 'name' must be a string"
    if "weight" in message and (message["role"] != "assistant" or message["weight"] not in (0, 1)
                                or isinstance(message["weight"], bool)):
        return f"messages[{index}]: 'weight' is 0 or 1, on assistant turns only"
    return None


def answer_problem(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """An example must end with an assistant answer, and the model must learn at least one turn."""
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        return "the last message must be the assistant's non-empty answer (what the model learns)"
    if not any(is_learned(m) for m in messages):
        return "every assistant turn has weight 0: nothing to learn"
    return None


def is_learned(message: Mapping[str, Any]) -> bool:
    """Whether the model learns this turn: an assistant turn without ``weight`` 0."""
    return message.get("role") == "assistant" and message.get("weight", 1) == 1


def chat_segments(tokenizer: Any, messages: Turns) -> list[tuple[list[int], bool]]:
    """A chat example as ``(token_ids, is_target)`` segments, in order; targets are the assistant turns
    (but those with ``weight`` 0).

    Each assistant turn spans from where the template's prompt for it ends (the text a request
    with the turns before it would send) to where the conversation up to it ends, so the
    turn's closing marker (e.g. ``<|im_end|>``, the EOS) is learned too. A template whose
    renderings are not prefixes of one another cannot be split this way: EngineError.
    """
    _check_template(tokenizer)
    full = render(tokenizer, messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    done = 0  # characters of ``full`` already in pieces
    for index, message in enumerate(messages):
        if not is_learned(message):
            continue
        start_text = render(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        end_text = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        start = len(start_text)
        if not (full.startswith(end_text) and end_text.startswith(start_text) and start >= done):
            raise EngineError(
                "invalid_data",
                "the model's chat template does not render a conversation as a prefix of its continuation, "
                "so the assistant turns cannot be located: use {prompt, completion} examples",
            )
        pieces += [(full[done:start], False), (full[start : len(end_text)], True)]
        done = len(end_text)
    pieces.append((full[done:], False))
    return [(_ids(tokenizer, text), is_target) for text, is_target in pieces if text]


def render(tokenizer: Any, messages: Turns, *, add_generation_prompt: bool) -> str:
    turns = [{"role": ROLE_ALIASES.get(m["role"], m["role"]), "content": m["content"]} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # jinja2's TemplateError, or a template's own raise_exception(...)
        raise EngineError("invalid_request", f"the model's chat template refused these messages: {exc}"[:500]) from exc
    return str(text)


def _check_template(tokenizer: Any) -> None:
    if tokenizer is None:
        raise EngineError("no_chat_template", "this model has no tokenizer: send 'prompt_token_ids'")
    if not has_chat_template(tokenizer):
        raise EngineError(
            "no_chat_template", "this model has no chat template: send 'prompt' (raw text) or 'prompt_token_ids'"
        )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
