"""Operator commands from ``loquetier.control``, applied through Postgres.

The control topic is consumed by one worker of the group, so every command acts on the
shared state in Postgres and the worker that owns the target reacts to it:
- load: register the adapter in ``adapters`` (from a path) or take its latest ready row
  ("db" / "job:<id>"), and load it here; other workers pick it up lazily or on sync.
- unload: archive every ready version (every worker drops it on its next sync).
- cancel / pause: change the job row; the owner's next lease renewal fails and it stops
  the job (a paused job resumes later from its last checkpoint). A request_id target is
  aborted if it runs here.
- resume: a paused job becomes queued again.
- drain: mark the target worker(s) draining; each notices on its heartbeat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from loquetier.db import repo
from loquetier.messages import ControlCommand, JobDoneResult

from . import store as q
from .adapters import AdapterSync, lora_fields
from .engine_client import EngineClient
from .inference import Inference
from .jobs import JobRunner
from .publisher import Publisher
from .store import Store

log = logging.getLogger(__name__)


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Control:
    def __init__(
        self,
        client: EngineClient,
        store: Store,
        publisher: Publisher,
        adapters: AdapterSync,
        *,
        jobs: JobRunner,
        inference: Inference,
        worker_id: str,
        on_drain: Callable[[], None],
    ):
        self._client = client
        self._store = store
        self._publisher = publisher
        self._adapters = adapters
        self._jobs = jobs
        self._inference = inference
        self._worker_id = worker_id
        self._on_drain = on_drain

    async def apply(self, cmd: ControlCommand) -> None:
        if cmd.worker_id is not None and cmd.action != "drain" and cmd.worker_id != self._worker_id:
            log.info("control command for another worker", extra={"action": cmd.action, "for": cmd.worker_id})
        log.info("control", extra={"action": cmd.action, "target_id": cmd.target_id, "command_id": cmd.command_id})
        handler: dict[str, Callable[[ControlCommand], Any]] = {
            "load": self._load,
            "unload": self._unload,
            "cancel": self._cancel,
            "pause": self._pause,
            "resume": self._resume,
            "drain": self._drain,
        }
        await handler[cmd.action](cmd)

    async def _load(self, cmd: ControlCommand) -> None:
        adapter_id = cmd.target_id
        if cmd.path is not None:
            await self._client.load_adapter(adapter_id, cmd.path)
            data = await self._client.export_adapter(adapter_id)
            fields = lora_fields(data, {})
            row = await self._store.tx(
                lambda s: repo.register_adapter(
                    s, adapter_id=adapter_id, source_kind="path", source=cmd.path, data=data, **fields
                )
            )
            self._adapters.mark_loaded(adapter_id, row.version)
            return
        source = cmd.source or "db"
        if source.startswith("job:"):
            job = await self._store.tx(lambda s: repo.get_job(s, source.removeprefix("job:")))
            if job is None or job.adapter_id != adapter_id:
                raise ControlError("not_found", f"{source} did not produce adapter {adapter_id!r}")
        if not await self._adapters.load_latest(adapter_id):
            raise ControlError("unknown_adapter", f"no ready version of adapter {adapter_id!r} in the database")

    async def _unload(self, cmd: ControlCommand) -> None:
        await self._store.tx(lambda s: q.archive_adapter(s, cmd.target_id))
        await self._adapters.unload(cmd.target_id)

    async def _cancel(self, cmd: ControlCommand) -> None:
        target = cmd.target_id
        job = await self._store.tx(lambda s: repo.get_job(s, target))
        if job is None:
            if await self._client.abort(target):
                log.info("request aborted", extra={"request_id": target})
            return
        if await self._store.tx(lambda s: repo.finish_job(s, target, status="cancelled", error="cancelled")):
            await self._jobs.stop_local(target)
            await self._publisher.publish(
                JobDoneResult(job_id=target, adapter_id=job.adapter_id, status="cancelled", step=job.step),
                target,
            )

    async def _pause(self, cmd: ControlCommand) -> None:
        target = cmd.target_id
        if await self._store.tx(
            lambda s: repo.set_job_status(s, target, "paused", from_statuses=("queued", "running"))
        ):
            await self._jobs.stop_local(target)

    async def _resume(self, cmd: ControlCommand) -> None:
        if await self._store.tx(lambda s: repo.set_job_status(s, cmd.target_id, "queued", from_statuses=("paused",))):
            self._jobs.wake()

    async def _drain(self, cmd: ControlCommand) -> None:
        target = cmd.worker_id or cmd.target_id
        drained = await self._store.tx(lambda s: q.drain_workers(s, target))
        if self._worker_id in drained or target in ("*", self._worker_id):
            self._on_drain()
