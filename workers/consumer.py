"""One consumer in one group over the requests, training and control topics.

Manual commits only (``enable_auto_commit=False``): each partition is committed up to the
highest offset below which every record is done (:mod:`loquetier.workers.offsets`).
Back-pressure pauses the request partitions while ``max_inflight`` requests are in the
worker and resumes them when half have drained, and the training or control partitions
while ``max_waiting`` of their records wait to be handled (they run one at a time beside
the intake); paused records stay in Kafka, so nothing accepted is ever dropped. On a
rebalance the revoked partitions are drained (their in-flight records finish and are
committed) before the new owner starts; what does not finish in time keeps running here and
the new owner waits for its row instead of computing it again.

Committed offsets are trusted across restarts. A broker's ListOffsets answer is not used to
judge them: the embedded broker (tansu) answers the start of the last batch + 1 there (50
records in one batch: "end 1"). Only the high watermark of an actual fetch can show that a
log is shorter than the position read from (a broker that lost its data); only then, and
only for that partition, is it read again from its beginning. Real Kafka answers such a
fetch with OffsetOutOfRange, which the consumer resets to the earliest offset by itself.
A group generation that goes back (a restarted in-memory broker forgot the group) means every
offset committed there is stale: the assigned partitions are read from the beginning.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from loquetier.messages import TopicKind
from loquetier.settings import KafkaSettings

from .metrics import PAUSED
from .offsets import OffsetTracker
from .topics import forbid_auto_create

log = logging.getLogger(__name__)

Handler = Callable[[TopicKind, Any, int], Awaitable[None]]  # (kind, ConsumerRecord, epoch)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Consumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._owner.on_assigned(set(assigned))


class Consumer:
    def __init__(
        self,
        bootstrap: str,
        kafka: KafkaSettings,
        handler: Handler,
        *,
        worker_id: str,
        max_inflight: int,
        inflight: Callable[[], int],
        waiting: Callable[[TopicKind], int] = lambda kind: 0,
        max_waiting: int = 64,
        drain_timeout_s: float = 10.0,
    ):
        self._kafka = kafka
        self._handler = handler
        self._max_inflight = max_inflight
        self._inflight = inflight
        self._waiting = waiting  # training or control records read and not yet handled
        self._max_waiting = max_waiting
        self._drain_timeout_s = drain_timeout_s
        self._kinds: dict[str, TopicKind] = {
            kafka.requests_topic: "requests",
            kafka.training_topic: "training",
            kafka.control_topic: "control",
        }
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=kafka.group_id,
            client_id=f"{kafka.client_id}-{worker_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=kafka.max_record_bytes + 64 * 1024,
            fetch_max_bytes=max(kafka.max_record_bytes * 2, 52_428_800),
            # a request waits for this fetch: on tansu a record came back a median 115 ms after it
            # was produced with aiokafka's default 500 ms wait, 6 ms with 20 ms (docs/benchmarks/service.md)
            fetch_max_wait_ms=20,
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            retry_backoff_ms=200,
            metadata_max_age_ms=5_000,  # a topic created after start is seen within seconds
        )
        forbid_auto_create(self.consumer)
        self._paused: dict[str, bool] = dict.fromkeys(self._kinds, False)
        self.num_assignments = 0
        self._stopping = asyncio.Event()
        self._expected: dict[TopicPartition, int] = {}  # where reading resumes, per partition
        self._generation: int | None = None  # of the group, at the last assignment

    async def start(self) -> None:
        self.consumer.subscribe(list(self._kinds), listener=_Listener(self))
        backoff = 0.2
        while True:
            try:
                await self.consumer.start()
                leave_from_generation_zero(self.consumer)
                return
            except KafkaError as exc:
                log.warning("broker unavailable at start, retrying", extra={"error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)

    def stop_consuming(self) -> None:
        self._stopping.set()

    def done(self, part: TopicPartition, offset: int, epoch: int | None = None) -> None:
        self.tracker.done(part, offset, epoch)

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch, dispatch and commit until :meth:`stop_consuming`."""
        while not self._stopping.is_set():
            try:
                # a paused topic resumes only here: while one is, look again soon, or a storm of
                # control records would wait a whole fetch timeout per half-limit handled
                wait_ms = 10 if any(self._paused.values()) else 100
                batches = await self.consumer.getmany(timeout_ms=wait_ms, max_records=self._max_inflight)
            except KafkaError as exc:
                log.warning("fetch failed", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            for part, records in batches.items():
                kind = self._kinds.get(part.topic)
                for record in records:
                    if self._stopping.is_set():  # not accepted: left to the next owner
                        break
                    epoch = self.tracker.accept(part, record.offset)
                    if kind is None:
                        self.tracker.done(part, record.offset, epoch)
                        continue
                    try:
                        await self._handler(kind, record, epoch)
                    except Exception:  # stays pending (redelivered), the loop goes on
                        log.exception("record handling failed", extra={"partition": str(part), "offset": record.offset})
            self._check_log_ends(batches)
            self._apply_backpressure()
            await self.commit()

    def _apply_backpressure(self) -> None:
        for topic, kind in self._kinds.items():
            num, limit = ((self._inflight(), self._max_inflight) if kind == "requests"
                          else (self._waiting(kind), self._max_waiting))
            if not self._paused[topic] and num >= limit:
                self._set_paused(topic, True, num)
            elif self._paused[topic] and num <= limit // 2:
                self._set_paused(topic, False, num)

    def _parts(self, topic: str) -> list[TopicPartition]:
        return [p for p in self.consumer.assignment() if p.topic == topic]

    def request_partitions(self) -> list[TopicPartition]:
        """The request partitions this consumer owns now."""
        return self._parts(self._kafka.requests_topic)

    def _set_paused(self, topic: str, paused: bool, num: int) -> None:
        parts = self._parts(topic)
        if paused:
            self.consumer.pause(*parts)
        else:
            self.consumer.resume(*parts)
        self._paused[topic] = paused
        PAUSED.labels(self._kinds[topic]).set(len(parts) if paused else 0)
        log.info("back-pressure", extra={"topic": topic, "paused": paused, "waiting": num})

    async def commit(self, parts: set[TopicPartition] | None = None) -> bool:
        points = self.tracker.commit_points(parts)
        for part, point in list(points.items()):
            highwater = self.consumer.highwater(part) if part in self.consumer.assignment() else None
            if highwater is not None and point > highwater:  # the log shrank under us: never commit past it
                del points[part]
        if not points:
            return True
        try:
            await self.consumer.commit({p: OffsetAndMetadata(o, "") for p, o in points.items()})
        except (CommitFailedError, KafkaError) as exc:  # rebalancing or broker away: retried next round
            log.warning("commit failed", extra={"error": repr(exc)})
            return False
        self.tracker.mark_committed(points)
        return True

    # --- rebalance -----------------------------------------------------------------------

    def _pending(self, parts: set[TopicPartition]) -> int:
        return sum(self.tracker.num_pending(p) for p in parts)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        while self._pending(revoked) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.commit(revoked)
        left = self._pending(revoked)
        self.tracker.forget(revoked)
        log.info("partitions revoked", extra={"partitions": sorted(map(str, revoked)), "handed_over": left})

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.tracker.forget(assigned)  # fresh positions come from the group's committed offsets
        if self._group_went_back():
            for part in assigned:  # every record there is new; any committed offset is a stale one of ours
                self._expected.pop(part, None)
                self.consumer.seek(part, 0)
        else:
            await self._expect_committed(assigned)
        self.num_assignments += 1
        for topic, paused in self._paused.items():
            if paused:
                self.consumer.pause(*self._parts(topic))
        log.info("partitions assigned", extra={"partitions": sorted(map(str, assigned))})

    def _group_went_back(self) -> bool:
        """A group generation at or below the last one seen: the coordinator lost the group, so
        the broker lost its state (tansu keeps it in memory), and offsets this worker committed
        into the fresh broker before it rejoined point into a log that no longer exists."""
        generation = getattr(getattr(self.consumer, "_coordinator", None), "generation", None)
        if not isinstance(generation, int) or generation < 0:
            return False
        last, self._generation = self._generation, generation
        if last is None or generation > last:
            return False
        log.warning("the group started over (the broker lost its state): reading the assigned partitions again",
                    extra={"generation": generation, "last_generation": last})
        return True

    async def _expect_committed(self, parts: set[TopicPartition]) -> None:
        """Remember where each partition resumes, to check it against the first fetch."""
        for part in parts:
            self._expected.pop(part, None)
            try:
                committed = await self.consumer.committed(part)
            except KafkaError as exc:
                log.warning("could not read a committed offset", extra={"partition": str(part), "error": repr(exc)})
                continue
            if committed is not None:
                self._expected[part] = committed

    def _check_log_ends(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Rewind only a partition whose fetched high watermark is below where reading resumes.

        ``highwater`` comes from the last fetch response, which counts every record the
        broker holds; a value below the expected position means the log really shrank (a
        broker that lost its data started over), so the records there now are new ones.
        """
        for part, records in batches.items():
            if records:
                self._expected[part] = records[-1].offset + 1
        assigned = self.consumer.assignment()
        for part, expected in list(self._expected.items()):
            if part not in assigned:
                del self._expected[part]
                continue
            end = self.consumer.highwater(part)
            if end is None or end >= expected:
                continue
            log.warning(
                "the log is shorter than the committed position (the broker lost its data): reading it again",
                extra={"partition": str(part), "position": expected, "end": end},
            )
            del self._expected[part]
            self.consumer.seek(part, 0)

    async def close(self) -> None:
        """Commit what is done and leave the group."""
        for _ in range(3):
            if await self.commit():
                break
            await asyncio.sleep(0.2)
        await self.consumer.stop()


def leave_from_generation_zero(consumer: AIOKafkaConsumer) -> None:
    """Make a started consumer leave its group on stop from generation 0 too.

    tansu numbers a group's first generation 0, and aiokafka sends LeaveGroup on stop only from a
    generation above 0: a member of generation 0 that stopped would still hold its partitions
    until its session ran out, and the group's next member would wait that long for them.
    The leave is sent where aiokafka's own would be (its heartbeats stopped, before it forgets its
    member id). Real Kafka starts at generation 1, where aiokafka leaves by itself."""
    from aiokafka.protocol.group import LeaveGroupRequest

    coordinator = getattr(consumer, "_coordinator", None)
    own_leave = getattr(coordinator, "_maybe_leave_group", None)
    if coordinator is None or own_leave is None:
        return

    async def maybe_leave_group() -> None:
        if (coordinator.generation == 0 and coordinator.member_id
                and getattr(coordinator, "_group_instance_id", None) is None):
            try:
                await coordinator._send_req(LeaveGroupRequest(coordinator.group_id, coordinator.member_id))
            except KafkaError as exc:  # the session runs out instead
                log.warning("leaving the group failed", extra={"error": repr(exc)})
            else:
                log.info("left the group", extra={"generation": 0})
        await own_leave()

    coordinator._maybe_leave_group = maybe_leave_group
