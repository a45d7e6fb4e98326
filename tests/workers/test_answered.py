"""Answered records: a Kafka record whose answer went out is not answered again when it comes back
(real PostgreSQL; the engine client and the publisher are stand-ins, so that a test chooses what a
redelivery is and when a publish is acknowledged; the last tests publish to a real broker and read
it back for an answer the row does not list)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loquetier.db import repo
from loquetier.db.store import Store
from loquetier.engine.events import RequestFinished, Timings, Usage
from loquetier.messages import GenerateRequest, TokenResult, decode_record
from loquetier.workers import publisher as real_publisher
from loquetier.workers.answer_log import AnswerLog
from loquetier.workers.inference import Inference
from loquetier.workers.publisher import PublishAborted
from loquetier.workers.sources import Source

pytestmark = pytest.mark.postgres

PART = TopicPartition("requests", 0)


class Client:
    """The engine client's side the request path uses: submissions are only counted."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    async def submit(self, request_id: str, **kwargs: Any) -> None:
        self.submitted.append(request_id)

    async def abort(self, request_id: str) -> None:
        pass


class Publisher:
    """Acknowledges every record at once, unless ``gate`` is closed (then it waits) or ``fail`` is set."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def publish(self, record: Any, key: str | None, *, topic: str | None = None) -> bool:
        await self.gate.wait()
        if self.fail:
            raise PublishAborted("the broker did not take the record in time")
        self.sent.append(record)
        return True

    async def stream(self, record: Any, key: str, *, topic: str | None = None) -> None:
        pass

    def finals(self, rid: str) -> list[Any]:
        return [r for r in self.sent if r.request_id == rid and r.type in ("result", "error")]


class Worker:
    """One worker's request path: an Inference with its own client, the shared publisher and store."""

    def __init__(self, store: Store, publisher: Any, answers: AnswerLog | None = None) -> None:
        self.client = Client()
        self.done: list[Source] = []
        self.inference = Inference(
            self.client,
            store,
            publisher,
            None,
            worker_id=f"w-{uuid.uuid4().hex[:6]}",  # type: ignore[arg-type]
            on_done=self.done.append,
            answers=answers,
        )

    async def deliver(self, req: GenerateRequest, source: Source) -> None:
        task = self.inference.accept(req, source)
        if task is not None:
            await task

    async def finish(self, rid: str) -> None:
        await self.inference.on_event(
            RequestFinished(rid, [6, 7, 8], "abc", "length", Usage(2, 3), Timings(1.0, 2.0, 3.0))
        )
        await self.inference.settle()


def request(rid: str, prompt: list[int] | None = None) -> GenerateRequest:
    return GenerateRequest.model_validate(
        {"schema": 1, "request_id": rid, "prompt_token_ids": prompt or [5, 6], "sampling": {"max_tokens": 3}}
    )


def source(offset: int, timestamp: int | None = 1_700_000_000_000) -> Source:
    return Source(PART, offset, 0, timestamp)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(database_url)
    yield store
    await store.close()


def _ordered(key: dict[str, Any]) -> str:
    """A record key as a comparable string (its fields in a fixed order)."""
    return json.dumps(key, sort_keys=True)


async def answered(store: Store, rid: str) -> list[dict[str, Any]]:
    """The records the row lists as answered (not those listed pending when its outcome was stored)."""
    row = await store.tx(lambda s: repo.get_request(s, rid))
    assert row is not None
    return [r for r in row.answered_records if not r.get("pending")]


async def pending(store: Store, rid: str) -> list[dict[str, Any]]:
    row = await store.tx(lambda s: repo.get_request(s, rid))
    assert row is not None
    return [{k: v for k, v in r.items() if k != "pending"} for r in row.answered_records if r.get("pending")]


async def test_a_redelivered_answered_record_is_only_marked_done(store: Store) -> None:
    rid, publisher = f"r-{uuid.uuid4().hex[:8]}", Publisher()
    first = Worker(store, publisher)
    await first.deliver(request(rid), source(10))
    await first.finish(rid)
    assert len(publisher.finals(rid)) == 1 and first.done == [source(10)]
    # the first worker was killed before offset 10 was committed: the record comes back elsewhere
    survivor = Worker(store, publisher)
    await survivor.deliver(request(rid), source(10))
    assert len(publisher.finals(rid)) == 1  # no second answer
    assert survivor.done == [source(10)]  # and done: its offset can be committed
    assert survivor.client.submitted == [] and survivor.inference.num_inflight == 0
    assert await answered(store, rid) == [source(10).key()]


