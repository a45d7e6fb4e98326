"""The worker against a deterministic fake engine, a real broker and real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import pytest

from loquetier.db import repo
from loquetier.db.session import create_engine, session_factory
from tests.fakes import FakeEngine
from tests.workers.conftest import client_for, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def row(database_url: str, request_id: str) -> Any:
    engine = create_engine(database_url)
    try:
        async with session_factory(engine).begin() as s:
            return await repo.get_request(s, request_id)
    finally:
        await engine.dispose()


async def test_request_round_trip_and_redelivery(topics: Any, database_url: str) -> None:
    settings = await topics()
    engine = FakeEngine()
    async with running_worker(engine, settings), client_for(settings) as client:
        sent = time.time()
        rid = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=4, stream=True)
        records = [r async for r in client.results([rid])]
        # the engine counts TTFT from the worker's intake of the record, not from when it got the command
        assert sent <= engine.arrived_at[rid] <= time.time()
        # token records (a record carries every token of the steps since the last one), then the result
        assert [r.type for r in records[:-1]] == ["token"] * (len(records) - 1) and records[-1].type == "result"
        result = records[-1]
        assert result.token_ids == [6, 7, 8, 6]
        assert [i for t in records[:-1] for i in t.token_ids] == result.token_ids
        assert [t.index for t in records[:-1]] == [sum(len(t.token_ids) for t in records[:k]) for k in
                                                  range(len(records) - 1)]
        again = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=4, request_id=rid)
        second = await client.wait_result(again, timeout=20)
        assert second.type == "result"
    assert engine.submitted_ids.count(rid) == 1
    stored = await row(database_url, rid)
    assert stored.status == "succeeded" and stored.completion_tokens == 4 and stored.ttft_ms == 2.0
    assert second.model_dump() == result.model_dump()


async def test_duplicates_in_flight_compute_once_and_answer_once(topics: Any, database_url: str) -> None:
    """Copies of a running request (retries, redeliveries, a flood of them) compute once and are answered
    by one result record: every copy reads it under the same id. None stays pending."""
    import threading

    from loquetier.workers.inference import MAX_JOINED
    from tests.workers.test_restarts import final_records

    gate = threading.Event()

    class HeldEngine(FakeEngine):
        def step(self) -> list[Any]:  # no progress until every copy has been read
            if not gate.is_set():
                time.sleep(0.005)
                return []
            return super().step()

    settings = await topics()
    engine = HeldEngine()
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        rid = f"dup-{uuid.uuid4().hex[:6]}"
        for _ in range(3 * MAX_JOINED):
            await client.submit_generate(prompt_token_ids=[1, 2], max_tokens=30, request_id=rid)
        deadline = time.monotonic() + 20
        flight = None
        while flight is None or len(flight.sources) < MAX_JOINED or rid not in engine.requests:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
            flight = worker.inference.inflight.get(rid)
        await asyncio.sleep(0.5)  # the rest of the copies are read meanwhile, and done before the answer
        assert len(flight.sources) == MAX_JOINED and worker.consumer.tracker.num_pending() == MAX_JOINED
        gate.set()
        assert (await client.wait_result(rid, timeout=30)).type == "result"
        deadline = time.monotonic() + 20
        while worker.consumer.tracker.num_pending() or worker.inference.num_inflight:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert len(worker.inference.inflight) == 0
    assert engine.submitted_ids.count(rid) == 1
    assert (await final_records(settings, [rid]))[rid] == 1


async def test_training_job_checkpoints_done_and_serves_the_adapter(topics: Any, database_url: str) -> None:
    from sqlalchemy import select

    from loquetier.db.models import AdapterRow, CheckpointRow

    settings = await topics()
    engine = FakeEngine()
    job = {"adapter_id": "fake-a", "data": [{"prompt": "a b", "completion": "c"}],
           "params": {"max_steps": 6, "checkpoint_every": 2, "seed": 3}}
    async with running_worker(engine, settings), client_for(settings) as client:
        job_id = await client.submit_training(job)
        records = [r async for r in client.results([job_id])]
        types = [r.type for r in records]
        assert types[-1] == "job_done" and "checkpoint" in types and "progress" in types
        done = records[-1]
        assert done.status == "succeeded" and done.step == 6 and done.adapter_version == 1
        assert [r.step for r in records if r.type == "checkpoint"] == [2, 4]
        rid = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=2, adapter_id="fake-a")
        result = await client.wait_result(rid, timeout=20)
        assert result.type == "result" and result.adapter_id == "fake-a"
        missing = await client.submit_generate(prompt_token_ids=[5], max_tokens=2, adapter_id="nope")
        error = await client.wait_result(missing, timeout=20)
        assert error.type == "error" and error.code == "unknown_adapter"
    db = create_engine(database_url)
    async with session_factory(db).begin() as s:
        ckpts = (await s.scalars(select(CheckpointRow.step).where(CheckpointRow.job_id == job_id))).all()
        adapter = await s.scalar(select(AdapterRow).where(AdapterRow.adapter_id == "fake-a"))
        job_row = await repo.get_job(s, job_id)
    await db.dispose()
    assert sorted(ckpts) == [2, 4]
    assert adapter is not None and adapter.status == "ready" and adapter.data == b"adapter:fake-a:6:3"
    assert job_row is not None and job_row.status == "succeeded" and job_row.step == 6


async def test_a_job_keeps_its_newest_checkpoints_and_their_files(topics: Any, database_url: str,
                                                                    tmp_path: Any) -> None:
    """A checkpoint at every step keeps only ``keep_checkpoints`` rows and files: older ones go as
    newer ones are stored (the store no longer grows with the job's length)."""
    import random

    from sqlalchemy import select

    from loquetier.db.models import CheckpointRow

    keep, steps = random.randint(2, 3), random.randint(8, 11)
    root = tmp_path / "blobs"
    settings = await topics(checkpoint_storage="uri", checkpoint_dir=root, keep_checkpoints=keep)
    job = {"adapter_id": f"kept-{keep}-{steps}", "data": [{"prompt": "a b", "completion": "c"}],
           "params": {"max_steps": steps, "checkpoint_every": 1, "seed": 5}}
    async with running_worker(FakeEngine(), settings), client_for(settings) as client:
        job_id = await client.submit_training(job)
        records = [r async for r in client.results([job_id])]
    published = [r.step for r in records if r.type == "checkpoint"]
    assert published == list(range(1, steps))  # each one was stored and announced
    db = create_engine(database_url)
    async with session_factory(db).begin() as s:
        rows = (await s.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id))).all()
    await db.dispose()
    assert sorted(r.step for r in rows) == published[-keep:]
    files = sorted(p.name for p in root.rglob("*.ckpt"))
    assert files == sorted(f"step-{step}.ckpt" for step in published[-keep:])
    assert all(r.uri and r.uri.endswith(f"step-{r.step}.ckpt") for r in rows)


