"""Training and eval jobs: claimed from Postgres with a lease, run in the engine, recorded.

Postgres is the source of truth once the job row exists. This worker claims queued jobs
(or ones whose lease expired: their worker died) with ``FOR UPDATE SKIP LOCKED``, starts
each from its latest checkpoint, renews the lease on every heartbeat and progress update,
and stops a job as soon as a renewal fails (cancelled, paused, or taken by another
worker). Checkpoints go to the ``checkpoints`` table (bytes, or a file URI plus sha256);
a finished fine-tune registers its adapter in ``adapters`` and is served here at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loquetier.db import repo
from loquetier.db.models import JobRow
from loquetier.db.store import Store
from loquetier.engine.errors import EngineError
from loquetier.engine.events import JobCheckpoint, JobEvaluated, JobFinished, JobProgress
from loquetier.lora import tensor_io
from loquetier.messages import CheckpointResult, ErrorResult, JobDoneResult, ProgressResult, TrainingJobRecord
from loquetier.settings import WorkerSettings
from loquetier.training_files import TrainingFileError, file_id_of, parse_jsonl

from . import adapter_paths, convert
from .adapters import AdapterSync, lora_fields, read_payload, remove_blobs, store_blob
from .engine_client import EngineClient, EngineStopped
from .errors import public_error
from .inference import POISONED, poisoned_message
from .metrics import QUEUE_DEPTH
from .publisher import Publisher

log = logging.getLogger(__name__)

JobEvent = JobProgress | JobEvaluated | JobCheckpoint | JobFinished
RUN_END_WAIT_S = 60.0  # how long a job's new run waits for the engine to end the one stopped before


def coalesce_progress(events: list[Any]) -> list[Any]:
    """A job's run of progress events in one batch as its last one. The earlier ones carry nothing
    the last does not (step, loss and rate are each the latest), and every job event is a task in the
    job's lane: a worker loop that fell behind a fast engine would queue one per step without bound.
    A progress event never moves past another event of its job (an evaluation, a checkpoint, the
    end), so each lane keeps the engine's order."""
    out: list[Any] = []
    at: dict[str, int] = {}  # job_id -> its progress in out, while no other event of the job followed
    for ev in events:
        if isinstance(ev, JobProgress):
            i = at.get(ev.job_id)
            if i is not None:
                out[i] = ev
                continue
            at[ev.job_id] = len(out)
        elif isinstance(ev, JobEvaluated | JobCheckpoint | JobFinished):
            at.pop(ev.job_id, None)
        out.append(ev)
    return out


@dataclass
class _Stopping:
    """A run this worker stopped, until its JobFinished arrives. ``certain``: the engine held the run
    when told to cancel it, so that event will come; else the run had already ended in the engine,
    and its JobFinished may be on its way or already handled."""

    adapter_id: str
    certain: bool = True


@dataclass
class _Pausing:
    """A paused job running here, being stopped after a last checkpoint: ``stored`` is set when that
    checkpoint is stored (``steps``: its step), ``stopped`` once the job is stopped."""

    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    stored: asyncio.Event = field(default_factory=asyncio.Event)
    steps: list[int] = field(default_factory=list)


@dataclass
class RunningJob:
    job: TrainingJobRecord
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    last_report: float = 0.0


def _resumed_at(checkpoint: bytes | None) -> dict[str, Any]:
    """A resumed job's epoch, tokens and loss at its checkpoint (its header), for the progress record
    that says the job runs again; nothing (zeros) for a job from its start or an unreadable header."""
    if checkpoint is None:
        return {}
    try:
        header = tensor_io.header(checkpoint)
        metrics = header.get("metrics") or {}
        losses = metrics.get("losses") or []
        return {"epoch": max(0.0, float(header["cursor"][0])), "tokens_processed": max(0, int(metrics["num_tokens"])),
                "loss": float(losses[-1]) if losses else None}
    except (ValueError, KeyError, TypeError, IndexError):
        return {}


