"""``POST /v1/chat/completions`` and ``POST /v1/completions``: one request record, one answer.

Order of checks: the key (401/429), the body (413/400), the model (404), a live worker (503),
room in this gateway (429); only then is a ``GenerateRequest`` published, with this gateway's
reply topic as ``reply_to``. So a refused call leaves nothing behind: no record, no row.

The body's ``loquetier`` field (``extra_body`` in the SDKs) carries our own knobs: ``priority``,
``ttft_ms`` / ``tpot_ms`` latency targets and ``top_k``. A call with ``n`` choices or several
prompts publishes one request record per choice and merges their answers. A stream waits for
each choice's first record before its headers go out, so a request the worker refuses is an
HTTP error the clients can act on, not an event inside a 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from loquetier.codec import DEFAULT_LIMITS
from loquetier.db.keys_repo import KeyOwner
from loquetier.messages import ControlCommand, GenerateRequest, GenerateResult, encode_record

from . import answers
from .body import read_json
from .errors import APIError, bad_request
from .metrics import IN_FLIGHT, TOKENS
from .schemas import ChatRequest, CompletionRequest, Sampling, error_text, parse
from .state import Gateway

log = logging.getLogger(__name__)
T = TypeVar("T")

LEGACY_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CALL_BYTES = 16 * 2**20  # a call's request records together (n copies of a long prompt add up)
LARGE_ANSWER_TOKENS = 4096  # an answer of more tokens (or with logprobs) is built off the event loop


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
    # no limit asked: up to the context, as OpenAI does (the worker caps it to the room the prompt leaves)
    asked = body.token_limit() or gw.config.default_max_tokens
    sampling = _sampling(body, asked or DEFAULT_LIMITS.max_new_tokens, 1 if body.logprobs else None)
    return await _complete(request, gw, owner, "chat", body, adapter_id, [{"messages": messages}], sampling,
                           asked or 0)


async def completions(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    owner = await gw.auth.owner(request)
    body = parse(CompletionRequest, await read_json(request))
    body.check_supported()
    adapter_id = await gw.resolve_model(owner, body.model)
    prompts: list[dict[str, Any]] = []
    for index, prompt in enumerate(body.prompts()):
        if prompt == "":
            raise bad_request("prompt must not be empty", param="prompt" if len(body.prompts()) == 1 else
                              f"prompt.{index}")
        prompts.append({"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt})
    limit = body.max_tokens or LEGACY_DEFAULT_MAX_TOKENS
    sampling = _sampling(body, limit, 1 if body.logprobs is not None else None)
    return await _complete(request, gw, owner, "text", body, adapter_id, prompts, sampling, limit)


def _sampling(body: Sampling, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"stop": body.stops(), "seed": body.seed, "logprobs": logprobs, "max_tokens": max_tokens,
                            "top_k": body.sampling_top_k()}
    if body.temperature is not None:
        spec["temperature"] = body.temperature
    if body.top_p is not None:
        spec["top_p"] = body.top_p
    if body.ignore_eos:
        spec["ignore_eos"] = True
    return spec


def _record(rid: str, gw: Gateway, body: Sampling, adapter_id: str | None, fields: dict[str, Any],
            sampling: dict[str, Any]) -> GenerateRequest:
    """The request record, validated, or a 400 that says what is wrong."""
    options = body.loquetier
    check_priority(gw, options.priority if options else 0)
    slo = {"ttft_ms": options.ttft_ms, "tpot_ms": options.tpot_ms} if options is not None else None
    try:
        record = GenerateRequest.model_validate(
            {"request_id": rid, "adapter_id": adapter_id, **fields, "sampling": sampling, "stream": bool(body.stream),
             "reply_to": gw.bus.topic, "priority": options.priority if options else 0,
             "slo": slo if slo and any(v is not None for v in slo.values()) else None},
            strict=False,
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _body_field(body, err["loc"])
        raise bad_request(f"{param or 'request'}: {error_text(err)}", param=param) from None
    limits = DEFAULT_LIMITS
    if record.prompt is not None and len(record.prompt) > limits.max_prompt_chars:
        raise bad_request(f"the prompt is longer than {limits.max_prompt_chars} characters", param="prompt")
    if record.sampling.max_tokens > limits.max_new_tokens:
        raise bad_request(f"max_tokens is above {limits.max_new_tokens}", param="max_tokens")
    return record


def check_priority(gw: Gateway, priority: int) -> None:
    """A 400 for a ``loquetier.priority`` above the gateway's ``max_priority``: one tenant must not
    put its work ahead of everyone's by asking."""
    top = gw.config.max_priority
    if priority > top:
        raise bad_request(f"loquetier.priority {priority} is above this gateway's maximum, {top} "
                          "(LOQUETIER_GATEWAY__MAX_PRIORITY)", param="loquetier.priority")


