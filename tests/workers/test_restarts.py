"""Broker and PostgreSQL restarts, idle and under load: the worker reconnects by itself and
no accepted request is lost or computed twice.

Each test owns its service (its own tansu broker, its own embedded PostgreSQL) so that the
restarts do not disturb other tests. tansu keeps data in memory: a restart loses topics,
records and group offsets, so the topics are created again right after it.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from loquetier import services
from loquetier.db import migrate
from loquetier.db.models import RequestRow
from tests.workers.conftest import client_for, make_settings, running_worker
from tests.workers.test_worker_e2e import query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def counting(engine: Any) -> collections.Counter[str]:
    """Count engine.add_request calls per request_id (computations)."""
    counts: collections.Counter[str] = collections.Counter()
    original = engine.add_request

    def add_request(request_id: str, *args: Any, **kwargs: Any) -> None:
        counts[request_id] += 1
        original(request_id, *args, **kwargs)

    engine.add_request = add_request
    return counts


async def rows(database_url: str, ids: list[str]) -> dict[str, RequestRow]:
    async def fetch(s: Any) -> dict[str, RequestRow]:
        found = (await s.scalars(select(RequestRow).where(RequestRow.request_id.in_(ids)))).all()
        return {r.request_id: r for r in found}

    return await query(database_url, fetch)


async def wait_rows(database_url: str, ids: list[str], *, started: int = 0, finished: int = 0,
                    timeout: float = 90) -> dict[str, RequestRow]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await rows(database_url, ids)
        num_started = sum(1 for r in found.values() if r.status in ("running", "succeeded"))
        num_finished = sum(1 for r in found.values() if r.finished_at is not None)
        if num_started >= started and num_finished >= finished:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"started {num_started}/{started}, finished {num_finished}/{finished}")
        await asyncio.sleep(0.2)


async def submit(client: Any, n: int, max_tokens: int = 4) -> list[str]:
    return [await client.submit_generate("the quick brown fox", max_tokens=max_tokens, temperature=0.0)
            for _ in range(n)]


async def results(client: Any, ids: list[str], timeout: float = 90, *, from_beginning: bool = False) -> dict[str, Any]:
    async def collect() -> dict[str, Any]:
        found = client.results(ids, from_beginning=from_beginning)
        return {r.request_id: r async for r in found if r.type in ("result", "error")}

    return await asyncio.wait_for(collect(), timeout)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[list[services.ServiceProcess]]:
    box = [services.start_broker(log_dir=tmp_path / "broker")]
    yield box
    services.stop_service(box[0])


async def test_broker_restart_idle_and_under_load(own_broker: list[Any], database_url: str, make_engine: Any) -> None:
    bootstrap = own_broker[0].address
    settings = make_settings(bootstrap, database_url, f"b{uuid.uuid4().hex[:8]}")
    await services.create_topics(bootstrap, settings.kafka.topics(), num_partitions=2)

    async def restart(worker: Any) -> None:
        """Restart, recreate the topics, and wait until the worker rejoined the new broker's group
        (records published before that could land below a stale position: tansu forgets its logs)."""
        assignments = worker.consumer.num_assignments
        port = int(bootstrap.rsplit(":", 1)[1])
        services.stop_service(own_broker[0])
        await asyncio.sleep(1.0)
        own_broker[0] = services.start_broker(log_dir=Path(own_broker[0].log_path).parent, port=port)
        await services.create_topics(bootstrap, settings.kafka.topics(), num_partitions=2)
        for _ in range(300):
            if worker.consumer.num_assignments > assignments:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("the worker did not rejoin the restarted broker")

    engine = make_engine()
    counts = counting(engine)
    async with running_worker(engine, settings) as worker:
        async with client_for(settings) as client:
            assert len(await results(client, await submit(client, 3))) == 3
        await restart(worker)  # idle
        # after a broker lost its data, results are read from the beginning (filtered by id)
        async with client_for(settings) as client:
            after_idle = await submit(client, 3)
            got = await results(client, after_idle, from_beginning=True)
            assert {r.type for r in got.values()} == {"result"}
            loaded = await submit(client, 24, max_tokens=24)
            await wait_rows(database_url, loaded, started=4)
        await restart(worker)  # under load
        async with client_for(settings) as client:
            after_load = await submit(client, 3)
        # Here the worker publishes its backlog into the recreated topics at once, and tansu's
        # memory engine can renumber a partition under such concurrent batches (seen: acknowledged
        # offsets 3, then 1 on one partition; "AlreadyExists" in its log), losing acknowledged
        # records. Delivery through a restarted broker is asserted in the idle phase above; here
        # the outcome is read from the record, PostgreSQL.
        await wait_rows(database_url, after_load, finished=len(after_load))
        accepted = await rows(database_url, loaded)
        await wait_rows(database_url, list(accepted), finished=len(accepted))
    final = await rows(database_url, [*loaded, *after_idle, *after_load])
    assert len(final) == len(loaded) + len(after_idle) + len(after_load)
    assert all(r.status == "succeeded" for r in final.values())  # every accepted request finished
    assert max(counts.values()) == 1  # and none was computed twice


async def test_postgres_restart_idle_and_under_load(kafka_bootstrap: str, tmp_path: Path, make_engine: Any) -> None:
    root = Path(tempfile.mkdtemp(prefix="loquetier-pg-"))  # postgres runs as a user that must reach it
    root.chmod(0o755)
    try:
        pg = services.start_postgres(data_dir=root / "data", database="loquetier")
    except RuntimeError as exc:
        pytest.skip(f"no embedded PostgreSQL: {exc}")
    port = int(pg.address.rsplit(":", 1)[1].split("/")[0])
    database_url = pg.address
    box = [pg]

    async def restart(down_s: float) -> None:
        services.stop_service(box[0])
        await asyncio.sleep(down_s)
        box[0] = await asyncio.to_thread(services.start_postgres, data_dir=root / "data", port=port)

    try:
        await migrate.upgrade_async(database_url)
        settings = make_settings(kafka_bootstrap, database_url, f"p{uuid.uuid4().hex[:8]}")
        await services.create_topics(kafka_bootstrap, settings.kafka.topics(), num_partitions=2)
        engine = make_engine()
        counts = counting(engine)
        async with running_worker(engine, settings) as worker, client_for(settings) as client:
            assert len(await results(client, await submit(client, 2))) == 2
            await restart(1.0)  # idle
            after_idle = await submit(client, 3)
            assert {r.type for r in (await results(client, after_idle)).values()} == {"result"}
            loaded = await submit(client, 24, max_tokens=24)
            await wait_rows(database_url, loaded, started=4)
            await restart(2.0)  # under load
            got = await results(client, loaded, timeout=120)
            assert {r.type for r in got.values()} == {"result"} and len(got) == len(loaded)
            assert worker.store.num_retries > 0
        final = await rows(database_url, [*after_idle, *loaded])
        assert len(final) == len(after_idle) + len(loaded)
        assert all(r.status == "succeeded" and r.completion_tokens for r in final.values())
        assert max(counts.values()) == 1
    finally:
        services.stop_service(box[0])
        shutil.rmtree(root, ignore_errors=True)


async def burst(client: Any, settings: Any, n: int) -> list[str]:
    """``n`` requests enqueued at once, so the producer packs them into multi-record batches
    (the shape that makes tansu's ListOffsets answer the start of the last batch + 1)."""
    import msgpack

    ids = [f"burst-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    futures = []
    for rid in ids:
        value = msgpack.packb({"schema": 1, "request_id": rid, "prompt": "the quick brown fox",
                               "sampling": {"max_tokens": 2, "temperature": 0.0}}, use_bin_type=True)
        futures.append(await client.send_raw(settings.kafka.requests_topic, value, key=rid.encode()))
    await asyncio.gather(*futures)
    return ids


async def final_records(settings: Any, ids: list[str]) -> collections.Counter[str]:
    """How many final records ("result"/"error") each id has on the results topic, read whole."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from loquetier.messages import decode_record

    wanted, counts = set(ids), collections.Counter[str]()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        topic = settings.kafka.results_topic
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        while True:  # to the true end: the fetch's high watermark, not ListOffsets
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for msg in records:
                    record = decode_record("results", msg.value)
                    if record.type in ("result", "error") and record.request_id in wanted:
                        counts[record.request_id] += 1
            positions = [await consumer.position(p) for p in parts]
            ends = [consumer.highwater(p) for p in parts]
            if not batches and all(e is not None and e <= pos for pos, e in zip(positions, ends, strict=True)):
                return counts
    finally:
        await consumer.stop()


async def test_graceful_restart_after_a_burst_replays_nothing(topics: Any, database_url: str, make_engine: Any) -> None:
    """A burst, a graceful stop, a restart on the same group: the committed offsets hold, so no
    request is computed or answered twice and none is lost (issue 23: every partition rewound)."""
    settings = await topics()
    engine = make_engine()
    counts = counting(engine)
    async with running_worker(engine, settings), client_for(settings) as client:
        first = await burst(client, settings, 200)
        await wait_rows(database_url, first, finished=len(first), timeout=150)
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        second = await burst(client, settings, 10)
        await wait_rows(database_url, second, finished=len(second), timeout=60)
        await asyncio.sleep(1.0)  # a replay, if any, would be under way by now
        assert worker.inference.num_computed == len(second)
    answered = await final_records(settings, [*first, *second])
    assert sorted(set(answered.values())) == [1] and len(answered) == len(first) + len(second)
    assert sorted(set(counts.values())) == [1] and len(counts) == len(first) + len(second)


async def test_a_committed_offset_past_the_fetched_end_reads_the_partition_again(topics: Any) -> None:
    """The other side of the rule: a group offset beyond what a fetch shows exists (a broker that
    lost its log but kept, or was given, a larger offset) rewinds that partition, and only it."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    from tests.fakes import FakeEngine

    settings = await topics()
    k = settings.kafka
    async with client_for(settings) as client:
        ids = await burst(client, settings, 8)
        parts = [TopicPartition(k.requests_topic, p) for p in (0, 1)]
        where: dict[TopicPartition, list[str]] = {p: [] for p in parts}
        probe = AIOKafkaConsumer(bootstrap_servers=k.bootstrap, group_id=k.group_id, enable_auto_commit=False)
        await probe.start()
        try:
            probe.assign(parts)
            await probe.seek_to_beginning(*parts)
            while sum(map(len, where.values())) < len(ids):
                for part, records in (await probe.getmany(timeout_ms=2000)).items():
                    where[part] += [msg.key.decode() for msg in records]
            lost, kept = sorted(parts, key=lambda p: len(where[p]), reverse=True)
            assert where[lost]
            await probe.commit({lost: OffsetAndMetadata(len(where[lost]) + 1000, ""),
                                kept: OffsetAndMetadata(len(where[kept]), "")})
        finally:
            await probe.stop()
        engine = FakeEngine()
        async with running_worker(engine, settings):
            got = await results(client, where[lost], timeout=60)
            await asyncio.sleep(1.0)
    assert set(got) == set(where[lost])  # the rewound partition is read again
    assert sorted(engine.submitted_ids) == sorted(where[lost])  # the other one is not replayed
