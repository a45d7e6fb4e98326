"""``loquetier gateway`` (the HTTP server) and ``loquetier keys create|list|revoke``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from loquetier.settings import Settings, get_settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway (/v1 chat, files, fine-tuning)")
    p.add_argument("--host", default=None, help="default: LOQUETIER_GATEWAY__HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: LOQUETIER_GATEWAY__PORT (8000)")
    p.add_argument("--model", default=None,
                   help="the workers' model directory, if readable here: its name is the base model's in /v1/models, "
                        "its tokenizer.json gives logprobs their token texts (default: LOQUETIER_ENGINE__MODEL_DIR)")
    p.add_argument("--model-name", default=None, help="the base model's name in /v1/models (default: its directory)")
    p.add_argument("--gateway-id", default=None, help="names this gateway's reply topic (default: <host>-gateway)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_gateway)

    keys = subparsers.add_parser("keys", help="API keys of the gateway (stored hashed in PostgreSQL)")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a key; prints it as the last line (shown only once)")
    create.add_argument("name")
    create.add_argument("--tenant", default=None, help="the tenant that owns what the key creates (default: NAME)")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute allowed to this key (per gateway)")
    create.add_argument("--tpm", type=int, default=None,
                        help="tokens per minute (prompt and completion) allowed to this key (per gateway)")
    create.set_defaults(func=_keys_create)
    listing = sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant", default=None)
    listing.set_defaults(func=_keys_list)
    revoke = sub.add_parser("revoke", help="revoke a key by its key_id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_keys_revoke)


def _addresses(settings: Settings) -> tuple[str, str] | None:
    bootstrap, url = settings.kafka.bootstrap, settings.database.url
    if bootstrap is None or url is None:
        print("set LOQUETIER_KAFKA__BOOTSTRAP and LOQUETIER_DATABASE__URL (or run `loquetier up`)", file=sys.stderr)
        return None
    return bootstrap, url


def _check_port_free(host: str, port: int) -> None:
    """One clear line, before the server starts, when something already listens on ``host:port``."""
    import socket

    from loquetier.cli_errors import UserError

    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                            "another gateway (the one `loquetier up` starts listens on 8000) or program has "
                            "that port: give --port another one") from None


def run_gateway(args: argparse.Namespace) -> int:
    from loquetier.workers import logs

    from .server import serve

    logs.configure(args.log_level.upper())
    settings = get_settings()
    updates = {k: v for k, v in {"host": args.host, "port": args.port, "model_name": args.model_name,
                                 "id": args.gateway_id}.items() if v is not None}
    if updates:
        gateway = settings.gateway.model_validate(settings.gateway.model_dump() | updates)
        settings = settings.model_copy(update={"gateway": gateway})
    if args.model:
        engine = settings.engine.model_copy(update={"model_dir": Path(args.model)})
        settings = settings.model_copy(update={"engine": engine})
    addresses = _addresses(settings)
    if addresses is None:
        return 2
    _check_port_free(settings.gateway.host, settings.gateway.port)
    serve(settings, bootstrap=addresses[0], database_url=addresses[1], log_level=args.log_level.lower())
    return 0


async def _tx(url: str, fn: Any) -> Any:
    from loquetier.db.session import create_engine, session_factory

    engine = create_engine(url)
    try:
        async with session_factory(engine).begin() as session:
            return await fn(session)
    finally:
        await engine.dispose()


def _database_url() -> str | None:
    url = get_settings().database.url
    if url is None:
        print("no database: set LOQUETIER_DATABASE__URL (or run `loquetier up`)", file=sys.stderr)
    return url


def _keys_create(args: argparse.Namespace) -> int:
    from loquetier.db import keys_repo

    url = _database_url()
    if url is None:
        return 2
    for flag, value in (("--rpm", args.rpm), ("--tpm", args.tpm)):
        if value is not None and not 0 < value < 2**31:
            print(f"{flag} must be > 0 and below 2^31", file=sys.stderr)
            return 2
    tenant = args.tenant or args.name
    row, key = asyncio.run(_tx(url, lambda s: keys_repo.create_key(
        s, name=args.name, tenant_id=tenant, max_requests_per_minute=args.rpm, max_tokens_per_minute=args.tpm)))
    print(f"key_id {row.key_id} for tenant {tenant!r} (keep the key: it is not stored, only its hash)")
    print(key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from loquetier.db import keys_repo

    url = _database_url()
    if url is None:
        return 2
    rows = asyncio.run(_tx(url, lambda s: keys_repo.list_keys(s, args.tenant)))
    print(f"{'key_id':<22} {'tenant':<20} {'name':<20} {'rpm':>6} {'tpm':>9}  state")
    for r in rows:
        state = "revoked" if r.revoked_at is not None else "active"
        print(f"{r.key_id:<22} {r.tenant_id:<20} {r.name:<20} {r.max_requests_per_minute or '-':>6} "
              f"{r.max_tokens_per_minute or '-':>9}  {state}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from loquetier.db import keys_repo

    url = _database_url()
    if url is None:
        return 2
    if not asyncio.run(_tx(url, lambda s: keys_repo.revoke_key(s, args.key_id))):
        print(f"no active key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id} (gateways stop accepting it within their key cache time)")
    return 0