def _body_field(body: Sampling, loc: tuple[int | str, ...]) -> str | None:
    """The body field a request record's invalid value came from (``sampling.top_k`` is the body's
    ``top_k`` or ``loquetier.top_k``, ``slo.ttft_ms`` is ``loquetier.ttft_ms``); None: the request."""
    parts = [str(p) for p in loc]
    if not parts:
        return None
    head, rest = parts[0], parts[1:]
    if head == "sampling" and rest:
        name = rest[0]
        if name == "top_k" and body.top_k in (None, -1, 0):
            return "loquetier.top_k"
        if name == "max_tokens" and getattr(body, "max_completion_tokens", None) is not None:
            return "max_completion_tokens"
        return ".".join(rest)
    if head in ("slo", "priority"):
        return ".".join(["loquetier", *(rest or [head])])
    if head == "prompt_token_ids":
        return "prompt"
    if head in ("prompt", "messages"):
        return ".".join(parts)
    return None


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice ``j`` of ``n`` samples with ``seed + j``: the choices differ, and a call is repeatable."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice + 2**63) % 2**64 - 2**63  # stays a signed 64-bit value


@dataclass
class _Choice:
    rid: str  # the request record's id
    value: bytes  # the record, encoded
    prompt: int  # which prompt of the call it completes
    first: bool = True  # the first of its prompt's n choices: the one that counts the prompt's tokens


def _choices(rid: str, gw: Gateway, body: Sampling, adapter_id: str | None, prompts: list[dict[str, Any]],
             sampling: dict[str, Any]) -> list[_Choice]:
    """One encoded request record per choice (prompts x n), in the order of the answer's ``index``.
    Each prompt is validated once; a call's records together stay within ``MAX_CALL_BYTES``, checked
    from each prompt's first record before its copies are encoded (413 otherwise)."""
    n = body.num_choices()
    many = len(prompts) * n > 1
    out: list[_Choice] = []
    total = 0
    for p, fields in enumerate(prompts):
        record = _record(rid, gw, body, adapter_id, fields, sampling)
        for j in range(n):
            sub = f"{rid}-{p * n + j}" if many else rid
            seed = _choice_seed(record.sampling.seed, j)
            copy = record.model_copy(update={"request_id": sub, "sampling": record.sampling.model_copy(
                update={"seed": seed})}) if many else record
            value = encode_record(copy)
            if len(value) > gw.settings.kafka.max_record_bytes:
                raise APIError(413, "the request is larger than the broker's record limit", code="request_too_large")
            if j == 0 and total + len(value) * n > MAX_CALL_BYTES:  # the copies differ by a few bytes
                raise APIError(413, f"the call's {len(prompts) * n} request records would take more than "
                               f"{MAX_CALL_BYTES // 2**20} MiB: send fewer choices or shorter prompts",
                               code="request_too_large")
            total += len(value)
            out.append(_Choice(sub, value, p, first=j == 0))
    return out


def prompt_tokens_estimate(fields: dict[str, Any]) -> int:
    """A prompt's tokens before the worker counts them: exact for token ids, 4 bytes a token for
    text, and 4 more a chat turn for its template's markers."""
    if fields.get("prompt_token_ids") is not None:
        return len(fields["prompt_token_ids"])
    if fields.get("prompt") is not None:
        return math.ceil(len(str(fields["prompt"]).encode()) / 4)
    return sum(4 + math.ceil(len(str(turn.get("content") or "").encode()) / 4) for turn in fields.get("messages") or ())


def _token_takes(choices: list[_Choice], prompts: list[dict[str, Any]], completion: int) -> list[int]:
    """What each choice takes of its key's tokens per minute before it runs: its prompt's estimate
    (counted once for the ``n`` choices of a prompt) and the ``max_tokens`` asked (0: none asked)."""
    return [completion + (prompt_tokens_estimate(prompts[c.prompt]) if c.first else 0) for c in choices]


