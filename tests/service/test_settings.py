"""Process settings from the environment: prefix, nested groups, one cached accessor."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from loquetier.settings import Settings, get_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LOQUETIER_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()


def test_defaults() -> None:
    s = Settings()
    assert s.kafka.bootstrap is None and s.database.url is None  # -> embedded services
    assert s.kafka.topics() == [
        "loquetier.requests",
        "loquetier.training",
        "loquetier.control",
        "loquetier.results",
        "loquetier.dlq",
    ]
    assert s.worker.checkpoint_storage == "db"
    assert s.engine.block_size > 0 and s.engine.max_adapter_slots > 0


def test_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOQUETIER_KAFKA__BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("LOQUETIER_KAFKA__REQUESTS_TOPIC", "my.requests")
    monkeypatch.setenv("LOQUETIER_KAFKA__NUM_PARTITIONS", "8")
    monkeypatch.setenv("LOQUETIER_DATABASE__URL", "postgresql+asyncpg://u:p@db/x")
    monkeypatch.setenv("LOQUETIER_ENGINE__MAX_NUM_SEQS", "7")
    monkeypatch.setenv("LOQUETIER_ENGINE__DEFAULT_TTFT_MS", "250")
    monkeypatch.setenv("LOQUETIER_WORKER__ID", "w-1")
    monkeypatch.setenv("LOQUETIER_WORKER__CHECKPOINT_STORAGE", "uri")
    monkeypatch.setenv("LOQUETIER_WORKER__ADAPTER_DIR", "/srv/adapters")
    s = get_settings()
    assert s.kafka.bootstrap == "kafka:9092" and s.kafka.requests_topic == "my.requests"
    assert s.kafka.num_partitions == 8 and s.kafka.results_topic == "loquetier.results"
    assert s.database.url == "postgresql+asyncpg://u:p@db/x"
    assert s.engine.max_num_seqs == 7 and s.engine.default_ttft_ms == 250.0
    assert s.worker.id == "w-1" and s.worker.checkpoint_storage == "uri"
    assert s.worker.adapter_dir == Path("/srv/adapters")


def test_cached_accessor(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    monkeypatch.setenv("LOQUETIER_WORKER__ID", "changed")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().worker.id == "changed"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOQUETIER_KAFKA__NUM_PARTITIONS", "0"),
        ("LOQUETIER_ENGINE__DTYPE", "float8"),
        ("LOQUETIER_WORKER__CHECKPOINT_STORAGE", "s3"),
        ("LOQUETIER_WORKER__LEASE_S", "-1"),
        ("LOQUETIER_ENGINE__TPOT_BURST", "0.5"),
        ("LOQUETIER_ENGINE__PREFILL_COALESCE_MS", "-3"),
    ],
)
def test_invalid_values_fail_loudly(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_scheduler_knobs_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from loquetier.engine.config import EngineConfig
    from loquetier.workers.cli import engine_limits

    assert "prefill_coalesce_ms" not in engine_limits(Settings())  # unset: the engine decides
    monkeypatch.setenv("LOQUETIER_ENGINE__TPOT_BURST", "2.5")
    monkeypatch.setenv("LOQUETIER_ENGINE__PREFILL_COALESCE_MS", "40")
    monkeypatch.setenv("LOQUETIER_ENGINE__TPOT_LOOKAHEAD", "4")
    limits = engine_limits(Settings())
    assert limits["tpot_burst"] == 2.5 and limits["prefill_coalesce_ms"] == 40.0
    config = EngineConfig.from_kwargs(**limits)
    assert config.tpot_burst == 2.5 and config.prefill_coalesce_ms == 40.0 and config.tpot_lookahead == 4
    for bad in ({"tpot_burst": 0.9}, {"prefill_coalesce_ms": -1.0}, {"tpot_lookahead": -1}):
        with pytest.raises(ValueError):
            EngineConfig(**bad)  # type: ignore[arg-type]
