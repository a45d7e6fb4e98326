"""Gateway fixtures: a gateway in the test's event loop beside a real worker, keys, the official client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from loquetier.settings import GatewaySettings, Settings
from tests.workers import conftest as workers

# The worker fixtures, for this folder too: broker topics, the tiny model, the real engine.
topics, tiny_model_dir, reference_backend, make_engine = (
    workers.topics, workers.tiny_model_dir, workers.reference_backend, workers.make_engine)

MODEL = "tiny-llama"


def gateway_settings(settings: Settings, model_dir: Path, **gateway: Any) -> Settings:
    """``settings`` with a gateway of its own (id = the topics' prefix) serving ``model_dir`` as MODEL."""
    prefix = settings.kafka.requests_topic.removesuffix(".requests")
    config = GatewaySettings(id=f"{prefix}-gw", model_name=MODEL, **gateway)
    engine = settings.engine.model_copy(update={"model_dir": model_dir})
    return settings.model_copy(update={"gateway": config, "engine": engine})


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[str]:
    from loquetier.gateway.server import running

    assert settings.kafka.bootstrap and settings.database.url
    async with running(settings, bootstrap=settings.kafka.bootstrap, database_url=settings.database.url) as url:
        yield url


async def new_key(database_url: str, tenant: str, *, rpm: int | None = None, tpm: int | None = None) -> str:
    from loquetier.db import keys_repo
    from loquetier.db.session import create_engine, session_factory

    engine = create_engine(database_url)
    try:
        async with session_factory(engine).begin() as s:
            _, key = await keys_repo.create_key(s, name=f"{tenant}-key", tenant_id=tenant, max_requests_per_minute=rpm,
                                                max_tokens_per_minute=tpm)
            return key
    finally:
        await engine.dispose()


def client(base_url: str, key: str) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture
def gateway_setup(topics: Callable[..., Any], tiny_model_dir: Path) -> Callable[..., Any]:
    """``await gateway_setup(**gateway_settings)`` -> Settings with fresh topics and a gateway config."""

    async def make(worker: dict[str, Any] | None = None, **gateway: Any) -> Settings:
        return gateway_settings(await topics(**(worker or {})), tiny_model_dir, **gateway)

    return make
