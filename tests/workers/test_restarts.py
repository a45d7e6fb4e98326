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
