"""The completion body's ``prompt`` union: each wrong shape is a 400 that names where it is wrong."""

from __future__ import annotations

import random
from typing import Any

import pytest

from loquetier.codec import DEFAULT_LIMITS
from loquetier.gateway.errors import APIError
from loquetier.gateway.schemas import MAX_CHOICES, CompletionRequest, parse


def _refusal(prompt: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(CompletionRequest, {"model": "m", "prompt": prompt})
    assert caught.value.status == 400 and caught.value.param == "prompt" and caught.value.code == "invalid_value"
    return caught.value


@pytest.mark.parametrize(("prompt", "message"), [
    (42, "prompt is an integer: it must be a string, a list of token ids"),
    (None, "prompt is null: it must be"),
    ({"text": "hi"}, "prompt is an object: it must be"),
    ([], "prompt is an empty list"),
    ([1.5], "prompt[0] is a number: prompt must be"),
    ([True, 1], "prompt[0] is a boolean: prompt must be"),
    ([5, "x"], "prompt[1] is a string: token ids are integers"),
    ([7, -1], "prompt[1] = -1: token ids are in [0, 2^31)"),
    ([2**40], f"prompt[0] = {2**40}: token ids are in [0, 2^31)"),
    (["a", 3], "prompt[1] is an integer in a list of strings"),
    ([[1, 2], "a"], "prompt[1] is a string in a list of token-id lists"),
    ([[1, 2], [3, 1.5]], "prompt[1][1] is a number: token ids are integers"),
    ([[1], []], "prompt[1] is an empty token list"),
    ([["a"]], "prompt[0][0] is a string: token ids are integers"),
    (["x"] * (MAX_CHOICES + 1), f"prompt holds {MAX_CHOICES + 1} prompts, more than {MAX_CHOICES} a call"),
    ([1] * (DEFAULT_LIMITS.max_prompt_tokens + 1), "prompt holds"),
])
def test_each_wrong_prompt_is_named_where_it_is_wrong(prompt: Any, message: str) -> None:
    assert _refusal(prompt).message.startswith(message)


def test_every_prompt_shape_openai_takes_is_accepted() -> None:
    ids = [random.randrange(2**31) for _ in range(random.randint(1, 40))]
    more = [[random.randrange(50_000) for _ in range(random.randint(1, 9))] for _ in range(3)]
    cases: list[tuple[Any, list[Any]]] = [
        ("hello", ["hello"]), ("", [""]), (ids, [ids]), (["a b", "c"], ["a b", "c"]), (more, more),
    ]
    for prompt, prompts in cases:
        assert parse(CompletionRequest, {"model": "m", "prompt": prompt}).prompts() == prompts
