"""From result records to OpenAI answers: whole JSON objects, or SSE chunks as tokens arrive.

``Waiter`` takes the records of one request from the gateway's reply queue: token records
(only for streams) and then one final ``result`` or ``error``. A call with several choices
(``n``, or several prompts) is one request record per choice, whose answers are merged here. A stream's text is the
concatenation of its token records' text; if the final text carries more (a token record
lost on the way: they are best-effort), the missing tail goes out as a last delta, so a
stream always ends with the same text as the same request without streaming.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from loquetier.messages import GenerateResult

from .errors import APIError, from_worker
from .tokens import TokenText

Kind = str  # "chat" | "text"
T = TypeVar("T")


@dataclass
class Waiter:
    queue: asyncio.Queue[Any]
    deadline: float
    sent: tuple[str, int, int] | None = None  # where the request's record stands
    done: bool = False  # its final record (result or error) arrived
    on_result: Callable[[GenerateResult], None] | None = None  # called once, with the result record

    async def next(self) -> Any:
        """The next record; 504 past the deadline; an ``error`` record as its APIError."""
        while True:
            remaining = self.deadline - time.monotonic()
            try:
                record = await asyncio.wait_for(self.queue.get(), max(remaining, 0.001))
            except TimeoutError:
                raise APIError(504, "no result within the gateway's request timeout", code="timeout") from None
            if self._is_ours(record):
                break
        return self._checked(record)

    def ready(self) -> list[Any]:
        """Records already waiting (none if an error is among them: that one is raised)."""
        out = []
        while not self.queue.empty():
            record = self.queue.get_nowait()
            if self._is_ours(record):
                out.append(self._checked(record))
        return out

    def _checked(self, record: Any) -> Any:
        if record.type in ("result", "error"):
            self.done = True
        if record.type == "result" and self.on_result is not None:
            settle, self.on_result = self.on_result, None
            settle(record)
        if record.type == "error":
            raise from_worker(record.code, record.message)
        return record

    def _is_ours(self, record: Any) -> bool:
        """A refusal of one named record answers only that record: one another producer sent to
        this gateway's topic under our request id is not our answer."""
        ref = getattr(record, "record", None)
        return ref is None or self.sent is None or ref.key() == self.sent

    async def final(self) -> GenerateResult:
        while True:
            record = await self.next()
            if record.type == "result":
                assert isinstance(record, GenerateResult)
                return record


def usage(results: Sequence[GenerateResult], prompt_of: Sequence[int]) -> dict[str, int]:
    """Token counts of one call: each prompt counted once (``n`` choices share it), every completion."""
    prompts = {p: r.usage.prompt_tokens for r, p in zip(results, prompt_of, strict=True)}
    prompt_tokens = sum(prompts.values())
    completion_tokens = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def scored_tokens(result: GenerateResult, tokens: TokenText) -> tuple[list[str], list[float], list[int]]:
    """The texts, log-probabilities and text offsets of the tokens whose text is in the answer.

    A stop string cuts the answer's text inside the generated tokens: the tokens that start at or
    past the cut (the stop string's own, and any the worker sampled after it) are left out, so every
    offset lies inside ``text``. Without a tokenizer nothing is cut and the offsets count the
    placeholders' lengths."""
    pieces, logprobs = tokens.pieces(list(result.token_ids)), list(result.logprobs or [])
    spans = tokens.offsets(list(result.token_ids))
    if spans is None:
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        return pieces, logprobs, offsets
    offsets, full = spans
    if len(full) > len(result.text) and full.startswith(result.text):
        keep = sum(1 for at in offsets if at < len(result.text))  # offsets never decrease
        pieces, logprobs, offsets = pieces[:keep], logprobs[:keep], offsets[:keep]
    return pieces, logprobs, offsets


def chat_logprobs(result: GenerateResult, tokens: TokenText) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    pieces, logprobs, _ = scored_tokens(result, tokens)
    raw = tokens.token_bytes(list(result.token_ids[: len(pieces)]), pieces)
    return {"content": [
        {"token": piece, "logprob": lp, "bytes": token_bytes, "top_logprobs": []}
        for piece, lp, token_bytes in zip(pieces, logprobs, raw, strict=False)
    ], "refusal": None}


def text_logprobs(result: GenerateResult, tokens: TokenText) -> dict[str, Any] | None:
    """``top_logprobs`` holds the chosen token alone: the worker returns no alternatives."""
    if result.logprobs is None:
        return None
    pieces, logprobs, offsets = scored_tokens(result, tokens)
    return {"tokens": pieces, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": [{piece: lp} for piece, lp in zip(pieces, logprobs, strict=False)]}


def whole(kind: Kind, rid: str, model: str, results: Sequence[GenerateResult], prompt_of: Sequence[int],
          tokens: TokenText) -> dict[str, Any]:
    """The non-streaming answer: one choice per result, in order."""
    created = int(time.time())
    choices: list[dict[str, Any]] = []
    for index, result in enumerate(results):
        if kind == "chat":
            choices.append({"index": index, "message": {"role": "assistant", "content": result.text, "refusal": None},
                            "logprobs": chat_logprobs(result, tokens), "finish_reason": result.finish_reason})
        else:
            choices.append({"index": index, "text": result.text, "logprobs": text_logprobs(result, tokens),
                            "finish_reason": result.finish_reason})
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage(results, prompt_of), "system_fingerprint": None}


