"""Which reply topics exist, learned beside the worker's other work.

A request's ``reply_to`` names a gateway's topic, which the worker has to find in the broker's
metadata before it writes there. The records for a name not known yet are held, in order, while one
background task asks the broker about every such name at once (one metadata request for up to
:data:`BATCH` names, each asked twice :data:`RETRY_S` apart before it counts as missing); the
event pump never waits for an answer. A found topic gets its held records first, then the
rest; a missing one drops them and is not asked about again for :data:`DOWN_S`.

A name is only asked about: a missing one never joins the producer's own metadata set (which
aiokafka refreshes for as long as the producer lives), so records naming made-up topics cost one
lookup each and nothing after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

BATCH = 64  # names in one metadata request
RETRY_S = 0.5  # a name the broker does not know is asked about once more after this long
TRIES = 2
DOWN_S = 30.0  # a missing topic's records are dropped without a lookup for this long
BROKER_AWAY_S = 1.0  # names are asked about again this long after a metadata request that failed
MAX_HELD = 4096  # records held for one name; more are dropped (token previews)
KEEP_IDLE_S = 600.0  # a known topic unused this long is forgotten once many are known
MANY = 1024


@dataclass
class _Pending:
    future: asyncio.Future[bool]
    held: deque[tuple[bytes, bytes | None]] = field(default_factory=deque)
    tries: int = 0
    due: float = 0.0


class ReplyTopics:
    def __init__(self, producer: AIOKafkaProducer, prefix: str) -> None:
        self._producer = producer
        self.prefix = prefix
        self._known: dict[str, float] = {}  # topic -> last use (monotonic)
        self._down: dict[str, float] = {}  # topic -> when it may be asked about again
        self._pending: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.num_dropped = 0  # records dropped for a missing or unwritable reply topic
        self.num_lookups = 0  # metadata requests made

    def is_reply(self, topic: str) -> bool:
        return topic.startswith(self.prefix)

    def is_known(self, topic: str) -> bool:
        """Whether records may go to ``topic`` now (any topic outside the prefix may)."""
        if not self.is_reply(topic):
            return True
        if topic in self._known:
            self._known[topic] = time.monotonic()
            return True
        return False

    def hold(self, topic: str, value: bytes, key: bytes | None) -> None:
        """Keep a record for ``topic`` (not known yet) until its lookup ends: it is sent then, in
        order, if the topic exists, and dropped otherwise. Never waits."""
        if self._is_down(topic):
            self.num_dropped += 1
            return
        pending = self._ask(topic)
        if len(pending.held) >= MAX_HELD:
            self.num_dropped += 1
            return
        pending.held.append((value, key))

    async def usable(self, topic: str, wait_s: float) -> bool:
        """Whether ``topic`` exists, waiting at most ``wait_s`` for its lookup; records held for it
        have been sent when this returns True."""
        if self.is_known(topic):
            return True
        if self._is_down(topic):
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(self._ask(topic).future), wait_s)
        except TimeoutError:
            return False

    def mark_down(self, topic: str) -> None:
        """``topic`` turned out unwritable (deleted): drop its records for :data:`DOWN_S`."""
        if not self.is_reply(topic):
            return
        self._known.pop(topic, None)
        self._down[topic] = time.monotonic() + DOWN_S
        if len(self._down) > MANY:
            now = time.monotonic()
            for name in [n for n, until in self._down.items() if until <= now]:
                del self._down[name]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_result(False)

    # --- lookups -----------------------------------------------------------------------------

    def _is_down(self, topic: str) -> bool:
        return self._down.get(topic, 0.0) > time.monotonic()

    def _ask(self, topic: str) -> _Pending:
        pending = self._pending.get(topic)
        if pending is None:
            pending = _Pending(asyncio.get_running_loop().create_future())
            self._pending[topic] = pending
            self._wake.set()
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run(), name="reply-topic-lookups")
        return pending

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            due = [name for name, p in self._pending.items() if p.due <= now][:BATCH]
            if not due:
                self._wake.clear()
                later = min((p.due for p in self._pending.values()), default=None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), None if later is None else max(0.0, later - now))
                continue
            found = await self._look_up(due)
            for name in due:
                pending = self._pending[name]
                if found is None:  # the broker away: not the topics' fault
                    pending.due = time.monotonic() + BROKER_AWAY_S
                elif name in found:
                    await self._release(name, pending)
                else:
                    pending.tries += 1
                    if pending.tries < TRIES:
                        pending.due = time.monotonic() + RETRY_S
                    else:
                        log.warning("reply topic does not exist, its records dropped",
                                    extra={"topic": name[:256], "records": len(pending.held)})
                        self._finish(name, pending, False)

    async def _look_up(self, names: list[str]) -> set[str] | None:
        """The names among ``names`` that the broker knows; None when no broker answered."""
        self.num_lookups += 1
        metadata = ClusterMetadata()
        try:
            answered = await self._producer.client._metadata_update(metadata, names)
        except KafkaError as exc:
            log.warning("reply topic lookup failed", extra={"error": repr(exc)[:300]})
            return None
        if not answered:
            return None
        return {name for name in names if metadata.partitions_for_topic(name)}

    async def _release(self, topic: str, pending: _Pending) -> None:
        """Send the held records in order; records held meanwhile join the queue, so the topic is
        known (and later records go straight out) only once it is empty."""
        while pending.held:
            value, key = pending.held.popleft()
            try:
                await self._producer.send(topic, value, key=key)
            except KafkaError as exc:
                log.warning("held reply record not sent", extra={"topic": topic[:256], "error": repr(exc)[:300]})
                self._finish(topic, pending, False)
                return
        self._known[topic] = time.monotonic()
        if len(self._known) > MANY:
            idle = time.monotonic() - KEEP_IDLE_S
            for name in [n for n, used in self._known.items() if used < idle]:
                del self._known[name]
        self._finish(topic, pending, True)

    def _finish(self, topic: str, pending: _Pending, exists: bool) -> None:
        del self._pending[topic]
        if not exists:
            self.num_dropped += len(pending.held)
            pending.held.clear()
            self.mark_down(topic)
        if not pending.future.done():
            pending.future.set_result(exists)