@dataclass
class _Call:
    """One HTTP call's records in flight: what ``end`` releases, once."""

    gw: Gateway
    owner: KeyOwner
    choices: list[_Choice]
    takes: list[int]  # each choice's tokens taken of the key's minute, settled by its answer
    waiters: list[answers.Waiter] = field(default_factory=list)  # one per choice published so far
    ended: bool = False
    sending_since: float | None = None  # a stream's event waits on a client that does not read

    @property
    def key_id(self) -> str:
        return self.owner.key_id

    def settler(self, index: int) -> Callable[[GenerateResult], None]:
        """What choice ``index``'s result settles: the tokens it took against those it used (its
        prompt counted by the first choice of the prompt only, like its take)."""
        counts_prompt = self.choices[index].first

        def settle(result: GenerateResult) -> None:
            used = result.usage.completion_tokens + (result.usage.prompt_tokens if counts_prompt else 0)
            self.gw.auth.settle_tokens(self.owner, self.takes[index], used)

        return settle

    def end(self) -> None:
        """Stop waiting and ask the workers to stop what still runs for the call. The places of its
        answered or unpublished requests are free at once; a request that was published and not
        answered keeps its place until its worker's final record (the cancelled result) or its
        deadline, so a key that calls and leaves cannot hold more of the workers than its limit."""
        if self.ended:
            return
        self.ended = True
        running = []
        for index, choice in enumerate(self.choices):
            waiter = self.waiters[index] if index < len(self.waiters) else None
            if waiter is not None and not waiter.done:  # published, not answered
                _cancel_soon(self.gw, choice.rid)
                running.append((choice.rid, waiter))
            else:
                self.gw.bus.forget(choice.rid)
                if waiter is None:  # never published: what it took goes back
                    self.gw.auth.settle_tokens(self.owner, self.takes[index], 0)
        self.gw.release(self.key_id, len(self.choices) - len(running))
        if running:
            _in_background(_release_when_answered(self.gw, self.key_id, running))
        IN_FLIGHT.dec()


async def _release_when_answered(gw: Gateway, key_id: str, running: list[tuple[str, answers.Waiter]]) -> None:
    """Free each place of an ended call once its request's final record has come, or its deadline."""
    for rid, waiter in running:
        try:
            while not waiter.done:
                await waiter.next()  # its tokens, then the cancelled result; an error record raises
        except Exception:  # noqa: S110  # an error record or the deadline: either way it is over
            pass
        finally:
            gw.bus.forget(rid)
            gw.release(key_id, 1)


