"""A stream whose worker restarts mid-answer: token records come again from index 0 (at-least-once
delivery, a recomputed request). The client gets each token's text once, or an error event when the
new run does not continue what was sent; never text of two runs glued together."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

from loquetier.gateway import answers
from loquetier.gateway.tokens import TokenText
from loquetier.results import GenerateResult, TokenResult, Usage

RID = "cmpl-restart"


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice([" the", " river", " runs", " é", " 日本", " fast", "\n"]) for _ in range(n)]


def _records(ids: list[int], words: list[str], cuts: list[int]) -> list[TokenResult]:
    """Token records over ``ids`` cut at ``cuts`` (record boundaries), each with its tokens' text."""
    bounds = [0, *cuts, len(ids)]
    return [TokenResult(request_id=RID, index=a, token_ids=ids[a:b], text="".join(words[a:b]))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _result(ids: list[int], words: list[str]) -> GenerateResult:
    return GenerateResult(request_id=RID, token_ids=ids, text="".join(words), finish_reason="length",
                          usage=Usage(prompt_tokens=5, completion_tokens=len(ids)))


async def _streamed(records: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    """The text a chat client reads from ``records`` (in arrival order), and the error events."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for record in records:
        queue.put_nowait(record)
    waiter = answers.Waiter(queue, time.monotonic() + 10)
    first = await waiter.next()
    chunks = answers.Chunks("chat", RID, "m", include_usage=False)
    text, errors = "", []
    async for event in answers.stream([waiter], [first], [0], chunks, TokenText(None)):
        data = event.decode().removeprefix("data: ").strip()
        if data == "[DONE]":
            continue
        body = json.loads(data)
        if "error" in body:
            errors.append(body["error"])
            continue
        for choice in body["choices"]:
            text += choice["delta"].get("content") or ""
    return text, errors


async def test_a_recomputed_run_with_the_same_tokens_streams_each_token_once() -> None:
    n = random.randint(30, 60)
    ids, words = [random.randrange(3, 30_000) for _ in range(n)], _words(n, 1)
    killed = random.randint(5, n - 10)  # the first run got this far
    first_run = _records(ids[:killed], words[:killed], sorted(random.sample(range(1, killed), 3)))
    # the second run cuts its records elsewhere: some repeat, one straddles the end of what was sent
    second_run = _records(ids, words, sorted(random.sample(range(1, n), 6)))
    text, errors = await _streamed([*first_run, *second_run, _result(ids, words)])
    assert errors == [] and text == "".join(words)


async def test_repeats_that_match_are_dropped_and_the_stream_goes_on() -> None:
    n = 40
    ids, words = [random.randrange(3, 30_000) for _ in range(n)], _words(n, 2)
    cuts = list(range(4, n, 4))  # both runs cut every 4 tokens, as decode windows do
    first = _records(ids[:20], words[:20], [c for c in cuts if c < 20])
    second = _records(ids, words, cuts)
    text, errors = await _streamed([*first, *second, _result(ids, words)])
    assert errors == [] and text == "".join(words)


async def test_a_run_that_continues_differently_ends_with_an_error_not_mixed_text() -> None:
    n = 30
    ids, words = [random.randrange(3, 30_000) for _ in range(n)], _words(n, 3)
    other_ids = ids[:10] + [i + 1 for i in ids[10:]]  # the second run samples differently from token 10
    other_words = words[:10] + [w.upper() + "!" for w in words[10:]]
    first = _records(ids[:16], words[:16], [4, 8, 12])
    second = _records(other_ids, other_words, [4, 8, 12, 16, 20])
    text, errors = await _streamed([*first, *second, _result(other_ids, other_words)])
    assert [e["code"] for e in errors] == ["stream_restarted"] and e_type(errors) == "server_error"
    assert text == "".join(words[:16])  # nothing of the second run's different text went out


async def test_a_final_record_that_contradicts_the_sent_text_is_an_error() -> None:
    n = 12
    ids, words = [random.randrange(3, 30_000) for _ in range(n)], _words(n, 4)
    first = _records(ids[:6], words[:6], [3])
    other = ids[:5] + [ids[5] + 7] + ids[6:]
    text, errors = await _streamed([*first, _result(other, words)])
    assert [e["code"] for e in errors] == ["stream_restarted"] and text == "".join(words[:6])


def e_type(errors: list[dict[str, Any]]) -> str:
    return str(errors[0]["type"])
