"""``loquetier worker --model DIR``: one worker process (broker and database from settings)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from loquetier.cli_errors import UserError, require_bootstrap, require_database
from loquetier.settings import Settings, get_settings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("worker", help="run a worker: consume requests/jobs, serve and train on one device")
    p.add_argument("--model", default=None,
                   help="a local Hugging Face Llama-family model directory (default: LOQUETIER_ENGINE__MODEL_DIR)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: settings, 'auto')")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: settings, 'auto')")
    p.add_argument("--partitions", type=int, default=None, help="partitions of topics created at start")
    p.add_argument("--worker-id", default=None, help="default: LOQUETIER_WORKER__ID or <host>-worker")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0 = off)")
    p.add_argument("--max-jobs", type=int, default=2, help="training/eval jobs run at once here")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run_worker)


def resolve_device(device: str | None, dtype: str | None, settings: Settings) -> tuple[str, str]:
    device = device or settings.engine.device
    dtype = dtype or settings.engine.dtype
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def check_model_dir(model: Any) -> None:
    from pathlib import Path

    path = Path(model).expanduser()
    if not path.is_dir():
        raise UserError(f"no model directory {model}", "give --model a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{model} is not a Hugging Face model directory (no config.json)",
                        "it needs config.json, *.safetensors and the tokenizer files")


def run_worker(args: argparse.Namespace) -> int:
    from loquetier import services

    from . import logs, metrics

    logs.configure(args.log_level)
    settings = get_settings()
    updates: dict[str, Any] = {}
    if args.worker_id:
        updates["id"] = args.worker_id
    if args.metrics_port is not None:
        updates["metrics_port"] = args.metrics_port
    if updates:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update=updates)})
    bootstrap, database_url = settings.kafka.bootstrap, settings.database.url
    if bootstrap is None or database_url is None:
        print(
            "set LOQUETIER_KAFKA__BOOTSTRAP and LOQUETIER_DATABASE__URL (or run `loquetier up`)",
            file=sys.stderr,
        )
        return 2
    model = args.model or settings.engine.model_dir
    if model is None:
        print("give --model DIR or set LOQUETIER_ENGINE__MODEL_DIR", file=sys.stderr)
        return 2
    check_model_dir(model)  # before any connection: a typo fails at once, not after the broker setup
    require_bootstrap(bootstrap)
    require_database(database_url)
    partitions = args.partitions or settings.kafka.num_partitions
    created = asyncio.run(
        services.create_topics(
            bootstrap,
            settings.kafka.topics(),
            num_partitions=partitions,
            replication_factor=settings.kafka.replication_factor,
        )
    )
    if created:
        log.info("topics created", extra={"topics": created, "partitions": partitions})
    device, dtype = resolve_device(args.device, args.dtype, settings)
    from .engine_process import EngineProcessFailed, EngineSpec, ProcessEngineClient, build_engine

    # The engine thread (or process) gives the GIL up at every wait for the GPU; another thread then
    # holds it until the interpreter's switch interval (5 ms by default) forces a hand-back. A short
    # interval bounds how long a step that is ready to run waits.
    switch_s = settings.worker.gil_switch_interval_ms / 1000
    spec = EngineSpec(str(model), device, dtype, settings.engine.limits(), switch_interval_s=switch_s,
                      log_level=args.log_level)
    engine: Any
    if settings.worker.engine_process:
        engine = ProcessEngineClient(spec, on_step=metrics.observe_step)
        try:
            engine.launch()
        except EngineProcessFailed as exc:
            print(f"worker not started: its engine could not start: {exc.reason}", file=sys.stderr)
            return 1
    else:
        engine = build_engine(spec)
    metrics.serve(settings.worker.metrics_port)
    sys.setswitchinterval(switch_s)
    try:
        failure = asyncio.run(_serve(engine, settings, bootstrap, database_url, device=device,
                                     max_jobs=args.max_jobs))
    finally:
        if isinstance(engine, ProcessEngineClient):
            engine.abandon()  # a no-op after a clean stop; else the engine process must not outlive us
    if failure is not None:  # non-zero, so that a supervisor (restart on failure) starts a fresh worker
        print(f"worker stopped: its engine failed: {failure}", file=sys.stderr)
        return 1
    return 0


async def _serve(
    engine: Any, settings: Settings, bootstrap: str, database_url: str, *, device: str, max_jobs: int
) -> str | None:
    """Run a worker until it stops; returns why its engine failed, or None."""
    from .runtime import Worker

    worker = Worker(engine, settings, bootstrap=bootstrap, database_url=database_url, device=device, max_jobs=max_jobs)
    worker.install_signal_handlers()
    await worker.run()
    return worker.engine_failure
