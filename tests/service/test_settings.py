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

    config = EngineConfig.from_kwargs(**Settings().engine.limits())
    assert config.scheduler.prefill_coalesce_ms is None  # unset: the engine decides
    assert config.scheduler.tpot_burst == EngineConfig().scheduler.tpot_burst  # one default, the engine's
    monkeypatch.setenv("LOQUETIER_ENGINE__TPOT_BURST", "2.5")
    monkeypatch.setenv("LOQUETIER_ENGINE__PREFILL_COALESCE_MS", "40")
    monkeypatch.setenv("LOQUETIER_ENGINE__TPOT_LOOKAHEAD", "4")
    limits = Settings().engine.limits()
    assert limits["tpot_burst"] == 2.5 and limits["prefill_coalesce_ms"] == 40.0
    sched = EngineConfig.from_kwargs(**limits).scheduler
    assert sched.tpot_burst == 2.5 and sched.prefill_coalesce_ms == 40.0 and sched.tpot_lookahead == 4
    for bad in ({"tpot_burst": 0.9}, {"prefill_coalesce_ms": -1.0}, {"tpot_lookahead": -1}):
        with pytest.raises(ValueError):
            EngineConfig.from_kwargs(**bad)


def test_engine_settings_are_checked_by_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranges live in the engine's dataclasses only: a value the engine refuses fails at start-up."""
    monkeypatch.setenv("LOQUETIER_ENGINE__MAX_NUM_SEQS", "9000")  # above max_num_batched_tokens
    with pytest.raises(ValidationError, match="max_num_batched_tokens must be >= max_num_seqs"):
        Settings()
