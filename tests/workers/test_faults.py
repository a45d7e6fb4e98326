"""Hostile records and leftover state against the real broker and PostgreSQL (fake engine):
bounded dead letters, duplicate request ids, poisoned rows, stale rows, database errors."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from sqlalchemy import text, update

from loquetier import services
from loquetier.db import repo
from loquetier.db.models import JobRow, RequestRow
from loquetier.db.store import Store, StoreError
from loquetier.messages import ErrorResult, GenerateRequest, GenerateResult, TokenResult, decode_record
from loquetier.workers import convert
from loquetier.workers.publisher import Publisher
from tests.fakes import FakeEngine
from tests.gateway.test_gateway_reply_to import read_topic
from tests.workers.conftest import client_for, running_worker
from tests.workers.test_worker_e2e import query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def request(rid: str, prompt: list[int], max_tokens: int = 3) -> dict[str, Any]:
    return {"schema": 1, "request_id": rid, "prompt_token_ids": prompt, "sampling": {"max_tokens": max_tokens}}


async def dead_letters(settings: Any, num: int, timeout: float = 30) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    letters: list[Any] = []
    try:
        topic = settings.kafka.dlq_topic
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
        deadline = time.monotonic() + timeout
        while len(letters) < num and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                letters += [(len(m.value), decode_record("dlq", m.value)) for m in records]
        return letters
    finally:
        await consumer.stop()


async def test_a_huge_bad_record_is_dead_lettered_bounded_and_consumption_goes_on(topics: Any) -> None:
    """Issue 23: a 3 MB key + a 2 MiB non-msgpack value wedged all consumption, also after a restart."""
    settings = await topics()
    k = settings.kafka
    key, value = os.urandom(3_000_000), b"\xc1" + os.urandom(2 * 1024 * 1024)
    raw = AIOKafkaProducer(bootstrap_servers=k.bootstrap, max_request_size=16 << 20)
    await raw.start()
    try:
        await raw.send_and_wait(k.requests_topic, value, key=key, partition=0)
        named = f"named-{uuid.uuid4().hex[:8]}"  # unreadable value, readable key: its sender is answered
        await raw.send_and_wait(k.requests_topic, b"\xc1\xc1", key=named.encode(), partition=0)
    finally:
        await raw.stop()
    engine = FakeEngine()
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        ids = [await client.submit_generate(prompt_token_ids=[3, 4], max_tokens=2) for _ in range(8)]
        got = {rid: await client.wait_result(rid, 30) for rid in ids}
        assert {r.type for r in got.values()} == {"result"}
        error = await client.wait_result(named, 30)
        assert error.type == "error" and error.code == "undecodable"
        letters = await dead_letters(settings, 2)
        started = time.monotonic()
        worker.request_stop()
        while not worker.store.closing:
            await asyncio.sleep(0.05)
        assert time.monotonic() - started < 5
    assert len(letters) == 2
    size, big = next((n, letter) for n, letter in letters if letter.key_size_bytes == len(key))
    assert size < k.max_record_bytes and len(big.key) == k.max_dlq_excerpt_bytes and big.key == key[: len(big.key)]
    assert big.key_sha256 == hashlib.sha256(key).hexdigest() and big.value_size_bytes == len(value)
    # the key is over its limit, which intake checks before it reads the value
    assert big.value_sha256 == hashlib.sha256(value).hexdigest() and big.code == "too_large"
    small = next(letter for _, letter in letters if letter is not big)
    assert small.key == named.encode() and small.value == b"\xc1\xc1" and small.request_id == named


async def test_a_record_the_broker_refuses_is_skipped_not_retried(topics: Any) -> None:
    settings = await topics()
    kafka = settings.kafka.model_copy(update={"max_record_bytes": 2048})
    publisher = Publisher(kafka.bootstrap or "", kafka, worker_id="w")
    await publisher.start()
    try:
        started = time.monotonic()
        assert not await publisher.publish(ErrorResult(request_id="r", code="x", message="y" * 100_000), "r")
        assert await publisher.publish(ErrorResult(request_id="r", code="x", message="small"), "r")
        assert time.monotonic() - started < 5 and publisher.num_skipped == 1 and publisher.num_retries == 0
    finally:
        await publisher.stop()


async def test_a_reused_request_id_with_other_content_is_refused(topics: Any, database_url: str) -> None:
    settings = await topics()
    engine = FakeEngine()
    rid = f"reuse-{uuid.uuid4().hex[:8]}"
    async with running_worker(engine, settings), client_for(settings) as client:
        await client.submit_generate(prompt_token_ids=[5, 6], max_tokens=3, request_id=rid)
        (first,) = await _finals(client, rid, 1)
        await client.submit_generate(prompt_token_ids=[7, 8], max_tokens=3, request_id=rid)
        refused = (await _finals(client, rid, 2))[-1]
        await client.submit_generate(prompt_token_ids=[5, 6], max_tokens=3, request_id=rid, priority=9)
        republished = (await _finals(client, rid, 3))[-1]
        both = f"both-{uuid.uuid4().hex[:8]}"  # two contents at once: one computed, the other refused
        await client.submit_generate(prompt_token_ids=[1] * 3, max_tokens=200, request_id=both)
        await client.submit_generate(prompt_token_ids=[2] * 3, max_tokens=200, request_id=both)
        finals = await _finals(client, both, 2)
    assert first.type == "result" and republished.model_dump() == first.model_dump()
    assert refused.type == "error" and refused.code == "duplicate_request_id"
    assert sorted(r.type for r in finals) == ["error", "result"]
    assert engine.submitted_ids.count(rid) == 1 and engine.submitted_ids.count(both) == 1
    row = await query(database_url, lambda s: repo.get_request(s, rid))
    assert row.status == "succeeded" and convert.from_stored(row.result).token_ids == first.token_ids


class _SlowEngine(FakeEngine):
    """A step every 10 ms: a long request stays in flight for as long as a test needs it."""

    def step(self) -> list[Any]:
        time.sleep(0.01)
        return super().step()


async def test_a_refusal_under_another_producers_id_is_not_its_answer(topics: Any) -> None:
    """Records another producer sends under an id in flight (other content; unreadable) are refused
    with errors that name them: that producer's client reads its refusals, the id's own client
    skips them and gets its request's outcome (500 tokens at 10 ms a step: after the refusals); a
    control ack names its command too."""
    settings = await topics()
    rid = f"mine-{uuid.uuid4().hex[:8]}"
    async with (running_worker(_SlowEngine(), settings), client_for(settings) as mine,
                client_for(settings) as other, client_for(settings) as watcher):
        await mine.submit_generate(prompt_token_ids=[1, 2, 3], max_tokens=500, request_id=rid)
        await other.submit_generate(prompt_token_ids=[4, 5], max_tokens=3, request_id=rid)
        unreadable = {**request(rid, [6, 7]), "sampling": {"max_tokens": "many"}}
        await (await other.send_raw(settings.kafka.requests_topic, msgpack.packb(unreadable), rid.encode()))
        (duplicate,) = await _finals(other, rid, 1)  # its client: its own record refused
        refusals = await _finals(watcher, rid, 2)  # a client that sent nothing under rid sees both
        ack = await mine.control("cancel", f"nothing-{rid}", wait=True)
        outcome = await mine.wait_result(rid, timeout=60)  # read from its start: the refusals come first
    assert duplicate.type == "error" and duplicate.code == "duplicate_request_id" and duplicate.record is not None
    assert sorted(r.code for r in refusals) == ["duplicate_request_id", "wrong_type"]
    assert all(r.record is not None and r.record.topic == settings.kafka.requests_topic for r in refusals)
    assert ack.code == "unknown_target" and ack.record is not None and ack.record.topic == settings.kafka.control_topic
    assert outcome.type == "result" and outcome.finish_reason == "length" and len(outcome.token_ids) == 500


async def _finals(client: Any, rid: str, num: int) -> list[Any]:
    """The first ``num`` final records of ``rid`` since the client started."""
    finals: list[Any] = []

    async def collect() -> None:
        async for record in client.results([rid], follow=True):
            if record.type in ("result", "error"):
                finals.append(record)
                if len(finals) == num:
                    return

    await asyncio.wait_for(collect(), 30)
    return finals


async def _records_until(client: Any, key: str, types: set[str], timeout: float = 30) -> list[Any]:
    records: list[Any] = []

    async def collect() -> None:
        async for record in client.results([key], follow=True, from_beginning=True):
            records.append(record)
            if types <= {r.type for r in records}:
                return

    await asyncio.wait_for(collect(), timeout)
    return records


async def test_rows_left_by_crashed_workers_end_poisoned(topics: Any, database_url: str) -> None:
    """A request row and a job row whose attempts all ended with their worker (max_attempts 2)."""
    settings = await topics(max_attempts=2)
    rid, job_id = f"pill-{uuid.uuid4().hex[:8]}", f"pill-job-{uuid.uuid4().hex[:8]}"
    req = GenerateRequest.model_validate(request(rid, [9, 9]))

    async def crashed_twice(s: Any) -> None:
        await repo.insert_request_idempotent(s, request_id=rid, adapter_id=None,
                                             content_sha256=convert.request_fingerprint(req))
        for _ in range(2):
            await repo.start_request(s, rid, "ghost-worker")
        await repo.insert_job_idempotent(s, job_id=job_id, kind="finetune", adapter_id=f"a-{job_id}",
                                         spec={"job_id": job_id, "adapter_id": f"a-{job_id}",
                                               "data": [{"prompt": "a", "completion": "b"}]})
        await repo.claim_job(s, "ghost-worker", lease_s=30.0, job_id=job_id)  # its worker dies at once
        await s.execute(update(JobRow).where(JobRow.job_id == job_id).values(
            attempts=2, lease_expires_at=text("now() - interval '1 minute'")))  # a second claim went the same way

    await query(database_url, crashed_twice)
    engine = FakeEngine()
    async with running_worker(engine, settings), client_for(settings) as client:
        await client.send(settings.kafka.requests_topic, req, rid)
        poisoned = await client.wait_result(rid, 30)
        job_records = await _records_until(client, job_id, {"error", "job_done"})
    assert poisoned.type == "error" and poisoned.code == "poisoned"
    assert any(r.type == "error" and r.code == "poisoned" for r in job_records)
    assert any(r.type == "job_done" and r.status == "failed" for r in job_records)
    assert rid not in engine.submitted_ids and job_id not in engine.jobs
    row = await query(database_url, lambda s: repo.get_request(s, rid))
    job = await query(database_url, lambda s: repo.get_job(s, job_id))
    assert row.status == "failed" and row.attempts == 2 and row.error.startswith("poisoned")
    assert job.status == "failed" and job.attempts == 2 and job.error.startswith("poisoned")


async def test_stale_rows_whose_record_was_committed_are_failed(topics: Any, database_url: str) -> None:
    """Rows left running by a gone worker, whose records lie below the committed offset."""
    settings = await topics(reconcile_every_s=0.3, max_attempts=2)
    k = settings.kafka
    ids = [f"stale-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    raw = AIOKafkaProducer(bootstrap_servers=k.bootstrap)
    await raw.start()
    try:
        metas = [await raw.send_and_wait(k.requests_topic, msgpack.packb(request(rid, [4])), rid.encode(),
                                         partition=0) for rid in ids]
    finally:
        await raw.stop()
    part = TopicPartition(k.requests_topic, 0)
    same = list(zip(ids, metas, strict=True))
    probe = AIOKafkaConsumer(bootstrap_servers=k.bootstrap, group_id=k.group_id, enable_auto_commit=False)
    await probe.start()
    try:
        probe.assign([part])
        await probe.commit({part: OffsetAndMetadata(max(m.offset for _, m in same) + 1, "")})
    finally:
        await probe.stop()
    (lost, lost_meta), *rest = same

    async def left_running(s: Any) -> None:
        for rid, meta, attempts in [(lost, lost_meta, 1), *[(r, m, 2) for r, m in rest]]:
            await repo.insert_request_idempotent(s, request_id=rid, adapter_id=None, kafka_topic=part.topic,
                                                 kafka_partition=part.partition, kafka_offset=meta.offset)
            for _ in range(attempts):
                await repo.start_request(s, rid, "ghost-worker")
        await s.execute(update(RequestRow).where(RequestRow.request_id.in_(ids))
                        .values(updated_at=text("now() - interval '1 hour'")))

    await query(database_url, left_running)
    engine = FakeEngine()
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        finals = {r.request_id: r async for r in client.results([rid for rid, _ in same], from_beginning=True)}
        assert worker.reconciler.num_failed == len(same)
    assert finals[lost].code == "lost" and all(finals[r].code == "poisoned" for r, _ in rest)
    assert not set(engine.submitted_ids) & {rid for rid, _ in same}  # below the committed offset: never read
    for rid, _ in same:
        row = await query(database_url, lambda s, rid=rid: repo.get_request(s, rid))
        assert row.status == "failed" and row.finished_at is not None


async def test_database_errors_reach_users_without_sql(database_url: str) -> None:
    store = Store(database_url)
    try:
        with pytest.raises(StoreError) as caught:
            await store.tx(lambda s: s.execute(text("SELECT 1 / 0")))
        assert caught.value.code == "invalid_value" and "SELECT" not in caught.value.message
        with pytest.raises(StoreError) as caught:
            await store.tx(lambda s: s.execute(update(JobRow).values(status="no-such-status")))
        assert caught.value.code == "database_error" and "training_jobs" not in str(caught.value)
    finally:
        await store.close()


async def test_reply_topics_are_looked_up_beside_the_records(topics: Any) -> None:
    """Token records for a reply topic not known yet never wait for its lookup: a new gateway's
    topic gets them all, in order, before the result; made-up names cost two lookups at most each
    and never join the producer's metadata set."""
    settings = await topics()
    kafka = settings.kafka.model_copy(update={"reply_timeout_s": 10.0})
    bootstrap = kafka.bootstrap or ""
    publisher = Publisher(bootstrap, kafka, worker_id="w")
    await publisher.start()
    fresh = f"{kafka.reply_prefix}gw-{uuid.uuid4().hex[:8]}"
    made_up = [f"{kafka.reply_prefix}nobody-{uuid.uuid4().hex[:8]}-{i}" for i in range(200)]
    try:
        await services.create_topics(bootstrap, [fresh], num_partitions=1)
        started = time.monotonic()
        for name in made_up:  # each returns at once: its record is held while the names are asked about
            await asyncio.wait_for(publisher.stream(_token("r", 0), "r", topic=name), 0.5)
        for index in range(3):
            await asyncio.wait_for(publisher.stream(_token("mine", index), "mine", topic=fresh), 0.5)
        assert time.monotonic() - started < 5
        final = GenerateResult(request_id="mine", token_ids=[1, 2, 3], text="abc", finish_reason="length",
                               usage={"prompt_tokens": 2, "completion_tokens": 3})  # type: ignore[arg-type]
        assert await publisher.publish(final, "mine", topic=fresh)
        assert not await publisher.publish(ErrorResult(request_id="r", code="x", message="y"), "r", topic=made_up[0])
        while publisher.replies._pending:
            await asyncio.sleep(0.05)
        assert publisher.num_replies_dropped == len(made_up) + 1
        assert publisher.replies.num_lookups <= 2 * (len(made_up) + 1)  # each name asked about twice at most
        assert not set(made_up) & publisher._producer.client._topics
        # a known topic's records go straight out; a missing one's are dropped without a lookup
        lookups = publisher.replies.num_lookups
        await publisher.stream(_token("mine", 3), "mine", topic=fresh)
        await publisher.stream(_token("r", 1), "r", topic=made_up[1])
        assert publisher.replies.num_lookups == lookups and publisher.num_replies_dropped == len(made_up) + 2
    finally:
        await publisher.stop()
    records = await read_topic(bootstrap, fresh, want=5)
    assert [(r.type, getattr(r, "index", None)) for r in records] == [
        ("token", 0), ("token", 1), ("token", 2), ("result", None), ("token", 3)]


def _token(rid: str, index: int) -> TokenResult:
    return TokenResult(request_id=rid, index=index, token_ids=[index + 5], text=str(index))
