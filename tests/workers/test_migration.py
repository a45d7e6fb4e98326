"""Migration: kill -9 the worker training a job; another resumes it from the last checkpoint
and finishes with exactly the adapter of an uninterrupted run (same seed, fp32)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select

from loquetier.db import repo
from loquetier.db.models import AdapterRow, CheckpointRow, WorkerRow
from loquetier.engine.events import JobFinished
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.params import TrainingParams
from tests.workers.procs import WorkerProcess
from tests.workers.test_worker_e2e import LORA, query, train_data

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

PARAMS = {"lr": 5e-3, "max_steps": 80, "micro_batch_tokens": 20, "seed": 7, "checkpoint_every": 5}


async def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise TimeoutError(what)


async def test_kill9_mid_training_resumes_elsewhere_with_identical_result(
    topics: Any, database_url: str, tiny_model_dir: Path, make_engine: Any, tmp_path: Path
) -> None:
    from tests.workers.conftest import client_for

    settings = await topics(heartbeat_s=0.5, lease_s=3.0, progress_every_s=0.1)
    workers = {w: WorkerProcess(settings, f"{settings.kafka.group_id}-{w}", tiny_model_dir, tmp_path) for w in "AB"}
    by_id = {p.worker_id: p for p in workers.values()}
    try:
        async def both_running(s: Any) -> int:
            ids = [p.worker_id for p in workers.values()]
            return int(await s.scalar(select(func.count()).where(WorkerRow.worker_id.in_(ids),
                                                                 WorkerRow.status == "running")) or 0)

        await wait_for(lambda: query(database_url, both_running), 90, "workers never registered")
        async with client_for(settings) as client:
            job_id = await client.submit_training({"adapter_id": "migrated", "data": train_data(), "lora": LORA,
                                                   "params": PARAMS})

            async def checkpointed(s: Any) -> Any:
                job = await repo.get_job(s, job_id)
                step = await s.scalar(select(func.max(CheckpointRow.step)).where(CheckpointRow.job_id == job_id))
                return (job.worker_id, step) if job is not None and step is not None and step >= 10 else None

            owner, step_at_kill = await wait_for(lambda: query(database_url, checkpointed), 120, "no checkpoint")
            victim = by_id[owner]
            victim.kill()
            survivor = next(p for p in workers.values() if p is not victim)
            job_done = await asyncio.wait_for(_final(client, job_id), 150)
        assert job_done.status == "succeeded" and job_done.step == 80
        job_row = await query(database_url, lambda s: repo.get_job(s, job_id))
        assert job_row.worker_id == survivor.worker_id and job_row.attempts == 2
        resumed = [e for e in survivor.logs() if e.get("msg") == "job started" and e.get("job_id") == job_id]
        assert resumed and resumed[-1]["from_step"] >= step_at_kill  # lost work <= checkpoint_every steps
        story = list(reversed(await query(database_url, lambda s: repo.job_events(s, job_id, limit=1000))))
        starts = [e for e in story if e.kind == "started"]
        assert [(e.worker_id, e.level) for e in starts] == [(victim.worker_id, "info"), (survivor.worker_id, "warn")]
        assert starts[1].data["previous_worker_id"] == victim.worker_id
        [restored] = [e for e in story if e.kind == "restored"]
        assert restored.worker_id == survivor.worker_id and restored.data["step"] == resumed[-1]["from_step"]
        assert story.index(starts[1]) < story.index(restored) and story[-1].kind == "succeeded"
        assert [e.step for e in story if e.kind == "metrics"][-1] == 80
        adapter = await query(database_url, lambda s: s.scalar(
            select(AdapterRow).where(AdapterRow.adapter_id == "migrated")))
        assert survivor.terminate() == 0  # SIGTERM: graceful stop
        stopped = await query(database_url, lambda s: s.scalar(
            select(WorkerRow.status).where(WorkerRow.worker_id == survivor.worker_id)))
        assert stopped == "stopped"
    finally:
        for p in workers.values():
            p.terminate()
    reference = make_engine()
    reference.add_training_job("migrated", train_data(), TrainingParams(**PARAMS), lora=LORA, job_id="ref")
    finished = next(e for e in reference.run_until_idle() if isinstance(e, JobFinished))
    expected, got = LoRAAdapter.from_bytes(finished.adapter), LoRAAdapter.from_bytes(adapter.data)
    assert expected.weights.keys() == got.weights.keys()
    for key, (a, b) in expected.weights.items():
        assert torch.equal(a, got.weights[key][0]) and torch.equal(b, got.weights[key][1]), key


async def _final(client: Any, job_id: str) -> Any:
    async for record in client.results([job_id], from_beginning=True):
        if record.type == "job_done":
            return record
    raise AssertionError("no job_done")
