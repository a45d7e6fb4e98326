"""``loquetier``: one argparse tree; each area adds its subcommands with ``register(subparsers)``.

- here: ``migrate``
- ``loquetier.workers.cli``: ``worker``
- ``loquetier.producers.cli_submit``: ``submit generate|train``, ``results``
- ``loquetier.producers.cli_tables``: ``jobs``, ``requests``, ``adapters``
- ``loquetier.gateway.cli``: ``gateway``, ``keys create|list|revoke``
- ``loquetier.cli_demo`` (the lead's; registered when present): ``up``, ``down``, ``demo``
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

REGISTRARS = (
    "loquetier.workers.cli",
    "loquetier.producers.cli_submit",
    "loquetier.producers.cli_tables",
    "loquetier.gateway.cli",
    "loquetier.cli_demo",  # up / down / demo: left to the lead, optional until it exists
)

Command = Callable[[argparse.Namespace], int]


def _migrate(args: argparse.Namespace) -> int:
    from loquetier.db.migrate import upgrade
    from loquetier.settings import get_settings

    url = args.database_url or get_settings().database.url
    if url is None:
        print("no database: set LOQUETIER_DATABASE__URL (or run `loquetier up`)", file=sys.stderr)
        return 2
    upgrade(url, args.revision)
    print(f"migrated to {args.revision}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("migrate", help="apply the database migrations (alembic upgrade)")
    p.add_argument("--database-url", help="default: LOQUETIER_DATABASE__URL")
    p.add_argument("--revision", default="head")
    p.set_defaults(func=_migrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loquetier", description="Fine-tune and serve many LoRA adapters on one shared base LLM."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(subparsers)
    for name in REGISTRARS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