@pytest.mark.parametrize("storage", ["db", "uri"])
async def test_a_worker_whose_job_went_elsewhere_stores_none_of_its_checkpoints(
    topics: Any, database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, storage: str
) -> None:
    """Another worker took the job (this one's lease ran out): the next checkpoint is neither stored
    (no row, and with file storage no file) nor announced, and the job stops here; the checkpoints made
    before stay."""
    from datetime import timedelta

    from sqlalchemy import func, select, update

    from loquetier.db.models import CheckpointRow, JobRow
    from loquetier.workers.jobs import LeasedJobs

    original = LeasedJobs._checkpoint

    async def taken_at_step_2(self: LeasedJobs, ev: Any, rj: Any) -> None:
        if ev.step == 2:
            db = create_engine(database_url)
            async with session_factory(db).begin() as s:
                await s.execute(update(JobRow).where(JobRow.job_id == ev.job_id).values(
                    worker_id="w-elsewhere", lease_expires_at=func.now() + timedelta(hours=1)))  # renewed there
            await db.dispose()
        await original(self, ev, rj)

    monkeypatch.setattr(LeasedJobs, "_checkpoint", taken_at_step_2)
    root = tmp_path / "blobs"
    settings = await topics(checkpoint_storage=storage, checkpoint_dir=root)
    engine = FakeEngine()
    job = {"adapter_id": "fake-moved", "data": [{"prompt": "a b", "completion": "c"}],
           "params": {"max_steps": 6, "checkpoint_every": 1, "seed": 2}}
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        job_id = await client.submit_training(job)
        deadline = time.monotonic() + 30
        while job_id in worker.jobs.running or not engine.stored_checkpoints:
            assert time.monotonic() < deadline, "the job did not stop here"
            await asyncio.sleep(0.05)
        assert job_id not in engine.jobs  # cancelled in the engine
        records: list[Any] = []

        async def read() -> None:
            async for record in client.results([job_id], follow=True, from_beginning=True):
                records.append(record)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), 3.0)
    db = create_engine(database_url)
    async with session_factory(db).begin() as s:
        steps = (await s.scalars(select(CheckpointRow.step).where(CheckpointRow.job_id == job_id))).all()
        row = await repo.get_job(s, job_id)
    await db.dispose()
    assert sorted(steps) == [1]
    assert row is not None and row.worker_id == "w-elsewhere" and row.status == "running"
    assert [r.step for r in records if r.type == "checkpoint"] == [1]
    assert "job_done" not in [r.type for r in records]  # the job goes on elsewhere
    assert sorted(p.name for p in root.rglob("*.ckpt")) == (["step-1.ckpt"] if storage == "uri" else [])


