"""The request path: row first, then the engine, then the row again, then the result.

1. Insert the ``inference_requests`` row idempotently (by request_id) before any work.
2. A row that already finished: a record the row lists as answered (a redelivery: its worker
   stopped after the answer, before the offset was committed) is only marked done; so is a record
   it lists as pending (waiting when the outcome was stored) whose final is on the reply topic
   (its worker stopped between the publish and step 4: ``answer_log.py``); another record (a
   client's retry) gets the stored result republished. No computation either way.
   A row running on another live worker: wait for it to finish, then the same.
   Otherwise (new, queued, or its worker is gone): start it in the engine.
3. On the engine's finish: store result and timings in the row (first outcome wins), with the
   records it is published for listed pending, publish the "result" record, and only then mark
   the Kafka record done.
4. Once the broker has acknowledged a final record, list its Kafka record on the row as
   answered (topic, partition, offset and the record's timestamp, which tells a redelivery from
   a new record at an offset a restarted in-memory broker reused; the last eight). The write runs
   in the background, after the publish: it delays no answer. A crash before it ends is caught on
   redelivery by the read of the reply topic in step 2; where that read fails, the record is
   answered once more, never not at all.

Records go to the request's ``reply_to`` topic when it names one (a gateway's), else to the
shared results topic; duplicates that attach to a running request get the first one's topic.

A duplicate that arrives while the request runs here attaches to it: one computation,
one "result" record per Kafka record. A record that reuses a known request_id for other
content (another prompt, adapter or sampling) is answered ``duplicate_request_id`` and
changes nothing. Each start is counted on the row; a request whose earlier starts all
ended with their worker (crashed or stalled) is failed ``poisoned`` at
``max_attempts`` instead of being started again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from loquetier.chat import chat_prompt_ids
from loquetier.db import repo
from loquetier.db.store import Store
from loquetier.engine.events import RequestFailed, RequestFinished, Timings, TokenEvent, Usage
from loquetier.messages import ErrorResult, GenerateRequest, TokenResult

from . import convert
from .adapters import AdapterSync
from .answer_log import AnswerLog
from .engine_client import EngineClient, EngineStopped
from .errors import INTERNAL, public_error
from .metrics import INTAKE, QUEUE_DEPTH, REQUESTS
from .publisher import Publisher
from .sources import Source

log = logging.getLogger(__name__)

# Copies of a running request (redeliveries, a client's retries) wait for its answer with it, up to
# this many; later copies are done at once: the request's one answer reaches their readers too.
MAX_JOINED = 8

DoneHook = Callable[[Source], None]


POISONED = "poisoned"
# A cancel that arrives before its request (the request's partition is behind, or paused while the
# worker is full) is remembered this long, for this many ids, and the request is dropped when read.
EARLY_CANCEL_TTL_S = 600.0
MAX_EARLY_CANCELS = 10_000


@dataclass
class Inflight:
    request: GenerateRequest
    sources: list[Source]
    fingerprint: str = ""
    num_streamed: int = 0
    in_engine: bool = False
    started: float = field(default_factory=time.monotonic)
    arrived_at: float = field(default_factory=time.time)  # wall clock: the engine counts TTFT from here


class Inference:
    def __init__(
        self,
        client: EngineClient,
        store: Store,
        publisher: Publisher,
        adapters: AdapterSync,
        *,
        worker_id: str,
        on_done: DoneHook,
        owner_timeout_s: float = 15.0,
        poll_s: float = 0.25,
        max_attempts: int = 2,
        answers: AnswerLog | None = None,
        slo_floor: tuple[float, float] = (0.0, 0.0),
    ):
        self._client = client
        self._store = store
        self._publisher = publisher
        self._adapters = adapters
        self._worker_id = worker_id
        self._on_done = on_done
        self._owner_timeout_s = owner_timeout_s
        self._poll_s = poll_s
        self._max_attempts = max_attempts
        self._answers = answers
        self._slo_floor = slo_floor  # (min_ttft_ms, min_tpot_ms)
        self.inflight: dict[str, Inflight] = {}
        self.num_computed = 0
        self._noting: set[asyncio.Task[None]] = set()  # answered records being written to rows
        self._num_refusing = 0  # duplicate_request_id answers being published
        self._early_cancels: OrderedDict[str, float] = OrderedDict()  # request_id -> when the cancel came

    def note_cancel(self, rid: str) -> None:
        """Remember a cancel of a request this worker is not running (not read yet, or between its
        intake and the engine): the request is answered ``cancelled`` instead of computed."""
        now = time.monotonic()
        self._early_cancels.pop(rid, None)
        self._early_cancels[rid] = now
        while self._early_cancels and (len(self._early_cancels) > MAX_EARLY_CANCELS
                                       or next(iter(self._early_cancels.values())) < now - EARLY_CANCEL_TTL_S):
            self._early_cancels.popitem(last=False)

    def _cancelled_early(self, rid: str) -> bool:
        when = self._early_cancels.pop(rid, None)
        return when is not None and when >= time.monotonic() - EARLY_CANCEL_TTL_S

    async def _answer_cancelled(self, rid: str) -> None:
        """The answer of a request cancelled before it reached the engine: no tokens, ``cancelled``."""
        flight = self.inflight.get(rid)
        prompt = len(flight.request.prompt_token_ids or []) if flight else 0
        if flight is not None and flight.request.messages is not None:  # usage counts the rendered chat
            try:
                prompt = len(await self._chat_ids(flight.request))
            except EngineStopped:
                raise
            except Exception:  # a chat the template refuses: it had no prompt to count
                prompt = 0
        log.info("request cancelled before it started", extra={"request_id": rid})
        await self.on_event(RequestFinished(request_id=rid, token_ids=[], text="", finish_reason="abort",
                                            usage=Usage(prompt, 0), timings=Timings(0.0, None, None)))

    @property
    def num_inflight(self) -> int:
        """Requests in flight, and refusals of copies not yet sent (back-pressure counts both)."""
        return len(self.inflight) + self._num_refusing

    def _refused(self, _: asyncio.Task[None]) -> None:
        self._num_refusing -= 1

    def num_pending(self, parts: set[Any]) -> int:
        return sum(1 for f in self.inflight.values() for s in f.sources if s.part in parts)

    # --- intake --------------------------------------------------------------------------

    def accept(self, req: GenerateRequest, source: Source) -> asyncio.Task[None] | None:
        """Take a decoded request; returns the task handling it (None: joined a running one)."""
        fingerprint = convert.request_fingerprint(req)
        running = self.inflight.get(req.request_id)
        if running is not None and running.fingerprint == fingerprint:
            if len(running.sources) < MAX_JOINED:
                running.sources.append(source)
            else:  # the one answer reaches this copy's reader too (same id, same topic): nothing to hold
                self._on_done(source)
            return None
        if running is not None:
            self._num_refusing += 1
            task = asyncio.create_task(self._refuse_duplicate(req.request_id, source, req.reply_to))
            task.add_done_callback(self._refused)
            return task
        self.inflight[req.request_id] = Inflight(req, [source], fingerprint)
        QUEUE_DEPTH.labels("inflight_requests").set(len(self.inflight))
        return asyncio.create_task(self._start(req, source, fingerprint), name=f"request:{req.request_id}")

    async def _refuse_duplicate(self, rid: str, source: Source, reply_to: str | None) -> None:
        """Answer one record that reuses ``rid`` for other content; the first request is untouched."""
        error = ErrorResult(request_id=rid, code="duplicate_request_id", message=_DUPLICATE, record=source.ref())
        try:
            await self._publisher.publish(error, rid, topic=reply_to)
        except Exception:  # not done: the record comes back and is answered then
            log.exception("could not answer a duplicate request_id", extra={"request_id": rid})
            return
        self._on_done(source)
        self._note_answered(rid, [source])
        log.info("duplicate request_id refused", extra={"request_id": rid})

    async def _start(self, req: GenerateRequest, source: Source, fingerprint: str) -> None:
        rid = req.request_id
        try:
            is_new = await self._store.tx(
                lambda s: repo.insert_request_idempotent(
                    s,
                    request_id=rid,
                    adapter_id=req.adapter_id,
                    priority=req.priority,
                    prompt_tokens=len(req.prompt_token_ids) if req.prompt_token_ids else None,
                    kafka_topic=getattr(source.part, "topic", None),
                    kafka_partition=getattr(source.part, "partition", None),
                    kafka_offset=source.offset,
                    content_sha256=fingerprint,
                    started_by=self._worker_id,  # a new row starts here, its first attempt counted
                )
            )
            if not is_new and not await self._take_over(rid, fingerprint):
                return
            if self._cancelled_early(rid):
                await self._answer_cancelled(rid)
                return
            if req.adapter_id is not None and not await self._adapters.ensure(req.adapter_id):
                await self._fail(rid, "unknown_adapter", f"adapter {req.adapter_id!r} is not registered")
                return
            try:  # the engine's own checks of a value the border let through: a ValueError
                kwargs = convert.request_kwargs(req, min_ttft_ms=self._slo_floor[0], min_tpot_ms=self._slo_floor[1])
            except ValueError as exc:
                await self._fail(rid, "invalid_request", str(exc)[:500])
                return
            attempt = 1 if is_new else await self._store.tx(
                lambda s: repo.start_request(s, rid, self._worker_id, max_attempts=self._max_attempts)
            )
            if attempt is None:
                await self._poisoned_or_done(rid)
                return
            try:
                if req.messages is not None:
                    kwargs["prompt_token_ids"] = await self._chat_ids(req)
                # the wait for the row and for the step in flight counts toward the request's TTFT
                await self._client.submit(rid, arrived_at=self.inflight[rid].arrived_at, **kwargs)
            except EngineStopped:  # the worker stops: its stop answers this request or leaves it for redelivery
                return
            except Exception as exc:  # EngineError(code, message) for bad input, else internal
                await self._fail(rid, *public_error(exc, "this request", log, request_id=rid))
                return
            flight = self.inflight[rid]
            flight.in_engine = True
            if self._cancelled_early(rid) and await self._client.abort(rid):  # came while it was handed over
                log.info("request aborted", extra={"request_id": rid})
            INTAKE.observe(time.monotonic() - flight.started)
            self.num_computed += 1
            log.info(
                "request started",
                extra={"request_id": rid, "adapter_id": req.adapter_id, "worker_id": self._worker_id,
                       "attempt": attempt},
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request intake failed", extra={"request_id": rid})
            await self._fail(rid, INTERNAL, "the worker could not start this request; the detail is in its log")

    async def _chat_ids(self, req: GenerateRequest) -> list[int]:
        """The chat turns rendered by the model's chat template, on the engine thread (it owns the
        tokenizer, and rendering a long chat should not hold up the event loop)."""
        turns = [m.model_dump() for m in req.messages or ()]
        return await self._client.call(functools.partial(_chat_ids_on, turns))

    async def _poisoned_or_done(self, rid: str) -> None:
        """``start_request`` refused: the row finished meanwhile, or it used up its attempts."""
        row = await self._store.tx(lambda s: repo.get_request(s, rid))
        if row is not None and row.finished_at is not None:
            await self._republish(rid, row)
            return
        attempts = row.attempts if row is not None else self._max_attempts
        log.warning("request poisoned", extra={"request_id": rid, "attempts": attempts})
        await self._fail(rid, POISONED, poisoned_message("request", attempts))

    async def _take_over(self, rid: str, fingerprint: str) -> bool:
        """For an existing row: refuse other content, republish a finished one, wait for a live
        owner, or compute."""
        while True:
            row = await self._store.tx(lambda s: repo.get_request(s, rid))
            if row is None:
                return True
            if row.content_sha256 is not None and row.content_sha256 != fingerprint:
                error = ErrorResult(request_id=rid, code="duplicate_request_id", message=_DUPLICATE)
                await self._deliver(rid, error, answered=row.answered_records, refusal=True)
                log.info("duplicate request_id refused", extra={"request_id": rid})
                return False
            if row.finished_at is not None:
                await self._republish(rid, row)
                return False
            owner = row.worker_id
            if row.status != "running" or owner is None or owner == self._worker_id:
                return True
            alive = await self._store.tx(lambda s: repo.worker_is_alive(s, owner, within_s=self._owner_timeout_s))
            if not alive:
                log.info("request taken over", extra={"request_id": rid, "from_worker": owner})
                return True
            await asyncio.sleep(self._poll_s)

    async def _republish(self, rid: str, row: Any) -> None:
        """The stored outcome for the records waiting on ``rid`` that the row does not list as answered."""
        if row.result is not None:
            record = convert.from_stored(row.result)
        else:
            record = ErrorResult(request_id=rid, code=row.status, message=row.error or "")
        answered = list(row.answered_records or ())
        on_log = await self._answered_on_log(rid, row.finished_at, answered)
        if on_log:
            self._note_answered(rid, on_log)
            answered += [source.key() for source in on_log]
        num = await self._deliver(rid, record, answered=answered)
        log.info(
            "request republished" if num else "redelivered record answered already",
            extra={"request_id": rid, "status": row.status, "num_published": num, "found_on_topic": len(on_log)},
        )

    async def _answered_on_log(self, rid: str, finished_at: Any, listed: list[Any]) -> list[Source]:
        """The records waiting on finished ``rid`` that were waiting when its outcome was stored
        (listed ``pending``) and that a final on the reply topic answered: their worker stopped after
        the publish, before the row listed them answered (``workers/answer_log.py``). A record not
        listed at all is a new one, a client's retry, whatever its timestamp says."""
        flight = self.inflight.get(rid)
        if flight is None or self._answers is None or finished_at is None:
            return []
        unsure = [source for source in flight.sources
                  if source.key() not in listed and {**source.key(), "pending": True} in listed]
        if not unsure:
            return []
        finished_ms = int(finished_at.timestamp() * 1000)
        return unsure if await self._answers.has_final(flight.request.reply_to, rid, finished_ms) else []

    def _answering(self, rid: str) -> list[dict[str, Any]]:
        """The records an outcome of ``rid`` is about to be published for (the row lists them pending)."""
        flight = self.inflight.get(rid)
        return [source.key() for source in flight.sources] if flight is not None else []

    # --- engine events ----------------------------------------------------------------------

    async def on_event(self, ev: TokenEvent | RequestFinished | RequestFailed) -> None:
        if isinstance(ev, TokenEvent):
            await self._stream(ev)
        elif isinstance(ev, RequestFinished):
            flight = self.inflight.get(ev.request_id)
            adapter_id = flight.request.adapter_id if flight else None
            result = convert.generate_result(ev, adapter_id)
            t = result.timings
            answering = self._answering(ev.request_id)
            await self._record(
                lambda s: repo.finish_request(
                    s,
                    ev.request_id,
                    answering=answering,
                    status="cancelled" if result.finish_reason == "cancelled" else "succeeded",
                    result=convert.stored(result),
                    prompt_tokens=result.usage.prompt_tokens,
                    completion_tokens=result.usage.completion_tokens,
                    queued_ms=t.queued_ms,
                    ttft_ms=t.ttft_ms,
                    tpot_ms=t.tpot_ms,
                )
            )
            REQUESTS.labels(result.finish_reason).inc()
            await self._deliver(ev.request_id, result)
        else:
            await self._fail(ev.request_id, ev.code, ev.message)

    async def _stream(self, ev: TokenEvent) -> None:
        flight = self.inflight.get(ev.request_id)
        if flight is None:
            return
        record = TokenResult(
            request_id=ev.request_id, index=flight.num_streamed, token_ids=list(ev.token_ids), text=ev.text
        )
        flight.num_streamed += len(ev.token_ids)
        await self._publisher.stream(record, ev.request_id, topic=flight.request.reply_to)

    # --- outcomes ------------------------------------------------------------------------

    async def _fail(self, rid: str, code: str, message: str, *, status: str = "failed") -> bool | None:
        """Record and deliver an error outcome; returns what :meth:`_record` returned."""
        error = ErrorResult(request_id=rid, code=code, message=message)
        answering = self._answering(rid)
        recorded = await self._record(lambda s: finish_failed(s, rid, error, status, answering))
        REQUESTS.labels("error").inc()
        await self._deliver(rid, error)
        return recorded

    async def _record(self, fn: Any) -> bool | None:
        """Store an outcome; a write the database refuses (not an outage) is logged and
        the result still goes out, so a bad request never blocks its partition.

        Returns True when written, False when the row had finished already, None on failure."""
        try:
            return bool(await self._store.tx(fn))
        except Exception:
            log.exception("could not store a request outcome")
            return None

    async def _deliver(self, rid: str, record: Any, *, answered: Collection[Any] = (), refusal: bool = False) -> int:
        """Publish ``record`` for the Kafka records waiting on ``rid``, mark each done, then note on
        the row the records it was published for; returns how many.

        A record whose key is in ``answered`` (the row's list) was answered before: it is only
        marked done. ``refusal``: ``record`` (an error) refuses each record alone, which it then
        names. The flight leaves ``inflight`` before the first publish, so two outcomes racing for
        one request (an engine finish and a stop) never both go out."""
        flight = self.inflight.pop(rid, None)
        QUEUE_DEPTH.labels("inflight_requests").set(len(self.inflight))
        if flight is None:
            return 0
        published: list[Source] = []
        try:
            if not refusal:  # copies of one request share its topic and key: one publish answers them all
                waiting = [source for source in flight.sources if source.key() not in answered]
                if waiting:
                    await self._publish_final(rid, record, flight.request.reply_to)
                    published = waiting
                for source in flight.sources:
                    self._on_done(source)
                return len(published)
            while flight.sources:
                source = flight.sources[0]
                if source.key() not in answered:
                    await self._publish_final(rid, record.model_copy(update={"record": source.ref()}),
                                              flight.request.reply_to)
                    published.append(source)
                flight.sources.pop(0)
                self._on_done(source)
        finally:  # a publish that failed leaves its record unanswered, those before it answered
            self._note_answered(rid, published)
        return len(published)

    async def _publish_final(self, rid: str, record: Any, topic: str | None) -> None:
        """Returns once the broker acknowledged ``record``, or refused it for good (a result too
        large is then answered ``too_large``)."""
        if not await self._publisher.publish(record, rid, topic=topic) and not isinstance(record, ErrorResult):
            too_large = ErrorResult(request_id=rid, code="too_large", message=_UNSENDABLE)
            await self._publisher.publish(too_large, rid, topic=topic)

    def _note_answered(self, rid: str, sources: list[Source]) -> None:
        """List ``sources`` as answered on the row, in the background (after their publish)."""
        if not sources:
            return
        task = asyncio.create_task(self._write_answered(rid, [s.key() for s in sources]))
        self._noting.add(task)
        task.add_done_callback(self._noting.discard)

    async def _write_answered(self, rid: str, keys: list[dict[str, Any]]) -> None:
        try:
            await self._store.tx(lambda s: repo.add_answered_records(s, rid, keys), attempts=3)
        except Exception as exc:  # a redelivery of these records then gets the stored outcome again
            log.warning("could not note answered records", extra={"request_id": rid, "error": repr(exc)[:300]})

    async def settle(self) -> None:
        """Wait for the answered records still being written (before the database closes)."""
        while self._noting:
            await asyncio.gather(*list(self._noting), return_exceptions=True)

    async def answer_all(self, code: str, message: str, *, can_abort: bool, abort_timeout_s: float = 2.0) -> list[str]:
        """Stop: abort what still runs and answer every in-flight request with ``code``.

        A request is answered only when its row took the outcome; a row that finished
        meanwhile is delivered by its own path or, if that is cut short, republished on
        redelivery. Returns the request ids answered."""
        answered = []
        for rid, flight in list(self.inflight.items()):
            if flight.in_engine and can_abort:
                try:
                    await asyncio.wait_for(self._client.abort(rid), abort_timeout_s)
                except Exception as exc:  # the engine is gone or stuck: the answer still goes out
                    log.warning("abort failed while stopping", extra={"request_id": rid, "error": repr(exc)})
            error = ErrorResult(request_id=rid, code=code, message=message)
            answering = self._answering(rid)
            if await self._record(lambda s, rid=rid, error=error, answering=answering: finish_failed(
                    s, rid, error, "cancelled", answering)):
                await self._deliver(rid, error)
                answered.append(rid)
        return answered


