"""One worker process per GPU: the lifecycle around the engine thread.

``start`` (engine thread, database, producer, consumer, workers row) / ``run`` (consume,
pump engine events, claim jobs, heartbeat) / ``finally stop`` (STYLE.md habit 10). SIGTERM
and a control "drain" both end in the same graceful stop, whose every step runs even when
an earlier one fails: stop consuming, give jobs back, let in-flight requests finish (up to
``drain_timeout_s``; a second SIGTERM cuts it short), answer the rest with an error and
record it, commit, mark the row stopped, stop the engine thread. Every retry loop gives up
at a deadline once stopping, so a stop ends in bounded time even with the broker or the
database away. An engine thread that died or stalled (no answer for ``engine_stall_s``)
stops the worker the same way, without waiting on the engine, and the log says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from loquetier.codec import Limits
from loquetier.db import repo
from loquetier.db.store import Store
from loquetier.engine.events import JobCheckpoint, JobEvaluated, JobFinished, JobProgress, TokenEvent
from loquetier.settings import Settings

from . import metrics
from .adapters import AdapterSync
from .answer_log import AnswerLog
from .consumer import Consumer
from .control import Control
from .engine_client import EngineClient, EngineLike, StepFailed
from .inference import Inference, coalesce_tokens
from .intake import Intake
from .jobs import LeasedJobs, coalesce_progress
from .lanes import Lanes
from .loop_lag import LoopLag
from .publisher import Publisher
from .reconcile import Reconciler
from .sources import Source

log = logging.getLogger(__name__)

T = TypeVar("T")

_JOB_EVENTS = (JobProgress, JobEvaluated, JobCheckpoint, JobFinished)
_STOP_GRACE_S = 5.0  # past the drain: answering, committing and leaving the group


class Worker:
    def __init__(
        self,
        engine: EngineLike | EngineClient,
        settings: Settings,
        *,
        bootstrap: str,
        database_url: str,
        device: str = "cpu",
        max_jobs: int = 2,
        drain_timeout_s: float | None = None,
    ):
        ws = settings.worker
        self.worker_id = ws.id
        self.settings = settings
        self.device = device
        self.drain_timeout_s = ws.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        # an engine of its own process comes as its client (engine_process.ProcessEngineClient)
        self.client = engine if isinstance(engine, EngineClient) else EngineClient(engine, on_step=metrics.observe_step)
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
            max_attempts=ws.max_attempts,
            answers=AnswerLog(bootstrap, settings.kafka, worker_id=self.worker_id),
            slo_floor=(ws.min_ttft_ms, ws.min_tpot_ms),
        )
        self.consumer = Consumer(
            bootstrap,
            settings.kafka,
            self._handle,
            worker_id=self.worker_id,
            max_inflight=ws.max_inflight,
            inflight=self._num_inflight,
            waiting=lambda kind: self.intake.num_waiting[kind],
            drain_timeout_s=self.drain_timeout_s,
        )
        self.jobs = LeasedJobs(
            self.client,
            self.store,
            self.publisher,
            self.adapters,
            ws,
            worker_id=self.worker_id,
            max_jobs=max_jobs,
        )
        self.job_lanes = Lanes("job event handling")  # a job's engine events, in order, beside the pump
        self.control = Control(
            self.client,
            self.store,
            self.publisher,
            self.adapters,
            jobs=self.jobs,
            inference=self.inference,
            settings=ws,
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
            done=self.consumer.done,
            is_current=self.consumer.tracker.is_current,
            max_excerpt_bytes=settings.kafka.max_dlq_excerpt_bytes,
        )
        self.reconciler = Reconciler(
            self.store, self.publisher, self.consumer, self.inference, ws, worker_id=self.worker_id
        )
        self.loop_lag = LoopLag()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop signal: no more waiting for in-flight work
        self._tasks: list[asyncio.Task[None]] = []
        self.started = asyncio.Event()
        self.engine_failure: str | None = None  # why the engine can no longer be used

    def _num_inflight(self) -> int:
        return self.inference.num_inflight

    def _done(self, source: Source) -> None:
        self.consumer.done(source.part, source.offset, source.epoch)

    async def _handle(self, kind: Any, record: Any, epoch: int) -> None:
        await self.intake.handle(kind, record, epoch)

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM, control "drain", a draining row); idempotent."""
        if self._stop.is_set():
            return
        log.info("stop requested", extra={"worker_id": self.worker_id})
        deadline = time.monotonic() + self.drain_timeout_s + _STOP_GRACE_S
        self.publisher.give_up_at(deadline)
        self.store.give_up_at(deadline)
        self._stop.set()
        self.consumer.stop_consuming()

    def engine_failed(self, why: str) -> None:
        """The engine is dead or stuck: stop without waiting on it."""
        if self.engine_failure is None:
            self.engine_failure = why
            log.error("engine failed, stopping the worker", extra={"worker_id": self.worker_id, "reason": why})
        self.request_stop()
        self._hurry.set()

    def on_signal(self) -> None:
        """SIGTERM / SIGINT: a graceful stop; a second one stops waiting for in-flight work."""
        if self._stop.is_set():
            log.warning("second stop signal: in-flight requests are answered now")
            self._hurry.set()
        self.request_stop()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal)

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
            with contextlib.suppress(Exception):
                await consume
        finally:
            await self.stop()

    async def start(self) -> None:
        ws = self.settings.worker
        max_jobs = self.jobs.max_jobs
        await self.client.start()
        await self.client.set_checkpoint_window(ws.max_unstored_checkpoints)
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
            asyncio.create_task(self._watch_engine(), name="watchdog"),
            asyncio.create_task(self.reconciler.run(), name="reconcile"),
            asyncio.create_task(self.loop_lag.run(), name="loop-lag"),
        ]
        log.info("worker started", extra={"worker_id": self.worker_id, "device": self.device, "pid": os.getpid()})
        self.started.set()

    async def stop(self) -> None:
        """Every step runs even when an earlier one failed; each is bounded in time."""
        self.request_stop()
        if not self.client.is_running:
            self.engine_failed(self.engine_failure or "the engine thread is not running")
        is_engine_ok = self.engine_failure is None
        await _step("mark draining", self._mark("draining"))
        await _step("handle training and control records", self.intake.finish_lanes(), timeout_s=5.0)
        await _step("record job events", self.job_lanes.drain(), timeout_s=10.0)
        await _step("release jobs", self.jobs.release_all(is_clean=is_engine_ok))
        await _step("drain requests", self._drain(), timeout_s=self.drain_timeout_s + 1.0)
        await _step("stop intake", self._cancel_intake())
        code, message = ("engine_failed", _ENGINE_FAILED) if not is_engine_ok else ("worker_stopped", _STOPPED)
        if getattr(self.client.failure, "crashed", False):
            # The engine process died (killed, a segfault): as if the whole worker had. In-flight
            # requests stay unanswered and uncommitted, so they come back to a worker, their attempts
            # counted: an input that kills the engine each time ends "poisoned", the rest get served.
            log.warning("in-flight requests left for redelivery (the engine process died)",
                        extra={"num": self.inference.num_inflight})
        else:
            answered = await _step("answer in-flight requests",
                                   self.inference.answer_all(code, message, can_abort=is_engine_ok))
            if answered:
                log.warning("in-flight requests answered at stop", extra={"request_ids": answered[:20],
                                                                           "num": len(answered), "code": code})
        await _step("note answered records", self.inference.settle(), timeout_s=5.0)
        await _step("stop background tasks", self._cancel_tasks())
        await _step("commit and leave the group", self.consumer.close(), timeout_s=_STOP_GRACE_S + 5.0)
        await _step("stop the producer", self.publisher.stop(), timeout_s=10.0)
        await _step("mark stopped", self._mark("stopped"))
        await _step("close the database", self.store.close(), timeout_s=10.0)
        if is_engine_ok:  # a stuck engine thread is left behind (a daemon): joining it would hang
            await _step("stop the engine", self.client.stop(), timeout_s=35.0)
        else:
            self.client.abandon()  # an engine process is killed: its GPU memory comes back
        log.info("event loop lag, whole run", extra=self.loop_lag.summary())
        log.info("worker stopped", extra={"worker_id": self.worker_id, "engine_failure": self.engine_failure})

    async def _mark(self, status: str) -> None:
        await self.store.tx(lambda s: repo.heartbeat_worker(s, self.worker_id, status=status), attempts=3)

    async def _drain(self) -> None:
        """Let in-flight requests finish, unless the engine cannot or a second signal came."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self.inference.num_inflight and time.monotonic() < deadline and not self._hurry.is_set():
            if self.engine_failure is not None or not self.client.is_running:
                return
            await asyncio.sleep(0.05)

    async def _cancel_intake(self) -> None:
        tasks = list(self.intake.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- background tasks ----------------------------------------------------------------

    async def _pump(self) -> None:
        """Engine events to their owners, each in its own task so I/O never blocks the pump; a job's
        events in order in the job's lane (a checkpoint before the job's end), which the pump does not
        wait for either: tokens of later steps must not queue behind a job's database write."""
        pending: set[asyncio.Task[None]] = set()
        while True:
            try:
                events = coalesce_progress(coalesce_tokens(await self.client.next_events()))
            except StepFailed as exc:
                self.engine_failed(f"an engine step failed: {exc}"[:500])
                return
            for ev in events:
                if isinstance(ev, TokenEvent):
                    await self.inference.on_event(ev)  # only enqueued: keeps tokens before the result
                    continue
                if isinstance(ev, _JOB_EVENTS):
                    self.job_lanes.submit(ev.job_id, functools.partial(self.jobs.on_event, ev))
                    continue
                task = asyncio.create_task(_logged(self.inference.on_event(ev)))
                pending.add(task)
                task.add_done_callback(pending.discard)

    async def _heartbeat(self) -> None:
        ws = self.settings.worker
        while True:
            try:
                await self.store.tx(lambda s: repo.heartbeat_worker(s, self.worker_id))
                status = await self.store.tx(lambda s: repo.worker_status(s, self.worker_id))
                if status == "draining":
                    self.request_stop()
                await self.jobs.heartbeat()
                await self.adapters.sync()
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(ws.heartbeat_s)

    async def _watch_engine(self) -> None:
        """The engine thread answers a command between any two steps: one unanswered for
        ``engine_stall_s`` means a step that does not end (or a dead thread)."""
        ws = self.settings.worker
        while True:
            await asyncio.sleep(ws.heartbeat_s)
            if not self.client.is_running:
                self.engine_failed("the engine thread is not running")
                return
            try:
                metrics.observe_stats(await asyncio.wait_for(self.client.stats(), ws.engine_stall_s))
            except TimeoutError:
                self.engine_failed(f"the engine thread did not answer for {ws.engine_stall_s:g} s")
                return
            except Exception:
                log.exception("engine stats failed")


async def _step(what: str, awaitable: Awaitable[T], *, timeout_s: float = 15.0) -> T | None:
    """One stop step: bounded, and its failure logged instead of ending the stop."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.CancelledError as exc:  # a library's own cancellation (aiokafka's stop, broker away)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the stop itself is being cancelled
        log.warning("stop step failed: %s", what, extra={"step": what, "error": repr(exc)[:500]})
    except Exception as exc:
        log.warning("stop step failed: %s", what, extra={"step": what, "error": repr(exc)[:500]})
    return None


async def _logged(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("event handling failed")


_STOPPED = "the worker stopped before this request finished; submit it again under a new request_id"
_ENGINE_FAILED = "the worker's engine failed before this request finished; submit it again under a new request_id"
