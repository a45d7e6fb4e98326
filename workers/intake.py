"""From a Kafka record to work: decode, route, and turn every bad record into a DLQ entry.

A record that does not decode goes to ``loquetier.dlq`` with the reason, plus an "error"
result when a request_id or job_id can be read from it; the worker keeps running. A
training record is done once its job row exists (Postgres owns it from then on); a
control record once it has been applied.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from loquetier.codec import Limits, check_key
from loquetier.db import repo
from loquetier.messages import (
    ControlCommand,
    DeadLetter,
    ErrorResult,
    GenerateRequest,
    RecordError,
    TopicKind,
    TrainingJob,
    decode_record,
)

from . import convert
from .control import Control
from .errors import public_error
from .inference import Inference
from .jobs import JobRunner
from .metrics import RECORDS
from .publisher import Publisher
from .store import Store

log = logging.getLogger(__name__)


class Intake:
    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        inference: Inference,
        jobs: JobRunner,
        control: Control,
        *,
        limits: Limits,
        done: Any,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._inference = inference
        self._jobs = jobs
        self._control = control
        self._limits = limits
        self._done = done  # (partition, offset, epoch) -> None
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, kind: TopicKind, record: Any, epoch: int) -> None:
        part, offset = _partition(record), record.offset
        try:
            check_key(_bytes(record.key), self._limits)
            decoded = decode_record(kind, record.value, self._limits)
            _check_storable(decoded)
            _check_reply_to(decoded, self._publisher.reply_prefix)
        except RecordError as err:
            RECORDS.labels(kind, "invalid").inc()
            await self._reject(record, err)
            self._done(part, offset, epoch)
            return
        RECORDS.labels(kind, "ok").inc()
        if isinstance(decoded, GenerateRequest):
            task = self._inference.accept(decoded, (part, offset, epoch))
            if task is not None:
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            return
        try:
            if isinstance(decoded, TrainingJob):
                await self._insert_job(decoded)
            elif isinstance(decoded, ControlCommand):
                await self._control.apply(decoded)
        except Exception as exc:
            code, message = public_error(exc, "this record", log, kind=kind, offset=offset)
            log.warning("record failed", extra={"kind": kind, "offset": offset, "code": code})
            ids = (None, decoded.job_id if isinstance(decoded, TrainingJob) else None)
            await self._reject(record, RecordError(code, message, *ids))
        self._done(part, offset, epoch)

    async def _insert_job(self, job: TrainingJob) -> None:
        params = job.params
        await self._store.tx(
            lambda s: repo.insert_job_idempotent(
                s,
                job_id=job.job_id,
                kind=job.kind,
                adapter_id=job.adapter_id,
                spec=convert.job_spec(job),
                priority=job.priority,
                total_steps=params.max_steps,
            )
        )
        log.info("job accepted", extra={"job_id": job.job_id, "kind": job.kind, "adapter_id": job.adapter_id})
        self._jobs.wake()

    async def _reject(self, record: Any, err: RecordError) -> None:
        letter = DeadLetter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=_bytes(record.key),
            value=_bytes(record.value),
            code=err.code,
            reason=err.message[:4000],
            request_id=err.request_id,
            job_id=err.job_id,
        )
        if len(record.value or b"") > self._limits.max_record_bytes // 2:
            letter = letter.model_copy(update={"value": None})  # keep the DLQ record under the size limit
        await self._publisher.dead_letter(letter)
        if err.request_id is not None or err.job_id is not None:
            error = ErrorResult(request_id=err.request_id, job_id=err.job_id, code=err.code, message=err.message)
            await self._publisher.publish(error, err.request_id or err.job_id)
        log.info(
            "record rejected",
            extra={
                "topic": record.topic,
                "offset": record.offset,
                "code": err.code,
                "request_id": err.request_id,
                "job_id": err.job_id,
            },
        )


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
