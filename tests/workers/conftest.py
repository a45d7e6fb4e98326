"""Worker fixtures: per-test topics and settings, an in-process worker, a client."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from loquetier.settings import KafkaSettings, Settings, WorkerSettings

# tansu holds a group's join open for half the session: each worker start waits 1.5 s, not 3 s. A
# real Kafka (a configured bootstrap) refuses sessions below its group.min.session.timeout.ms (6 s)
# and keeps the default.
_SHORT_SESSION: dict[str, int] = (
    {} if os.environ.get("LOQUETIER_KAFKA__BOOTSTRAP") else {"session_timeout_ms": 3_000, "heartbeat_interval_ms": 300})


def make_settings(bootstrap: str, database_url: str, prefix: str, **worker: Any) -> Settings:
    kafka = KafkaSettings(
        bootstrap=bootstrap,
        requests_topic=f"{prefix}.requests",
        training_topic=f"{prefix}.training",
        control_topic=f"{prefix}.control",
        results_topic=f"{prefix}.results",
        dlq_topic=f"{prefix}.dlq",
        group_id=f"{prefix}-workers",
        num_partitions=2,
        **_SHORT_SESSION,
    )
    defaults: dict[str, Any] = {
        "id": f"{prefix}-w0",
        "heartbeat_s": 0.5,
        "lease_s": 3.0,
        "progress_every_s": 0.1,
        "max_inflight": 64,
    }
    return Settings(kafka=kafka, database={"url": database_url}, worker=WorkerSettings(**(defaults | worker)))


@pytest.fixture
async def topics(kafka_bootstrap: str, database_url: str) -> Callable[..., Any]:
    """``await topics(**worker_settings)`` -> Settings with fresh topics of 2 partitions."""
    from loquetier import services

    async def make(**worker: Any) -> Settings:
        prefix = f"t{uuid.uuid4().hex[:8]}"
        settings = make_settings(kafka_bootstrap, database_url, prefix, **worker)
        await services.create_topics(kafka_bootstrap, settings.kafka.topics(), num_partitions=2)
        return settings

    return make


@asynccontextmanager
async def running_worker(engine: Any, settings: Settings, **kwargs: Any) -> AsyncIterator[Any]:
    from loquetier.workers.runtime import Worker

    assert settings.kafka.bootstrap and settings.database.url
    worker = Worker(
        engine, settings, bootstrap=settings.kafka.bootstrap, database_url=settings.database.url, **kwargs
    )
    task = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)


@asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[Any]:
    from loquetier.producers.client import LoquetierClient

    assert settings.kafka.bootstrap
    async with LoquetierClient(settings.kafka.bootstrap, settings.kafka) as client:
        yield client


# --- the real engine on a tiny model ---------------------------------------------------------

ENGINE_LIMITS: dict[str, Any] = {"num_kv_blocks": 256, "block_size": 8, "max_num_batched_tokens": 256,
                                 "max_prefill_chunk": 64, "max_adapter_slots": 6, "num_train_slots": 2,
                                 "max_lora_rank": 16}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("worker-tiny") / "llama")


@pytest.fixture(scope="session")
def reference_backend() -> Any:
    from loquetier.kernels import force_backend

    force_backend("reference")  # the Triton interpreter is exercised by the kernel tests
    yield
    force_backend(None)


@pytest.fixture
def make_engine(tiny_model_dir: Any, reference_backend: Any) -> Callable[..., Any]:
    from loquetier.engine.engine import Engine

    def make(**limits: Any) -> Any:
        return Engine.from_pretrained(tiny_model_dir, **(ENGINE_LIMITS | limits))

    return make