async def test_an_adapter_keeps_its_newest_versions_and_their_files(topics: Any, database_url: str,
                                                                    tmp_path: Any) -> None:
    """Each fine-tune with ``overwrite`` registers a new version of its adapter: only the newest
    ``keep_adapter_versions`` rows and files are kept, the served version among them."""
    from sqlalchemy import select

    from loquetier.db.models import AdapterRow

    keep, jobs = 2, 4
    root = tmp_path / "blobs"
    settings = await topics(checkpoint_storage="uri", checkpoint_dir=root, keep_adapter_versions=keep)
    adapter_id = f"versions-{uuid.uuid4().hex[:6]}"
    finals = []
    async with running_worker(FakeEngine(), settings), client_for(settings) as client:
        for seed in range(jobs):
            job_id = await client.submit_training({"adapter_id": adapter_id, "overwrite": True,
                                                   "data": [{"prompt": "a b", "completion": "c"}],
                                                   "params": {"max_steps": 2, "seed": seed}})
            finals.append([r async for r in client.results([job_id])][-1])
    assert [(f.status, f.adapter_version) for f in finals] == [("succeeded", v) for v in range(1, jobs + 1)]
    db = create_engine(database_url)
    async with session_factory(db).begin() as s:
        rows = (await s.scalars(select(AdapterRow).where(AdapterRow.adapter_id == adapter_id))).all()
    await db.dispose()
    assert sorted(r.version for r in rows) == list(range(jobs - keep + 1, jobs + 1))
    kept = {f.job_id for f in finals[-keep:]}
    assert {p.parent.name for p in root.rglob("adapter.bin")} == kept


@pytest.mark.parametrize("storage", ["db", "uri"])
async def test_an_unloaded_adapter_keeps_its_record_and_drops_its_weights(topics: Any, database_url: str,
                                                                          tmp_path: Any, storage: str) -> None:
    """Unloading archives every version: the rows stay (checksum, size, source), their bytes or
    files go, and the adapter is not served again. Another adapter's files stay."""
    from sqlalchemy import select

    from loquetier.db.models import AdapterRow

    root = tmp_path / "blobs"
    settings = await topics(checkpoint_storage=storage, checkpoint_dir=root, operator_token="op")
    gone, kept, deleted = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("gone", "kept", "deleted"))
    engine = FakeEngine()
    async with running_worker(engine, settings), client_for(settings) as client:
        for adapter_id, overwrite in ((gone, False), (gone, True), (kept, False), (deleted, False)):
            job_id = await client.submit_training({"adapter_id": adapter_id, "overwrite": overwrite,
                                                   "data": [{"prompt": "a b", "completion": "c"}],
                                                   "params": {"max_steps": 2}})
            assert [r async for r in client.results([job_id])][-1].status == "succeeded"
        ack = await client.control("unload", gone, wait=True)
        assert ack.ok and "2 version(s) archived" in ack.message
        rid = await client.submit_generate(prompt_token_ids=[1], max_tokens=1, adapter_id=gone)
        assert (await client.wait_result(rid, 20)).code == "unknown_adapter"
        again = await client.control("unload", gone, wait=True)  # nothing left to archive or drop
        assert not again.ok and again.code == "unknown_adapter"
        db = create_engine(database_url)
        async with session_factory(db).begin() as s:  # a model deleted in the gateway: archived, then unloaded
            assert await repo.archive_adapter(s, deleted) == 1
        assert (await client.control("unload", deleted, wait=True)).ok
        async with session_factory(db).begin() as s:
            rows = (await s.scalars(select(AdapterRow).where(AdapterRow.adapter_id.in_([gone, kept, deleted])))).all()
        await db.dispose()
    by_id = {(r.adapter_id, r.version): r for r in rows}
    assert sorted(by_id) == sorted([(gone, 1), (gone, 2), (kept, 1), (deleted, 1)])
    for adapter_id, version in ((gone, 1), (gone, 2), (deleted, 1)):
        row = by_id[(adapter_id, version)]
        assert row.status == "archived" and row.data is None and row.uri is None
        assert row.sha256 and row.size_bytes and row.job_id
    alive = by_id[(kept, 1)]
    assert alive.status == "ready" and (alive.data is not None) == (storage == "db")
    files = {p.parent.name for p in root.rglob("adapter.bin")}
    assert files == ({alive.job_id} if storage == "uri" else set())