def coalesce_tokens(events: list[Any]) -> list[Any]:
    """One TokenEvent per request for a run of steps: each request's new tokens (and text) joined
    at the place of its first, so one token record carries them all. A request's tokens still come
    before its finish or failure, which follow them in the engine's order."""
    out: list[Any] = []
    at: dict[str, int] = {}  # request_id -> its TokenEvent in out
    for ev in events:
        if isinstance(ev, TokenEvent):
            i = at.get(ev.request_id)
            if i is None:
                at[ev.request_id] = len(out)
                out.append(ev)
            else:
                prev = out[i]
                out[i] = TokenEvent(ev.request_id, [*prev.token_ids, *ev.token_ids], prev.text + ev.text)
            continue
        rid = getattr(ev, "request_id", None)
        if rid is not None:
            at.pop(rid, None)  # its tokens are complete: nothing may join them after its outcome
        out.append(ev)
    return out


_DUPLICATE = "this request_id was already used for a request with other content; use a new request_id"
_UNSENDABLE = "the result is larger than the broker accepts; ask for fewer tokens or no logprobs"


def poisoned_message(what: str, attempts: int) -> str:
    return (f"this {what} was started {attempts} times and each time its worker stopped before it "
            "finished; it is not tried again")


async def finish_failed(session: Any, rid: str, error: ErrorResult, status: str,
                        answering: list[dict[str, Any]] | None = None) -> bool:
    text = f"{error.code}: {error.message}".replace("\x00", "\\0")
    return await repo.finish_request(session, rid, status=status, result=convert.stored(error), error=text,
                                     answering=answering or ())


def _chat_ids_on(turns: list[dict[str, Any]], engine: Any) -> list[int]:
    """Run on the engine's side (a module-level function: it may be pickled to an engine process). A chat
    whose turns cannot fit the context is refused before the template renders it."""
    check = getattr(engine, "check_prompt_chars", None)
    if check is not None:
        check(sum(len(t["content"]) for t in turns))
    return chat_prompt_ids(getattr(engine, "tokenizer", None), turns)
