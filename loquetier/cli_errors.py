"""What the CLI says when the user's setup or input is wrong: one or two lines, never a traceback.

A command raises :class:`UserError` (what is wrong, then what to do); ``loquetier.cli.main``
prints it and exits non-zero (``--debug`` shows the traceback instead). The checks here make a
dead broker or database fail within seconds instead of hanging in a client's retry loop.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

CONNECT_TIMEOUT_S = 3.0  # a reachable local or LAN service answers a TCP connect well within this
UP_HINT = 'start the local stack with `loquetier up`, or load its settings: eval "$(loquetier env)"'


class UserError(Exception):
    """A mistake the user can fix: ``message`` says what is wrong, ``hint`` what to do."""

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    address = address.split(",", maxsplit=1)[0].strip().removeprefix("tcp://")
    host, _, port = address.rpartition(":")
    if not host:
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise UserError(f"{address!r} is not a host:port address") from None


def reachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_bootstrap(bootstrap: str | None) -> str:
    """The configured broker address, answering; else a UserError."""
    if not bootstrap:
        raise UserError("no broker configured (LOQUETIER_KAFKA__BOOTSTRAP is not set)", UP_HINT)
    host, port = _host_port(bootstrap, 9092)
    if not reachable(host, port):
        raise UserError(
            f"cannot reach the broker at {bootstrap} (LOQUETIER_KAFKA__BOOTSTRAP)",
            f"is it running? After `loquetier down` the address is stale: {UP_HINT}",
        )
    return bootstrap


def require_database(url: str | None) -> str:
    """The configured database URL, its server answering; else a UserError."""
    if not url:
        raise UserError("no database configured (LOQUETIER_DATABASE__URL is not set)", UP_HINT)
    from loquetier.db.session import server_address

    try:
        host, port = server_address(url)
    except ValueError:
        raise UserError(f"LOQUETIER_DATABASE__URL is not a database URL: {url!r}",
                        "expected postgresql://USER@HOST:PORT/DATABASE") from None
    if not reachable(host, port):
        raise _unreachable_database(host, port)
    return url


def _unreachable_database(host: str, port: int) -> UserError:
    return UserError(
        f"cannot reach the database at {host}:{port} (LOQUETIER_DATABASE__URL)",
        f"is it running? After `loquetier down` the address is stale: {UP_HINT}",
    )


async def database_call(awaitable: Awaitable[T], url: str, timeout_s: float = 15.0) -> T:
    """``awaitable`` (a query), with a database that refuses us or stalls said in one line."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise UserError(f"the database did not answer within {timeout_s:.0f} s", UP_HINT) from None
    except Exception as exc:
        raise database_error(exc, url) from exc


def database_error(exc: BaseException, url: str) -> Exception:
    """A UserError for the usual database failures; anything else is returned unchanged."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0][:200] if str(exc) else name
    if name in ("InvalidCatalogNameError", "InvalidPasswordError", "InvalidAuthorizationSpecificationError"):
        return UserError(f"the database refused the connection: {text}", "check LOQUETIER_DATABASE__URL")
    if name in ("UndefinedTableError", "ProgrammingError") and "does not exist" in str(exc):
        return UserError("the database has no Loquetier tables yet", "run `loquetier migrate`")
    if isinstance(exc, OSError | ConnectionError):
        from loquetier.db.session import server_address

        try:
            host, port = server_address(url)
        except ValueError:  # no URL known: whether the server answers cannot be told
            host, port = "", 0
        if host and not reachable(host, port):  # refused at connect: said as every other command says it
            return _unreachable_database(host, port)
        return UserError(f"lost the database connection: {text}", UP_HINT)
    return exc if isinstance(exc, Exception) else RuntimeError(text)


_UNION_TAGS = frozenset({"inline", "path", "text", "tokens", "chat"})  # pydantic's names of union branches


def validation_lines(exc: Any, *, limit: int = 3) -> str:
    """A pydantic ValidationError as short ``field: problem`` items (at most ``limit``)."""
    lines = []
    for error in exc.errors()[:limit]:
        parts = [str(p) for p in error.get("loc", ()) if not str(p).startswith("function-") and p not in _UNION_TAGS]
        where = ".".join(parts)
        kind, message = error.get("type", ""), error.get("msg", "invalid")
        if kind == "extra_forbidden":
            message = "unknown field (a misspelt option?)"
        elif kind == "missing":
            message = "required field is missing"
        lines.append(f"{where or 'value'}: {message}")
    more = len(exc.errors()) - limit
    if more > 0:
        lines.append(f"... and {more} more")
    return "; ".join(lines)
