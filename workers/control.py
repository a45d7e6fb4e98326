"""Operator commands from ``loquetier.control``, applied through Postgres and acknowledged.

The control topic is consumed by one worker of the group, so every command acts on the
shared state in Postgres and the worker that owns the target reacts to it:
- load: register the adapter in ``adapters`` (from a path under the adapter roots, read
  boundedly: workers/adapter_paths.py) or take its latest ready row ("db" / "job:<id>"),
  and load it here; other workers pick it up lazily or on sync.
- unload: archive every ready version (every worker drops it on its next sync).
- cancel / pause: change the job row; the owner's next lease renewal fails and it stops
  the job (a paused job resumes later from its last checkpoint). A request_id target is
  aborted when it runs here.
- resume: a paused job becomes queued again.
- drain: only with the operator token (``LOQUETIER_WORKER__OPERATOR_TOKEN``); marks the
  target worker(s) draining, each notices on its heartbeat.

Every command is answered by one ``control_ack`` result keyed by its ``command_id``: ok,
or a code and a reason (``unknown_adapter``, ``unknown_job``, ``forbidden``, ...). The ack of an
applied command that carries its own ``command_id`` is kept in ``control_acks``: the same command
delivered again (its offset not yet committed when a worker stopped) is answered with that ack,
not applied again; another command under a kept ``command_id`` is refused
(``duplicate_command_id``). A refused command changed nothing, so it is evaluated again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import shutil
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from loquetier.db import repo, tenancy_repo
from loquetier.db.store import Store
from loquetier.messages import ControlAck, ControlCommand, JobDoneResult
from loquetier.settings import WorkerSettings

from . import adapter_paths
from .adapters import AdapterSync, lora_fields, remove_blobs, store_blob
from .engine_client import EngineClient
from .errors import ControlError
from .inference import EARLY_CANCEL_TTL_S, Inference
from .jobs import LeasedJobs
from .publisher import Publisher

log = logging.getLogger(__name__)


Outcome = tuple[str, int | None]  # (message, adapter_version)


class Control:
    def __init__(
        self,
        client: EngineClient,
        store: Store,
        publisher: Publisher,
        adapters: AdapterSync,
        *,
        jobs: LeasedJobs,
        inference: Inference,
        settings: WorkerSettings,
        worker_id: str,
        on_drain: Callable[[], None],
    ):
        self._client = client
        self._store = store
        self._publisher = publisher
        self._adapters = adapters
        self._jobs = jobs
        self._inference = inference
        self._settings = settings
        self._worker_id = worker_id
        self._on_drain = on_drain
        self._targets = CancelTargets(store)

    async def apply(self, cmd: ControlCommand, command_id: str) -> ControlAck:
        """Apply ``cmd``; the ack says what happened (never raises for a refused command)."""
        log.info("control", extra={"action": cmd.action, "target_id": cmd.target_id, "command_id": command_id})
        handler: dict[str, Callable[[ControlCommand], Awaitable[Outcome]]] = {
            "load": self._load,
            "unload": self._unload,
            "cancel": self._cancel,
            "pause": self._pause,
            "resume": self._resume,
            "drain": self._drain,
        }
        ack: dict[str, Any] = {"command_id": command_id, "action": cmd.action, "target_id": cmd.target_id,
                               "worker_id": self._worker_id}
        # only a command's own id is an idempotency key: one derived from the record's offset names
        # another command once a broker's offsets start over (a memory-only broker restarted)
        keyed = cmd.command_id is not None
        digest = hashlib.sha256(cmd.model_dump_json(exclude={"command_id"}).encode()).hexdigest() if keyed else ""
        kept = None
        if keyed:
            try:
                kept = await self._store.tx(lambda s: repo.kept_command_ack(s, command_id))
            except Exception as exc:  # the store's trouble: the command's own calls report it in its ack
                log.warning("kept control acks not read", extra={"command_id": command_id, "error": repr(exc)})
        if kept is not None:
            if kept[0] == digest:
                log.info("control command answered again", extra={"command_id": command_id})
                return ControlAck.model_validate(kept[1])
            return ControlAck(**ack, ok=False, code="duplicate_command_id",
                              message=f"command_id {command_id[:100]!r} was used by another command; "
                                      "give each command its own id")
        try:
            message, version = await handler[cmd.action](cmd)
        except (ControlError, adapter_paths.PathRefused) as exc:
            return ControlAck(**ack, ok=False, code=exc.code, message=exc.message[:2000])
        except Exception as exc:  # engine and store errors carry a code and a message fit for users
            code, reason = getattr(exc, "code", None), getattr(exc, "message", None)
            if not isinstance(code, str) or not isinstance(reason, str):
                log.exception("control command failed", extra={"command_id": command_id})
                code, reason = "internal", "the worker could not apply this command"
            return ControlAck(**ack, ok=False, code=code, message=reason[:2000])
        done = ControlAck(**ack, ok=True, message=message, adapter_version=version)
        if not keyed:
            return done
        try:
            kept_ack = done.model_dump(mode="json", exclude_none=True)
            await self._store.tx(lambda s: repo.keep_command_ack(s, command_id, digest, kept_ack))
        except Exception as exc:  # the command is applied: its ack goes out all the same
            log.warning("control ack not kept", extra={"command_id": command_id, "error": repr(exc)})
        return done

    # --- adapters -------------------------------------------------------------------------

    async def _load(self, cmd: ControlCommand) -> Outcome:
        adapter_id = cmd.target_id
        if cmd.path is not None:
            return await self._load_path(adapter_id, cmd.path)
        source = cmd.source or "db"
        if source != "db" and not source.startswith("job:"):
            raise ControlError("invalid_value", f"source must be 'db' or 'job:<job_id>', got {source[:100]!r}")
        if source.startswith("job:"):
            job = await self._store.tx(lambda s: repo.get_job(s, source.removeprefix("job:")))
            if job is None or job.adapter_id != adapter_id:
                raise ControlError("not_found", f"{source} did not produce adapter {adapter_id!r}")
        if not await self._adapters.load_latest(adapter_id):
            raise ControlError("unknown_adapter", f"no ready version of adapter {adapter_id!r} in the database")
        version = self._adapters.versions.get(adapter_id)
        return f"adapter {adapter_id!r} loaded from the database", version

    async def _load_path(self, adapter_id: str, path: str) -> Outcome:
        roots = self._settings.load_roots()
        directory = await asyncio.to_thread(adapter_paths.resolve, path, roots)
        copy = await asyncio.to_thread(
            adapter_paths.copy_adapter, directory, roots, max_adapter_bytes=self._settings.max_adapter_bytes
        )
        try:
            await self._client.load_adapter(adapter_id, str(copy))
            data = await self._client.export_adapter(adapter_id)
            # held as bytes from now on: an adapter loaded from the copy would be read from it again
            # after the engine dropped it from memory, and the copy is deleted next
            await self._client.load_adapter_bytes(adapter_id, data)
        finally:
            await asyncio.to_thread(shutil.rmtree, copy, True)
        fields = await asyncio.to_thread(lora_fields, data, {})  # parses the whole file: off the loop
        blob = await store_blob(self._settings, f"adapters/{adapter_id}/{uuid.uuid4().hex}.safetensors", data)
        async def register(s: Any) -> tuple[Any, list[str]]:
            row = await repo.register_adapter(
                s, adapter_id=adapter_id, source_kind="path", source=str(directory), **blob, **fields
            )
            return row, await repo.prune_adapter_versions(s, adapter_id, self._settings.keep_adapter_versions)

        row, pruned = await self._store.tx(register)
        if pruned:  # files of the versions deleted above, once their rows are gone
            await asyncio.to_thread(remove_blobs, self._settings, pruned)
        self._adapters.mark_loaded(adapter_id, row.version)
        return f"adapter {adapter_id!r} loaded from {path}", row.version

    async def _unload(self, cmd: ControlCommand) -> Outcome:
        adapter_id = cmd.target_id
        # Refusals first, archiving last: an unload that is refused changes nothing, here or in the
        # table (archived versions are never served again, by any worker)
        jobs = await self._store.tx(lambda s: tenancy_repo.unfinished_jobs_of_adapter(s, adapter_id))
        if jobs:
            raise ControlError("adapter_busy", f"adapter {adapter_id!r} is trained or used as a base by unfinished "
                                               f"job(s) {', '.join(jobs[:5])}; cancel them first")
        is_loaded = adapter_id in self._adapters.versions or await self._client.has_adapter(adapter_id)
        await self._adapters.unload(adapter_id)  # the engine may refuse: then nothing is archived
        num_archived = await self._store.tx(lambda s: repo.archive_adapter(s, adapter_id))
        # the archived versions' weights go (their rows stay): an unload the gateway archived first
        # (a deleted model) comes here too, with nothing left to archive
        num_dropped, files = await self._store.tx(lambda s: repo.drop_archived_payloads(s, adapter_id))
        if files:
            await asyncio.to_thread(remove_blobs, self._settings, files)
        if not num_archived and not is_loaded and not num_dropped:
            raise ControlError("unknown_adapter", f"adapter {adapter_id!r} is neither served nor registered")
        return f"adapter {adapter_id!r} unloaded ({num_archived} version(s) archived)", None

    # --- jobs and requests ------------------------------------------------------------------

    async def _cancel(self, cmd: ControlCommand) -> Outcome:
        target = cmd.target_id

        job, request = await self._targets.read(target)
        if job is None:
            return await self._cancel_request(target, request)
        cancelled = await self._store.tx(lambda s: repo.finish_job(s, target, status="cancelled", error="cancelled"))
        await self._jobs.stop_local(target)  # also when it ended meanwhile (e.g. cancelled by a gateway)
        if not cancelled:
            raise ControlError("invalid_state", f"job {target!r} is already {job.status}")
        await self._publisher.publish(
            JobDoneResult(job_id=target, adapter_id=job.adapter_id, status="cancelled", step=job.step), target
        )
        return f"job {target!r} cancelled", None

    async def _cancel_request(self, rid: str, row: Any) -> Outcome:
        """``row``: the request's row as read before the engine was asked (None: no row then)."""
        # only a request this worker took can be in its engine: a storm of made-up ids asks it nothing
        if rid in self._inference.inflight and await self._client.abort(rid):
            log.info("request aborted", extra={"request_id": rid})
            return f"request {rid!r} cancelled", None
        if row is not None and row.finished_at is None:  # it may have finished since: read again
            row = await self._store.tx(lambda s: repo.get_request(s, rid))
        if row is None or row.finished_at is None:  # not read yet, or on its way to the engine here
            self._inference.note_cancel(rid)
        if row is None:
            raise ControlError("unknown_target", f"no job or request {rid!r} yet; a request of this id that "
                                                 f"arrives within {EARLY_CANCEL_TTL_S / 60:g} minutes is "
                                                 "cancelled then")
        if row.finished_at is not None:
            raise ControlError("invalid_state", f"request {rid!r} is already {row.status}")
        if row.worker_id == self._worker_id:
            return f"request {rid!r} cancelled as it reaches the engine", None
        raise ControlError("elsewhere", f"request {rid!r} runs on worker {row.worker_id!r}, which "
                                        "does not read the control topic; it cannot be cancelled from here")

    async def _job(self, job_id: str) -> Any:
        job = await self._store.tx(lambda s: repo.get_job(s, job_id))
        if job is None:
            raise ControlError("unknown_job", f"no job {job_id!r}")
        return job

    async def _pause(self, cmd: ControlCommand) -> Outcome:
        job = await self._job(cmd.target_id)
        paused = await self._store.tx(lambda s: repo.pause_job(s, cmd.target_id))
        # here: stopped once a checkpoint of it as it stands is stored (also when paused or ended
        # already: then not running here either); elsewhere: its worker does the same when its lease
        # renewal fails
        step = await self._jobs.stop_paused(cmd.target_id) if paused else None
        if not paused:
            await self._jobs.stop_local(cmd.target_id)
            raise ControlError("invalid_state", f"job {cmd.target_id!r} is {job.status}: only queued or running "
                                                "jobs pause")
        if step is not None:
            return f"job {cmd.target_id!r} paused at step {step}: it resumes from there", None
        return f"job {cmd.target_id!r} paused", None

    async def _resume(self, cmd: ControlCommand) -> Outcome:
        job = await self._job(cmd.target_id)
        if not await self._store.tx(lambda s: repo.set_job_status(s, cmd.target_id, "queued",
                                                                  from_statuses=("paused",))):
            raise ControlError("invalid_state", f"job {cmd.target_id!r} is {job.status}: only paused jobs resume")
        self._jobs.wake()
        return f"job {cmd.target_id!r} queued again", None

    # --- workers --------------------------------------------------------------------------

    async def _drain(self, cmd: ControlCommand) -> Outcome:
        expected = self._settings.operator_token
        if expected is None:
            raise ControlError("forbidden", "drain needs an operator token: set LOQUETIER_WORKER__OPERATOR_TOKEN "
                                            "on the workers and send it in the command's 'token'")
        given = (cmd.token or "").encode()
        if not hmac.compare_digest(given, expected.get_secret_value().encode()):
            raise ControlError("forbidden", "the command's token does not match the operator token")
        target = cmd.worker_id or cmd.target_id
        drained = await self._store.tx(lambda s: repo.drain_workers(s, target))
        is_me = self._worker_id in drained or target in ("*", self._worker_id)
        if not drained and not is_me:
            raise ControlError("unknown_worker", f"no live worker {target!r}")
        if is_me:
            self._on_drain()
        return f"draining {', '.join(sorted(set(drained) | ({self._worker_id} if is_me else set())))}", None


