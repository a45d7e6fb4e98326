"""Postgres from a service's side: one transaction per call, retried through outages.

``await store.tx(lambda s: repo.claim_job(s, ...))`` runs the function in a fresh
transaction and, when the connection fails (server restart, network), retries it with
exponential backoff until it succeeds or the worker stops. Every write the worker makes
is idempotent (insert-on-conflict, "first outcome wins" updates), so a retry after a
commit whose acknowledgement was lost is harmless. The queries themselves live in the
``*_repo`` modules (:mod:`loquetier.db.repo` gathers them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from asyncpg import PostgresError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from loquetier.db.session import create_engine, session_factory

log = logging.getLogger(__name__)

T = TypeVar("T")


_TRANSIENT_NAMES = (
    "ConnectionDoesNotExistError",
    "CannotConnectNowError",
    "AdminShutdownError",
    "ConnectionFailureError",
    "ConnectionRejectionError",
    "TooManyConnectionsError",
    "InterfaceError",
    "InternalClientError",
)


def is_transient(exc: BaseException) -> bool:
    """Connection-level failures worth retrying (not constraint or programming errors).

    Looks through the whole cause chain: SQLAlchemy wraps asyncpg's exceptions, which in
    turn may wrap an ``OSError`` (connection refused while the server restarts).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OperationalError | InterfaceError | PoolTimeoutError | OSError | TimeoutError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if type(current).__name__ in _TRANSIENT_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


class StoreError(Exception):
    """A database refusal as users may see it: a code and a message without SQL or parameters
    (the statement and the server's words go to the log only)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class StoreAborted(StoreError):
    """The worker is stopping and the database did not answer in time."""


def public_error(exc: BaseException) -> StoreError | None:
    """A database exception mapped to a :class:`StoreError`; None for anything else."""
    if not isinstance(exc, SQLAlchemyError | PostgresError):
        return None
    state = str(getattr(getattr(exc, "orig", exc), "sqlstate", "") or "")
    if state.startswith("22"):  # data exception: a value the column cannot hold
        return StoreError("invalid_value", "a value the database cannot store: a number out of its range, "
                          "or a NUL character (\\u0000) in text")
    return StoreError("database_error", "the database refused the operation")


class Store:
    """Sessions for one worker process, with retries."""

    def __init__(self, url: str, *, max_backoff_s: float = 2.0) -> None:
        self.engine: AsyncEngine = create_engine(url)
        self._sessions = session_factory(self.engine)
        self._max_backoff_s = max_backoff_s
        self.closing = False
        self._deadline: float | None = None
        self.num_retries = 0

    def give_up_at(self, deadline: float) -> None:
        """Stop retrying at ``deadline`` (``time.monotonic()``); the earliest deadline wins."""
        self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)

    async def close(self) -> None:
        self.closing = True
        try:
            await asyncio.wait_for(self.engine.dispose(), timeout=5.0)
        except TimeoutError:
            log.warning("database connections did not close in time")

    async def tx(self, fn: Callable[[AsyncSession], Awaitable[T]], *, attempts: int | None = None) -> T:
        """``fn(session)`` in one transaction; retried on connection errors (``attempts``
        None: until the store closes or its deadline passes). Other database errors are
        raised as :class:`StoreError`; ``fn``'s own exceptions pass through."""
        backoff = 0.05
        tried = 0
        while True:
            tried += 1
            try:
                return await self._attempt(fn)
            except Exception as exc:
                past = self._deadline is not None and time.monotonic() >= self._deadline
                if is_transient(exc) and not (self.closing or past or (attempts is not None and tried >= attempts)):
                    self.num_retries += 1
                    log.warning("database unavailable, retrying", extra={"error": str(exc)[:200], "attempt": tried})
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff_s)
                    continue
                if is_transient(exc) and past:
                    raise StoreAborted("database_unavailable", "the database did not answer in time") from exc
                public = public_error(exc)
                if public is None:
                    raise
                log.warning(
                    "database refused an operation",
                    extra={"error_type": type(exc).__name__, "error": _server_words(exc)},
                )
                raise public from exc

    async def _attempt(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        async def run() -> T:
            async with self._sessions.begin() as session:
                return await fn(session)

        if self._deadline is None:
            return await run()
        return await asyncio.wait_for(run(), timeout=max(0.05, self._deadline - time.monotonic()))


def _server_words(exc: BaseException) -> str:
    """The server's message without the statement and its parameters (for the log)."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).split("\n[SQL:", 1)[0][:500]
