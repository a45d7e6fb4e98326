"""One worker process per GPU: the lifecycle around the engine thread.

``start`` (engine thread, database, producer, consumer, workers row) / ``run`` (consume,
pump engine events, claim jobs, heartbeat) / ``finally stop``: stop consuming, let
in-flight requests finish (up to ``drain_timeout_s``), commit, give jobs back, mark the
row stopped, stop the engine thread (STYLE.md habit 10). SIGTERM and a control "drain"
both end in the same graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

from loquetier.codec import Limits
from loquetier.db import repo
from loquetier.engine.events import JobCheckpoint, JobEvaluated, JobFinished, JobProgress, TokenEvent
from loquetier.settings import Settings

from . import metrics
from . import store as q
from .adapters import AdapterSync
from .consumer import Consumer
from .control import Control
from .engine_client import EngineClient, EngineLike
from .inference import Inference
from .intake import Intake
from .jobs import JobRunner
from .publisher import Publisher
from .store import Store

log = logging.getLogger(__name__)

_JOB_EVENTS = (JobProgress, JobEvaluated, JobCheckpoint, JobFinished)


class Worker:
    def __init__(
        self,
        engine: EngineLike,
        settings: Settings,
        *,
        bootstrap: str,
        database_url: str,
        device: str = "cpu",
        max_jobs: int = 2,
        drain_timeout_s: float = 10.0,
    ):
        ws = settings.worker
        self.worker_id = ws.id
        self.settings = settings
        self.device = device
        self.drain_timeout_s = drain_timeout_s
        self.client = EngineClient(engine, on_step=metrics.observe_step)
        self.store = Store(database_url)
        self.publisher = Publisher(bootstrap, settings.kafka, worker_id=self.worker_id)
        self.adapters = AdapterSync(self.client, self.store)
        self.inference: Inference = Inference(
            self.client,
            self.store,
            self.publisher,
            self.adapters,
            worker_id=self.worker_id,
            on_done=self._done,
            owner_timeout_s=max(3 * ws.heartbeat_s, 5.0),
        )
        self.consumer = Consumer(
            bootstrap,
            settings.kafka,
            self._handle,
            worker_id=self.worker_id,
            max_inflight=ws.max_inflight,
            inflight=self._num_inflight,
            drain_timeout_s=drain_timeout_s,
        )
        self.jobs = JobRunner(
            self.client,
            self.store,
            self.publisher,
            self.adapters,
            ws,
            worker_id=self.worker_id,
            max_jobs=max_jobs,
        )
        self.control = Control(
            self.client,
            self.store,
            self.publisher,
            self.adapters,
            jobs=self.jobs,
            inference=self.inference,
            worker_id=self.worker_id,
            on_drain=self.request_stop,
        )
        limits = Limits(
            max_record_bytes=settings.kafka.max_record_bytes,
            max_prompt_tokens=settings.engine.max_prompt_tokens,
        )
        self.intake = Intake(
            self.store,
            self.publisher,
            self.inference,
            self.jobs,
            self.control,
            limits=limits,
            done=lambda part, off, epoch: self._done((part, off, epoch)),
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.started = asyncio.Event()

    def _num_inflight(self) -> int:
        return self.inference.num_inflight

    def _done(self, source: tuple[Any, int, int]) -> None:
        self.consumer.done(*source)

    async def _handle(self, kind: Any, record: Any, epoch: int) -> None:
        await self.intake.handle(kind, record, epoch)

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM, control "drain")."""
        if not self._stop.is_set():
            log.info("stop requested", extra={"worker_id": self.worker_id})
        self._stop.set()
        self.consumer.stop_consuming()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """start / consume until stopped / finally stop."""
        await self.start()
        try:
            consume = asyncio.create_task(self.consumer.run(), name="consume")
            stop = asyncio.create_task(self._stop.wait(), name="stop")
            done, _ = await asyncio.wait([consume, stop, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and task.exception() is not None:
                    log.error("worker task failed", exc_info=task.exception())
            self.consumer.stop_consuming()
            stop.cancel()
            await consume
        finally:
            await self.stop()

    async def start(self) -> None:
        ws = self.settings.worker
        max_jobs = self.jobs.max_jobs
        await self.client.start()
        capacity = {
            "max_inflight": ws.max_inflight,
            "max_jobs": max_jobs,
            "max_num_seqs": self.settings.engine.max_num_seqs,
            "max_adapter_slots": self.settings.engine.max_adapter_slots,
        }
        await self.store.tx(
            lambda s: repo.upsert_worker(
                s,
                worker_id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=self.device,
                capacity=capacity,
                status="running",
            )
        )
        await self.publisher.start()
        await self.consumer.start()
        self._tasks = [
            asyncio.create_task(self._pump(), name="pump"),
            asyncio.create_task(self.jobs.run(), name="jobs"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        log.info("worker started", extra={"worker_id": self.worker_id, "device": self.device, "pid": os.getpid()})
        self.started.set()

    async def stop(self) -> None:
        """Stop consuming, finish or hand back in-flight work, commit, release, stop the engine."""
        self.request_stop()
        with contextlib.suppress(Exception):
            await self.store.tx(lambda s: repo.heartbeat_worker(s, self.worker_id, status="draining"), attempts=3)
        await self.jobs.release_all()
        deadline = time.monotonic() + self.drain_timeout_s
        while self.inference.num_inflight and time.monotonic() < deadline and self.client.is_running:
            await asyncio.sleep(0.05)
        aborted = await self.inference.abort_all()
        if aborted:
            log.warning("in-flight requests handed back", extra={"request_ids": aborted[:20], "num": len(aborted)})
        for task in self._tasks:
            task.cancel()
        for task in [*self._tasks, *self.intake.tasks]:
            with contextlib.suppress(BaseException):
                await task
        await self.consumer.close()
        await self.publisher.stop()
        with contextlib.suppress(Exception):
            await self.store.tx(lambda s: repo.heartbeat_worker(s, self.worker_id, status="stopped"), attempts=3)
        await self.store.close()
        await self.client.stop()
        log.info("worker stopped", extra={"worker_id": self.worker_id})

    # --- background tasks ----------------------------------------------------------------

    async def _pump(self) -> None:
        """Engine events to their owners, each in its own task so I/O never blocks the pump."""
        pending: set[asyncio.Task[None]] = set()
        while True:
            events = await self.client.next_events()
            for ev in events:
                if isinstance(ev, TokenEvent):
                    await self.inference.on_event(ev)  # only enqueued: keeps tokens before the result
                    continue
                is_job = isinstance(ev, _JOB_EVENTS)
                owner = self.jobs.on_event(ev) if is_job else self.inference.on_event(ev)
                task = asyncio.create_task(_logged(owner))
                pending.add(task)
                task.add_done_callback(pending.discard)
                if is_job:
                    await task  # job events in order: a checkpoint before the job's end

    async def _heartbeat(self) -> None:
        ws = self.settings.worker
        while True:
            try:
                await self.store.tx(lambda s: repo.heartbeat_worker(s, self.worker_id))
                status = await self.store.tx(lambda s: q.worker_status(s, self.worker_id))
                if status == "draining":
                    self.request_stop()
                await self.jobs.heartbeat()
                await self.adapters.sync()
                metrics.observe_stats(await self.client.stats())
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(ws.heartbeat_s)


async def _logged(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("event handling failed")