async def test_a_new_record_for_the_request_gets_the_stored_result(store: Store) -> None:
    rid, publisher = f"r-{uuid.uuid4().hex[:8]}", Publisher()
    worker = Worker(store, publisher)
    await worker.deliver(request(rid), source(10))
    await worker.finish(rid)
    # a client's retry at another offset; and one at offset 10 again after a broker restart (another timestamp)
    retries = [source(11), source(10, timestamp=1_700_000_999_000), source(12, timestamp=None)]
    for retry in retries:
        await worker.deliver(request(rid), retry)
    await worker.inference.settle()
    finals = publisher.finals(rid)
    assert len(finals) == 4 and all(f.model_dump() == finals[0].model_dump() for f in finals)
    assert worker.done == [source(10), *retries] and worker.client.submitted == [rid]
    # each delivery's records are noted by a transaction of their own in the background: all four,
    # each once, in whatever order those transactions commit
    assert sorted(map(_ordered, await answered(store, rid))) == sorted(
        _ordered(s.key()) for s in [source(10), *retries])
    await worker.deliver(request(rid), source(12, timestamp=None))  # that retry, redelivered
    assert len(publisher.finals(rid)) == 4
    await worker.deliver(request(rid, prompt=[9]), source(13))  # other content: still refused
    await worker.inference.settle()
    refused = publisher.finals(rid)[-1]
    assert refused.type == "error" and refused.code == "duplicate_request_id"
    await worker.deliver(request(rid, prompt=[9]), source(13))  # the refused record, redelivered
    assert len(publisher.finals(rid)) == 5 and worker.done[-1] == source(13)


async def test_duplicates_attached_to_a_running_request_are_answered_by_one_publish(store: Store) -> None:
    """Copies share the request's topic and key: one result record answers every one of them, and each
    is listed answered, so none is answered again after a restart."""
    rid, publisher = f"r-{uuid.uuid4().hex[:8]}", Publisher()
    worker = Worker(store, publisher)
    await worker.deliver(request(rid), source(20))
    assert worker.inference.accept(request(rid), source(21)) is None  # attached to the running one
    assert worker.inference.accept(request(rid), source(22)) is None
    await worker.finish(rid)
    assert len(publisher.finals(rid)) == 1 and worker.client.submitted == [rid]
    assert worker.done == [source(o) for o in (20, 21, 22)]
    assert await answered(store, rid) == [source(o).key() for o in (20, 21, 22)]
    survivor = Worker(store, publisher)
    for offset in (20, 21, 22):
        await survivor.deliver(request(rid), source(offset))
    assert len(publisher.finals(rid)) == 1 and survivor.done == [source(o) for o in (20, 21, 22)]


async def test_a_record_is_listed_answered_only_after_its_publish_is_acknowledged(store: Store) -> None:
    rid, publisher = f"r-{uuid.uuid4().hex[:8]}", Publisher()
    worker = Worker(store, publisher)
    await worker.deliver(request(rid), source(30))
    publisher.gate.clear()  # the broker has not acknowledged yet
    finishing = asyncio.create_task(worker.finish(rid))
    await asyncio.sleep(0.3)
    row = await store.tx(lambda s: repo.get_request(s, rid))
    assert row is not None and row.finished_at is not None  # the outcome is stored first
    assert await answered(store, rid) == [] and worker.done == []
    assert await pending(store, rid) == [source(30).key()]  # on its way: listed pending only
    publisher.fail = True  # the worker stops and the broker never took it: nothing answered, nothing done
    publisher.gate.set()
    with pytest.raises(PublishAborted):
        await finishing
    await worker.inference.settle()
    assert await answered(store, rid) == [] and worker.done == []
    publisher.fail = False
    survivor = Worker(store, publisher)  # the record comes back: it is answered now, not lost
    await survivor.deliver(request(rid), source(30))
    assert len(publisher.finals(rid)) == 1 and survivor.done == [source(30)]


