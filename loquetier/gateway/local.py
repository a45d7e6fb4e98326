"""A gateway beside ``loquetier up``'s worker: a background process and a key for the local user.

``start`` runs ``loquetier gateway`` in its own process group (log: ``<cache>/logs/gateway.log``,
state: ``<cache>/gateway.json``), reusing one that a previous ``up`` left running; ``local_key``
keeps the local user's key in ``<cache>/gateway.key`` (mode 600) and makes a new one when that
key no longer works (a fresh database). ``exports`` are the lines that make the plain ``openai``
client talk to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from loquetier import procs
from loquetier.settings import Settings

GATEWAY_ID = "local-gateway"
LOCAL_TENANT = "local"


def _state(settings: Settings) -> Path:
    return settings.cache_dir / "gateway.json"


async def _key(database_url: str, key: str | None) -> str | None:
    """``key`` if it works in this database, else a new key for the local tenant."""
    from loquetier.db import keys_repo
    from loquetier.db.session import create_engine, session_factory

    engine = create_engine(database_url)
    try:
        async with session_factory(engine).begin() as s:
            if key is not None and await keys_repo.find_key(s, key) is not None:
                return key
            _, new = await keys_repo.create_key(s, name="local", tenant_id=LOCAL_TENANT)
            return new
    finally:
        await engine.dispose()


def local_key(settings: Settings, database_url: str) -> str:
    path = settings.cache_dir / "gateway.key"
    old = path.read_text().strip() if path.is_file() else None
    key = asyncio.run(_key(database_url, old))
    assert key is not None
    if key != old:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(key + "\n")
    return key


def running(settings: Settings) -> tuple[int, str] | None:
    """(pid, base URL) of the gateway a previous ``start`` left running."""
    try:
        state = json.loads(_state(settings).read_text())
    except (OSError, ValueError):
        return None
    pid, port = int(state["pid"]), int(state["port"])
    if procs.is_alive(pid) and procs.cmdline_contains(pid, "gateway"):
        return pid, f"http://127.0.0.1:{port}/v1"
    return None


def start(settings: Settings, bootstrap: str, database_url: str, *, model_name: str,
          model_dir: Path | None = None) -> tuple[int, str]:
    """Start (or find) the local gateway; returns (pid, base URL ending in /v1)."""
    found = running(settings)
    if found is not None:
        return found
    port = settings.gateway.port
    if procs.port_open("127.0.0.1", port):
        port = procs.free_port()
    env = {**os.environ, "LOQUETIER_KAFKA__BOOTSTRAP": bootstrap, "LOQUETIER_DATABASE__URL": database_url}
    if model_dir is not None:
        env["LOQUETIER_ENGINE__MODEL_DIR"] = str(model_dir)  # token texts for logprobs
    log_path = settings.cache_dir / "logs" / "gateway.log"
    argv = [sys.executable, "-m", "loquetier.cli", "gateway", "--host", "127.0.0.1", "--port", str(port),
            "--model-name", model_name, "--gateway-id", GATEWAY_ID, "--log-level", "warning"]
    pid = procs.spawn(argv, log_path=log_path, env=env)
    try:
        procs.wait_until(lambda: procs.port_open("127.0.0.1", port), timeout_s=60, pid=pid, what="gateway",
                         log_path=log_path)
    except Exception:
        procs.stop_group(pid)
        raise
    _state(settings).write_text(json.dumps({"pid": pid, "port": port}))
    return pid, f"http://127.0.0.1:{port}/v1"


def stop(settings: Settings) -> bool:
    found = running(settings)
    _state(settings).unlink(missing_ok=True)
    if found is None:
        return False
    procs.stop_group(found[0])
    return True


def exports(base_url: str, key: str) -> list[str]:
    return [f"export OPENAI_BASE_URL={base_url}", f"export OPENAI_API_KEY={key}"]
