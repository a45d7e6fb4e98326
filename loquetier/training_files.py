"""Training files: JSONL bytes -> example maps, checked line by line with the line at fault.

An uploaded file (``POST /v1/files``) holds one example a line, in one of the forms a
``TrainingJobRecord`` takes: ``{"prompt", "completion"}``, ``{"prompt_token_ids",
"completion_token_ids"}`` or a chat example ``{"messages": [{"role", "content"}, ...]}`` whose
last message is the assistant's answer. The gateway checks a file on upload; the worker reads it
back (``file:<file_id>`` as a job's ``data``) and hands the examples to the engine as they are.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loquetier.chat import answer_problem, turn_problem
from loquetier.messages import MAX_CHAT_MESSAGES

FILE_DATA = re.compile(r"^file:(file-[0-9a-f]{1,64})$")  # a job's data naming an uploaded file
ROLES = frozenset({"system", "developer", "user", "assistant"})


class TrainingFileError(ValueError):
    """A file that is not usable training data; the message names the line."""


def file_id_of(data: object) -> str | None:
    """The file id when a job's ``data`` is ``file:<file_id>``, else None."""
    match = FILE_DATA.match(data) if isinstance(data, str) else None
    return match.group(1) if match else None


def parse_jsonl(data: bytes, *, max_examples: int = 100_000) -> list[dict[str, Any]]:
    """Every non-blank line as an example map; the first bad line raises TrainingFileError."""
    try:
        text = data.decode("utf-8-sig")  # a byte order mark that editors on Windows write is not part of line 1
    except UnicodeDecodeError as exc:
        raise TrainingFileError(f"the file is not UTF-8 (byte {exc.start})") from None
    examples: list[dict[str, Any]] = []
    # JSONL lines end at "\n" only ("\r\n" is "\n" after JSON whitespace): str.splitlines would
    # also cut at U+2028, U+2029 or U+0085, which JSON strings may hold as they are
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if len(examples) >= max_examples:
            raise TrainingFileError(f"more than {max_examples} examples")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingFileError(f"line {number}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise TrainingFileError(f"line {number}: nested too deeply") from None
        except ValueError:  # an integer of more digits than Python converts (4,300)
            raise TrainingFileError(f"line {number}: a number with more digits than any value here takes") from None
        problem = example_problem(value) or _text_problem(value)
        if problem:
            raise TrainingFileError(f"line {number}: {problem}")
        examples.append(value)
    if not examples:
        raise TrainingFileError("the file holds no examples")
    return examples


def example_problem(value: Any) -> str | None:
    """Why ``value`` is not a training example, or None."""
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    keys = set(value)
    if keys == {"prompt", "completion"}:
        prompt, completion = value["prompt"], value["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            return "'prompt' must be a string and 'completion' a non-empty string"
        return None
    if keys == {"prompt_token_ids", "completion_token_ids"}:
        for name in ("prompt_token_ids", "completion_token_ids"):
            ids = value[name]
            if not isinstance(ids, list) or not all(_is_token(t) for t in ids):
                return f"'{name}' must be a list of token ids (integers in [0, 2^31))"
        if not value["completion_token_ids"]:
            return "'completion_token_ids' must not be empty"
        if not value["prompt_token_ids"]:  # the engine learns each completion token from the one before it
            return "'prompt_token_ids' must not be empty: the first completion token needs a token before it"
        return None
    if keys == {"messages"}:
        return _messages_problem(value["messages"])
    return (
        "expected {prompt, completion}, {prompt_token_ids, completion_token_ids} or {messages}, "
        f"got keys {sorted(keys)}"
    )


def _text_problem(value: Any) -> str | None:
    """A string no tokenizer can take: JSON's ``\\ud800`` escapes decode to lone surrogates,
    which are not Unicode text (UTF-8 cannot hold them)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"a string holds a lone surrogate (\\u{ord(value[exc.start]):04x}), which is not text"
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((p for p in map(_text_problem, items) if p), None)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or len(messages) < 2:
        return "'messages' must be a list of at least two messages"
    if len(messages) > MAX_CHAT_MESSAGES:
        return f"'messages' holds {len(messages)} messages, more than {MAX_CHAT_MESSAGES}"
    for index, message in enumerate(messages):
        problem = turn_problem(index, message, ROLES)
        if problem is not None:
            return problem
    return answer_problem(messages)
