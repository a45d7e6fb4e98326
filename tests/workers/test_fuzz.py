"""Fuzz: thousands of malformed records, each a DLQ entry or an "error" result; the valid
records interleaved with them are all served and the worker keeps running."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgpack
import pytest

from loquetier.messages import decode_record
from tests.workers.conftest import client_for, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

NUM_BAD = 2000
NUM_GOOD = 40


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def good(rid: str) -> dict[str, Any]:
    return {"schema": 1, "request_id": rid, "prompt": "the quick brown fox", "sampling": {"max_tokens": 3,
                                                                                           "temperature": 0.0}}


def bad_request(rng: random.Random, i: int) -> bytes:
    rid = f"bad-{i}"
    choice = rng.randrange(16)
    base = good(rid)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if choice == 1:
        return pack(rng.choice([[1, 2, 3], 7, "request", None, b"\x00\x01", 3.5]))
    if choice == 2:
        return pack({k: v for k, v in base.items() if k != "schema"})
    if choice == 3:
        return pack(base | {"schema": rng.choice([0, 2, "1", None, True])})
    if choice == 4:
        return pack(base | {"request_id": rng.choice([123, None, "", ["x"], "x" * 300])})
    if choice == 5:
        return pack(base | {"prompt": rng.choice([5, None, "", ["a"], {"t": 1}])})
    if choice == 6:
        return pack(base | {"sampling": rng.choice(["x", [1], {"max_tokens": rng.choice([0, -1, -(2**40)])}])})
    if choice == 7:
        return pack(base | {"sampling": {"temperature": rng.choice([-1.0, "hot"]), "top_p": rng.choice([0.0, 2.0])}})
    if choice == 8:
        return pack(base | {"prompt_token_ids": [1, 2, 3]})  # both prompt forms
    if choice == 9:
        return pack(base | {"surprise": 1, "priority": rng.choice([2**40, "high"]), "stream": "yes"})
    if choice == 10:
        return pack(base | {"adapter_id": f"no-such-adapter-{i}"})  # valid record, unknown adapter
    if choice == 11:
        return pack(base | {"prompt": " ".join(["fox"] * rng.randrange(600, 900))})  # longer than the context
    if choice == 12:
        return pack({k: v for k, v in base.items() if k != "prompt"} | {"prompt_token_ids": [10**6, 3]})
    if choice == 13:
        return pack(base | {"slo": {"ttft_ms": -5}, "priority": -(2**31) - 1})
    if choice == 14:
        return pack(base | {"request_id": f"nul\x00-{i}", "prompt": "a\x00b"})
    return rng.randbytes(8) + pack(base)  # trailing garbage before a valid map


def huge(i: int) -> bytes:
    if i % 2:
        return pack(good(f"huge-{i}") | {"prompt": "y" * 1_100_000})
    return pack({k: v for k, v in good(f"huge-{i}").items() if k != "prompt"} | {"prompt_token_ids": [5] * 40_000})


async def test_malformed_records_dead_letter_or_error_and_valid_ones_are_served(
    topics: Any, make_engine: Any
) -> None:
    settings = await topics(max_inflight=128)
    rng = random.Random(1234)
    k = settings.kafka
    sent: list[tuple[str, bytes, Any]] = []  # (kind, value, metadata future)
    good_ids = [f"good-{i}" for i in range(NUM_GOOD)]
    async with running_worker(make_engine(), settings, drain_timeout_s=30), client_for(settings) as client:
        every = NUM_BAD // NUM_GOOD
        for i in range(NUM_BAD):
            value = huge(i) if i < 4 else bad_request(rng, i)
            sent.append(("bad", value, await client.send_raw(k.requests_topic, value)))
            if i % every == 0:
                value = pack(good(good_ids[i // every]))
                sent.append(("good", value, await client.send_raw(k.requests_topic, value)))
        for topic, value in ((k.training_topic, pack({"schema": 1, "job_id": "bad-job", "data": 3})),
                             (k.training_topic, b"\xc1garbage"), (k.control_topic, pack({"schema": 1, "action": "x"})),
                             (k.control_topic, pack({"schema": 1, "action": "load", "target_id": "a"}))):
            sent.append(("bad", value, await client.send_raw(topic, value)))
        metas = await asyncio.gather(*(f for _, _, f in sent))
        expected_bad = {(m.topic, m.partition, m.offset): v for (kind, v, _), m in zip(sent, metas, strict=True)
                        if kind == "bad"}
        dead: set[tuple[str, int, int]] = set()
        errors: set[str] = set()
        served: set[str] = set()

        async def results() -> None:
            async for record in client.results(follow=True):
                if record.type == "error" and record.request_id:
                    errors.add(record.request_id)
                elif record.type == "result":
                    served.add(record.request_id)

        readers = [asyncio.create_task(results()), asyncio.create_task(_read_dlq(client, k.dlq_topic, dead))]
        try:
            deadline = asyncio.get_running_loop().time() + 150
            while asyncio.get_running_loop().time() < deadline:
                missing = _unaccounted(expected_bad, dead, errors)
                if not missing and served >= set(good_ids):
                    break
                await asyncio.sleep(0.5)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    assert served >= set(good_ids)
    missing = _unaccounted(expected_bad, dead, errors)
    assert not missing, f"{len(missing)} bad records got neither a DLQ entry nor an error: {missing[:5]}"


def _unaccounted(expected: dict[tuple[str, int, int], bytes], dead: set[Any], errors: set[str]) -> list[Any]:
    missing = []
    for where, value in expected.items():
        if where in dead:
            continue
        try:
            rid = msgpack.unpackb(value, raw=False).get("request_id")
        except Exception:
            rid = None
        if not isinstance(rid, str) or rid not in errors:
            missing.append((where, value[:80]))
    return missing


async def _read_dlq(client: Any, topic: str, dead: set[tuple[str, int, int]]) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=client.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        while not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for msg in records:
                    letter = decode_record("dlq", msg.value)
                    dead.add((letter.topic, letter.partition, letter.offset))
    finally:
        await consumer.stop()
