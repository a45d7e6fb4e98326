"""Ordered lanes for engine events whose handling does I/O: one lane per key (a job), in order within
a lane, lanes side by side, and nothing that hands work to a lane waits for it.

The pump that reads the engine's step events must never wait on a database commit or a produce call:
tokens of later steps (a request's first token among them) would wait behind it. A job's events
still need their order (a checkpoint is recorded before the job's end), so each job gets a lane.

Invariants: ``submit(key, aw)`` starts ``aw`` once every earlier awaitable of the same key has ended
(returned or raised: a failure is logged and does not stop the lane); it returns at once; ``drain``
waits for every lane.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger(__name__)


class Lanes:
    def __init__(self, what: str = "event handling") -> None:
        self._what = what
        self._tails: dict[Any, asyncio.Task[None]] = {}

    def submit(self, key: Any, aw: Awaitable[Any]) -> asyncio.Task[None]:
        """Run ``aw`` after the lane ``key``'s earlier work; returns its task at once."""
        task = asyncio.create_task(self._run(self._tails.get(key), aw))
        self._tails[key] = task
        task.add_done_callback(lambda t: self._forget(key, t))
        return task

    @property
    def num_busy(self) -> int:
        """Lanes with work not yet done."""
        return len(self._tails)

    async def drain(self) -> None:
        """Wait until every lane is done (work submitted meanwhile included)."""
        while self._tails:
            await asyncio.gather(*self._tails.values(), return_exceptions=True)

    async def _run(self, before: asyncio.Task[None] | None, aw: Awaitable[Any]) -> None:
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)  # its failure is its own (logged there)
        try:
            await aw
        except Exception:
            log.exception("%s failed", self._what)

    def _forget(self, key: Any, task: asyncio.Task[None]) -> None:
        if self._tails.get(key) is task:
            del self._tails[key]