class CancelTargets:
    """The job and request rows of cancel targets, read for every cancel waiting in one transaction.

    Commands to different targets run side by side (``intake.MAX_CONTROL_AT_ONCE``), so a storm of
    cancels (a client that calls and leaves, or made-up ids) would take a pooled connection each,
    one after another, and a real cancel read behind them would wait for all of them. The cancels
    that wait together share one read instead."""

    MAX_AT_ONCE = 1_000

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: dict[str, list[asyncio.Future[tuple[Any, Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.num_reads = 0

    async def read(self, target: str) -> tuple[Any, Any]:
        """(job row, request row) of ``target``; the request row only where no job has that id."""
        future: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(target, []).append(future)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_waiting(), name="cancel targets")
        return await future

    async def _read_waiting(self) -> None:
        futures: dict[str, list[asyncio.Future[tuple[Any, Any]]]] = {}
        try:
            await asyncio.sleep(0)  # the cancels read with this one join it
            while self._waiting:
                ids = list(self._waiting)[: self.MAX_AT_ONCE]
                futures = {target: self._waiting.pop(target) for target in ids}
                try:
                    self.num_reads += 1
                    jobs, requests = await self._store.tx(functools.partial(_rows_of, ids))
                except Exception as exc:  # each waiting command fails with the store's error, as alone
                    _settle(futures, exc)
                    continue
                for target, waiting in futures.items():
                    rows = (jobs.get(target), None if target in jobs else requests.get(target))
                    for future in waiting:
                        if not future.done():
                            future.set_result(rows)
        finally:  # stopped (the worker stops): no command waits on a read that will not come
            stopped = RuntimeError("the worker stopped reading cancel targets")
            _settle(futures, stopped)
            _settle(self._waiting, stopped)
            self._waiting.clear()


def _settle(futures: dict[str, list[asyncio.Future[Any]]], exc: BaseException) -> None:
    for waiting in futures.values():
        for future in waiting:
            if not future.done():
                future.set_exception(exc)


async def _rows_of(ids: list[str], session: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    jobs = await repo.get_jobs(session, ids)
    return jobs, await repo.get_requests(session, [i for i in ids if i not in jobs])
