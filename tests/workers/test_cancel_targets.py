"""Cancel targets read together: the cancels waiting at one time share one transaction (real
PostgreSQL), each gets its own rows, and a store that fails fails each of them alone."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import pytest

from loquetier.db import repo
from loquetier.db.store import Store
from loquetier.workers.control import CancelTargets

pytestmark = pytest.mark.postgres


async def test_cancels_waiting_together_share_one_read(database_url: str) -> None:
    store = Store(database_url)
    try:
        tag = uuid.uuid4().hex[:8]
        jobs = [f"job-{tag}-{i}" for i in range(random.randint(2, 5))]
        requests = [f"req-{tag}-{i}" for i in range(random.randint(2, 5))]
        for job_id in jobs:
            await store.tx(lambda s, job_id=job_id: repo.insert_job_idempotent(
                s, job_id=job_id, kind="finetune", adapter_id=f"a-{job_id}", spec={}, priority=0, total_steps=3))
        for rid in requests:
            await store.tx(lambda s, rid=rid: repo.insert_request_idempotent(
                s, request_id=rid, adapter_id=None, priority=0, prompt_tokens=2, kafka_topic="t",
                kafka_partition=0, kafka_offset=1, content_sha256="x", started_by="w"))
        unknown = [f"nobody-{tag}-{i}" for i in range(random.randint(200, 400))]
        targets = [*jobs, *requests, *unknown, jobs[0], unknown[0]]  # a target named twice
        random.shuffle(targets)
        reader = CancelTargets(store)
        rows = await asyncio.gather(*(reader.read(t) for t in targets))
        assert reader.num_reads == 1
        for target, (job, request) in zip(targets, rows, strict=True):
            if target in jobs:
                assert job is not None and job.job_id == target and request is None
            elif target in requests:
                assert job is None and request is not None and request.request_id == target
            else:
                assert job is None and request is None
        assert await reader.read(requests[0]) != (None, None) and reader.num_reads == 2  # a later one reads again
    finally:
        await store.close()


async def test_a_failing_store_fails_each_waiting_cancel(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(database_url)

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the database refused")

    try:
        reader = CancelTargets(store)
        monkeypatch.setattr(store, "tx", down)
        outcomes = await asyncio.gather(*(reader.read(f"t{i}") for i in range(5)), return_exceptions=True)
        assert all(isinstance(o, RuntimeError) and "refused" in str(o) for o in outcomes)
        monkeypatch.undo()
        assert await reader.read("t0") == (None, None)  # the next read works again
    finally:
        await store.close()
