"""Every record type through a real broker with aiokafka: a consumer group with manual
commits, restarted to prove it resumes right after the last committed offset."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from wire_samples import SAMPLES

from loquetier.messages import (
    DeadLetter,
    ErrorResult,
    GenerateRequest,
    RecordError,
    TopicKind,
    decode_record,
    encode_record,
    peek_ids,
)
from loquetier.services import create_topics

pytestmark = pytest.mark.kafka


def _key(record: Any) -> bytes:
    for name in ("request_id", "job_id", "target_id", "topic"):
        value = getattr(record, name, None)
        if value:
            return str(value).encode()
    raise AssertionError(record)


@pytest.fixture
def consume(kafka_bootstrap: str, kafka_consumer_options: dict[str, int]) -> Any:
    async def run(
        group: str, topics: list[str], count: int, skip_commit: set[tuple[str, int, int]] | None = None
    ) -> list[ConsumerRecord[bytes, bytes]]:
        return await _consume(kafka_bootstrap, kafka_consumer_options, group, topics, count, skip_commit)

    return run


async def _consume(  # noqa: PLR0917
    bootstrap: str,
    options: dict[str, int],
    group: str,
    topics: list[str],
    count: int,
    skip_commit: set[tuple[str, int, int]] | None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``count`` records in ``group``, committing offset+1 for each unless skipped."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **options,
    )
    await consumer.start()
    got: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for rec in records:
                    got.append(rec)
                    if skip_commit is None or (rec.topic, rec.partition, rec.offset) not in skip_commit:
                        await consumer.commit({tp: rec.offset + 1})
        extra = await consumer.getmany(timeout_ms=300)  # nothing beyond what we expect
        got += [rec for records in extra.values() for rec in records]
    finally:
        await consumer.stop()
    return got


async def test_every_record_type_through_broker(kafka_bootstrap: str, consume: Any) -> None:
    suffix = uuid.uuid4().hex[:8]
    kinds: list[TopicKind] = ["requests", "training", "control", "results", "dlq"]
    topic_of = {kind: f"test.{kind}.{suffix}" for kind in kinds}
    kind_of = {topic: kind for kind, topic in topic_of.items()}
    created = await create_topics(kafka_bootstrap, list(topic_of.values()), num_partitions=2)
    assert sorted(created) == sorted(topic_of.values())
    assert await create_topics(kafka_bootstrap, list(topic_of.values()), num_partitions=2) == []

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for kind, record in SAMPLES:
            await producer.send_and_wait(topic_of[kind], encode_record(record), key=_key(record))
        await producer.send_and_wait(topic_of["requests"], b"\xc1 not msgpack", key=b"junk")

        group = f"test-group-{suffix}"
        first = await consume(group, list(topic_of.values()), len(SAMPLES) + 1)
        assert len(first) == len(SAMPLES) + 1
        decoded: list[Any] = []
        for rec in first:
            assert rec.value is not None
            try:
                decoded.append(decode_record(kind_of[rec.topic], rec.value))
            except RecordError as err:  # the junk record: DLQ material, not a crash
                assert err.code == "undecodable" and rec.key == b"junk"
                assert peek_ids(rec.value) == (None, None)
        assert sorted(map(repr, decoded)) == sorted(repr(r) for _, r in SAMPLES)

        # Everything above is committed; publish two more, and leave the second uncommitted.
        late = [GenerateRequest(request_id=f"late-{i}", prompt="again") for i in range(2)]
        for record in late:
            await producer.send_and_wait(
                topic_of["requests"], encode_record(record), key=b"late", partition=0
            )
        second = await consume(group, [topic_of["requests"]], 2)
        assert [decode_record("requests", r.value or b"") for r in second] == late

        offsets = await _committed(kafka_bootstrap, group, topic_of["requests"])
        end = second[-1].offset + 1
        assert offsets[0] == end  # committed exactly past the last record of partition 0
    finally:
        await producer.stop()


async def test_consumer_resumes_after_last_commit(kafka_bootstrap: str, consume: Any) -> None:
    suffix = uuid.uuid4().hex[:8]
    topic = f"test.resume.{suffix}"
    await create_topics(kafka_bootstrap, [topic], num_partitions=1)
    records = [GenerateRequest(request_id=f"r{i}", prompt=f"p{i}") for i in range(5)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(topic, encode_record(record), key=record.request_id.encode())
    finally:
        await producer.stop()

    group = f"resume-{suffix}"
    # Work finishes out of order: 0, 1 and 3 are done; 2 and 4 are not -> commit only up to 2.
    first = await consume(group, [topic], 5, skip_commit={(topic, 0, 2), (topic, 0, 3), (topic, 0, 4)})
    assert [r.offset for r in first] == [0, 1, 2, 3, 4]
    assert (await _committed(kafka_bootstrap, group, topic))[0] == 2

    again = await consume(group, [topic], 3)  # restart: redelivered from offset 2
    assert [r.offset for r in again] == [2, 3, 4]
    assert [decode_record("requests", r.value or b"") for r in again] == records[2:]
    assert (await _committed(kafka_bootstrap, group, topic))[0] == 5


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(2)]  # tansu needs explicit partitions
        found = await admin.list_consumer_group_offsets(group, partitions=partitions)
        return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}
    finally:
        await admin.close()


async def test_dead_letter_records_round_trip(kafka_bootstrap: str, consume: Any) -> None:
    bad = b"\x81\xa6schema\x01"  # a map with only a schema: invalid GenerateRequest
    with pytest.raises(RecordError) as caught:
        decode_record("requests", bad)
    letter = DeadLetter(
        topic="loquetier.requests",
        partition=0,
        offset=3,
        value=bad,
        code=caught.value.code,
        reason=caught.value.message,
    )
    topic = f"test.dlq.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, [topic], num_partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, encode_record(letter))
    finally:
        await producer.stop()
    got = await consume(f"dlq-{uuid.uuid4().hex[:6]}", [topic], 1)
    assert decode_record("dlq", got[0].value or b"") == letter


async def test_client_reads_a_results_log_that_started_over(kafka_bootstrap: str) -> None:
    """A broker that lost its data (an in-memory broker restarted) starts the results log
    over at offset 0, below where the client stood: the client reads it again from the start
    instead of waiting forever past its end."""
    from loquetier.producers.client import LoquetierClient
    from loquetier.settings import KafkaSettings

    prefix = f"c{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(bootstrap=kafka_bootstrap, results_topic=f"{prefix}.results", num_partitions=1)
    await create_topics(kafka_bootstrap, [kafka.results_topic], num_partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        for i in range(3):
            old = ErrorResult(request_id=f"old{i}", code="internal", message="before the restart")
            await producer.send_and_wait(kafka.results_topic, encode_record(old), partition=0)
        async with LoquetierClient(kafka_bootstrap, kafka) as client:  # stands at offset 3
            await admin.delete_topics([kafka.results_topic])
            assert await create_topics(kafka_bootstrap, [kafka.results_topic], num_partitions=1)
            new = ErrorResult(request_id="new", code="internal", message="after the restart")
            meta = await producer.send_and_wait(kafka.results_topic, encode_record(new), partition=0)
            assert meta.offset == 0
            got = await client.wait_result("new", timeout=20)
            assert got.request_id == "new" and got.message == "after the restart"
    finally:
        await admin.close()
        await producer.stop()
