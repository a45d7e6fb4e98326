"""A job's set-up: its data is prepared off the engine thread while the worker keeps the job's
lease, so a set-up longer than a lease never lets a second worker start the same job."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from loquetier.db import repo
from loquetier.db.session import create_engine, session_factory
from loquetier.engine.errors import EngineError
from tests.fakes import FakeEngine
from tests.workers.conftest import client_for, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


class SlowPreparing(FakeEngine):
    """Takes ``prepare_s`` to prepare a job's data (a large data file, say), counting the jobs it starts."""

    def __init__(self, prepare_s: float) -> None:
        super().__init__()
        self.prepare_s = prepare_s
        self.started: list[str] = []
        self.preparing = threading.Event()
        self.stopped = threading.Event()  # a preparation ended early by its stop event

    def prepare_data(self, data: Any, micro_batch_tokens: int | None = None,
                     stop: threading.Event | None = None) -> Any:
        self.preparing.set()
        deadline = time.monotonic() + self.prepare_s
        while time.monotonic() < deadline:  # on a worker thread: the engine thread and the event loop go on
            if stop is not None and stop.is_set():
                self.stopped.set()
                raise EngineError("cancelled", "the data's preparation was stopped")
            time.sleep(0.02)
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


async def test_a_cancel_stops_the_data_preparation(topics: Any) -> None:
    """A job cancelled while its data is prepared stops the preparing thread, which would otherwise
    tokenize (and hold the preparer from every other job) to the end for nothing."""
    settings = await topics(lease_s=1.0, heartbeat_s=0.25)
    engine = SlowPreparing(prepare_s=120.0)
    job = {"adapter_id": "setup-cancel", "data": [{"prompt": "a b", "completion": "c"}], "params": {"max_steps": 3}}
    async with running_worker(engine, settings), client_for(settings) as client:
        job_id = await client.submit_training(job)
        assert await asyncio.to_thread(engine.preparing.wait, 30)
        ack = await client.control("cancel", job_id, wait=True)
        assert ack.ok, ack
        assert await asyncio.to_thread(engine.stopped.wait, 10)
    assert engine.started == []


async def test_a_data_path_is_read_only_from_under_the_data_roots(topics: Any, tmp_path: Any) -> None:
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "ok.jsonl").write_text('{"prompt": "a b", "completion": "c"}\n{"prompt": "d", "completion": "e f"}\n')
    (outside / "secret.jsonl").write_text('{"prompt": "s", "completion": "t"}\n')
    (root / "out.jsonl").symlink_to(outside / "secret.jsonl")
    settings = await topics()
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"data_roots": [root]})})
    engine = SlowPreparing(prepare_s=0.0)
    async with running_worker(engine, settings), client_for(settings) as client:
        done = {}
        for name, path in {"inside": str(root / "ok.jsonl"), "outside": str(outside / "secret.jsonl"),
                           "linked out": str(root / "out.jsonl")}.items():
            job_id = await client.submit_training({"adapter_id": f"data-{name.replace(' ', '-')}", "data": path,
                                                   "params": {"max_steps": 2}})
            records = [r async for r in client.results([job_id])]
            done[name] = records[-1]
    assert done["inside"].type == "job_done" and done["inside"].status == "succeeded"
    for name in ("outside", "linked out"):
        assert done[name].status == "failed" and done[name].error.startswith("forbidden_path:"), done[name]
        assert "secret" not in done[name].error
    assert done["outside"].error == done["linked out"].error
