"""Whether a request's final record is on its reply topic already: the check before a stored
outcome goes out again.

A worker lists a request's records on its row twice: as pending, in the transaction that stores the
outcome (the records the outcome is about to be published for), and as answered right after the
broker acknowledged the final record (``workers/inference.py``). A worker killed between the publish
and the second list leaves a record uncommitted and pending, so it comes back to another worker,
which finds the row finished. Before that worker publishes the stored outcome again, it reads the
reply topic's partition that holds the request's records (they are keyed by request_id) over the
minute after the outcome was stored: a final of the request there means the publish happened, so
the record gets no second final. A read that fails or runs out of time finds nothing: the outcome
goes out again, so a record can be answered twice, never left unanswered. A record not listed at
all is a new one (a client's retry) and gets the stored outcome without a read, whatever its
client-set timestamp says.

The read covers the row's window, and its answer is kept per request, so the copies of one request
cost one read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from loquetier.codec import RecordError, unpack_map
from loquetier.settings import KafkaSettings

log = logging.getLogger(__name__)

FINAL_TYPES = frozenset({"result", "error"})


# A final goes out right after its row took the outcome. Reads start this long before the row's
# finish (clocks of the database and the worker differ) and end this long after it (a publish
# retried through a broker outage for longer is not looked for: its record is answered again).
CLOCK_SLACK_MS = 2_000
WINDOW_MS = 60_000
MAX_REMEMBERED = 4_096


class AnswerLog:
    def __init__(self, bootstrap: str, kafka: KafkaSettings, *, worker_id: str, timeout_s: float = 5.0):
        self._bootstrap = bootstrap
        self._kafka = kafka
        self._client_id = f"{kafka.client_id}-{worker_id}-answers"
        self._timeout_s = timeout_s
        self._partitioner = DefaultPartitioner()  # the one the publisher's producer places keyed records with
        self._found: OrderedDict[tuple[str, str, int], bool] = OrderedDict()
        self._reads: dict[tuple[str, str, int], asyncio.Future[bool]] = {}
        self.num_reads = 0

    async def has_final(self, topic: str | None, request_id: str, finished_ms: int) -> bool:
        """Whether ``topic`` (None: the results topic) holds a final record of ``request_id`` in the
        window after its row finished at ``finished_ms``; False when the read failed."""
        topic = topic or self._kafka.results_topic
        key = (topic, request_id, finished_ms)
        if key in self._found:
            self._found.move_to_end(key)
            return self._found[key]
        running = self._reads.get(key)
        if running is not None:  # copies of one request wait for one read
            return await asyncio.shield(running)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._reads[key] = future
        try:
            found = await self._timed_read(topic, request_id, finished_ms)
            future.set_result(found)
            return found
        finally:
            del self._reads[key]
            if not future.done():
                future.set_result(False)

    async def _timed_read(self, topic: str, request_id: str, finished_ms: int) -> bool:
        self.num_reads += 1
        started = time.monotonic()
        try:
            found = await asyncio.wait_for(self._read(topic, request_id, finished_ms), self._timeout_s)
        except Exception as exc:  # the broker is away or slow: publish again rather than risk no answer
            log.warning("could not read the reply topic for an earlier answer",
                        extra={"request_id": request_id, "topic": topic[:256], "error": repr(exc)[:300]})
            return False
        self._found[(topic, request_id, finished_ms)] = found
        while len(self._found) > MAX_REMEMBERED:
            self._found.popitem(last=False)
        log.info("reply topic read for an earlier answer",
                 extra={"request_id": request_id, "topic": topic[:256], "found": found,
                        "ms": round(1000 * (time.monotonic() - started), 1)})
        return found

    async def _read(self, topic: str, request_id: str, finished_ms: int) -> bool:
        key = request_id.encode()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=self._kafka.max_record_bytes + 64 * 1024,
            fetch_max_wait_ms=20,
        )
        await consumer.start()
        try:
            parts: set[int] = set()
            for _ in range(20):
                parts = consumer.partitions_for_topic(topic) or set()
                if parts:
                    break
                await consumer.topics()
                await asyncio.sleep(0.05)
            if not parts:
                return False  # no such topic: nothing was answered on it
            ordered = sorted(parts)
            tp = TopicPartition(topic, self._partitioner(key, ordered, ordered))
            consumer.assign([tp])
            first = await _offset_at(consumer, tp, finished_ms - CLOCK_SLACK_MS)
            if first is None:
                return False  # nothing on the partition since then
            after = await _offset_at(consumer, tp, finished_ms + WINDOW_MS)
            end = after if after is not None else (await consumer.end_offsets([tp]))[tp]
            consumer.seek(tp, first)
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=200)
                for record in batch.get(tp, []):
                    if record.offset < end and record.key == key and _is_final(record.value, request_id):
                        return True
            return False
        finally:
            await consumer.stop()


async def _offset_at(consumer: AIOKafkaConsumer, tp: TopicPartition, ms: int) -> int | None:
    """The first offset stamped at ``ms`` or later; None when there is none. (tansu answers "none"
    with offset 0 and timestamp -1, where Kafka answers offset -1.)"""
    hit = (await consumer.offsets_for_times({tp: ms})).get(tp)
    if hit is None or hit.offset < 0 or hit.timestamp < 0:
        return None
    return int(hit.offset)


def _is_final(value: bytes | None, request_id: str) -> bool:
    if value is None:
        return False
    try:
        obj = unpack_map(value)
    except RecordError:
        return False
    return obj.get("type") in FINAL_TYPES and obj.get("request_id") == request_id
