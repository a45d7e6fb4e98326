"""A whole service for the chaos runs: its own tansu broker and PostgreSQL (so restarting them
disturbs nobody else), the real worker as a child process on a tiny model, and a client.

The worker runs as ``loquetier worker`` does in production, started through
:mod:`tests.chaos.crashy`: the same worker, except that its process dies on one "pill"
prompt (nothing else changes). The stack restarts it when told, like a supervisor would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from loquetier import services
from loquetier.db import migrate
from loquetier.db.models import WorkerRow
from loquetier.db.session import create_engine, session_factory
from loquetier.producers.client import LoquetierClient
from loquetier.settings import Settings
from tests.workers.conftest import make_settings
from tests.workers.procs import WorkerProcess

OPERATOR_TOKEN = "chaos-operator"
PILL = [251, 252, 253, 254]  # the prompt that makes tests.chaos.crashy's engine die


@dataclass
class Options:
    """Worker settings of a chaos run (short timings so that faults resolve in seconds)."""

    heartbeat_s: float = 0.5
    lease_s: float = 3.0
    max_attempts: int = 2
    drain_timeout_s: float = 3.0
    engine_stall_s: float = 20.0
    reconcile_every_s: float = 2.0
    env: dict[str, str] = field(default_factory=dict)
    adapter_dir: Path = Path("adapters")  # set under the stack's directory by the stack

    def worker_env(self) -> dict[str, str]:
        return {
            "LOQUETIER_WORKER__MAX_ATTEMPTS": str(self.max_attempts),
            "LOQUETIER_WORKER__DRAIN_TIMEOUT_S": str(self.drain_timeout_s),
            "LOQUETIER_WORKER__ENGINE_STALL_S": str(self.engine_stall_s),
            "LOQUETIER_WORKER__RECONCILE_EVERY_S": str(self.reconcile_every_s),
            "LOQUETIER_WORKER__OPERATOR_TOKEN": OPERATOR_TOKEN,
            "LOQUETIER_ENGINE__MAX_NUM_SEQS": "32",
            "CHAOS_PILL": json.dumps(PILL),
            "LOQUETIER_WORKER__ADAPTER_DIR": str(self.adapter_dir),
            **self.env,
        }


class Stack:
    def __init__(self, root: Path, model_dir: Path, options: Options) -> None:
        self.root = root
        self.model_dir = model_dir
        self.options = options
        self.options.adapter_dir = root / "adapters"
        self.broker: services.ServiceProcess | None = None
        self.postgres: services.ServiceProcess | None = None
        self.settings: Settings | None = None
        self.worker: WorkerProcess | None = None
        self.worker_id = f"chaos-{uuid.uuid4().hex[:6]}"
        self.num_starts = 0

    # --- services ---------------------------------------------------------------------------

    @property
    def cfg(self) -> Settings:
        assert self.settings is not None
        return self.settings

    async def start_services(self) -> None:
        self.broker = services.start_broker(log_dir=self.root / "broker")
        pg_root = self.root / "pg"
        pg_root.mkdir(mode=0o755)
        self.postgres = await asyncio.to_thread(services.start_postgres, data_dir=pg_root / "data")
        await migrate.upgrade_async(self.postgres.address)
        self.settings = make_settings(self.broker.address, self.postgres.address, f"c{uuid.uuid4().hex[:6]}",
                                      heartbeat_s=self.options.heartbeat_s, lease_s=self.options.lease_s)
        await self.create_topics()

    async def create_topics(self) -> None:
        assert self.broker is not None
        await services.create_topics(self.broker.address, self.cfg.kafka.topics(), num_partitions=2)

    async def restart_broker(self, down_s: float) -> None:
        assert self.broker is not None
        port = int(self.broker.address.rsplit(":", 1)[1])
        services.stop_service(self.broker)
        await asyncio.sleep(down_s)
        self.broker = services.start_broker(log_dir=self.root / "broker", port=port)
        await self.create_topics()

    def stop_broker(self) -> None:
        assert self.broker is not None
        services.stop_service(self.broker)

    async def start_broker_again(self) -> None:
        assert self.broker is not None
        port = int(self.broker.address.rsplit(":", 1)[1])
        self.broker = services.start_broker(log_dir=self.root / "broker", port=port)
        await self.create_topics()

    async def restart_postgres(self, down_s: float) -> None:
        assert self.postgres is not None and self.postgres.data_dir is not None
        port = int(self.postgres.address.rsplit(":", 1)[1].split("/")[0])
        services.stop_service(self.postgres)
        await asyncio.sleep(down_s)
        self.postgres = await asyncio.to_thread(services.start_postgres, data_dir=Path(self.postgres.data_dir),
                                                port=port)

    def stop_services(self) -> None:
        for service in (self.broker, self.postgres):
            if service is not None:
                services.stop_service(service)

    # --- the worker -------------------------------------------------------------------------

    def start_worker(self) -> None:
        self.worker = WorkerProcess(self.cfg, self.worker_id, self.model_dir, self.root,
                                    module="tests.chaos.crashy", extra_env=self.options.worker_env())
        self.num_starts += 1

    def is_alive(self) -> bool:
        return self.worker is not None and self.worker.proc.poll() is None

    def kill_worker(self) -> None:
        assert self.worker is not None
        self.worker.kill()

    def terminate_worker(self, timeout: float = 60) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds to exit)."""
        assert self.worker is not None
        started = time.monotonic()
        code = self.worker.terminate(timeout)
        return code, time.monotonic() - started

    def logs(self, since: int = 0) -> list[dict[str, Any]]:
        return self.worker.logs()[since:] if self.worker is not None else []

    async def wait_serving(self, timeout: float = 120, *, since: int | None = None) -> None:
        """Until the worker (started after log line ``since``) has its partitions and a fresh row."""
        since = len(self.logs()) if since is None else since
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.worker is not None and not self.is_alive():
                raise RuntimeError(f"the worker exited with {self.worker.proc.returncode}: {self.tail()}")
            assigned = any(e.get("msg") == "partitions assigned" for e in self.logs(since))
            if assigned and await self.worker_status() == "running":
                return
            await asyncio.sleep(0.25)
        raise TimeoutError(f"the worker never started serving: {self.tail()}")

    def tail(self, num: int = 8) -> list[str]:
        return [str(e.get("msg")) + " " + str(e.get("error", "")) for e in self.logs()[-num:]]

    async def worker_status(self) -> str | None:
        return await self.query(lambda s: s.scalar(select(WorkerRow.status).where(
            WorkerRow.worker_id == self.worker_id)))

    async def query(self, fn: Any) -> Any:
        assert self.postgres is not None
        engine = create_engine(self.postgres.address)
        try:
            async with session_factory(engine).begin() as s:
                return await fn(s)
        finally:
            await engine.dispose()

    @asynccontextmanager
    async def client(self) -> AsyncIterator[LoquetierClient]:
        assert self.broker is not None
        async with LoquetierClient(self.broker.address, self.cfg.kafka) as client:
            yield client


@asynccontextmanager
async def chaos_stack(model_dir: Path, options: Options | None = None) -> AsyncIterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="loquetier-chaos-"))
    root.chmod(0o755)  # the embedded PostgreSQL runs as another user that must reach its directory
    stack = Stack(root, model_dir, options or Options())
    try:
        await stack.start_services()
        stack.start_worker()
        await stack.wait_serving(since=0)
        yield stack
    finally:
        if stack.worker is not None:
            stack.worker.terminate(20)
        stack.stop_services()
        shutil.rmtree(root, ignore_errors=True)
