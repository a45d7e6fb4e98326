"""``loquetier adapters load|unload|export`` and ``loquetier jobs cancel|pause|resume``.

Each control command waits for the worker's ``control_ack`` (docs/wire-format.md) and says
what happened in one line: done, the worker's reason, or no answer within ``--timeout``.
``export`` needs no worker: it reads the adapter's stored version from PostgreSQL and writes
it as a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``).
``register`` returns the subcommands it made, for ``cli_tables`` to add ``jobs events``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path
from typing import Any

from loquetier.cli_errors import UserError
from loquetier.settings import get_settings

from .cli_support import client, database_url, kafka_settings, query

ACTIONS = {"adapters": ("load", "unload", "export"), "jobs": ("cancel", "pause", "resume")}
DEFAULT_TIMEOUT_S = 30.0
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
HINTS = {  # what to try next, by the worker's error code (also for `jobs events`, cli_tables)
    "unknown_adapter": "`loquetier adapters` lists the adapters",
    "unknown_job": "`loquetier jobs` lists the jobs",
    "unknown_target": "`loquetier jobs` and `loquetier requests` list what can be cancelled",
    "invalid_state": "`loquetier jobs` shows the job's status",
    "forbidden_path": "the worker reads adapters only under LOQUETIER_WORKER__ADAPTER_DIR "
    "or LOQUETIER_WORKER__ADAPTER_ROOTS on its own machine",
    "not_found": "the path is read on the worker's machine",
    "bad_adapter": "a PEFT LoRA directory for this base model is expected",
}


def register(table: str, parser: argparse.ArgumentParser) -> Any:
    sub = parser.add_subparsers(dest="action", metavar="[ACTION]", required=False)
    if table == "adapters":
        load = sub.add_parser("load", help="load a PEFT adapter directory under ADAPTER_ID, on every worker")
        load.add_argument("adapter_id")
        load.add_argument("path", type=Path, help="a PEFT directory (adapter_config.json + adapter_model.safetensors)")
        unload = sub.add_parser("unload", help="archive an adapter: every worker drops it")
        unload.add_argument("adapter_id")
        export = sub.add_parser("export", help="write an adapter's stored version as a PEFT directory")
        export.add_argument("adapter_id")
        export.add_argument("dir", type=Path, help="the directory to write (must not hold another adapter)")
        export.add_argument("--version", type=int, default=None, help="default: the latest ready version")
        export.add_argument("--force", action="store_true", help="overwrite the adapter files in DIR")
        export.set_defaults(func=_export)
        for p in (load, unload):
            p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for a worker")
            p.set_defaults(func=_control)
    else:
        for action in ACTIONS["jobs"]:
            if action == "cancel":
                p = sub.add_parser(action, help="cancel a training job, or a running request by its request id "
                                                "(`loquetier requests` lists them; the worker acknowledges it)")
                p.add_argument("job_id", metavar="ID", help="a job id or a request id")
            else:
                p = sub.add_parser(action, help=f"{action} a training job (the worker acknowledges it)")
                p.add_argument("job_id")
            p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for a worker")
            p.set_defaults(func=_control)
    return sub


# --- commands through the worker --------------------------------------------------------------


def _control(args: argparse.Namespace) -> int:
    target = args.adapter_id if args.table == "adapters" else args.job_id
    path = str(staged_path(args.adapter_id, args.path)) if args.action == "load" else None
    kafka = kafka_settings()
    ack = asyncio.run(_send(kafka, args.action, target, path, args.timeout))
    if not ack.ok:
        print(f"error {ack.code}: {ack.message}")
        hint = HINTS.get(ack.code or "")
        if hint:
            print(f"  {hint}")
        return 1
    done = {"load": "loaded", "unload": "unloaded", "cancel": "cancelled", "pause": "paused", "resume": "resumed"}
    version = f" v{ack.adapter_version}" if ack.adapter_version is not None else ""
    detail = f": {ack.message}" if ack.message else ""
    print(f"{done[args.action]} {target}{version} (worker {ack.worker_id}){detail}")
    return 0


async def _send(kafka: Any, action: str, target: str, path: str | None, timeout: float) -> Any:
    async with client(kafka) as producer:
        try:
            return await producer.control(action, target, path=path, wait=True, timeout=timeout)
        except TimeoutError:
            raise UserError(
                f"no worker acknowledged the {action} of {target!r} within {timeout:.0f} s",
                "is a worker running? `loquetier up` starts one; its log says why it stopped",
            ) from None


def staged_path(adapter_id: str, path: Path) -> Path:
    """``path`` as a worker on this machine may read it: as it is when under the adapter roots,
    else copied into ``LOQUETIER_WORKER__ADAPTER_DIR/<adapter_id>`` (the worker reads only there)."""
    source = path.expanduser().resolve()
    if not source.is_dir():
        raise UserError(f"no such adapter directory: {path}", "a PEFT directory holds " + " and ".join(PEFT_FILES))
    missing = [name for name in PEFT_FILES if not (source / name).is_file()]
    if missing:
        raise UserError(f"{path} is not a PEFT adapter directory: no {', '.join(missing)}",
                        "`loquetier adapters export` and PEFT's save_pretrained write both files")
    worker = get_settings().worker
    roots = [Path(r).expanduser().resolve() for r in (worker.adapter_dir, *getattr(worker, "adapter_roots", ()))]
    if any(source.is_relative_to(root) for root in roots):
        return source
    staged = roots[0] / adapter_id
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for name in PEFT_FILES:
        shutil.copyfile(source / name, staged / name)
    print(f"copied {path} to {staged} (the adapter directory workers read)")
    return staged


# --- export (PostgreSQL only) -----------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    out: Path = args.dir
    present = [name for name in PEFT_FILES if (out / name).exists()]
    if present and not args.force:
        raise UserError(f"{out} already holds {', '.join(present)}", "choose another directory or add --force")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    version = asyncio.run(export_adapter(database_url(), args.adapter_id, out, version=args.version))
    print(f"exported {args.adapter_id} v{version} to {out} (PEFT: PeftModel.from_pretrained(model, {str(out)!r}))")
    return 0


async def export_adapter(url: str, adapter_id: str, out: Path, *, version: int | None = None) -> int:
    """Write ``adapter_id``'s stored version (default: latest ready) to ``out``; returns the version."""
    from loquetier.db import repo
    from loquetier.lora.adapter import LoRAAdapter
    from loquetier.lora.config import AdapterError
    from loquetier.workers.adapters import read_payload

    row = await query(url, lambda s: repo.get_adapter(s, adapter_id, version))
    if row is None:
        which = f"version {version} of" if version is not None else "ready version of"
        raise UserError(f"no {which} adapter {adapter_id!r} in the database", "`loquetier adapters` lists them")
    try:
        payload = await asyncio.to_thread(read_payload, row.data, row.uri, row.sha256)
        adapter = LoRAAdapter.from_bytes(payload)
    except (OSError, ValueError, AdapterError) as exc:
        raise UserError(f"adapter {adapter_id!r} v{row.version} cannot be read: {exc}") from None
    await asyncio.to_thread(adapter.save, out)
    return int(row.version)
