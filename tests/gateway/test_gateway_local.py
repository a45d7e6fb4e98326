"""The local gateway that ``loquetier up`` starts: a background process, a kept key, the plain client."""

from __future__ import annotations

import os
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


async def test_up_prints_openai_exports_and_down_stops(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    import asyncio
    import subprocess
    import sys

    env = {**os.environ, "LOQUETIER_CACHE_DIR": str(tmp_path), "LOQUETIER_KAFKA__BOOTSTRAP": kafka_bootstrap,
           "LOQUETIER_DATABASE__URL": database_url, "LOQUETIER_GATEWAY__MODEL_NAME": "local-model"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loquetier.cli", *args], env=env, capture_output=True,
                              text=True, timeout=180, check=False)

    up = await asyncio.to_thread(cli, "up", "--no-worker")
    assert up.returncode == 0, up.stderr[-2000:]
    lines = up.stdout.strip().splitlines()
    assert lines[-2].startswith("export OPENAI_BASE_URL=http://127.0.0.1:") and lines[-1].startswith(
        "export OPENAI_API_KEY=lq-")
    exported = dict(line.removeprefix("export ").split("=", 1) for line in lines[-2:])
    try:
        api = openai.AsyncOpenAI(base_url=exported["OPENAI_BASE_URL"], api_key=exported["OPENAI_API_KEY"],
                                 max_retries=0)
        assert [m.id for m in (await api.models.list()).data][0] == "local-model"
        await api.close()
    finally:
        down = await asyncio.to_thread(cli, "down")
    assert down.returncode == 0 and "gateway stopped" in down.stdout