async def test_a_crash_before_the_answered_write_ends_in_a_republish(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid, publisher = f"r-{uuid.uuid4().hex[:8]}", Publisher()

    async def lost(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionResetError("the worker died here")

    worker = Worker(store, publisher)
    await worker.deliver(request(rid), source(40))
    with monkeypatch.context() as patched:
        patched.setattr(repo, "add_answered_records", lost)
        await worker.finish(rid)
    assert len(publisher.finals(rid)) == 1 and worker.done == [source(40)]
    assert await answered(store, rid) == []  # the answer went out, its note did not
    survivor = Worker(store, publisher)
    await survivor.deliver(request(rid), source(40))
    await survivor.inference.settle()
    finals = publisher.finals(rid)
    assert len(finals) == 2 and finals[0].model_dump() == finals[1].model_dump()  # once more, never none
    assert survivor.done == [source(40)] and survivor.client.submitted == []
    assert await answered(store, rid) == [source(40).key()]  # the republish is noted
    await survivor.deliver(request(rid), source(40))
    assert len(publisher.finals(rid)) == 2


# --- the reply topic read back: a real broker -------------------------------------------------------


async def finals_on(bootstrap: str, topic: str, rid: str) -> list[Any]:
    """Every final record of ``rid`` on ``topic``, read from the start."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        found = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found += [decode_record("results", r.value) for r in records if r.key == rid.encode()]
        return [r for r in found if r.type in ("result", "error")]
    finally:
        await consumer.stop()


@pytest.fixture
async def broker_publisher(topics: Any) -> AsyncIterator[tuple[Any, real_publisher.Publisher]]:
    settings = await topics()
    publisher = real_publisher.Publisher(settings.kafka.bootstrap, settings.kafka, worker_id="w")
    await publisher.start()
    yield settings.kafka, publisher
    await publisher.stop()


async def crash_after_publish(worker: Worker, rid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finish ``rid`` and lose the write that lists its record answered (the worker died there)."""

    async def lost(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionResetError("the worker died here")

    with monkeypatch.context() as patched:
        patched.setattr(repo, "add_answered_records", lost)
        await worker.finish(rid)
    assert await answered(worker.inference._store, rid) == []


@pytest.mark.kafka
async def test_an_answer_found_on_the_reply_topic_is_not_published_again(
    store: Store, broker_publisher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka, publisher = broker_publisher
    rid, other = f"r-{uuid.uuid4().hex[:8]}", f"r-{uuid.uuid4().hex[:8]}"
    sent_at = int(time.time() * 1000) - 500
    original = source(50, timestamp=sent_at)
    first = Worker(store, publisher)
    await first.deliver(request(rid), original)
    await first.deliver(request(other), source(51, timestamp=sent_at))
    await first.finish(other)  # another request's final, and token records, share the topic
    for index in range(5):
        await publisher.stream(TokenResult(request_id=rid, index=index, token_ids=[index], text="x"), rid)
    await crash_after_publish(first, rid, monkeypatch)
    assert len(await finals_on(kafka.bootstrap, kafka.results_topic, rid)) == 1

    assert await pending(store, rid) == [original.key()]  # listed when the outcome was stored

    answers = AnswerLog(kafka.bootstrap, kafka, worker_id="survivor")
    survivor = Worker(store, publisher, answers)
    await survivor.deliver(request(rid), original)  # redelivered: the final is on the topic
    await survivor.inference.settle()
    assert survivor.done == [original] and survivor.client.submitted == []
    assert len(await finals_on(kafka.bootstrap, kafka.results_topic, rid)) == 1  # answered once
    assert await answered(store, rid) == [original.key()] and answers.num_reads == 1
    # a client's retry is a new record, whatever its clock says: stamped before the answer (a clock
    # behind), or far in the past, it still gets the stored result
    for offset, stamp in ((52, sent_at + 100), (53, 1575)):
        retry = source(offset, timestamp=stamp)
        await survivor.deliver(request(rid), retry)
        await survivor.inference.settle()
        assert survivor.done[-1] == retry
    finals = await finals_on(kafka.bootstrap, kafka.results_topic, rid)
    assert len(finals) == 3 and all(f.model_dump() == finals[0].model_dump() for f in finals)
    assert answers.num_reads == 1  # the topic is read for a record pending at the finish only
    await survivor.deliver(request(rid), original)  # the original once more: listed answered now
    assert len(await finals_on(kafka.bootstrap, kafka.results_topic, rid)) == 3 and answers.num_reads == 1


@pytest.mark.kafka
async def test_a_reply_topic_that_cannot_be_read_leaves_the_record_answered_again(
    store: Store, broker_publisher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka, publisher = broker_publisher
    rid = f"r-{uuid.uuid4().hex[:8]}"
    original = source(60, timestamp=int(time.time() * 1000) - 500)
    first = Worker(store, publisher)
    await first.deliver(request(rid), original)
    await crash_after_publish(first, rid, monkeypatch)
    nowhere = AnswerLog("127.0.0.1:9", kafka, worker_id="survivor", timeout_s=1.0)  # nothing listens there
    survivor = Worker(store, publisher, nowhere)
    started = time.monotonic()
    await survivor.deliver(request(rid), original)
    await survivor.inference.settle()
    assert time.monotonic() - started < 10
    assert len(await finals_on(kafka.bootstrap, kafka.results_topic, rid)) == 2  # twice, never none
    assert survivor.done == [original] and await answered(store, rid) == [original.key()]
