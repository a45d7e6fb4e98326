"""``POST /v1/chat/completions`` and ``POST /v1/completions``: one request record, one answer.

Order of checks: the key (401/429), the body (413/400), the model (404), a live worker (503),
room in this gateway (429); only then is a ``GenerateRequest`` published, with this gateway's
reply topic as ``reply_to``. So a refused call leaves nothing behind: no record, no row.

The body's ``loquetier`` field (``extra_body`` in the SDKs) carries our own knobs: ``priority``,
``ttft_ms`` / ``tpot_ms`` latency targets and ``top_k``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import orjson
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from loquetier.codec import DEFAULT_LIMITS
from loquetier.messages import ControlCommand, GenerateRequest, encode_record

from . import answers
from .body import read_json
from .errors import APIError, bad_request
from .metrics import IN_FLIGHT, TOKENS
from .schemas import ChatRequest, CompletionRequest, Sampling, parse
from .state import Gateway

log = logging.getLogger(__name__)

LEGACY_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


async def chat_completions(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    body = parse(ChatRequest, await read_json(request))
    body.check_supported()
    adapter_id = await gw.resolve_model(owner, body.model)
    if "messages" not in GenerateRequest.model_fields:  # a wire format from before chat messages
        raise bad_request("chat completions need a Loquetier version whose requests carry 'messages'; "
                          "use /v1/completions with a prompt", code="chat_unavailable")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    sampling = _sampling(body, body.token_limit(), 1 if body.logprobs else None)
    return await _complete(request, gw, "chat", body, adapter_id, {"messages": messages}, sampling)


async def completions(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    body = parse(CompletionRequest, await read_json(request))
    body.check_supported()
    adapter_id = await gw.resolve_model(owner, body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):
        prompt = prompt[0]
    fields = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    if fields.get("prompt") == "":
        raise bad_request("prompt must not be empty", param="prompt")
    limit = body.max_tokens or LEGACY_DEFAULT_MAX_TOKENS
    sampling = _sampling(body, limit, 1 if body.logprobs is not None else None)
    return await _complete(request, gw, "text", body, adapter_id, fields, sampling)


def _sampling(body: Sampling, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"stop": body.stops(), "seed": body.seed, "logprobs": logprobs}
    if max_tokens is not None:
        spec["max_tokens"] = max_tokens
    if body.temperature is not None:
        spec["temperature"] = body.temperature
    if body.top_p is not None:
        spec["top_p"] = body.top_p
    if body.loquetier is not None:
        spec["top_k"] = body.loquetier.top_k
    return spec


def _record(rid: str, gw: Gateway, body: Sampling, adapter_id: str | None, fields: dict[str, Any],
            sampling: dict[str, Any]) -> bytes:
    """The request record, encoded, or a 400/413 that says what is wrong."""
    options = body.loquetier
    slo = {"ttft_ms": options.ttft_ms, "tpot_ms": options.tpot_ms} if options is not None else None
    try:
        record = GenerateRequest.model_validate(
            {"request_id": rid, "adapter_id": adapter_id, **fields, "sampling": sampling, "stream": bool(body.stream),
             "reply_to": gw.bus.topic, "priority": options.priority if options else 0,
             "slo": slo if slo and any(v is not None for v in slo.values()) else None},
            strict=False,
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        raise bad_request(f"{'.'.join(map(str, err['loc'])) or 'request'}: {err['msg']}") from None
    limits = DEFAULT_LIMITS
    if record.prompt is not None and len(record.prompt) > limits.max_prompt_chars:
        raise bad_request(f"the prompt is longer than {limits.max_prompt_chars} characters", param="prompt")
    if record.sampling.max_tokens > limits.max_new_tokens:
        raise bad_request(f"max_tokens is above {limits.max_new_tokens}", param="max_tokens")
    value = encode_record(record)
    if len(value) > gw.settings.kafka.max_record_bytes:
        raise APIError(413, "the request is larger than the broker's record limit", code="request_too_large")
    return value


async def _complete(request: Request, gw: Gateway, kind: str, body: Sampling, adapter_id: str | None,
                    fields: dict[str, Any], sampling: dict[str, Any]) -> Response:
    is_stream = bool(body.stream)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    value = _record(rid, gw, body, adapter_id, fields, sampling)
    await gw.require_worker()
    gw.admit()
    queue = gw.bus.expect(rid)
    try:
        sent = await gw.bus.publish(gw.settings.kafka.requests_topic, value, rid)
    except KafkaError as exc:
        gw.bus.forget(rid)
        log.warning("request not published", extra={"request_id": rid, "error": repr(exc)})
        raise APIError(503, "the message broker is unavailable; retry later", code="broker_unavailable") from None
    IN_FLIGHT.inc()
    waiter = answers.Waiter(queue, time.monotonic() + gw.config.request_timeout_s, sent)
    route = request.url.path
    if is_stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = answers.Chunks(kind, rid, body.model, include_usage)
        return StreamingResponse(
            _streamed(gw, rid, route, answers.stream(waiter, chunks, gw.tokens)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": rid},
        )
    try:
        result = await waiter.final()
    except asyncio.CancelledError:
        _cancel_soon(gw, rid)
        raise
    finally:
        gw.bus.forget(rid)
        IN_FLIGHT.dec()
    TOKENS.labels(route).inc(result.usage.completion_tokens)
    answer = answers.whole(kind, rid, body.model, result, gw.tokens)
    return Response(orjson.dumps(answer), media_type="application/json", headers={"X-Request-Id": rid})


async def _streamed(gw: Gateway, rid: str, route: str, events: Any) -> Any:
    """Forward the SSE events; a client that leaves early gets its request cancelled."""
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
    finally:
        gw.bus.forget(rid)
        IN_FLIGHT.dec()
        if not finished:
            _cancel_soon(gw, rid)


_background: set[asyncio.Task[None]] = set()


def _cancel_soon(gw: Gateway, rid: str) -> None:
    """Best effort: ask the workers to stop computing for a client that went away."""

    async def cancel() -> None:
        with contextlib.suppress(Exception):
            command = ControlCommand(action="cancel", target_id=rid, command_id=f"cancel-{rid}")
            await gw.bus.publish(gw.settings.kafka.control_topic, command, rid)

    task = asyncio.create_task(cancel())
    _background.add(task)
    task.add_done_callback(_background.discard)
