"""Rows nobody will finish: unfinished requests whose record will not be delivered again.

A request row stays ``running`` when its worker died and the broker will not hand its
record to anyone again: the record lies below the group's committed offset (it was
committed, or a broker that lost its data renumbered the log past it). Every
``reconcile_every_s`` each worker looks at the request partitions it owns and fails such
rows (owner gone, or this worker's previous life) with an error result: ``poisoned`` when
the request used up its attempts, ``lost`` otherwise. Jobs need no sweep: a job whose
lease ran out is claimed again, or failed ``poisoned`` at claim time (workers/jobs.py).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka.errors import KafkaError

from loquetier.db import repo
from loquetier.db.models import RequestRow
from loquetier.db.store import Store
from loquetier.messages import ErrorResult
from loquetier.settings import WorkerSettings

from .consumer import Consumer
from .inference import POISONED, Inference, finish_failed, poisoned_message
from .publisher import Publisher

log = logging.getLogger(__name__)

LOST = "lost"
_LOST_MESSAGE = ("the worker running this request stopped and the broker will not deliver its record again; "
                 "submit it again under a new request_id")


class Reconciler:
    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        consumer: Consumer,
        inference: Inference,
        settings: WorkerSettings,
        *,
        worker_id: str,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._consumer = consumer
        self._inference = inference
        self._settings = settings
        self._worker_id = worker_id
        self.num_failed = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reconcile_every_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("reconciling stale rows failed")

    async def sweep(self) -> int:
        """One pass over the owned request partitions; returns the rows failed."""
        num_failed = 0
        idle_s = max(3 * self._settings.heartbeat_s, 5.0)
        for part in self._consumer.request_partitions():
            try:
                committed = await self._consumer.consumer.committed(part)
            except KafkaError as exc:
                log.warning("no committed offset to reconcile against", extra={"partition": str(part),
                                                                               "error": repr(exc)})
                continue
            if committed is None:
                continue
            rows = await self._store.tx(
                lambda s: repo.stale_requests(
                    s,
                    topic=part.topic,
                    partition=part.partition,
                    below_offset=committed,  # awaited before the loop moves on
                    worker_id=self._worker_id,
                    idle_s=idle_s,
                    exclude=list(self._inference.inflight),
                )
            )
            for row in rows:
                num_failed += await self._fail(row)
        self.num_failed += num_failed
        return num_failed

    async def _fail(self, row: RequestRow) -> int:
        rid = row.request_id
        if row.attempts >= self._settings.max_attempts:
            error = ErrorResult(request_id=rid, code=POISONED, message=poisoned_message("request", row.attempts))
        else:
            error = ErrorResult(request_id=rid, code=LOST, message=_LOST_MESSAGE)
        if not await self._store.tx(lambda s: finish_failed(s, rid, error, "failed")):
            return 0  # finished meanwhile
        log.warning("stale request failed", extra={"request_id": rid, "code": error.code, "from_worker": row.worker_id,
                                                    "offset": row.kafka_offset})
        await self._publisher.publish(error, rid)
        return 1
