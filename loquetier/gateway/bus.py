"""Kafka for one gateway: publish records, and read this gateway's own reply topic.

Each gateway creates (if missing) and reads one topic, ``<reply_prefix><gateway id>`` with one
partition, and names it as ``reply_to`` on every request it publishes; workers put that
request's records there. So a gateway reads only its own results, and N gateways scale out
without each reading everything. The reader starts at the topic's end (records from before
this process started belong to nobody waiting) and hands each record to the queue registered
for its request id, skipping the rest by key without decoding them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from loquetier.codec import Record, RecordError
from loquetier.messages import decode_record, encode_record
from loquetier.settings import KafkaSettings

log = logging.getLogger(__name__)


def reply_topic(kafka: KafkaSettings, gateway_id: str) -> str:
    return f"{kafka.reply_prefix}{gateway_id}"


class Bus:
    def __init__(self, bootstrap: str, kafka: KafkaSettings, *, gateway_id: str) -> None:
        self.kafka = kafka
        self.bootstrap = bootstrap
        self.topic = reply_topic(kafka, gateway_id)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=f"{kafka.client_id}-{gateway_id}",
            acks="all",
            linger_ms=0,
            max_request_size=kafka.max_record_bytes + 64 * 1024,
            request_timeout_ms=10_000,
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=f"{kafka.client_id}-{gateway_id}-replies",
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=20,  # a reply is wanted now; an idle poll costs one small fetch
            max_partition_fetch_bytes=kafka.max_record_bytes + 64 * 1024,
        )
        self._waiters: dict[str, asyncio.Queue[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.num_replies = 0

    async def start(self) -> None:
        from loquetier import services

        await services.create_topics(
            self.bootstrap, [self.topic], num_partitions=1, replication_factor=self.kafka.replication_factor
        )
        await self._producer.start()
        await self._consumer.start()
        await self._consumer.topics()  # metadata: a topic an operator made may have more partitions
        parts = [TopicPartition(self.topic, p) for p in sorted(self._consumer.partitions_for_topic(self.topic) or {0})]
        self._consumer.assign(parts)
        await self._consumer.seek_to_end(*parts)
        for part in parts:
            await self._consumer.position(part)  # resolved now: no reply published after this is missed
        self._reader = asyncio.create_task(self._read(), name="gateway-replies")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        await self._consumer.stop()
        await self._producer.stop()

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, topic: str, record: Record | bytes, key: str) -> tuple[str, int, int]:
        """Send (a record, or one already encoded) and wait for the broker's acknowledgement
        (KafkaError when it does not take it); returns where the record stands (topic, partition,
        offset), which a refusal of that record alone names."""
        value = record if isinstance(record, bytes) else encode_record(record)
        sent = await self._producer.send_and_wait(topic, value, key=key.encode())
        return (sent.topic, sent.partition, sent.offset)

    # --- replies ---------------------------------------------------------------------------

    def expect(self, request_id: str) -> asyncio.Queue[Any]:
        """Register before publishing: the records for ``request_id`` arrive on the returned queue."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiters[request_id] = queue
        return queue

    def forget(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    async def _read(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200)
            except KafkaError as exc:
                log.warning("reply fetch failed", extra={"error": repr(exc)})
                await asyncio.sleep(0.2)
                continue
            for records in batches.values():
                for msg in records:
                    self._dispatch(msg.key, msg.value)

    def _dispatch(self, key: bytes | None, value: bytes | None) -> None:
        queue = self._waiters.get(key.decode(errors="replace")) if key else None
        if queue is None or value is None:
            return  # nobody waits (finished, timed out, or sent before this process started)
        try:
            record = decode_record("results", value)
        except RecordError as err:
            log.warning("undecodable reply", extra={"error": err.message[:200]})
            return
        self.num_replies += 1
        queue.put_nowait(record)
