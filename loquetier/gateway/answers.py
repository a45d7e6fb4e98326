"""From result records to OpenAI answers: whole JSON objects, or SSE chunks as tokens arrive.

``Waiter`` takes the records of one request from the gateway's reply queue: token records
(only for streams) and then one final ``result`` or ``error``. A stream's text is the
concatenation of its token records' text; if the final text carries more (a token record
lost on the way: they are best-effort), the missing tail goes out as a last delta, so a
stream always ends with the same text as the same request without streaming.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from loquetier.messages import GenerateResult

from .errors import APIError, from_worker
from .tokens import TokenText

Kind = str  # "chat" | "text"


@dataclass
class Waiter:
    queue: asyncio.Queue[Any]
    deadline: float
    sent: tuple[str, int, int] | None = None  # where the request's record stands

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
        if record.type == "error":
            raise from_worker(record.code, record.message)
        return record

    def ready(self) -> list[Any]:
        """Records already waiting (none if an error is among them: that one is raised)."""
        out = []
        while not self.queue.empty():
            record = self.queue.get_nowait()
            if not self._is_ours(record):
                continue
            if record.type == "error":
                raise from_worker(record.code, record.message)
            out.append(record)
        return out

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


def usage(result: GenerateResult) -> dict[str, int]:
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def chat_logprobs(result: GenerateResult, tokens: TokenText) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    pieces = tokens.pieces(result.token_ids)
    return {"content": [
        {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []}
        for piece, lp in zip(pieces, result.logprobs, strict=False)
    ], "refusal": None}


def text_logprobs(result: GenerateResult, tokens: TokenText) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    pieces = tokens.pieces(result.token_ids)
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": list(result.logprobs), "top_logprobs": None, "text_offset": offsets}


def whole(kind: Kind, rid: str, model: str, result: GenerateResult, tokens: TokenText) -> dict[str, Any]:
    """The non-streaming answer."""
    created = int(time.time())
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text, "refusal": None},
            "logprobs": chat_logprobs(result, tokens),
            "finish_reason": result.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": text_logprobs(result, tokens),
                  "finish_reason": result.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(result), "system_fingerprint": None}


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

    def _choice(self, text: str | None, finish: str | None, logprobs: Any = None, *, role: bool = False) -> dict[
            str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def first(self) -> bytes | None:
        return self._event([self._choice("", None, role=True)]) if self.kind == "chat" else None

    def delta(self, text: str) -> bytes:
        return self._event([self._choice(text, None)])

    def last(self, result: GenerateResult, tokens: TokenText) -> list[bytes]:
        logprobs = (chat_logprobs if self.kind == "chat" else text_logprobs)(result, tokens)
        out = [self._event([self._choice(None if self.kind == "chat" else "", result.finish_reason, logprobs)])]
        if self.include_usage:
            out.append(self._event([], usage=usage(result)))
        return out


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


async def stream(waiter: Waiter, chunks: Chunks, tokens: TokenText) -> AsyncIterator[bytes]:
    """Token records as deltas, the final record as the closing chunk(s), then ``[DONE]``."""
    first = chunks.first()
    if first is not None:
        yield first
    sent = ""
    try:
        while True:
            records = [await waiter.next(), *waiter.ready()]  # a client that fell behind gets one delta
            text = "".join(r.text for r in records if r.type == "token")
            if text:
                sent += text
                yield chunks.delta(text)
            result = next((r for r in records if r.type == "result"), None)
            if result is not None:
                if result.text.startswith(sent) and len(result.text) > len(sent):
                    yield chunks.delta(result.text[len(sent):])
                for event in chunks.last(result, tokens):
                    yield event
                break
    except APIError as error:  # headers are out: the error travels as an event, then the stream ends
        yield error_event(error)
    yield b"data: [DONE]\n\n"
