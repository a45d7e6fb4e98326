"""What the producer commands share: the checked broker and database, a client, quick SQL.

Every command checks that its broker or database answers before it starts a Kafka client or a
pool (``loquetier.cli_errors``), so a dead or stale address fails in seconds with one line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from loquetier.cli_errors import UP_HINT, UserError, database_call, require_bootstrap, require_database
from loquetier.settings import KafkaSettings, get_settings

from .client import LoquetierClient

T = TypeVar("T")
LIVE_WORKER_S = 30.0  # a worker heartbeats every few seconds; older than this, it is gone


def kafka_settings() -> KafkaSettings:
    """The configured broker, else the running local stack's; checked that it answers."""
    settings = get_settings()
    kafka = settings.kafka
    if kafka.bootstrap is None:
        kafka = kafka.model_copy(update={"bootstrap": _local(settings).get("broker")})
    require_bootstrap(kafka.bootstrap)
    return kafka


def configured_database_url() -> str | None:
    """The configured database URL, else the running local stack's, else None (unchecked)."""
    settings = get_settings()
    return settings.database.url or _local(settings).get("postgres")


def database_url() -> str:
    return require_database(configured_database_url())


def _local(settings: Any) -> dict[str, str]:
    from loquetier import services

    return services.local_addresses(settings)


@asynccontextmanager
async def client(kafka: KafkaSettings) -> AsyncIterator[LoquetierClient]:
    """A started client whose results topic exists, or a UserError."""
    assert kafka.bootstrap is not None
    # aiokafka logs every failed connection attempt at ERROR; the CLI says it once, its own way.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    producer = LoquetierClient(kafka.bootstrap, kafka)
    try:
        await producer.start()
    except Exception as exc:
        raise UserError(f"cannot talk to the broker at {kafka.bootstrap}: {type(exc).__name__}", UP_HINT) from exc
    try:
        if not producer.num_results_partitions:
            raise UserError(
                f"the broker has no topic {kafka.results_topic!r}",
                "`loquetier up` or a starting worker creates the topics (or check LOQUETIER_KAFKA__RESULTS_TOPIC)",
            )
        yield producer
    finally:
        await producer.close()


async def query(url: str, fn: Callable[[Any], Awaitable[T]]) -> T:
    """``await fn(session)`` in one transaction, failures said in one line."""
    from loquetier.db.session import create_engine, session_factory

    engine = create_engine(url)

    async def run() -> T:
        async with session_factory(engine).begin() as session:
            return await fn(session)

    try:
        return await database_call(run(), url)
    finally:
        await engine.dispose()


async def live_workers(url: str, within_s: float = LIVE_WORKER_S) -> list[str]:
    """Ids of workers that are serving and heartbeated within ``within_s``."""
    from datetime import UTC, datetime, timedelta

    from loquetier.db.status_repo import live_worker_ids

    since = datetime.now(UTC) - timedelta(seconds=within_s)
    return await query(url, lambda session: live_worker_ids(session, since))


async def require_worker(url: str | None) -> None:
    """When a database is configured: a UserError unless some worker is alive."""
    if url is None:
        return
    if not await live_workers(require_database(url)):
        raise UserError(
            f"no worker is running (none has sent a heartbeat in the last {LIVE_WORKER_S:.0f} s)",
            "start one: `loquetier up`, or `loquetier worker --model DIR` (its log says why it stopped)",
        )
