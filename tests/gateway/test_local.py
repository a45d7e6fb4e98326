"""The local gateway that ``loquetier up`` starts: a background process, a kept key, the plain client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from loquetier.gateway import local

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


async def test_start_key_exports_stop(topics: Any, database_url: str, tmp_path: Path, monkeypatch: Any) -> None:
    settings = await topics()
    settings = settings.model_copy(update={"cache_dir": tmp_path})
    bootstrap = settings.kafka.bootstrap or ""
    for name in ("requests", "training", "control", "results", "dlq"):
        monkeypatch.setenv(f"LOQUETIER_KAFKA__{name.upper()}_TOPIC", getattr(settings.kafka, f"{name}_topic"))
    key = await _in_thread(local.local_key, settings, database_url)
    assert (tmp_path / "gateway.key").stat().st_mode & 0o077 == 0
    assert await _in_thread(local.local_key, settings, database_url) == key  # kept while it works
    pid, url = await _in_thread(lambda: local.start(settings, bootstrap, database_url, model_name="smol"))
    try:
        assert (await _in_thread(lambda: local.start(settings, bootstrap, database_url, model_name="smol"))) == (
            pid, url)
        for line in local.exports(url, key):
            name, value = line.removeprefix("export ").split("=", 1)
            monkeypatch.setenv(name, value)
        api = openai.AsyncOpenAI(max_retries=0)  # everything from OPENAI_BASE_URL / OPENAI_API_KEY
        assert [m.id for m in (await api.models.list()).data][0] == "smol"
        await api.close()
    finally:
        assert await _in_thread(local.stop, settings)
    assert local.running(settings) is None and not await _in_thread(local.stop, settings)


async def _in_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)
