"""The whole service on one machine, for ``bench_service``: broker, PostgreSQL, one worker process,
and what is read from outside them (the worker's CPU time by thread, its Prometheus metrics, the
database's write counters).

- broker: ``LOQUETIER_KAFKA__BOOTSTRAP`` if set, else an embedded tansu (``loquetier.services``);
- PostgreSQL: ``LOQUETIER_DATABASE__URL``'s server, else 127.0.0.1:5432 if it answers, else an
  embedded one; the run gets a fresh database there, migrated, dropped at the end;
- the worker: ``python -m loquetier.cli worker`` in its own session (``loquetier worker``), with the
  settings in its environment; stopped with SIGTERM (a graceful drain), then SIGKILL.

Only the service side of loquetier is imported here; it is not needed by the engine-only benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def broker(tmp: Path) -> Iterator[str]:
    configured = os.environ.get("LOQUETIER_KAFKA__BOOTSTRAP")
    if configured:
        yield configured
        return
    from loquetier import services

    with services.embedded_broker(tmp) as service:
        yield service.address


@contextlib.contextmanager
def postgres_server(tmp: Path) -> Iterator[str]:
    """URL of a server's maintenance database (``postgres``)."""
    from sqlalchemy.engine import make_url

    from loquetier import procs, services

    configured = os.environ.get("LOQUETIER_DATABASE__URL")
    if configured:
        yield make_url(configured).set(database="postgres").render_as_string(hide_password=False)
        return
    if procs.port_open("127.0.0.1", 5432):
        yield "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
        return
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o755)  # as root, the server runs as another user that must reach it
    with services.embedded_postgres(tmp / "data", database="postgres") as server:
        yield server.address


def _dsn(url: str, database: str | None = None) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url).set(drivername="postgresql")
    if database is not None:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def database(server_url: str, prefix: str = "loquetier_svcbench") -> AsyncIterator[str]:
    """A fresh, migrated database named ``<prefix>_<random>`` on ``server_url``; dropped afterwards."""
    import asyncpg
    from sqlalchemy.engine import make_url

    from loquetier.db import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(_dsn(server_url, "postgres"))
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        await migrate.upgrade_async(url)
        yield url
    finally:
        conn = await asyncpg.connect(_dsn(server_url, "postgres"))
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def db_counters(url: str) -> dict[str, float]:
    """The database's transaction and row-write counters (``pg_stat_database``) and the time."""
    import asyncpg

    conn = await asyncpg.connect(_dsn(url))
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return {"t": time.perf_counter(), **{k: float(row[k]) for k in row.keys()}}  # noqa: SIM118


def db_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    dt = max(after["t"] - before["t"], 1e-9)
    writes = sum(after[k] - before[k] for k in ("tup_inserted", "tup_updated", "tup_deleted"))
    return {"commits_per_s": (after["xact_commit"] - before["xact_commit"]) / dt, "row_writes_per_s": writes / dt,
            "rows_inserted": after["tup_inserted"] - before["tup_inserted"],
            "rows_updated": after["tup_updated"] - before["tup_updated"],
            "commits": after["xact_commit"] - before["xact_commit"]}


async def request_rows(url: str, request_ids: list[str]) -> dict[str, tuple[str, int | None]]:
    """request_id -> (status, completion_tokens) of the ``inference_requests`` rows."""
    import asyncpg

    conn = await asyncpg.connect(_dsn(url))
    try:
        rows = await conn.fetch(
            "SELECT request_id, status, completion_tokens FROM inference_requests WHERE request_id = ANY($1)",
            request_ids,
        )
    finally:
        await conn.close()
    return {r["request_id"]: (r["status"], r["completion_tokens"]) for r in rows}


# --- the worker process ---------------------------------------------------------------------------


