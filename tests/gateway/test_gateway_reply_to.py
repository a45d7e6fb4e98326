"""``reply_to``: a request's records go to its reply topic; topics outside the prefix are refused."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loquetier import services
from loquetier.db import repo
from loquetier.messages import GenerateRequest, RecordError, decode_record, encode_record
from loquetier.workers.convert import from_stored
from tests.workers.conftest import client_for, running_worker
from tests.workers.test_worker_e2e import query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


async def read_topic(bootstrap: str, topic: str, want: int, timeout: float = 60,
                     until: str | None = None) -> list[Any]:
    """The first ``want`` decoded records of a one-partition topic (fewer if the timeout passes);
    with ``until``, on until a record of that type is among them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[Any] = []
    try:
        part = TopicPartition(topic, 0)
        consumer.assign([part])
        await consumer.seek_to_beginning(part)
        deadline = asyncio.get_running_loop().time() + timeout
        def done() -> bool:
            return len(out) >= want and (until is None or any(r.type == until for r in out))

        while not done() and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out += [decode_record("results", r.value) for r in records]
        return out
    finally:
        await consumer.stop()


def request(rid: str, reply_to: str | None, prompt: str) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt=prompt, sampling={"max_tokens": 4, "temperature": 0.0},  # type: ignore[arg-type]
                           stream=True, reply_to=reply_to)


async def test_records_go_to_the_reply_topic_only(topics: Any, database_url: str, make_engine: Any) -> None:
    settings = await topics()
    kafka, bootstrap = settings.kafka, settings.kafka.bootstrap or ""
    kafka = kafka.model_copy(update={"reply_timeout_s": 1.0})
    settings = settings.model_copy(update={"kafka": kafka})
    reply = f"{kafka.reply_prefix}{uuid.uuid4().hex[:8]}"
    await services.create_topics(bootstrap, [reply], num_partitions=1)
    ours, refused, lost, after = (f"r-{uuid.uuid4().hex[:8]}" for _ in range(4))
    async with running_worker(make_engine(), settings), client_for(settings) as client:
        # made-up reply topics first: looked up beside the work, they never hold up the records of a
        # topic the worker has not written to yet (a new gateway's: the worker's first lookup of it)
        for index in range(30):
            made_up = f"made-up-{index}"
            await client.send(kafka.requests_topic, request(made_up, f"{kafka.reply_prefix}nobody-{ours}-{index}",
                                                            "hello"), made_up)
        await client.send(kafka.requests_topic, request(ours, reply, "the quick brown fox"), ours)
        replies = await read_topic(bootstrap, reply, want=2, timeout=20, until="result")
        assert {r.request_id for r in replies} == {ours}
        assert replies[-1].type == "result" and [r.type for r in replies[:-1]] == ["token"] * (len(replies) - 1)
        assert "".join(r.text for r in replies[:-1]) == replies[-1].text
        # a copy of the finished request naming another reply topic is refused, not sent the answer
        thief = f"{kafka.reply_prefix}thief-{ours}"
        await services.create_topics(bootstrap, [thief], num_partitions=1)
        await client.send(kafka.requests_topic, request(ours, thief, "the quick brown fox"), ours)
        (stolen,) = await read_topic(bootstrap, thief, want=1)
        assert stolen.type == "error" and stolen.code == "duplicate_request_id" and stolen.record is not None

        # a topic outside the prefix: refused, the error goes to the shared topic and the DLQ
        await client.send(kafka.requests_topic, request(refused, kafka.control_topic, "hello"), refused)
        error = await client.wait_result(refused, timeout=30)
        assert error.type == "error" and error.code == "forbidden_reply_to"
        # a reply topic that does not exist: dropped after reply_timeout_s, the worker goes on
        await client.send(kafka.requests_topic, request(lost, f"{kafka.reply_prefix}gone-{lost}", "hello"), lost)
        await client.send(kafka.requests_topic, request(after, None, "hello there"), after)
        result = await client.wait_result(after, timeout=60)
        assert result.type == "result" and result.request_id == after
        shared = [r async for r in client.results([after])]
        assert all(r.request_id == after for r in shared)
    row = await query(database_url, lambda s: repo.get_request(s, ours))
    assert row.status == "succeeded" and from_stored(row.result).text == replies[-1].text
    assert await query(database_url, lambda s: repo.get_request(s, refused)) is None  # refused before any row
    lost_row = await query(database_url, lambda s: repo.get_request(s, lost))
    assert lost_row.status == "succeeded"  # computed and stored; only its delivery was dropped


def test_reply_to_must_be_a_topic_name() -> None:
    for bad in ("", "has space", "a/b", "x" * 250):
        obj = msgpack.unpackb(encode_record(request("r1", None, "hi")))
        obj["reply_to"] = bad
        with pytest.raises(RecordError) as err:
            decode_record("requests", msgpack.packb(obj))
        assert err.value.code == "invalid_value" and err.value.request_id == "r1"


async def test_a_refusal_of_another_record_is_not_the_gateways_answer() -> None:
    """A record another producer sent under a gateway request's id, refused by the worker, has its
    refusal land on the gateway's topic (its reply_to named it) under that id: the gateway's waiter
    skips it and answers with the request's own outcome; a refusal of its own record is raised."""
    from loquetier.gateway.answers import Waiter
    from loquetier.gateway.errors import APIError
    from loquetier.messages import ErrorResult, GenerateResult, RecordRef

    ours = ("loquetier.requests", 1, 40)

    def refusal(offset: int) -> ErrorResult:
        return ErrorResult(request_id="r", code="duplicate_request_id", message="taken",
                           record=RecordRef(topic="loquetier.requests", partition=1, offset=offset))

    result = GenerateResult(request_id="r", token_ids=[5], text="hi", finish_reason="stop",
                            usage={"prompt_tokens": 1, "completion_tokens": 1})  # type: ignore[arg-type]
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for record in (refusal(41), refusal(7), result):
        queue.put_nowait(record)
    waiter = Waiter(queue, time.monotonic() + 5, ours)
    assert waiter.ready() == [result]
    for record in (refusal(41), result):
        queue.put_nowait(record)
    assert await waiter.final() == result
    queue.put_nowait(refusal(40))
    with pytest.raises(APIError) as err:
        await waiter.next()
    assert err.value.code == "duplicate_request_id"
