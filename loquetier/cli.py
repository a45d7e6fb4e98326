"""``loquetier``: one argparse tree; each area adds its subcommands with ``register(subparsers)``.

- here: ``migrate``, ``--version``, ``--debug``; a command's mistakes are ``UserError``s
  (``loquetier.cli_errors``): printed as one or two lines, with a non-zero exit
- ``loquetier.workers.cli``: ``worker``
- ``loquetier.producers.cli_submit``: ``submit generate|train``, ``results``
- ``loquetier.producers.cli_tables``: ``jobs``, ``requests``, ``adapters`` (with
  ``loquetier.producers.cli_control``: ``adapters load|unload|export``, ``jobs cancel|pause|resume``)
- ``loquetier.gateway.cli``: ``gateway``, ``keys create|list|revoke``
- ``loquetier.cli_stack``: ``up``, ``down``, ``env``, ``sql``; ``loquetier.cli_demo``: ``demo``
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
    "loquetier.cli_stack",
    "loquetier.cli_demo",
)

Command = Callable[[argparse.Namespace], int]


def _migrate(args: argparse.Namespace) -> int:
    from loquetier.cli_errors import require_database
    from loquetier.db.migrate import upgrade
    from loquetier.settings import get_settings

    url = require_database(args.database_url or get_settings().database.url)
    upgrade(url, args.revision)
    print(f"migrated to {args.revision}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("migrate", help="apply the database migrations (alembic upgrade)")
    p.add_argument("--database-url", help="default: LOQUETIER_DATABASE__URL")
    p.add_argument("--revision", default="head")
    p.set_defaults(func=_migrate)


def build_parser() -> argparse.ArgumentParser:
    from loquetier import __version__

    parser = argparse.ArgumentParser(
        prog="loquetier",
        description="Fine-tune and serve many LoRA adapters on one shared base LLM.",
        epilog="Start here: `loquetier up`, then `loquetier submit generate \"Hello\"`. "
        "Examples of jobs and data: examples/ in the repository.",
    )
    parser.add_argument("--version", action="version", version=f"loquetier {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    is_debug = "--debug" in argv  # anywhere on the line, also after the subcommand
    argv = [a for a in argv if a != "--debug"]
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "passthrough"):  # argparse's own message, with the subcommand's usage
        (_subcommand_parser(parser, args) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # `loquetier sql -c ... -t`: psql's own options, in the order given
        args.passthrough = argv[argv.index(args.command) + 1 :]
    args.debug = is_debug
    func: Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if is_debug:
            raise
        return _report(exc)


def _subcommand_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser | None:
    """The parser of the subcommand ``args`` ran (nested ones too: ``jobs pause``), if any."""
    found = None
    current: argparse.ArgumentParser | None = parser
    while current is not None:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            break
        chosen = getattr(args, actions[0].dest or "", None) if actions[0].dest else None
        current = actions[0].choices.get(chosen) if isinstance(chosen, str) else None
        found = current or found
    return found


def _database_url() -> str:
    """The configured database URL, or "" where the settings cannot be read."""
    try:
        from loquetier.settings import get_settings

        return str(get_settings().database.url or "")
    except Exception:  # noqa: BLE001 - only a better message depends on it
        return ""


def _report(exc: Exception) -> int:
    """One or two lines for the user; the traceback only with ``--debug``."""
    from loquetier.cli_errors import UserError, database_error

    if not isinstance(exc, UserError):
        exc = database_error(exc, _database_url())
    if isinstance(exc, UserError):
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  {exc.hint}", file=sys.stderr)
        return exc.exit_code
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    print(f"error: {type(exc).__name__}: {text}", file=sys.stderr)
    print("  run it again with --debug for the traceback", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