def spawn_worker(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "loquetier.cli", "worker", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def stop_worker(proc: subprocess.Popen[bytes], timeout_s: float = 40.0) -> int | None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


# --- CPU time by thread (Linux /proc) -------------------------------------------------------------

ENGINE_THREAD = "lq-engine"  # workers/thread_names.py
DETOK_THREAD = "lq-detok"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes and theirs (the worker's engine process)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    kids = [int(k) for k in (task / "children").read_text().split()]
                    found.extend(kids)
                    todo.extend(kids)
    return found


ENGINE_PROC = "@engine"  # suffix of the names of threads in the worker's engine process


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, user + system CPU seconds so far), the worker's threads and those of its
    child processes (named ``<name>@engine``)."""
    out: dict[int, tuple[str, float]] = {}
    for owner in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{owner}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    raw = (task / "stat").read_text()
                    name = raw[raw.index("(") + 1 : raw.rindex(")")]
                    fields = raw[raw.rindex(")") + 2 :].split()
                    out[int(task.name)] = (name if owner == pid else name + ENGINE_PROC,
                                           (int(fields[11]) + int(fields[12])) / _TICK)  # utime, stime
    return out


def thread_role(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "event loop (main thread)"
    if name.removesuffix(ENGINE_PROC) == ENGINE_THREAD:
        return "engine thread"
    if name.startswith(DETOK_THREAD):
        return "detokenizer thread"
    if name.endswith(ENGINE_PROC):
        return "engine process: other threads"
    return "other threads"


def cpu_split(pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              seconds: float) -> dict[str, Any]:
    """CPU seconds by role between two samples, and as a share of one core over ``seconds``."""
    roles: dict[str, float] = {}
    names: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        role = thread_role(pid, tid, name)
        roles[role] = roles.get(role, 0.0) + used
        names[name] = names.get(name, 0.0) + used
    total = sum(roles.values())
    return {
        "cpu_s": {k: round(v, 3) for k, v in sorted(roles.items())},
        "core_share": {k: round(v / max(seconds, 1e-9), 3) for k, v in sorted(roles.items())},
        "total_cpu_s": round(total, 3),
        "by_thread_name": {k: round(v, 3) for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:12]},
    }


# --- the worker's Prometheus metrics --------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def buckets(text: str, name: str = "loquetier_event_loop_lag_seconds") -> list[tuple[float, float]]:
    """The cumulative buckets ``(le, count)`` of histogram ``name`` in a scrape."""
    pattern = re.compile(rf'^{re.escape(name)}_bucket\{{le="([^"]+)"\}} ([0-9.e+]+)$', re.M)
    return [(float(le), float(n)) for le, n in pattern.findall(text)]


def lag_buckets(text: str) -> list[tuple[float, float]]:
    return buckets(text)


def lag_percentile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> dict[str, float]:
    """The q-th percentile of a histogram (the loop lag) between two scrapes, interpolated inside its
    bucket (ms)."""
    prev = dict(before)
    cum = [(le, n - prev.get(le, 0.0)) for le, n in after]
    total = cum[-1][1] if cum else 0.0
    if total <= 0:
        return {"num": 0.0, "ms": float("nan")}
    want = q / 100 * total
    lo_edge, lo_n = 0.0, 0.0
    for le, n in cum:
        if n >= want:
            if le == float("inf"):
                return {"num": total, "ms": lo_edge * 1e3}
            frac = (want - lo_n) / max(n - lo_n, 1e-9)
            return {"num": total, "ms": (lo_edge + frac * (le - lo_edge)) * 1e3, "bucket_le_ms": le * 1e3}
        lo_edge, lo_n = le, n
    return {"num": total, "ms": float("nan")}


def log_lines(path: Path, msg: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines whose message is ``msg``."""
    import json

    found = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"msg": "{msg}"' in line:
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


async def wait_for(predicate: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None,
                   log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log is not None else ""
            raise RuntimeError(f"the worker exited (rc {proc.returncode}) while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}; the worker's log ends:\n{tail}")
        await asyncio.sleep(0.05)
