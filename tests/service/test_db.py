"""Database: migrations up/down, no drift against the models, and the repo queries."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loquetier.db import keys_repo, migrate, repo, tenancy_repo
from loquetier.db.models import Base
from loquetier.db.session import async_url, create_engine, session_factory

pytestmark = pytest.mark.postgres

TABLES = {"inference_requests", "training_jobs", "adapters", "checkpoints", "workers", "job_events"}


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_upgrade_head_and_downgrade_base(empty_database: str) -> None:
    await migrate.upgrade_async(empty_database)
    assert TABLES <= await _tables(empty_database)
    assert await migrate.current_revision(empty_database) == migrate.head_revision()
    await asyncio.to_thread(migrate.downgrade, empty_database)  # the blocking helper, off-loop
    assert await _tables(empty_database) <= {"alembic_version"}
    assert await migrate.current_revision(empty_database) is None
    await asyncio.to_thread(migrate.upgrade, empty_database)
    assert TABLES <= await _tables(empty_database)


async def _columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return {c["name"] for c in await conn.run_sync(lambda c: inspect(c).get_columns(table))}
    finally:
        await engine.dispose()


async def test_answered_records_migrate_up_and_down_keeping_rows(empty_database: str) -> None:
    await migrate.upgrade_async(empty_database, "0004")
    engine = create_engine(empty_database)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO inference_requests (request_id) VALUES ('old')"))
        await migrate.upgrade_async(empty_database, "0005")
        async with engine.connect() as conn:  # an existing row answered no record yet
            assert (await conn.execute(text("SELECT answered_records FROM inference_requests"))).scalar() == []
        await migrate.downgrade_async(empty_database, "0004")
        assert "answered_records" not in await _columns(empty_database, "inference_requests")
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT request_id FROM inference_requests"))).scalar() == "old"
    finally:
        await engine.dispose()
    await migrate.upgrade_async(empty_database)
    assert "answered_records" in await _columns(empty_database, "inference_requests")
    assert await migrate.current_revision(empty_database) == migrate.head_revision()


async def test_autogenerate_reports_no_drift(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(
                    MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await engine.dispose()
    assert diff == []


def test_async_url() -> None:
    assert async_url("postgresql://u:p@h:1/d") == "postgresql+asyncpg://u:p@h:1/d"
    assert async_url("postgres://u@h/d") == "postgresql+asyncpg://u@h/d"
    with pytest.raises(ValueError):
        async_url("sqlite:///x.db")


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE " + ", ".join(sorted(TABLES)) + " CASCADE"))
    yield session_factory(engine)
    await engine.dispose()


async def test_a_request_inserted_started_counts_its_first_attempt(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions.begin() as s:
        assert await repo.insert_request_idempotent(s, request_id="r2", adapter_id=None, started_by="w1")
        assert not await repo.insert_request_idempotent(s, request_id="r2", adapter_id=None, started_by="w2")
    async with sessions() as s:
        row = await repo.get_request(s, "r2")
        assert row is not None and row.status == "running" and row.worker_id == "w1" and row.attempts == 1
        assert row.started_at is not None and row.finished_at is None
    async with sessions.begin() as s:  # a redelivery elsewhere counts the second start
        assert await repo.start_request(s, "r2", "w2", max_attempts=2) == 2
        assert await repo.start_request(s, "r2", "w3", max_attempts=2) is None  # poisoned


async def test_request_insert_is_idempotent(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions.begin() as s:
        assert await repo.insert_request_idempotent(s, request_id="r1", adapter_id="a", kafka_offset=7)
        assert not await repo.insert_request_idempotent(s, request_id="r1", adapter_id="b")
        await repo.start_request(s, "r1", "w1", prompt_tokens=3)
    result = {"type": "result", "request_id": "r1", "text": "hi"}
    async with sessions.begin() as s:
        assert await repo.finish_request(
            s, "r1", status="succeeded", result=result, completion_tokens=2, ttft_ms=9.0
        )
        assert not await repo.finish_request(s, "r1", status="failed", error="late duplicate")
    async with sessions() as s:
        row = await repo.get_request(s, "r1")
        assert row is not None and row.status == "succeeded" and row.adapter_id == "a"
        assert row.result == result and row.prompt_tokens == 3 and row.kafka_offset == 7
        assert row.finished_at is not None and row.started_at is not None and row.worker_id == "w1"
        assert await repo.get_request(s, "nope") is None


async def _add_jobs(sessions: async_sessionmaker[AsyncSession], *ids: str, priority: int = 0,
                    adapter_id: str | None = None) -> None:
    """Finetunes ``ids``, each of an adapter of its own (named as the job) unless ``adapter_id``."""
    async with sessions.begin() as s:
        for job_id in ids:
            spec = {"job_id": job_id}
            assert await repo.insert_job_idempotent(
                s, job_id=job_id, kind="finetune", adapter_id=adapter_id or job_id, spec=spec, priority=priority
            )
            assert not await repo.insert_job_idempotent(
                s, job_id=job_id, kind="finetune", adapter_id=adapter_id or job_id, spec={}
            )


async def test_a_claim_takes_the_job_of_the_tenant_with_fewest_running(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    """Tenant A's backlog (older) does not hold tenant B's first job behind it; priority still comes
    first, and age decides between tenants running as many."""
    async with sessions.begin() as s:
        for tenant in ("ta", "tb"):
            await keys_repo.ensure_tenant(s, tenant)
        for job_id, tenant in (("a1", "ta"), ("a2", "ta"), ("a3", "ta"), ("b1", "tb")):
            assert await repo.insert_job_idempotent(s, job_id=job_id, kind="finetune", adapter_id=job_id,
                                                    spec={}, tenant_id=tenant)
    async with sessions.begin() as s:
        first = await repo.claim_job(s, "w1", lease_s=30)
    async with sessions.begin() as s:
        second = await repo.claim_job(s, "w1", lease_s=30)
    async with sessions.begin() as s:
        third = await repo.claim_job(s, "w1", lease_s=30)
    assert first is not None and second is not None and third is not None
    assert [first.job_id, second.job_id, third.job_id] == ["a1", "b1", "a2"]


async def test_concurrent_claims_get_different_jobs(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1", "j2")
    await _add_jobs(sessions, "urgent", priority=5)
    async with sessions() as s1, sessions() as s2, s1.begin(), s2.begin():
        first = await repo.claim_job(s1, "w1", lease_s=30)
        second = await repo.claim_job(s2, "w2", lease_s=30)  # j? locked by s1: skipped, not waited on
        assert first is not None and second is not None
        assert first.job_id == "urgent" and second.job_id == "j1"
    async with sessions.begin() as s:
        third = await repo.claim_job(s, "w3", lease_s=30)
        assert third is not None and third.job_id == "j2"
        assert await repo.claim_job(s, "w3", lease_s=30) is None  # all leased
    async with sessions() as s:
        row = await repo.get_job(s, "urgent")
        assert row is not None and row.status == "running" and row.worker_id == "w1" and row.attempts == 1
        assert row.lease_expires_at is not None and row.started_at is not None


async def test_one_adapter_trains_one_job_at_a_time(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Finetunes of one adapter run one after another, whichever workers claim them (two claims at
    once included); another adapter's job and an evaluation of the adapter are claimed meanwhile."""
    await _add_jobs(sessions, "first", "second", adapter_id="shared")
    await _add_jobs(sessions, "other")
    async with sessions.begin() as s:
        assert await repo.insert_job_idempotent(s, job_id="eval", kind="evaluate", adapter_id="shared", spec={})
    async with sessions() as s1, sessions() as s2:
        t1, t2 = await s1.begin(), await s2.begin()
        one = await repo.claim_job(s1, "w1", lease_s=30, job_id="first")
        two = asyncio.create_task(repo.claim_job(s2, "w2", lease_s=30, job_id="second"))
        await asyncio.sleep(0.3)  # the second claim waits for the adapter's lock until the first commits
        assert one is not None and not two.done()
        await t1.commit()
        assert await two is None  # then it finds the first running
        await t2.commit()
    async with sessions.begin() as s:
        claimed = [await repo.claim_job(s, "w2", lease_s=30) for _ in range(3)]
        assert sorted(j.job_id for j in claimed if j is not None) == ["eval", "other"]
        assert await repo.finish_job(s, "first", status="succeeded", worker_id="w1")
        after = await repo.claim_job(s, "w2", lease_s=30)
        assert after is not None and after.job_id == "second"


