"""Control commands through the broker: pause/resume/cancel a job, unload/load an adapter, drain."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from loquetier.db import repo
from tests.fakes import FakeEngine
from tests.workers.conftest import client_for, running_worker
from tests.workers.test_worker_e2e import query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def until(fn: Any, timeout: float = 20) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await fn()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise TimeoutError


async def test_pause_resume_cancel_unload_load_and_drain(topics: Any, database_url: str) -> None:
    settings = await topics()
    engine = FakeEngine()
    job = {"adapter_id": "ctl-a", "data": [{"prompt": "a", "completion": "b"}],
           "params": {"max_steps": 10**7, "checkpoint_every": 1000}}

    async def status(job_id: str) -> str:
        row = await query(database_url, lambda s: repo.get_job(s, job_id))
        return row.status if row else ""

    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        job_id = await client.submit_training(job)
        await until(lambda: _true(job_id in worker.jobs.running))
        await client.control("pause", job_id)
        await until(lambda: _eq(status(job_id), "paused"))
        await until(lambda: _true(job_id not in engine.jobs))
        await client.control("resume", job_id)
        await until(lambda: _true(job_id in engine.jobs and not engine.jobs[job_id].paused))
        await client.control("cancel", job_id)
        done = [r async for r in client.results([job_id]) if r.type == "job_done"][-1]
        assert done.status == "cancelled" and await status(job_id) == "cancelled"
        assert job_id not in engine.jobs

        small = await client.submit_training(job | {"params": {"max_steps": 3}})
        assert [r async for r in client.results([small])][-1].status == "succeeded"
        await client.control("unload", "ctl-a")
        await until(lambda: _true(not engine.has_adapter("ctl-a")))
        rid = await client.submit_generate(prompt_token_ids=[1], max_tokens=1, adapter_id="ctl-a")
        assert (await client.wait_result(rid, 20)).code == "unknown_adapter"
        await client.control("load", "ctl-a", source=f"job:{small}")
        # archived versions are not served again; loading needs a ready version
        bad = await client.submit_generate(prompt_token_ids=[1], max_tokens=1, adapter_id="ctl-a")
        assert (await client.wait_result(bad, 20)).type == "error"

        await client.control("drain", worker.worker_id, worker_id=worker.worker_id)
        await asyncio.wait_for(worker._stop.wait(), 20)


async def _true(value: bool) -> bool:
    return value


async def _eq(awaitable: Any, expected: Any) -> bool:
    return bool(await awaitable == expected)
