"""The stop path: every step runs, in-flight requests are answered and recorded, offsets are
committed, the worker row ends ``stopped``; an engine that dies or stalls stops the worker
quickly and the log says why (real broker and PostgreSQL, a fake engine)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from loquetier.db import repo
from loquetier.db.models import WorkerRow
from tests.fakes import FakeEngine
from tests.workers.conftest import client_for, running_worker
from tests.workers.test_worker_e2e import query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

POISON = [666, 666]
STALL = [777, 777]


class TroubledEngine(FakeEngine):
    """Steps at a human pace; a POISON prompt makes step() raise, a STALL prompt blocks it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def step(self) -> list[Any]:
        prompts = [r.prompt_ids for r in self.requests.values()]
        if POISON in prompts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if STALL in prompts:
            self.release.wait(60)
        time.sleep(0.005)
        return super().step()


async def worker_status(database_url: str, worker_id: str) -> str | None:
    status: str | None = await query(database_url, lambda s: s.scalar(
        select(WorkerRow.status).where(WorkerRow.worker_id == worker_id)))
    return status


async def test_a_stop_answers_in_flight_requests_and_commits_them(topics: Any, database_url: str) -> None:
    settings = await topics(drain_timeout_s=0.5)
    engine = TroubledEngine()
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        quick = await client.submit_generate(prompt_token_ids=[3, 4], max_tokens=2)
        endless = await client.submit_generate(prompt_token_ids=[5, 6], max_tokens=100_000)
        assert (await client.wait_result(quick, 30)).type == "result"
        await _until(lambda: endless in engine.requests)
        started = time.monotonic()
        worker.request_stop()
        answer = await client.wait_result(endless, 30)
    assert time.monotonic() - started < 10
    assert answer.type == "error" and answer.code == "worker_stopped"
    row = await query(database_url, lambda s: repo.get_request(s, endless))
    assert row.status == "cancelled" and row.finished_at is not None and row.error.startswith("worker_stopped")
    assert await worker_status(database_url, settings.worker.id) == "stopped"
    again = FakeEngine()
    async with running_worker(again, settings), client_for(settings) as client:
        probe = await client.submit_generate(prompt_token_ids=[7], max_tokens=1)
        await client.wait_result(probe, 30)
    assert again.submitted_ids == [probe]  # the answered request's offset was committed: no replay


async def test_an_engine_that_dies_stops_the_worker_quickly(topics: Any, database_url: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    settings = await topics(drain_timeout_s=30.0)
    engine = TroubledEngine()
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        innocent = await client.submit_generate(prompt_token_ids=[5, 6], max_tokens=100_000)
        await _until(lambda: innocent in engine.requests)
        with caplog.at_level(logging.ERROR, logger="loquetier.workers.runtime"):
            started = time.monotonic()
            pill = await client.submit_generate(prompt_token_ids=POISON, max_tokens=4)
            answers = {rid: await client.wait_result(rid, 30) for rid in (innocent, pill)}
            await asyncio.wait_for(worker._stop.wait(), 10)
            while await worker_status(database_url, settings.worker.id) != "stopped":
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - started
    assert elapsed < 10  # not the 30 s drain: the engine cannot finish anything
    assert {a.code for a in answers.values()} == {"engine_failed"}
    assert "illegal memory access" in (worker.engine_failure or "")
    assert any("engine failed" in r.getMessage() for r in caplog.records)
    for rid in answers:
        row = await query(database_url, lambda s, rid=rid: repo.get_request(s, rid))
        assert row.status == "cancelled" and row.finished_at is not None


async def test_an_engine_that_stalls_stops_the_worker_and_keeps_the_job_claim(topics: Any, database_url: str) -> None:
    settings = await topics(engine_stall_s=1.0, drain_timeout_s=30.0, lease_s=30.0)
    engine = TroubledEngine()
    try:
        async with running_worker(engine, settings) as worker, client_for(settings) as client:
            job_id = await client.submit_training({"adapter_id": f"stall-{uuid.uuid4().hex[:6]}",
                                                   "data": [{"prompt": "a", "completion": "b"}],
                                                   "params": {"max_steps": 10**6, "checkpoint_every": 10**6}})
            await _until(lambda: job_id in engine.jobs)
            started = time.monotonic()
            stuck = await client.submit_generate(prompt_token_ids=STALL, max_tokens=4)
            answer = await client.wait_result(stuck, 30)
            await asyncio.wait_for(worker._stop.wait(), 10)
            elapsed = time.monotonic() - started
    finally:
        engine.release.set()
    assert elapsed < 15 and answer.code == "engine_failed"
    assert "did not answer" in (worker.engine_failure or "")
    job = await query(database_url, lambda s: repo.get_job(s, job_id))
    assert job.status == "running" and job.attempts == 1  # its claim still counts: a stall is a failed attempt
    assert job.lease_expires_at is not None and await worker_status(database_url, settings.worker.id) == "stopped"


async def _until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.02)
