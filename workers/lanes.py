"""Ordered lanes for engine events whose handling does I/O: one lane per key (a job), in order within
a lane, lanes side by side, and nothing that hands work to a lane waits for it.

The pump that reads the engine's step events must never wait on a database commit or a produce call:
tokens of later steps (a request's first token among them) would wait behind it. A job's events
still need their order (a checkpoint is recorded before the job's end), so each job gets a lane.

Invariants: ``submit(key, work)`` calls ``work()`` and awaits what it returns once all earlier work
of the same key has ended (returned, raised: a failure is logged and does not stop the lane, or was
cancelled); it returns at once; work cancelled before its turn is never called (no coroutine is made
that nobody awaits); ``drain`` waits for every lane, and cancelling it cancels none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class Lanes:
    def __init__(self, what: str = "event handling") -> None:
        self._what = what
        self._tails: dict[Any, asyncio.Task[None]] = {}

    def submit(self, key: Any, work: Callable[[], Awaitable[Any]]) -> asyncio.Task[None]:
        """Run ``work()`` after the lane ``key``'s earlier work; returns its task at once."""
        task = asyncio.create_task(self._run(self._tails.get(key), work))
        self._tails[key] = task
        task.add_done_callback(lambda t: self._forget(key, t))
        return task

    @property
    def num_busy(self) -> int:
        """Lanes with work not yet done."""
        return len(self._tails)

    async def drain(self) -> None:
        """Wait until every lane is done (work submitted meanwhile included). Cancelling the wait
        cancels no lane."""
        while self._tails:
            await asyncio.wait(list(self._tails.values()))

    async def _run(self, before: asyncio.Task[None] | None, work: Callable[[], Awaitable[Any]]) -> None:
        if before is not None:  # its failure is its own (logged there); cancelling this one spares it
            await asyncio.wait([before])
        try:
            await work()
        except Exception:
            log.exception("%s failed", self._what)

    def _forget(self, key: Any, task: asyncio.Task[None]) -> None:
        if self._tails.get(key) is task:
            del self._tails[key]