async def _complete(request: Request, gw: Gateway, owner: KeyOwner, kind: str, body: Sampling,
                    adapter_id: str | None, prompts: list[dict[str, Any]], sampling: dict[str, Any],
                    completion_take: int) -> Response:
    """``completion_take``: the tokens each choice takes of the key's minute for its completion
    before it runs (the ``max_tokens`` asked; 0: none asked). A key limited in tokens that asks
    none gets ``max_tokens`` = what its minute holds past the prompts, shared among the choices."""
    key_id = owner.key_id
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    count = len(prompts) * body.num_choices()
    if owner.max_tokens_per_minute is not None and completion_take == 0:
        # a key limited in tokens asks for no more than its minute holds: shared among the choices
        room = owner.max_tokens_per_minute - sum(prompt_tokens_estimate(p) for p in prompts)
        if room < count:
            raise APIError(429, f"this call's prompts take about {owner.max_tokens_per_minute - room} tokens, "
                           f"which leaves no room for {count} completions in the key's limit of "
                           f"{owner.max_tokens_per_minute} tokens per minute; send shorter prompts or fewer choices",
                           code="rate_limit_exceeded")
        completion_take = min(int(sampling["max_tokens"]), room // count)
        sampling = {**sampling, "max_tokens": completion_take}
    gw.admit(count, key_id)  # before any work: a full gateway or key is refused at once
    # validating and encoding a large call takes tens of ms: off the loop that serves every stream
    choices = await asyncio.to_thread(_choices, rid, gw, body, adapter_id, prompts, sampling)
    await gw.require_worker()
    gw.admit(count, key_id)
    takes = _token_takes(choices, prompts, completion_take)
    gw.auth.charge(owner, count - 1, sum(takes))  # each choice is a request for the workers
    call = _Call(gw, owner, choices, takes)
    gw.hold(key_id, count)
    IN_FLIGHT.inc()
    try:
        await _publish(call)
        # a client that leaves (its own timeout, Ctrl-C) ends the call: its requests are cancelled
        if body.stream:
            firsts = await _unless_gone(request, answers.first_records(call.waiters))
        else:
            results = await _unless_gone(request, _finals(call.waiters))
    except BaseException:  # an error, the timeout, or a client that went away
        call.end()
        raise
    prompt_of = [c.prompt for c in choices]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = answers.Chunks(kind, rid, body.model, include_usage)
        events = answers.stream(call.waiters, firsts, prompt_of, chunks, gw.tokens)
        return _CallStream(call, _streamed(call, events), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Request-Id": rid, **gw.auth.headers(owner)})
    call.end()
    completion_tokens = sum(r.usage.completion_tokens for r in results)
    TOKENS.labels(request.url.path).inc(completion_tokens)

    def build() -> bytes:
        return orjson.dumps(answers.whole(kind, rid, body.model, results, prompt_of, gw.tokens))

    # an answer's log-probabilities and texts are decoded token by token: for n=64 long answers that
    # is seconds of work, off the loop that serves every other call
    large = any(r.logprobs for r in results) or completion_tokens > LARGE_ANSWER_TOKENS
    return Response(await asyncio.to_thread(build) if large else build(), media_type="application/json",
                    headers={"X-Request-Id": rid, **gw.auth.headers(owner)})


async def _publish(call: _Call) -> None:
    """Publish every choice's record, each one's waiter into ``call.waiters`` once it is out; a
    broker that fails part-way is a 503, and ``call.end`` cancels the records already out."""
    gw, choices = call.gw, call.choices
    queues = [gw.bus.expect(c.rid) for c in choices]  # before publishing: no early record is missed
    deadline = time.monotonic() + gw.config.request_timeout_s
    try:
        for index, (choice, queue) in enumerate(zip(choices, queues, strict=True)):
            sent = await gw.bus.publish(gw.settings.kafka.requests_topic, choice.value, choice.rid)
            call.waiters.append(answers.Waiter(queue, deadline, sent, on_result=call.settler(index)))
    except KafkaError as exc:
        log.warning("request not published", extra={"request_id": choices[0].rid, "error": repr(exc)})
        raise APIError(503, "the message broker is unavailable; retry later", code="broker_unavailable") from None


class ClientGone(APIError):
    """The HTTP client closed its connection before the answer (499, as proxies log it; nobody reads it)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection before the answer", code="client_gone")


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s value, or ClientGone as soon as the client disconnects. The body has been read, so
    the next ASGI message is the disconnect: a client that stops waiting (an SDK's timeout) does not
    leave its requests computing for nobody."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ClientGone
        return task.result()
    finally:
        task.cancel()
        gone.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finals(waiters: list[answers.Waiter]) -> list[GenerateResult]:
    """Every choice's result; the first error ends the call."""
    return await answers.side_by_side([w.final() for w in waiters])


class _CallStream(StreamingResponse):
    """A stream that ends its call however the response ends: a client gone before the first event
    never starts the body's generator, whose own ``finally`` then never runs."""

    def __init__(self, call: _Call, content: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.call = call

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.end()


async def _streamed(call: _Call, events: Any) -> Any:
    """Forward the SSE events; whatever has not finished when they end (a client that left early,
    an error in another choice) is cancelled. A client that stops reading (its socket full, so an
    event cannot be sent) for ``stream_stall_s`` loses its call: the places it held are freed for
    other callers and the stream ends when the send returns, if it ever does."""
    watchdog = asyncio.create_task(_watch_stall(call))
    try:
        async for event in events:
            call.sending_since = time.monotonic()
            yield event
            call.sending_since = None
            if call.ended:  # by the watchdog: say so, rather than end like a finished answer
                yield answers.error_event(APIError(504, "the client read nothing for "
                                                   f"{call.gw.config.stream_stall_s:g} s; the call was ended",
                                                   code="stream_stalled"))
                yield b"data: [DONE]\n\n"
                return
    finally:
        watchdog.cancel()
        call.end()
        await events.aclose()


async def _watch_stall(call: _Call) -> None:
    limit = call.gw.config.stream_stall_s
    while not call.ended:
        await asyncio.sleep(min(1.0, limit / 4))
        since = call.sending_since
        if since is not None and time.monotonic() - since > limit:
            log.warning("stream client stopped reading; its call is ended",
                        extra={"request_id": call.choices[0].rid, "stalled_s": round(time.monotonic() - since, 1)})
            call.end()


_background: set[asyncio.Task[None]] = set()


def _cancel_soon(gw: Gateway, rid: str) -> None:
    """Best effort: ask the workers to stop computing for a client that went away."""

    async def cancel() -> None:
        with contextlib.suppress(Exception):
            command = ControlCommand(action="cancel", target_id=rid, command_id=f"cancel-{rid}")
            await gw.bus.publish(gw.settings.kafka.control_topic, command, rid)

    _in_background(cancel())


def _in_background(work: Any) -> None:
    task = asyncio.create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)