async def test_expired_lease_is_reclaimed(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1")
    async with sessions.begin() as s:
        job = await repo.claim_job(s, "w1", lease_s=0.05)
        assert job is not None
    await asyncio.sleep(0.1)
    async with sessions.begin() as s:
        job = await repo.claim_job(s, "w2", lease_s=30)
        assert job is not None and job.worker_id == "w2" and job.attempts == 2
    async with sessions.begin() as s:  # the old owner lost it: every owner-only update says so
        assert not await repo.renew_lease(s, "j1", "w1", lease_s=30)
        assert not await repo.update_job_progress(s, "j1", "w1", lease_s=30, step=5)
        assert not await repo.finish_job(s, "j1", status="succeeded", worker_id="w1")
        assert await repo.renew_lease(s, "j1", "w2", lease_s=30)


async def test_job_progress_release_and_finish(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1")
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w1", lease_s=30, job_id="j1") is not None
        ok = await repo.update_job_progress(
            s,
            "j1",
            "w1",
            lease_s=30,
            step=4,
            epoch=0.5,
            total_steps=8,
            last_loss=1.25,
            tokens_processed=1000,
            metrics={"tokens_per_s": 10.0},
        )
        assert ok
        assert await repo.update_job_progress(s, "j1", "w1", lease_s=30, step=5, metrics={"lr": 1e-4})
        assert await repo.release_job(s, "j1", "w1", status="paused")
        assert await repo.claim_job(s, "w2", lease_s=30) is None  # paused jobs are not claimable
        assert await repo.set_job_status(s, "j1", "queued", from_statuses=("paused",))
        assert await repo.claim_job(s, "w2", lease_s=30) is not None
        assert await repo.finish_job(s, "j1", status="succeeded", worker_id="w2")
        assert not await repo.finish_job(s, "j1", status="failed")  # final is final
    async with sessions() as s:
        row = await repo.get_job(s, "j1")
        assert row is not None and row.status == "succeeded" and row.step == 5 and row.last_loss == 1.25
        assert row.metrics == {"tokens_per_s": 10.0, "lr": 1e-4} and row.tokens_processed == 1000
        assert row.finished_at is not None and row.lease_expires_at is None
    with pytest.raises(ValueError):
        async with sessions.begin() as s:
            await repo.finish_job(s, "j1", status="running")


async def test_an_owned_job_event_is_written_only_while_the_worker_runs_the_job(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    """A worker's "goes on from its checkpoint" must not follow the entry of a cancel that came while
    it restored the job: the entry is written only under the row's lock, while the worker runs it."""
    await _add_jobs(sessions, "j1")
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w1", lease_s=30, job_id="j1") is not None
        assert await repo.record_owned_job_event(s, "j1", "w1", "restored", "goes on", data={"step": 2})
        assert not await repo.record_owned_job_event(s, "j1", "w2", "restored", "not w2's")
        assert await repo.finish_job(s, "j1", status="cancelled", worker_id="w1")
        assert not await repo.record_owned_job_event(s, "j1", "w1", "restored", "after the cancel")
    async with sessions() as s:
        told = [e.message for e in await repo.job_events(s, "j1") if e.kind == "restored"]
    assert told == ["goes on"]


async def test_checkpoints(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1")
    async with sessions.begin() as s:
        assert await repo.latest_checkpoint(s, "j1") is None
        await repo.save_checkpoint(s, job_id="j1", step=2, data=b"two", meta={"cursor": 10})
        await repo.save_checkpoint(s, job_id="j1", step=4, uri="file:///c/4", sha256="0" * 64, size_bytes=9)
        replaced = await repo.save_checkpoint(s, job_id="j1", step=2, data=b"TWO")
        assert replaced.sha256 == hashlib.sha256(b"TWO").hexdigest() and replaced.size_bytes == 3
    async with sessions() as s:
        latest = await repo.latest_checkpoint(s, "j1")
        assert latest is not None and latest.step == 4 and latest.data is None and latest.uri == "file:///c/4"
    with pytest.raises(ValueError):
        async with sessions.begin() as s:
            await repo.save_checkpoint(s, job_id="j1", step=5)


async def test_a_checkpoint_is_refused_to_a_worker_whose_job_went_elsewhere(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _add_jobs(sessions, "j1")
    async with sessions.begin() as s:
        assert await repo.job_taken_by(s, "j1", "w1") is None  # queued: nobody holds it
        assert await repo.claim_job(s, "w1", lease_s=30) is not None
        assert await repo.job_taken_by(s, "j1", "w1", lock=True) is None  # ours
        assert await repo.job_taken_by(s, "j1", "w2") == "w1"
        assert await repo.job_taken_by(s, "no-such-job", "w2") is None
        assert await repo.expire_lease(s, "j1", "w1")
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w2", lease_s=30) is not None  # w1's lease ran out; w2 goes on
        assert await repo.job_taken_by(s, "j1", "w1") == "w2"
        assert await repo.pause_job(s, "j1")
        assert await repo.job_taken_by(s, "j1", "w1") is None  # paused: a checkpoint of made steps is good


async def test_adapters_are_versioned(sessions: async_sessionmaker[AsyncSession]) -> None:
    common = {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"], "source_kind": "path"}
    async with sessions.begin() as s:
        v1 = await repo.register_adapter(s, adapter_id="a", data=b"w1", source="/x", **common)  # type: ignore[arg-type]
        v2 = await repo.register_adapter(s, adapter_id="a", data=b"w2", status="training", **common)  # type: ignore[arg-type]
        assert (v1.version, v2.version) == (1, 2)
    async with sessions() as s:
        latest_ready = await repo.get_adapter(s, "a")
        assert latest_ready is not None and latest_ready.version == 1 and latest_ready.data == b"w1"
        assert latest_ready.target_modules == ["q_proj", "v_proj"]
        second = await repo.get_adapter(s, "a", version=2)
        assert second is not None and second.status == "training"
        assert await repo.get_adapter(s, "missing") is None


async def test_a_later_version_keeps_the_adapters_owner(sessions: async_sessionmaker[AsyncSession]) -> None:
    """An adapter's id belongs to the tenant of its versions: an operator's overwrite (a job of no
    tenant, or a load) leaves it the tenant's, not shared, and only that tenant sees it."""
    common = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj"], "source_kind": "job"}
    async with sessions.begin() as s:
        await s.execute(text("INSERT INTO tenants (tenant_id) VALUES ('tenant-a'), ('tenant-b')"))
        first = await repo.register_adapter(s, adapter_id="owned", data=b"w1", tenant_id="tenant-a", **common)  # type: ignore[arg-type]
        second = await repo.register_adapter(s, adapter_id="owned", data=b"w2", **common)  # type: ignore[arg-type]
        third = await repo.register_adapter(s, adapter_id="owned", data=b"w3", tenant_id="tenant-b", **common)  # type: ignore[arg-type]
        assert [r.tenant_id for r in (first, second, third)] == ["tenant-a"] * 3
        await repo.archive_adapter(s, "owned")
        fourth = await repo.register_adapter(s, adapter_id="owned", data=b"w4", **common)  # type: ignore[arg-type]
        assert (fourth.version, fourth.tenant_id) == (4, "tenant-a")
        shared = await repo.register_adapter(s, adapter_id="ops", data=b"w", **common)  # type: ignore[arg-type]
        again = await repo.register_adapter(s, adapter_id="ops", data=b"w", tenant_id="tenant-b", **common)  # type: ignore[arg-type]
        assert (shared.tenant_id, again.tenant_id) == (None, None)
    async with sessions() as s:
        assert [a for a, _, _ in await tenancy_repo.visible_adapters(s, "tenant-b")] == ["ops"]
        assert [a for a, _, _ in await tenancy_repo.visible_adapters(s, "tenant-a")] == ["ops", "owned"]


async def test_workers(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions.begin() as s:
        await repo.upsert_worker(s, worker_id="w1", host="h", pid=1, device="cpu", capacity={"slots": 4})
        await repo.upsert_worker(s, worker_id="w1", host="h", pid=2, device="cuda:0")
        assert await repo.heartbeat_worker(s, "w1")
        assert await repo.heartbeat_worker(s, "w1", status="stopped")
        assert not await repo.heartbeat_worker(s, "nobody")
        row = (await s.execute(text("SELECT pid, device, status, stopped_at FROM workers"))).one()
        assert (
            row.pid == 2 and row.device == "cuda:0" and row.status == "stopped" and row.stopped_at is not None
        )


async def test_check_constraints_guard_statuses(sessions: async_sessionmaker[AsyncSession]) -> None:
    with pytest.raises(IntegrityError, match="ck_training_jobs_status_valid"):
        async with sessions.begin() as s:
            await s.execute(
                text(
                    "INSERT INTO training_jobs (job_id, adapter_id, spec, status)"
                    " VALUES ('x', 'a', '{}', 'lost')"
                )
            )


async def test_request_starts_are_counted_up_to_the_limit(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions.begin() as s:
        assert await repo.insert_request_idempotent(s, request_id="r1", adapter_id=None, content_sha256="ab" * 32)
        assert await repo.start_request(s, "r1", "w1", max_attempts=2) == 1
        assert await repo.start_request(s, "r1", "w2", max_attempts=2) == 2
        assert await repo.start_request(s, "r1", "w3", max_attempts=2) is None  # poisoned: not started
        row = await repo.get_request(s, "r1")
        assert row is not None and row.attempts == 2 and row.worker_id == "w2" and row.content_sha256 == "ab" * 32
        assert await repo.finish_request(s, "r1", status="failed", error="poisoned: ...")
        assert await repo.start_request(s, "r1", "w4") is None  # finished rows never start again


async def test_only_unclean_claims_count_toward_poison(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1", "j2")
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w1", lease_s=30, job_id="j1") is not None
        assert await repo.release_job(s, "j1", "w1")  # drain: a clean hand-back
        assert await repo.claim_job(s, "w1", lease_s=30, job_id="j1") is not None
        assert await repo.pause_job(s, "j1")  # pause of a running job: also clean
        assert (await repo.get_job(s, "j1")).attempts == 0  # type: ignore[union-attr]
        assert await repo.claim_job(s, "w1", lease_s=30, job_id="j2") is not None
        assert await repo.expire_lease(s, "j2", "w1")  # the engine failed under it: the claim counts
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w2", lease_s=30, max_attempts=1) is None  # j2 is left to poison_jobs
        poisoned = await repo.poison_jobs(s, max_attempts=1, error="poisoned: twice")
        assert [j.job_id for j in poisoned] == ["j2"] and poisoned[0].status == "failed"
        assert await repo.poison_jobs(s, max_attempts=1, error="x") == []
        paused = await repo.get_job(s, "j1")
        assert paused is not None and paused.status == "paused" and paused.worker_id is None


async def test_stale_requests_are_those_below_the_offset_nobody_runs(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions.begin() as s:
        await repo.upsert_worker(s, worker_id="alive", host="h", pid=1, device="cpu")
        for rid, offset, owner in (("gone", 3, "dead"), ("live", 4, "alive"), ("mine", 5, "me"),
                                   ("running-here", 6, "me"), ("ahead", 9, "dead")):
            await repo.insert_request_idempotent(s, request_id=rid, adapter_id=None, kafka_topic="t",
                                                 kafka_partition=0, kafka_offset=offset)
            await repo.start_request(s, rid, owner)
    await asyncio.sleep(1.2)
    async with sessions.begin() as s:
        await repo.heartbeat_worker(s, "alive")
        stale = await repo.stale_requests(s, topic="t", partition=0, below_offset=8, worker_id="me", idle_s=1.0,
                                          exclude=["running-here"])
        assert [r.request_id for r in stale] == ["gone", "mine"]
        assert await repo.stale_requests(s, topic="t", partition=1, below_offset=99, worker_id="me", idle_s=1.0,
                                         exclude=[]) == []


async def test_an_adapter_is_taken_when_another_maker_serves_it(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1", "j2", adapter_id="a")
    common = {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj"]}
    async with sessions.begin() as s:
        assert await repo.adapter_taken(s, "a", "j1") is None  # nothing served yet
        await repo.register_adapter(s, adapter_id="a", data=b"w", source_kind="job", job_id="j1", **common)  # type: ignore[arg-type]
        assert await repo.adapter_taken(s, "a", "j1") is None  # its own version
        taken = await repo.adapter_taken(s, "a", "j2")
        assert taken is not None and taken.version == 1
        await repo.register_adapter(s, adapter_id="b", data=b"w", source_kind="path", **common)  # type: ignore[arg-type]
        assert await repo.adapter_taken(s, "b", "j1") is not None  # an operator's load


async def test_answered_records_are_appended_and_bounded(sessions: async_sessionmaker[AsyncSession]) -> None:
    from loquetier.db.requests_repo import MAX_ANSWERED_RECORDS

    def key(offset: int) -> dict[str, object]:
        return {"topic": "t", "partition": 0, "offset": offset, "timestamp": 1_700_000_000_000 + offset}

    async with sessions.begin() as s:
        await repo.insert_request_idempotent(s, request_id="r1", adapter_id=None)
        assert await repo.finish_request(s, "r1", status="succeeded", result={"type": "result"})
    async with sessions() as s:
        before = await repo.get_request(s, "r1")
        assert before is not None and before.answered_records == []
    async with sessions.begin() as s:
        assert await repo.add_answered_records(s, "r1", [key(3)])
        assert await repo.add_answered_records(s, "r1", [key(4), {**key(5), "timestamp": None}])
        assert not await repo.add_answered_records(s, "nope", [key(1)])
    async with sessions() as s:
        row = await repo.get_request(s, "r1")
        assert row is not None and row.answered_records == [key(3), key(4), {**key(5), "timestamp": None}]
        assert row.updated_at == before.updated_at  # the request itself did not move
    async with sessions.begin() as s:
        for offset in range(10, 30):
            await repo.add_answered_records(s, "r1", [key(offset)])
    async with sessions() as s:
        row = await repo.get_request(s, "r1")
        assert row is not None and row.answered_records == [key(o) for o in range(30 - MAX_ANSWERED_RECORDS, 30)]


async def _story(sessions: async_sessionmaker[AsyncSession], job_id: str) -> list[tuple[str, str, Any]]:
    async with sessions() as s:
        rows = await repo.job_events(s, job_id, limit=100)
    return [(e.kind, e.level, e.step) for e in reversed(rows)]


async def test_every_transition_writes_its_history_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1", adapter_id="a")
    await _add_jobs(sessions, "j2")
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w1", lease_s=0.05, job_id="j1") is not None
        assert await repo.update_job_progress(s, "j1", "w1", lease_s=0.05, step=3, total_steps=9, last_loss=2.5)
        assert await repo.update_job_progress(s, "j1", "w1", lease_s=0.05, step=3, last_eval_loss=1.75,
                                              metrics={"eval_loss": 1.75})  # an evaluation at the same step
        await repo.save_checkpoint(s, job_id="j1", step=3, data=b"three")
        await repo.save_checkpoint(s, job_id="j1", step=3, data=b"THREE")  # a replay: no second entry
    await asyncio.sleep(0.1)
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w2", lease_s=30, job_id="j1") is not None  # w1's lease expired
        assert not await repo.update_job_progress(s, "j1", "w1", lease_s=30, step=4)  # not w1's: nothing written
        assert await repo.release_job(s, "j1", "w2", status="paused")
        assert not await repo.pause_job(s, "j1")  # already paused
        assert await repo.set_job_status(s, "j1", "queued", from_statuses=("paused",))
        assert await repo.claim_job(s, "w2", lease_s=30, job_id="j1") is not None
        assert await repo.release_job(s, "j1", "w2")  # drain
        assert await repo.claim_job(s, "w3", lease_s=30, job_id="j1") is not None
        assert await repo.expire_lease(s, "j1", "w3")
        assert await repo.finish_job(s, "j1", status="succeeded")
        assert not await repo.finish_job(s, "j1", status="failed", error="late")  # final is final
        assert await repo.finish_job(s, "j2", status="failed", error="x" * 900)
    assert await _story(sessions, "j1") == [
        ("created", "info", None), ("started", "info", None), ("metrics", "info", 3), ("checkpoint", "info", 3),
        ("started", "warn", None), ("paused", "info", None), ("resumed", "info", None), ("started", "info", None),
        ("requeued", "info", None), ("started", "info", None), ("lease_expired", "warn", None),
        ("succeeded", "info", None)]
    async with sessions() as s:
        newest = await repo.job_events(s, "j1", limit=100)
        by_kind = {e.kind: e for e in newest}
        metrics = by_kind["metrics"]
        assert metrics.data == {"step": 3, "total_steps": 9, "epoch": 0.0, "train_loss": 2.5, "eval_loss": 1.75,
                                "tokens_processed": 0}
        assert metrics.message == "Step 3/9: training loss=2.5, eval loss=1.75" and metrics.worker_id == "w1"
        [again] = [e for e in newest if e.kind == "started" and e.level == "warn"]  # the claim after the expiry
        assert again.data == {"attempt": 2, "worker_id": "w2", "previous_worker_id": "w1"}
        assert "lease of worker w1 expired" in again.message
        assert by_kind["succeeded"].message == "The job has succeeded; new fine-tuned model: a"
        assert [e.id for e in newest] == sorted((e.id for e in newest), reverse=True)
        older = await repo.job_events(s, "j1", before_id=newest[2].id, limit=3)
        assert [e.id for e in older] == [e.id for e in newest[3:6]]
        failed = await repo.job_events(s, "j2", limit=1)
        assert failed[0].level == "error" and failed[0].message == "The job has failed: " + "x" * 500


async def test_poisoned_jobs_say_why_in_their_history(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1")
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w1", lease_s=30, job_id="j1") is not None
        assert await repo.expire_lease(s, "j1", "w1")
    async with sessions.begin() as s:  # claimable once now() is past the lease's end
        assert [j.job_id for j in await repo.poison_jobs(s, max_attempts=1, error="poisoned: once")] == ["j1"]
    assert [k for k, _, _ in await _story(sessions, "j1")] == ["created", "started", "lease_expired", "failed"]
    async with sessions() as s:
        assert (await repo.job_events(s, "j1", limit=1))[0].message == "The job has failed: poisoned: once"


async def test_job_history_is_backfilled_by_its_migration(empty_database: str) -> None:
    await migrate.upgrade_async(empty_database, "0005")
    engine = create_engine(empty_database)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO training_jobs (job_id, adapter_id, spec, status, attempts, created_at, started_at,"
                " finished_at, error) VALUES ('old', 'a', '{}', 'failed', 2, now() - interval '3 hours',"
                " now() - interval '2 hours', now() - interval '1 hour', 'out of memory'),"
                " ('new', 'b', '{}', 'queued', 0, now(), NULL, NULL, NULL)"))
            await conn.execute(text(
                "INSERT INTO checkpoints (job_id, step, data, sha256, size_bytes, created_at)"
                " VALUES ('old', 7, 'x', repeat('0', 64), 1, now() - interval '90 minutes')"))
        await migrate.upgrade_async(empty_database, "0006")
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT job_id, kind, level, step, message FROM job_events ORDER BY id"))).all()
        assert [tuple(r[:4]) for r in rows] == [
            ("old", "created", "info", None), ("old", "started", "info", None), ("old", "checkpoint", "info", 7),
            ("old", "failed", "error", None), ("new", "created", "info", None)]
        assert rows[3][4] == "The job has failed: out of memory" and rows[0][4] == "Created fine-tuning job old"
        await migrate.downgrade_async(empty_database, "0005")
        assert "job_events" not in await _tables(empty_database)
    finally:
        await engine.dispose()
    await migrate.upgrade_async(empty_database)
    assert "job_events" in await _tables(empty_database)


async def test_archived_versions_lose_their_bytes_in_the_migration_and_keep_their_rows(empty_database: str) -> None:
    await migrate.upgrade_async(empty_database, "0006")
    engine = create_engine(empty_database)
    insert = ("INSERT INTO adapters (adapter_id, version, status, rank, alpha, target_modules, source_kind, data, uri,"
              " sha256, size_bytes) VALUES ('{a}', {v}, '{st}', 4, 8, '[\"q_proj\"]', 'path', {data}, {uri},"
              " repeat('0', 64), 3)")
    try:
        async with engine.begin() as conn:
            for a, v, st, data, uri in (("old", 1, "archived", "'abc'", "NULL"), ("old", 2, "archived", "NULL",
                                        "'file:///x/a.bin'"), ("live", 1, "ready", "'abc'", "NULL")):
                await conn.execute(text(insert.format(a=a, v=v, st=st, data=data, uri=uri)))
            with pytest.raises(IntegrityError):  # before 0007 every version needs a payload
                async with conn.begin_nested():
                    await conn.execute(text("UPDATE adapters SET data = NULL WHERE adapter_id = 'live'"))
        await migrate.upgrade_async(empty_database, "0007")
        async with engine.begin() as conn:
            rows = (await conn.execute(text(
                "SELECT adapter_id, version, data IS NULL, uri FROM adapters ORDER BY adapter_id DESC, version"))).all()
            assert [tuple(r) for r in rows] == [("old", 1, True, None), ("old", 2, True, "file:///x/a.bin"),
                                                ("live", 1, False, None)]
            with pytest.raises(IntegrityError):  # a version served needs its weights still
                async with conn.begin_nested():
                    await conn.execute(text("UPDATE adapters SET data = NULL WHERE adapter_id = 'live'"))
        await migrate.downgrade_async(empty_database, "0006")  # what has no payload cannot stay
        async with engine.connect() as conn:
            left = (await conn.execute(text("SELECT adapter_id, version FROM adapters ORDER BY 1 DESC, 2"))).all()
        assert [tuple(r) for r in left] == [("old", 2), ("live", 1)]
    finally:
        await engine.dispose()


async def test_keys_gain_a_token_rate_in_the_migration_and_keep_their_rows(empty_database: str) -> None:
    await migrate.upgrade_async(empty_database, "0007")
    engine = create_engine(empty_database)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO tenants (tenant_id) VALUES ('t1')"))
            await conn.execute(text("INSERT INTO api_keys (key_id, tenant_id, name, key_sha256, "
                                    "max_requests_per_minute) VALUES ('k1', 't1', 'n', repeat('a', 64), 30)"))
        await migrate.upgrade_async(empty_database, "0008")
        async with engine.begin() as conn:
            rows = (await conn.execute(text("SELECT key_id, max_requests_per_minute, max_tokens_per_minute "
                                            "FROM api_keys"))).all()
            assert [tuple(r) for r in rows] == [("k1", 30, None)]  # an old key keeps no token limit
            with pytest.raises(IntegrityError):
                async with conn.begin_nested():
                    await conn.execute(text("UPDATE api_keys SET max_tokens_per_minute = 0"))
            await conn.execute(text("UPDATE api_keys SET max_tokens_per_minute = 5000"))
        await migrate.downgrade_async(empty_database, "0007")
        async with engine.connect() as conn:
            left = (await conn.execute(text("SELECT key_id, max_requests_per_minute FROM api_keys"))).all()
        assert [tuple(r) for r in left] == [("k1", 30)]
    finally:
        await engine.dispose()


async def test_non_finite_numbers_are_stored_as_null_not_refused(sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_jobs(sessions, "j1")
    async with sessions.begin() as s:  # an evaluation of nothing, a diverged run: no JSON for NaN or infinity
        assert await repo.claim_job(s, "w1", lease_s=30, job_id="j1") is not None
        assert await repo.update_job_progress(s, "j1", "w1", lease_s=30, step=2, last_loss=1.5,
                                              last_eval_loss=math.nan,
                                              metrics={"eval_loss": math.nan, "grad": [1.0, -math.inf]})
        await repo.save_checkpoint(s, job_id="j1", step=2, data=b"two", meta={"loss": math.inf})
    async with sessions() as s:
        row = await repo.get_job(s, "j1")
        assert row is not None and row.metrics == {"eval_loss": None, "grad": [1.0, None]}
        assert math.isnan(row.last_eval_loss)  # a float column keeps it
        metrics, = [e for e in await repo.job_events(s, "j1") if e.kind == "metrics"]
        assert metrics.data["eval_loss"] is None and metrics.message == "Step 2/?: training loss=1.5, eval loss=nan"
        assert (await repo.latest_checkpoint(s, "j1")).meta == {"loss": None}  # type: ignore[union-attr]


async def test_a_long_job_reports_into_its_history_at_most_every_half_minute(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _add_jobs(sessions, "j1")
    async with sessions.begin() as s:
        assert await repo.claim_job(s, "w1", lease_s=30, job_id="j1") is not None
    for step in range(1, 8):  # reports every 2 s would be 900 entries in half an hour
        async with sessions.begin() as s:
            assert await repo.update_job_progress(s, "j1", "w1", lease_s=30, step=step, total_steps=9, last_loss=1.0)
    async with sessions.begin() as s:
        assert await repo.update_job_progress(s, "j1", "w1", lease_s=30, step=8, metrics={"eval_loss": 0.5})
        assert await repo.update_job_progress(s, "j1", "w1", lease_s=30, step=9, total_steps=9)
    assert [st for kind, _, st in await _story(sessions, "j1") if kind == "metrics"] == [1, 8, 9]
    async with sessions.begin() as s:  # once the last entry is older than the interval, the next report is told
        await s.execute(text("UPDATE job_events SET created_at = now() - interval '31 seconds' WHERE job_id = 'j1'"))
    async with sessions.begin() as s:
        assert await repo.update_job_progress(s, "j1", "w1", lease_s=30, step=10, total_steps=12)
    assert [st for kind, _, st in await _story(sessions, "j1") if kind == "metrics"] == [1, 8, 9, 10]
