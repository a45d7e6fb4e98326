"""From a Kafka record to work: decode, route, and turn every bad record into a DLQ entry.

A record that does not decode goes to ``loquetier.dlq`` with the reason, plus an "error"
result when a request_id or job_id can be read from it; the worker keeps running. A
training record is done once its job row exists (Postgres owns it from then on); a
control record once it has been applied and acknowledged.

Training records are handled one at a time, in the order read, in a lane beside the request
intake (a training record can carry MiBs of examples, decoded off the event loop). Control
records are handled in the order read per target (a job, a request, an adapter, a worker), and
commands to different targets side by side, up to ``MAX_CONTROL_AT_ONCE``: a ``load`` reads a
multi-GiB adapter, a ``pause`` waits for the job's checkpoint, and a storm of cancels (a client
that calls and leaves) must not queue every other command, or one another, behind a step of the
engine each. A record whose partition went to another worker before its turn is left to that
worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, get_args

from loquetier.codec import MAX_ID_CHARS, Limits, check_key
from loquetier.db import repo
from loquetier.db.store import Store
from loquetier.messages import (
    ControlAck,
    ControlAction,
    ControlCommand,
    ErrorResult,
    GenerateRequest,
    RecordError,
    TopicKind,
    TrainingJobRecord,
    decode_record,
)

from . import convert, rejects
from .control import Control
from .errors import public_error
from .inference import Inference
from .jobs import LeasedJobs
from .lanes import Lanes
from .metrics import RECORD_AGE, RECORDS
from .publisher import Publisher
from .sources import Source, record_ref, record_timestamp

log = logging.getLogger(__name__)

MAX_CONTROL_AT_ONCE = 64  # control commands to different targets applied side by side


class Intake:
    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        inference: Inference,
        jobs: LeasedJobs,
        control: Control,
        *,
        limits: Limits,
        done: Any,
        is_current: Callable[[Any, int], bool] = lambda part, epoch: True,
        max_excerpt_bytes: int = 64 * 1024,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._inference = inference
        self._jobs = jobs
        self._control = control
        self._limits = limits
        self._max_excerpt_bytes = max_excerpt_bytes
        self._done = done  # (partition, offset, epoch) -> None: the record may be committed
        self.tasks: set[asyncio.Task[None]] = set()
        self._is_current = is_current  # (partition, epoch) -> whether this worker still owns that record
        self._lanes = Lanes("record handling")  # training: one lane; control: one lane per target
        self._control_slots = asyncio.Semaphore(MAX_CONTROL_AT_ONCE)
        # read and not yet handled, per lane: the consumer pauses a topic past a limit
        self.num_waiting: dict[TopicKind, int] = {"training": 0, "control": 0}

    async def handle(self, kind: TopicKind, record: Any, epoch: int) -> None:
        """Requests are decoded here and run in tasks of their own; training and control records are
        handled one at a time per topic, in the order read, in a lane beside this intake: a command
        can take long (a ``load`` of a multi-GiB adapter), a training record can carry MiBs of
        inline examples, and the request records read meanwhile must not wait for them."""
        if kind == "requests":
            await self._handle(kind, record, epoch)
            return
        part = _partition(record)
        lane: Any = kind if kind == "training" else ("control", self._control_target(record))

        async def handle() -> None:
            if not self._is_current(part, epoch):  # the partition went to another worker meanwhile
                log.info("record left to the partition's new owner", extra={"kind": kind, "offset": record.offset})
                return
            if kind == "training":
                await self._handle(kind, record, epoch)
                return
            async with self._control_slots:
                await self._handle(kind, record, epoch)

        self.num_waiting[kind] += 1
        task = self._lanes.submit(lane, handle)
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._lane_ended, kind))

    def _control_target(self, record: Any) -> str | None:
        """The command's target (its lane), or None for a command that does not decode (those share a
        lane; ``_handle`` refuses them)."""
        try:
            return str(decode_record("control", record.value, self._limits).target_id)
        except Exception:  # noqa: BLE001  # refused with its reason in its turn
            return None

    def _lane_ended(self, kind: TopicKind, task: asyncio.Task[None]) -> None:
        self.num_waiting[kind] -= 1
        self.tasks.discard(task)

    async def finish_lanes(self) -> None:
        """Wait until every training and control record read so far is handled (cancelling the wait
        cancels none)."""
        await self._lanes.drain()

    async def _handle(self, kind: TopicKind, record: Any, epoch: int) -> None:
        part, offset = _partition(record), record.offset
        try:
            check_key(_bytes(record.key), self._limits)
            if kind == "training":  # up to max_record_bytes of examples: validation takes up to a second
                decoded = await asyncio.to_thread(decode_record, kind, record.value, self._limits)
            else:
                decoded = decode_record(kind, record.value, self._limits)
            _check_storable(decoded)
            _check_reply_to(decoded, self._publisher.reply_prefix)
        except RecordError as err:
            RECORDS.labels(kind, "invalid").inc()
            await self._reject(record, err, kind)
            self._done(part, offset, epoch)
            return
        RECORDS.labels(kind, "ok").inc()
        if isinstance(decoded, GenerateRequest):
            stamp = record_timestamp(record)  # milliseconds, the producer's clock
            if stamp:
                RECORD_AGE.observe(max(0.0, time.time() - stamp / 1000))
            task = self._inference.accept(decoded, Source(part, offset, epoch, stamp))
            if task is not None:
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            return
        if isinstance(decoded, ControlCommand):  # done (committable) once acknowledged
            command_id = decoded.command_id or derived_command_id(record)
            ack = await self._control.apply(decoded, command_id)
            await self._publisher.publish(ack.model_copy(update={"record": record_ref(record)}), command_id)
        elif isinstance(decoded, TrainingJobRecord):
            try:
                await self._insert_job(decoded)
            except (AdapterTaken, JobIdTaken) as exc:
                error = ErrorResult(job_id=decoded.job_id, code=exc.code, message=exc.message,
                                    record=record_ref(record))
                await self._publisher.publish(error, decoded.job_id)
                log.info("job refused", extra={"job_id": decoded.job_id, "code": exc.code})
            except Exception as exc:
                code, message = public_error(exc, "this record", log, kind=kind, offset=offset)
                log.warning("record failed", extra={"kind": kind, "offset": offset, "code": code})
                await self._reject(record, RecordError(code, message, None, decoded.job_id), kind)
        self._done(part, offset, epoch)

    async def _insert_job(self, job: TrainingJobRecord) -> None:
        params = job.params
        spec = await asyncio.to_thread(convert.job_spec, job)  # MiBs of inline examples: off the loop

        async def insert(s: Any) -> None:
            if job.kind == "finetune" and not job.overwrite:
                taken = await repo.adapter_taken(s, job.adapter_id, job.job_id)
                if taken is not None:
                    raise AdapterTaken(job.adapter_id, taken.version)
            new = await repo.insert_job_idempotent(
                s,
                job_id=job.job_id,
                kind=job.kind,
                adapter_id=job.adapter_id,
                spec=spec,
                priority=job.priority,
                total_steps=params.max_steps,
            )
            if not new:  # a redelivery or a client's retry, or another job under a known id
                stored = await repo.get_job(s, job.job_id)
                if stored is not None and not await asyncio.to_thread(same_job, stored.spec, spec):
                    raise JobIdTaken(job.job_id)

        await self._store.tx(insert)
        log.info("job accepted", extra={"job_id": job.job_id, "kind": job.kind, "adapter_id": job.adapter_id})
        self._jobs.wake()

    async def _reject(self, record: Any, err: RecordError, kind: TopicKind) -> None:
        letter = rejects.letter(record, kind, err, max_excerpt_bytes=self._max_excerpt_bytes)
        await self._publisher.dead_letter(letter)
        if kind == "control":
            await self._refuse_command(record, err)
        elif letter.request_id is not None or letter.job_id is not None:
            error = ErrorResult(request_id=letter.request_id, job_id=letter.job_id, code=err.code,
                                message=err.message[:2000], record=record_ref(record))
            await self._publisher.publish(error, letter.request_id or letter.job_id)
        log.info(
            "record rejected",
            extra={
                "topic": record.topic,
                "offset": record.offset,
                "code": err.code,
                "request_id": letter.request_id,
                "job_id": letter.job_id,
            },
        )

    async def _refuse_command(self, record: Any, err: RecordError) -> None:
        """An unreadable command still gets its ack (ok false) when its command_id can be read."""
        fields = rejects.peek_map(record.value, self._limits)
        command_id = fields.get("command_id")
        if not (isinstance(command_id, str) and 0 < len(command_id) <= MAX_ID_CHARS):
            return
        action = fields.get("action") if fields.get("action") in get_args(ControlAction) else None
        target = fields.get("target_id")
        target = target if isinstance(target, str) and 0 < len(target) <= MAX_ID_CHARS else None
        ack = ControlAck(command_id=command_id, action=action, target_id=target, ok=False, code=err.code,
                         message=err.message[:2000], record=record_ref(record))
        await self._publisher.publish(ack, command_id)


class AdapterTaken(Exception):
    """A finetune into an adapter_id that another job or an operator load made (no ``overwrite``)."""

    code = "adapter_exists"

    def __init__(self, adapter_id: str, version: int) -> None:
        self.message = (f"adapter {adapter_id!r} (version {version}) was made by another job or loaded by an "
                        "operator; set 'overwrite': true to train a new version of it, or use another adapter_id")
        super().__init__(f"{self.code}: {self.message}")


class JobIdTaken(Exception):
    """A training record that reuses a known ``job_id`` for another job (other data, adapter, kind or
    parameters): the known job runs on unchanged, and the sender hears why its record did nothing."""

    code = "duplicate_job_id"

    def __init__(self, job_id: str) -> None:
        self.message = (f"job_id {job_id!r} is known for a job with other content; the known job is unchanged. "
                        "Use a new job_id for a new job")
        super().__init__(f"{self.code}: {self.message}")


def same_job(stored_spec: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether a stored job's spec is ``spec`` (a record's ``convert.job_spec``) again, its
    ``priority`` aside; the stored one is read through the wire model so that defaults and number
    forms compare alike."""
    try:
        stored = convert.job_spec(convert.job_from_spec(stored_spec))
    except Exception:  # noqa: BLE001 - a spec this version cannot read is not this record
        return False
    ours = dict(spec)
    stored.pop("priority", None)
    ours.pop("priority", None)
    return stored == ours


def derived_command_id(record: Any) -> str:
    """The command_id of a command sent without one: where it is on the control topic."""
    return f"offset-{record.partition}-{record.offset}"


def _check_storable(record: Any) -> None:
    """Ids become Postgres text keys, which cannot hold NUL characters: refuse them here."""
    for name in ("request_id", "job_id", "adapter_id", "base_adapter", "target_id"):
        value = getattr(record, name, None)
        if isinstance(value, str) and "\x00" in value:
            ids = (getattr(record, "request_id", None), getattr(record, "job_id", None))
            raise RecordError("invalid_value", f"{name}: must not contain NUL characters", *ids)


def _check_reply_to(record: Any, prefix: str) -> None:
    """A reply topic outside the configured prefix is refused: producers must not be able to
    make the worker write into any topic they name (the request topic, another application's)."""
    reply_to = getattr(record, "reply_to", None)
    if reply_to is not None and not reply_to.startswith(prefix):
        raise RecordError(
            "forbidden_reply_to", f"reply_to: {reply_to!r} is not under the reply prefix {prefix!r}", record.request_id
        )


def _partition(record: Any) -> Any:
    from aiokafka import TopicPartition

    return TopicPartition(record.topic, record.partition)


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None
