"""A job's set-up: its data is prepared off the engine thread while the worker keeps the job's
lease, so a set-up longer than a lease never lets a second worker start the same job."""

from __future__ import annotations

import time
from typing import Any

import pytest

from loquetier.db import repo
from loquetier.db.session import create_engine, session_factory
from tests.fakes import FakeEngine
from tests.workers.conftest import client_for, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


class SlowPreparing(FakeEngine):
    """Takes ``prepare_s`` to prepare a job's data (a large data file, say), counting the jobs it starts."""

    def __init__(self, prepare_s: float) -> None:
        super().__init__()
        self.prepare_s = prepare_s
        self.started: list[str] = []

    def prepare_data(self, data: Any, micro_batch_tokens: int | None = None) -> Any:
        time.sleep(self.prepare_s)  # on a worker thread: the engine thread and the event loop go on
        return data

    def add_training_job(self, adapter_id: str, data: Any, params: Any, **kwargs: Any) -> str:  # type: ignore[override]
        self.started.append(str(kwargs.get("job_id")))
        return super().add_training_job(adapter_id, data, params, **kwargs)


async def test_a_set_up_longer_than_a_lease_keeps_the_job_on_one_worker(topics: Any, database_url: str) -> None:
    settings = await topics(lease_s=1.0, heartbeat_s=0.25)
    second = settings.model_copy(update={"worker": settings.worker.model_copy(update={"id": "second-worker"})})
    first_engine, second_engine = SlowPreparing(prepare_s=3.0), SlowPreparing(prepare_s=3.0)
    job = {"adapter_id": "setup-a", "data": [{"prompt": "a b", "completion": "c"}], "params": {"max_steps": 3}}
    async with (
        running_worker(first_engine, settings),
        running_worker(second_engine, second),
        client_for(settings) as client,
    ):
        job_id = await client.submit_training(job)
        records = [r async for r in client.results([job_id])]
        assert records[-1].type == "job_done" and records[-1].status == "succeeded"
    assert sorted(first_engine.started + second_engine.started) == [job_id]  # started once, by one worker
    db = create_engine(database_url)
    async with session_factory(db).begin() as s:
        row = await repo.get_job(s, job_id)
    await db.dispose()
    assert row is not None and row.status == "succeeded" and row.attempts == 1