async def test_a_slow_job_write_does_not_hold_up_tokens(topics: Any, database_url: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's events are recorded in the job's own lane: while its checkpoint's write hangs, a request
    that arrives meanwhile still streams and finishes, and the job's records keep their order."""
    from loquetier.engine.events import JobCheckpoint
    from loquetier.workers.jobs import LeasedJobs

    entered, gate = asyncio.Event(), asyncio.Event()
    original = LeasedJobs.on_event

    async def slow_checkpoint(self: LeasedJobs, ev: Any) -> None:
        if isinstance(ev, JobCheckpoint) and ev.step == 2:
            entered.set()
            await asyncio.wait_for(gate.wait(), 60)  # a database write that hangs
        await original(self, ev)

    monkeypatch.setattr(LeasedJobs, "on_event", slow_checkpoint)
    settings = await topics()
    engine = FakeEngine()
    job = {"adapter_id": "fake-lane", "data": [{"prompt": "a b", "completion": "c"}],
           "params": {"max_steps": 6, "checkpoint_every": 2, "seed": 1}}
    async with running_worker(engine, settings), client_for(settings) as client:
        job_id = await client.submit_training(job)
        await asyncio.wait_for(entered.wait(), 30)
        rid = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=4, stream=True)
        result = await client.wait_result(rid, timeout=20)
        assert result.type == "result" and result.token_ids == [6, 7, 8, 6]
        assert not gate.is_set()  # the checkpoint is still being written
        gate.set()
        records = [r async for r in client.results([job_id])]
    assert [r.step for r in records if r.type == "checkpoint"] == [2, 4]
    assert records[-1].type == "job_done" and records[-1].status == "succeeded"


async def test_a_record_answered_before_its_offset_was_committed_is_not_answered_again(
    topics: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed after answering a record, while an earlier record of the partition still ran,
    left the answered record's offset uncommitted: the next worker answered it a second time."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from loquetier.workers.consumer import Consumer
    from tests.workers.test_restarts import final_records

    async def never(self: Consumer, parts: Any = None) -> bool:
        return True

    settings = await topics()
    with monkeypatch.context() as uncommitted:  # the first worker's offsets never reach the group
        uncommitted.setattr(Consumer, "commit", never)
        async with running_worker(FakeEngine(), settings), client_for(settings) as client:
            rid = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=4)
            assert (await client.wait_result(rid, timeout=20)).type == "result"
    stored = await row(database_url, rid)
    pending, answered = ([a for a in stored.answered_records if bool(a.get("pending")) is p] for p in (True, False))
    assert [a["offset"] for a in answered] == [a["offset"] for a in pending] == [stored.kafka_offset]
    assert answered[0]["timestamp"] > 0
    engine = FakeEngine()
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=4, request_id=rid)  # a client's retry
        assert (await client.wait_result(rid, timeout=30)).type == "result"
        deadline = time.monotonic() + 20
        while worker.consumer.tracker.num_pending() or worker.inference.num_inflight:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert engine.submitted_ids == []
    assert (await final_records(settings, [rid]))[rid] == 2  # the first answer and the retry's, no third
    part = TopicPartition(settings.kafka.requests_topic, stored.kafka_partition)
    probe = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, group_id=settings.kafka.group_id, enable_auto_commit=False
    )
    await probe.start()
    try:
        assert (await probe.committed(part) or 0) > stored.kafka_offset + 1  # the redelivered record was done
    finally:
        await probe.stop()
    assert len([a for a in (await row(database_url, rid)).answered_records if not a.get("pending")]) == 2


async def test_a_stopped_worker_leaves_the_group_from_its_first_generation(topics: Any) -> None:
    """tansu numbers a group's first generation 0, from which aiokafka never leaves by itself: the
    stopped worker held its partitions until its session ran out, and the next worker of
    the group waited that long for them."""
    from aiokafka.admin import AIOKafkaAdminClient

    settings = await topics()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()

    async def members() -> list[Any]:
        [response] = await admin.describe_consumer_groups([settings.kafka.group_id])
        [(error, _group, _state, _kind, _protocol, found)] = response.groups
        assert error == 0
        return list(found)

    try:
        async with running_worker(FakeEngine(), settings) as worker, client_for(settings) as client:
            rid = await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=2)
            assert (await client.wait_result(rid, timeout=20)).type == "result"
            assert worker.consumer.consumer._coordinator.generation == 0
            assert len(await members()) == 1
        assert await members() == []  # left at once, not at the session's end
    finally:
        await admin.close()