class LeasedJobs:
    """The training and eval jobs this worker holds a lease on: claimed from Postgres, run in the
    engine, their progress, checkpoints and outcome recorded and published."""

    def __init__(
        self,
        client: EngineClient,
        store: Store,
        publisher: Publisher,
        adapters: AdapterSync,
        settings: WorkerSettings,
        *,
        worker_id: str,
        max_jobs: int = 2,
        poll_s: float = 1.0,
    ):
        self._client = client
        self._store = store
        self._publisher = publisher
        self._adapters = adapters
        self._settings = settings
        self._worker_id = worker_id
        self.max_jobs = max_jobs
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self.accepting = True
        self.running: dict[str, RunningJob] = {}
        # jobs stopped here whose run the engine has not yet said ended (its JobFinished): the events
        # of that run are dropped, and the job starts here again only once it has (``_launch``)
        self._stopping: dict[str, _Stopping] = {}
        self._launching: set[str] = set()  # a claim's set-up in progress (data, checkpoint), by job id
        self._pausing: dict[str, _Pausing] = {}  # paused jobs running here, stopped after a last checkpoint
        self._background: set[asyncio.Task[Any]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Claim jobs while there is room, until :attr:`accepting` turns false."""
        while self.accepting:
            await self.claim_more()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            except TimeoutError:
                pass

    async def claim_more(self) -> None:
        await self.poison()
        while self.accepting and len(self.running) < self.max_jobs:
            row = await self._store.tx(
                lambda s: repo.claim_job(
                    s, self._worker_id, lease_s=self._settings.lease_s, max_attempts=self._settings.max_attempts
                )
            )
            if row is None:
                return
            await self._launch(row)
        QUEUE_DEPTH.labels("jobs_running").set(len(self.running))

    async def poison(self) -> None:
        """Fail, for good, the claimable jobs whose every claim ended with its worker."""
        max_attempts = self._settings.max_attempts
        error = f"{POISONED}: {poisoned_message('job', max_attempts)}"
        rows = await self._store.tx(lambda s: repo.poison_jobs(s, max_attempts=max_attempts, error=error))
        for row in rows:
            log.warning("job poisoned", extra={"job_id": row.job_id, "attempts": row.attempts})
            message = poisoned_message("job", row.attempts)
            await self._publisher.publish(ErrorResult(job_id=row.job_id, code=POISONED, message=message), row.job_id)
            done = JobDoneResult(
                job_id=row.job_id, adapter_id=row.adapter_id, status="failed", step=row.step, error=error
            )
            await self._publisher.publish(done, row.job_id)

    async def _launch(self, row: JobRow) -> None:
        job_id = row.job_id
        # our own job, its lease renewed by the claim: it runs here already, or is being set up by an
        # earlier claim (a pause and a resume inside one set-up)
        if job_id in self.running or job_id in self._launching:
            return
        self._launching.add(job_id)
        try:
            await self._launch_new(row)
        finally:
            self._launching.discard(job_id)

    async def _launch_new(self, row: JobRow) -> None:
        job_id = row.job_id
        try:
            job = await asyncio.to_thread(convert.job_from_spec, row.spec)  # MiBs of inline examples: off the loop
            if job.kind == "finetune" and not job.overwrite:  # made meanwhile, e.g. by a job that ran before it
                taken = await self._store.tx(lambda s: repo.adapter_taken(s, job.adapter_id, job_id))
                if taken is not None:
                    raise EngineError("adapter_exists", f"adapter {job.adapter_id!r} (version {taken.version}) was "
                                      "made by another job or an operator before this job started; set 'overwrite': "
                                      "true to train a new version of it, or use another adapter_id")
            ckpt = await self._store.tx(lambda s: repo.latest_checkpoint(s, job_id))
            payload = await asyncio.to_thread(read_payload, ckpt.data, ckpt.uri, ckpt.sha256) if ckpt else None
            base = await self._base_adapter(job.base_adapter)
            data = await self._prepare(job_id, job.data, job.params.micro_batch_tokens)
            eval_data = await self._prepare(job_id, job.eval_data, job.params.micro_batch_tokens)
            if data is None or (job.eval_data is not None and eval_data is None):
                log.info("job lost while its data was prepared", extra={"job_id": job_id})
                return
            if not await self._runs_ended(job_id, job.adapter_id):
                return
            await self._client.add_job(
                job.adapter_id,
                data,
                convert.training_params(job),
                lora=job.lora.model_dump(),
                base_adapter=base,
                eval_data=eval_data,
                job_id=job_id,
                priority=max(0, job.priority),
                kind=job.kind,
                checkpoint=payload,
                install=False,  # the worker installs a result once it is stored and accepted (_finish)
            )
        except EngineStopped:  # the worker stops: the job's lease runs out and a worker resumes it
            log.info("job not started: the engine stopped", extra={"job_id": job_id})
            return
        except Exception as exc:
            if isinstance(exc, EngineError) and exc.code in ("duplicate_job", "adapter_busy"):
                # a run this worker stopped (of this job, or of another job of its adapter) is still in
                # the engine: not this job's failure; its lease runs out and it is claimed again
                log.warning("job not started: its last run is still in the engine", extra={"job_id": job_id})
                return
            code, message = public_error(exc, "this job", log, job_id=job_id)
            error = f"{code}: {message}"
            log.warning("job failed to start", extra={"job_id": job_id, "error": error})
            await self._store.tx(
                lambda s: repo.finish_job(s, job_id, status="failed", worker_id=self._worker_id, error=error)
            )
            done = JobDoneResult(job_id=job_id, adapter_id=row.adapter_id, status="failed", step=row.step, error=error)
            await self._publisher.publish(done, job_id)
            return
        step = ckpt.step if ckpt else 0
        self.running[job_id] = RunningJob(job, step=step, total_steps=row.total_steps)
        if ckpt is not None:  # not after a cancel or pause that came while the job was being restored
            await self._told(job_id, "restored", f"Goes on from the checkpoint of step {step}", {"step": step},
                             owned=True)
        log.info(
            "job started",
            extra={
                "job_id": job_id,
                "kind": job.kind,
                "from_step": step,
                "attempt": row.attempts,
                "worker_id": self._worker_id,
            },
        )
        await self._publisher.publish(
            ProgressResult(job_id=job_id, adapter_id=job.adapter_id, step=step, total_steps=row.total_steps,
                           **_resumed_at(payload)),
            job_id,
        )

    async def _runs_ended(self, job_id: str, adapter_id: str) -> bool:
        """Wait until no run that would meet this one is left on this worker: the run of ``job_id``
        this worker last stopped (its late events would be taken for the new run's, or the engine
        would refuse the new one as a duplicate), and any other job's run of ``adapter_id``, running
        or stopped (a cancel whose row changed before this worker stopped the run): the engine trains
        an adapter once. A stopped run of this job that had already ended in the engine has its
        JobFinished on the way, or handled: it is waited for a while only. False: a run was still
        there after ``RUN_END_WAIT_S`` (the job is left to its lease, and claimed again later)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        own = self._stopping.get(job_id)
        while True:
            waited = loop.time() - start
            if own is not None and self._stopping.get(job_id) is own and not own.certain \
                    and waited > self._settings.drain_timeout_s:
                del self._stopping[job_id]
            own_left = own is not None and self._stopping.get(job_id) is own
            others = any(jid != job_id and rj.job.adapter_id == adapter_id for jid, rj in self.running.items()) \
                or any(jid != job_id and st.certain and st.adapter_id == adapter_id
                       for jid, st in self._stopping.items())
            if not own_left and not others:
                return True
            if waited > RUN_END_WAIT_S:
                log.warning("job not started: an earlier run of it or of its adapter has not ended here",
                            extra={"job_id": job_id, "adapter_id": adapter_id})
                return False
            await asyncio.sleep(0.05)

    async def _base_adapter(self, base: str | None) -> str | None:
        """A known adapter id as is; else a PEFT directory under the adapter roots (resolved)."""
        if base is None or await self._adapters.ensure(base):
            return base
        roots = self._settings.load_roots()
        try:
            directory = await asyncio.to_thread(adapter_paths.resolve, base, roots)
            await asyncio.to_thread(
                adapter_paths.check_adapter, directory, roots, max_adapter_bytes=self._settings.max_adapter_bytes
            )
        except adapter_paths.PathRefused as exc:
            message = f"base_adapter is neither a registered adapter nor usable: {exc.message}"
            raise adapter_paths.PathRefused(exc.code, message) from None
        return str(directory)

    async def _prepare(self, job_id: str, data: Any, micro_batch_tokens: int) -> Any:
        """The job's data tokenized in a thread, off the engine's steps, while this worker keeps
        renewing the job's lease (a large data file may take longer than one lease). None: the
        lease was lost meanwhile (cancelled, paused or taken), so the job must not start here."""
        if data is None:
            return None
        stop = threading.Event()
        task = asyncio.create_task(self._client.prepare_data(await self._data(data), micro_batch_tokens, stop))
        try:
            while not (await asyncio.wait({task}, timeout=self._settings.heartbeat_s))[0]:
                ours = await self._store.tx(
                    lambda s: repo.renew_lease(s, job_id, self._worker_id, lease_s=self._settings.lease_s)
                )
                if not ours:
                    task.cancel()  # its thread stops within a few hundred examples (``stop``)
                    return None
            return task.result()
        finally:
            stop.set()  # a no-op once done; else (lease lost, worker stopping) the thread stops too

    async def _data(self, data: Any) -> Any:
        """Inline examples as they are; ``file:<file_id>`` (an upload) read from the ``files`` table;
        a path read (bounded, symlinks resolved) only from under the worker's data roots."""
        if not isinstance(data, str):
            return convert.job_data(data)
        file_id = file_id_of(data)
        blob: bytes | None
        if file_id is None:
            try:
                blob = await asyncio.to_thread(adapter_paths.read_data_file, data, self._settings.data_roots,
                                               max_bytes=self._settings.max_data_file_bytes)
            except adapter_paths.PathRefused as exc:
                raise EngineError(exc.code, exc.message) from None
            name = "the data file"
        else:
            blob = await self._store.tx(lambda s: repo.file_data(s, file_id))
            if blob is None:
                raise EngineError("invalid_data", f"training file {file_id!r} does not exist (deleted?)")
            name = f"training file {file_id!r}"
        try:
            return await asyncio.to_thread(parse_jsonl, blob)
        except TrainingFileError as exc:
            raise EngineError("invalid_data", f"{name}: {exc}") from None

    # --- leases ----------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        for job_id in list(self.running):
            ours = await self._store.tx(
                lambda s: repo.renew_lease(s, job_id, self._worker_id, lease_s=self._settings.lease_s)
            )
            if not ours:
                await self._lost(job_id, "lease lost (cancelled, paused or taken over)")

    async def _lost(self, job_id: str, why: str) -> None:
        """A renewal failed: a job paused (elsewhere) keeps its progress in a last checkpoint before it
        stops, in the background; one cancelled or taken over stops now."""
        if job_id in self._pausing:
            return  # the pause that asked for its checkpoint stops it
        row = await self._store.tx(lambda s: repo.get_job(s, job_id))
        if row is not None and row.status == "paused" and row.worker_id is None:
            task = asyncio.create_task(self.stop_paused(job_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        await self._drop(job_id, why)

    async def stop_paused(self, job_id: str) -> int | None:
        """Stop a job whose row was paused, after a checkpoint of it as it stands is stored (at most
        ``pause_checkpoint_s``): it resumes from there, not from its last periodic checkpoint or its
        start. The step of that checkpoint; None when none was made (the job ran not here, had taken no
        step, or its checkpoint did not come in time)."""
        pending = self._pausing.get(job_id)
        if pending is not None:  # its lease renewal and the pause command both got here: one stop
            await pending.stopped.wait()
            return pending.steps[-1] if pending.steps else None
        if job_id not in self.running:
            await self._drop(job_id, "paused")
            return None
        pausing = self._pausing[job_id] = _Pausing()
        try:
            if await self._client.checkpoint_job(job_id):
                await asyncio.wait_for(pausing.stored.wait(), self._settings.pause_checkpoint_s)
        except (TimeoutError, EngineStopped) as exc:
            log.warning("paused job stopped without a last checkpoint", extra={"job_id": job_id, "error": repr(exc)})
        finally:
            await self._drop(job_id, "paused")
            del self._pausing[job_id]
            pausing.stopped.set()
        return pausing.steps[-1] if pausing.steps else None

    async def _drop(self, job_id: str, why: str) -> None:
        rj = self.running.pop(job_id, None)
        if rj is not None:
            # until its JobFinished arrives (the cancel's, or one already on its way) the run's events
            # are dropped, and a new run of the job waits (``_runs_ended``)
            stopping = self._stopping[job_id] = _Stopping(rj.job.adapter_id)
            stopping.certain = await self._client.cancel_job(job_id)
            log.info("job stopped here", extra={"job_id": job_id, "reason": why})

    async def stop_local(self, job_id: str) -> bool:
        """Stop a job in this engine (control cancel/pause); the row is changed by the caller."""
        running = job_id in self.running
        await self._drop(job_id, "control")
        return running

    async def release_all(self, *, is_clean: bool = True, engine_timeout_s: float = 2.0) -> None:
        """Drain: stop every job here and give it back; another worker resumes it.

        A clean release gives the claim back (no failed attempt). When the engine failed,
        the rows only lose their lease: the claim keeps counting, so a job that breaks
        engines ends ``poisoned``. Each job is handled even when another one's step fails.
        """
        self.accepting = False
        self.wake()
        for job_id in list(self.running):
            self.running.pop(job_id, None)
            if is_clean:
                try:
                    await asyncio.wait_for(self._client.cancel_job(job_id), engine_timeout_s)
                except Exception as exc:
                    log.warning("job not cancelled in the engine", extra={"job_id": job_id, "error": repr(exc)})
            try:
                if is_clean:
                    await self._store.tx(lambda s: repo.release_job(s, job_id, self._worker_id))
                else:
                    await self._store.tx(lambda s: repo.expire_lease(s, job_id, self._worker_id))
                log.info("job released", extra={"job_id": job_id, "is_clean": is_clean})
            except Exception as exc:  # the lease runs out by itself and another worker resumes it
                log.warning("job not released", extra={"job_id": job_id, "error": repr(exc)})

    # --- engine events -------------------------------------------------------------------

    async def on_event(self, ev: JobEvent) -> None:
        stopped = self._stopping.get(ev.job_id)
        if stopped is not None:  # a run this worker stopped: its late events mean nothing
            if isinstance(ev, JobFinished):  # the engine let it go: the job may start here again
                del self._stopping[ev.job_id]
            return
        if isinstance(ev, JobCheckpoint):
            try:
                await self._on_event(ev)
            finally:  # stored or not, the engine may let the job go on (WorkerSettings.max_unstored_checkpoints)
                await self._checkpoint_done(ev.job_id)
        else:
            await self._on_event(ev)

    async def _checkpoint_done(self, job_id: str) -> None:
        try:
            await asyncio.wait_for(self._client.checkpoint_stored(job_id), self._settings.drain_timeout_s)
        except Exception as exc:  # noqa: BLE001  # a stopped engine holds no job
            log.warning("engine not told of a stored checkpoint", extra={"job_id": job_id, "error": repr(exc)})

    async def _on_event(self, ev: JobEvent) -> None:
        rj = self.running.get(ev.job_id)
        if rj is None:
            return  # a job we stopped; its late events mean nothing
        if isinstance(ev, JobProgress):
            rj.step, rj.total_steps, rj.loss = ev.step, ev.total_steps, ev.loss
            now = time.monotonic()
            if now - rj.last_report >= self._settings.progress_every_s or ev.step >= ev.total_steps:
                rj.last_report = now
                await self._report(ev.job_id, rj, ev)
        elif isinstance(ev, JobEvaluated):
            rj.eval_loss = ev.loss
            metrics = {"eval_loss": ev.loss, "token_accuracy": ev.token_accuracy}
            await self._update(ev.job_id, rj, metrics=metrics)
            await self._publisher.publish(
                ProgressResult(
                    job_id=ev.job_id,
                    adapter_id=rj.job.adapter_id,
                    step=max(0, ev.step),
                    total_steps=rj.total_steps,
                    loss=rj.loss,
                    eval_loss=ev.loss,
                ),
                ev.job_id,
            )
        elif isinstance(ev, JobCheckpoint):
            await self._checkpoint(ev, rj)
        else:
            await self._finish(ev, rj)

    async def _report(self, job_id: str, rj: RunningJob, ev: JobProgress) -> None:
        await self._update(job_id, rj, epoch=float(ev.epoch), tokens_processed=ev.tokens_processed)
        await self._publisher.publish(convert.progress_result(ev, rj.job.adapter_id, rj.eval_loss), job_id)

    async def _update(self, job_id: str, rj: RunningJob, **extra: Any) -> None:
        ours = await self._store.tx(
            lambda s: repo.update_job_progress(
                s,
                job_id,
                self._worker_id,
                lease_s=self._settings.lease_s,
                step=rj.step,
                total_steps=rj.total_steps,
                last_loss=rj.loss,
                last_eval_loss=rj.eval_loss,
                **extra,
            )
        )
        if not ours:
            await self._lost(job_id, "lease lost")

    async def _store_blob(self, name: str, data: bytes) -> dict[str, Any]:
        return await store_blob(self._settings, name, data)

    async def _told(self, job_id: str, kind: str, message: str, data: dict[str, Any], owned: bool = False) -> None:
        """An entry in the job's history that no row transition writes (``owned``: only while this
        worker runs the job); the job goes on without it when the database refuses it."""
        try:
            if owned:
                await self._store.tx(lambda s: repo.record_owned_job_event(s, job_id, self._worker_id, kind, message,
                                                                           data=data))
                return
            await self._store.tx(lambda s: repo.record_job_event(s, job_id, kind, message, data=data,
                                                                 worker_id=self._worker_id))
        except Exception as exc:  # noqa: BLE001  # history only: never stops the job
            log.warning("job history entry not stored", extra={"job_id": job_id, "kind": kind, "error": repr(exc)})

    async def _checkpoint(self, ev: JobCheckpoint, rj: RunningJob) -> None:
        # a worker whose lease ran out while its job went on elsewhere writes no row (checked in the
        # row's transaction, below) and no file (checked first: the new holder's files have the same names)
        if self._settings.checkpoint_storage == "uri":
            other = await self._store.tx(lambda s: repo.job_taken_by(s, ev.job_id, self._worker_id))
            if other is not None:
                await self._not_ours(ev, other)
                return
        blob = await self._store_blob(f"{ev.job_id}/step-{ev.step}.ckpt", ev.data)
        keep = self._settings.keep_checkpoints

        async def save(s: Any) -> tuple[Any, list[str], str | None]:
            taken = await repo.job_taken_by(s, ev.job_id, self._worker_id, lock=True)
            if taken is not None:
                return None, [], taken
            saved = await repo.save_checkpoint(
                s, job_id=ev.job_id, step=ev.step, meta={"worker_id": self._worker_id, "loss": rj.loss}, **blob)
            if ev.job_id in self._pausing:  # the row of a paused job shows the step it resumes from
                await repo.raise_job_step(s, ev.job_id, ev.step)
            return saved, await repo.prune_checkpoints(s, ev.job_id, keep), None

        row, dropped, other = await self._store.tx(save)
        if row is None:
            await self._not_ours(ev, other)
            return
        if dropped:  # files of the checkpoints pruned above, once their rows are gone
            await asyncio.to_thread(remove_blobs, self._settings, dropped)
        log.info("checkpoint stored", extra={"job_id": ev.job_id, "step": ev.step, "bytes": row.size_bytes})
        pausing = self._pausing.get(ev.job_id)
        if pausing is not None:  # a paused job's last checkpoint: its pause may stop it now
            pausing.steps.append(ev.step)
            pausing.stored.set()
        await self._publisher.publish(
            CheckpointResult(
                job_id=ev.job_id,
                adapter_id=rj.job.adapter_id,
                step=ev.step,
                uri=row.uri,
                sha256=row.sha256,
                size_bytes=row.size_bytes,
            ),
            ev.job_id,
        )

    async def _not_ours(self, ev: JobCheckpoint, holder: str | None) -> None:
        log.warning("checkpoint not stored: another worker holds the job",
                    extra={"job_id": ev.job_id, "step": ev.step, "holder": holder})
        await self._drop(ev.job_id, f"lease lost to {holder}")

    async def _finish(self, ev: JobFinished, rj: RunningJob) -> None:
        job, job_id = rj.job, ev.job_id
        status = ev.status if ev.status in ("succeeded", "failed", "cancelled") else "failed"
        adapter = ev.adapter if status == "succeeded" and job.kind == "finetune" else None
        blob = await self._store_blob(f"{job_id}/adapter.bin", adapter) if adapter is not None else None
        metrics = {k: float(v) for k, v in (ev.metrics or {}).items()}
        refused: list[str] = []  # set when another owner took the adapter_id while this job ran
        lost: list[bool] = []  # set when the row is no longer this worker's (paused, cancelled, taken)
        pruned: list[str] = []  # files of the adapter versions deleted below
        # parses the whole adapter (hundreds of MB at a high rank): off the event loop, before the transaction
        fields = await asyncio.to_thread(lora_fields, adapter, job.lora.model_dump()) if adapter is not None else {}

        async def record(s: Any) -> int | None:
            refused.clear()
            lost.clear()
            ours = await repo.update_job_progress(
                s,
                job_id,
                self._worker_id,
                lease_s=self._settings.lease_s,
                step=rj.step,
                metrics=metrics,
                last_loss=metrics.get("loss"),
                last_eval_loss=metrics.get("eval_loss"),
            )
            if not ours:  # its row moved on meanwhile: this run's outcome is not the job's
                lost.append(True)
                return None
            version = None
            taken = await repo.adapter_taken(s, job.adapter_id, job_id) if adapter and not job.overwrite else None
            if taken is not None:
                refused.append(f"adapter_exists: adapter {job.adapter_id!r} (version {taken.version}) was made "
                               "by another job or an operator meanwhile; set 'overwrite': true to replace it")
            elif adapter is not None and blob is not None:
                row = await repo.register_adapter(
                    s,
                    adapter_id=job.adapter_id,
                    source_kind="job",
                    source=f"job:{job_id}",
                    job_id=job_id,
                    **fields,
                    **blob,
                )
                version = row.version
                pruned[:] = await repo.prune_adapter_versions(s, job.adapter_id, self._settings.keep_adapter_versions)
            final, error = ("failed", refused[0]) if refused else (status, ev.error)
            await repo.finish_job(s, job_id, status=final, worker_id=self._worker_id, error=error)
            return version

        version = await self._store.tx(record)
        if lost:
            if blob is not None and blob.get("uri"):  # the adapter file written for a version never registered
                await asyncio.to_thread(remove_blobs, self._settings, [blob["uri"]])
            self.running.pop(job_id, None)
            log.warning("job result dropped: the job is no longer this worker's",
                        extra={"job_id": job_id, "status": ev.status})
            QUEUE_DEPTH.labels("jobs_running").set(len(self.running))
            self.wake()
            return
        if pruned:  # once their rows are gone
            await asyncio.to_thread(remove_blobs, self._settings, pruned)
        self.running.pop(job_id, None)
        if refused:  # the engine never served what this job trained: the owner's version stays
            ev = JobFinished(job_id, job.adapter_id, "failed", ev.metrics, error=refused[0])
        elif adapter is not None:
            # now, or once the sequences running on the version before end (new ones wait for it)
            await self._client.replace_adapter_bytes(job.adapter_id, adapter)
            self._adapters.mark_loaded(job.adapter_id, version)
        log.info("job finished", extra={"job_id": job_id, "status": ev.status, "adapter_version": version})
        await self._publisher.publish(convert.job_done_result(ev, rj.step, version, job.kind), job_id)
        QUEUE_DEPTH.labels("jobs_running").set(len(self.running))
        self.wake()
