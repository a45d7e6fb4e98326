"""The worker that ``loquetier up`` / ``demo`` run in the background, and waiting until it serves.

State: ``<cache>/worker.json`` (its pid), log: ``<cache>/logs/worker.log``. A second ``up`` finds
the running worker instead of starting another. :func:`wait_ready` returns once the worker's row
says it serves and it has answered a one-token request through the broker (the consumer group
has joined), or raises with the tail of its log when it died.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from loquetier import procs
from loquetier.settings import Settings

WORKER_ID = "local-worker"


def state_path(settings: Settings) -> Path:
    return settings.cache_dir / "worker.json"


def log_path(settings: Settings) -> Path:
    return settings.cache_dir / "logs" / "worker.log"


def running_pid(settings: Settings) -> int | None:
    """The pid of the worker a previous ``up`` started, when it still runs."""
    try:
        pid = int(json.loads(state_path(settings).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if procs.is_alive(pid) and procs.cmdline_contains(pid, "worker") else None


def start(model: Path, settings: Settings, bootstrap: str, database_url: str,
          device: str | None) -> subprocess.Popen[bytes]:
    log = log_path(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOQUETIER_KAFKA__BOOTSTRAP": bootstrap, "LOQUETIER_DATABASE__URL": database_url,
           "LOQUETIER_CACHE_DIR": str(settings.cache_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "loquetier.cli", "worker", "--model", str(model), "--worker-id", WORKER_ID,
           "--metrics-port", "0"]
    if device:
        cmd += ["--device", device]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state_path(settings).write_text(json.dumps({"pid": proc.pid}))
    return proc


def stop(settings: Settings, timeout: float = 30.0) -> bool:
    path = state_path(settings)
    if not path.is_file():
        return False
    pid = running_pid(settings)
    path.unlink(missing_ok=True)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)  # graceful: drain, hand back jobs, commit
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    return True


class WorkerDied(RuntimeError):
    """The background worker exited while we waited for it."""


async def wait_ready(settings: Settings, bootstrap: str, database_url: str, pid: int, *,
                     timeout_s: float) -> float:
    """Seconds until the worker ``pid`` answered a request; WorkerDied / TimeoutError otherwise."""
    started = time.monotonic()
    deadline = started + timeout_s
    await _wait_serving(settings, database_url, pid, deadline)
    from loquetier.producers.client import LoquetierClient

    async with LoquetierClient(bootstrap, settings.kafka.model_copy(update={"bootstrap": bootstrap})) as client:
        rid = await client.submit_generate(prompt_token_ids=[1, 2], max_tokens=1,
                                           request_id=f"up-probe-{uuid.uuid4().hex[:16]}")
        probe = asyncio.ensure_future(client.wait_result(rid, timeout=max(1.0, deadline - time.monotonic())))
        while not probe.done():
            await asyncio.wait([probe], timeout=0.5)
            if not probe.done() and not procs.is_alive(pid):
                probe.cancel()
                raise WorkerDied(_died(settings))
        probe.result()  # an error result is an answer too: the worker takes requests
    return time.monotonic() - started


async def _wait_serving(settings: Settings, database_url: str, pid: int, deadline: float) -> None:
    from loquetier.db import repo
    from loquetier.db.session import create_engine, session_factory

    engine = create_engine(database_url)
    try:
        while time.monotonic() < deadline:
            if not procs.is_alive(pid):
                raise WorkerDied(_died(settings))
            async with session_factory(engine)() as session:
                status = await repo.worker_status(session, WORKER_ID)
            if status == "running":
                return
            await asyncio.sleep(0.5)
    finally:
        await engine.dispose()
    raise TimeoutError("the worker did not start serving in time")


def _died(settings: Settings) -> str:
    return f"the worker exited while starting; the end of {log_path(settings)}:\n{procs.tail(log_path(settings), 8)}"
