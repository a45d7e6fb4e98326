"""The worker's Kafka clients never create a topic by asking for it (workers/topics.py)."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from loquetier.services import create_topics
from loquetier.workers.topics import forbid_auto_create

pytestmark = pytest.mark.kafka


async def listed(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_a_missing_topic_stays_missing_until_created(kafka_bootstrap: str) -> None:
    guarded_topic, plain_topic = f"g{uuid.uuid4().hex[:8]}", f"p{uuid.uuid4().hex[:8]}"
    guarded = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=1500)
    plain = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    forbid_auto_create(guarded)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    forbid_auto_create(consumer)
    await guarded.start()
    await plain.start()
    await consumer.start()
    try:
        with pytest.raises(KafkaError):
            await guarded.send_and_wait(guarded_topic, b"x")
        consumer.subscribe([guarded_topic])  # the guarded consumer asks for its metadata too
        assert await consumer.getmany(timeout_ms=1500) == {}
        await plain.send_and_wait(plain_topic, b"x")  # aiokafka's default: the broker creates it
        topics = await listed(kafka_bootstrap)
        assert plain_topic in topics and guarded_topic not in topics
        await create_topics(kafka_bootstrap, [guarded_topic], num_partitions=3)
        meta = await guarded.send_and_wait(guarded_topic, b"y", partition=2)
        assert meta.offset == 0
    finally:
        await consumer.stop()
        await plain.stop()
        await guarded.stop()