class Chunks:
    """SSE chunks of one streamed answer."""

    def __init__(self, kind: Kind, rid: str, model: str, include_usage: bool) -> None:
        self.kind, self.rid, self.model, self.include_usage = kind, rid, model, include_usage
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj: dict[str, Any] = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model,
                               "choices": choices, "system_fingerprint": None, **extra}
        if self.include_usage and "usage" not in obj:
            obj["usage"] = None
        return _sse(orjson.dumps(obj))

    def _choice(self, index: int, text: str | None, finish: str | None, logprobs: Any = None, *,
                role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta["role"] = "assistant"
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def first(self, index: int) -> bytes | None:
        return self._event([self._choice(index, "", None, role=True)]) if self.kind == "chat" else None

    def delta(self, index: int, text: str) -> bytes:
        return self._event([self._choice(index, text, None)])

    def finish(self, index: int, result: GenerateResult, tokens: TokenText) -> bytes:
        logprobs = (chat_logprobs if self.kind == "chat" else text_logprobs)(result, tokens)
        return self._event([self._choice(index, None if self.kind == "chat" else "", result.finish_reason, logprobs)])

    def usage(self, results: Sequence[GenerateResult], prompt_of: Sequence[int]) -> bytes:
        return self._event([], usage=usage(results, prompt_of))


def error_event(error: APIError) -> bytes:
    return _sse(orjson.dumps(error.body()))


def _sse(data: bytes) -> bytes:
    """One SSE event. JSON leaves U+0085/U+2028/U+2029 raw, and line readers that split like
    ``str.splitlines`` would cut the event there; escaped, every reader sees one line."""
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


async def side_by_side(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Every awaitable's value, awaited side by side; the first to raise cancels the rest and raises."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task in done and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


async def first_records(waiters: Sequence[Waiter]) -> list[Any]:
    """Each waiter's first record, so that a request the worker refuses (``prompt_too_long``,
    ``unknown_adapter``) is an HTTP error before a stream's headers go out; the first error wins."""
    return await side_by_side([w.next() for w in waiters])


@dataclass
class _Streamed:
    """What one choice of a stream has sent. Token records come at least once: a worker that
    restarts computes the request again from its first token, so records repeat (same ``index``),
    and an unseeded sampled request (or a near tie) may continue differently the second time."""

    ids: list[int] = field(default_factory=list)  # token ids whose text went out, in order
    text: str = ""
    held: bool = False  # a record that starts past (or straddles) the end of what went out: the
    # rest of the text comes with the final record
    diverged: bool = False  # a record contradicts tokens already sent

    def take(self, record: Any) -> bool:
        """Whether ``record``'s text is the next text of this choice (and note it as sent)."""
        start, ids = int(record.index), list(record.token_ids)
        have = len(self.ids)
        if start < have:
            seen = self.ids[start : start + len(ids)]
            if seen != ids[: len(seen)]:
                self.diverged = True
                return False
            if start + len(ids) <= have:
                return False  # a repeat
            self.held = True  # part repeat, part new: its text cannot be cut at the boundary
            return False
        if start > have or self.held:
            self.held = True
            return False
        self.ids += ids
        self.text += record.text
        return True

    def tail(self, result: GenerateResult) -> str | None:
        """The final text past what went out; None if the result contradicts it."""
        ids = list(result.token_ids)
        if ids[: len(self.ids)] != self.ids or not result.text.startswith(self.text):
            return None
        return result.text[len(self.text) :]


def _diverged() -> APIError:
    return APIError(502, "the worker computing this answer restarted, and its new run does not continue the "
                    "text already streamed; send the request again", code="stream_restarted")


async def stream(waiters: Sequence[Waiter], firsts: Sequence[Any], prompt_of: Sequence[int], chunks: Chunks,
                 tokens: TokenText) -> AsyncIterator[bytes]:
    """Token records as deltas, each final record as its choice's closing chunk, the usage chunk
    when asked, then ``[DONE]``. Choices interleave as their records arrive."""
    arrived: asyncio.Queue[tuple[int, list[Any] | APIError]] = asyncio.Queue()

    async def pump(index: int, waiter: Waiter, first: Any) -> None:
        try:
            records = [first, *waiter.ready()]  # a client that fell behind gets one delta
            while True:
                await arrived.put((index, records))
                if any(r.type == "result" for r in records):
                    return
                records = [await waiter.next(), *waiter.ready()]
        except APIError as error:
            await arrived.put((index, error))

    for index in range(len(waiters)):
        first = chunks.first(index)
        if first is not None:
            yield first
    pumps = [asyncio.ensure_future(pump(i, w, f)) for i, (w, f) in enumerate(zip(waiters, firsts, strict=True))]
    choices = [_Streamed() for _ in waiters]
    results: list[GenerateResult | None] = [None] * len(waiters)
    try:
        while any(r is None for r in results):
            index, batch = await arrived.get()
            if isinstance(batch, APIError):  # headers are out: the error travels as an event, the stream ends
                yield error_event(batch)
                break
            choice = choices[index]
            text = ""
            for record in batch:
                if record.type == "token" and not choice.diverged and choice.take(record):
                    text += record.text
            if text:
                yield chunks.delta(index, text)
            if choice.diverged:
                yield error_event(_diverged())
                break
            result = next((r for r in batch if r.type == "result"), None)
            if result is not None:
                tail = choice.tail(result)
                if tail is None:
                    yield error_event(_diverged())
                    break
                if tail:
                    yield chunks.delta(index, tail)
                results[index] = result
                yield chunks.finish(index, result, tokens)
        else:
            if chunks.include_usage:
                yield chunks.usage([r for r in results if r is not None], prompt_of)
    finally:
        for task in pumps:
            task.cancel()
    yield b"data: [DONE]\n\n"
