"""The client library: publish requests, jobs and commands; read their results.

    async with LoquetierClient("localhost:9092") as client:
        rid = await client.submit_generate("Hello", adapter_id="pirate", stream=True)
        async for record in client.results([rid]):
            print(record.type, getattr(record, "text", ""))

``results`` reads ``loquetier.results`` from where it stood when the client started (so a
result of anything submitted through this client is never missed), or from a timestamp.
It ends once every id reached a final record ("result"/"error" for a request,
"job_done"/"error" for a job, "control_ack" for a command) unless ``follow`` is set. An error or
ack that names the record it answers (``record``) is skipped for an id this client sent unless it
names a record this client sent: another producer's record under the same id (a typo, or a
hostile reuse of an id it read) gets its own refusal, which is not this client's answer. The
worker delivers at least once:
a result may arrive twice, identical. A results log that shrinks under the reader (a broker
that lost its data and started over) is read again from its beginning.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from typing import Any, Literal, overload

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from loquetier.codec import Record, RecordError
from loquetier.messages import (
    ControlAck,
    ControlCommand,
    GenerateRequest,
    SamplingSpec,
    TrainingJobRecord,
    decode_record,
    encode_record,
)
from loquetier.settings import KafkaSettings

FINAL_TYPES = frozenset({"result", "error", "job_done", "control_ack"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class LoquetierClient:
    def __init__(self, bootstrap: str, kafka: KafkaSettings | None = None) -> None:
        self.bootstrap = bootstrap
        self.kafka = kafka or KafkaSettings(bootstrap=bootstrap)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=2,
            max_request_size=self.kafka.max_record_bytes + 64 * 1024,
        )
        self._start_offsets: dict[TopicPartition, int] = {}
        self._sent: set[tuple[str, int, int]] = set()  # (topic, partition, offset) of every record sent
        self._sent_ids: set[str] = set()  # the request, job and command ids of those records

    async def __aenter__(self) -> LoquetierClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            await self._producer.start()
            self._start_offsets = await self._end_offsets()
        except BaseException:
            await self._producer.stop()  # no "Unclosed AIOKafkaProducer" left behind a failed start
            raise

    @property
    def num_results_partitions(self) -> int:
        """Partitions of the results topic when the client started (0: no such topic)."""
        return len(self._start_offsets)

    async def close(self) -> None:
        await self._producer.stop()

    # --- publishing ------------------------------------------------------------------------

    async def send(self, topic: str, record: Record, key: str | None) -> None:
        sent = await self._producer.send_and_wait(topic, encode_record(record), key=key.encode() if key else None)
        self._sent.add((sent.topic, sent.partition, sent.offset))
        own_id = _record_id(record)
        if own_id is not None:
            self._sent_ids.add(own_id)

    def _is_ours(self, record: Any, rid: str | None) -> bool:
        """Whether a result record answers this client: anything but a refusal of one named record
        under an id this client sent, unless that record is one of ours."""
        ref = getattr(record, "record", None)
        if ref is None or rid not in self._sent_ids:
            return True
        return ref.key() in self._sent

    async def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[Any]:
        """Enqueue arbitrary bytes (tests, other encoders); await the result for the RecordMetadata."""
        future: asyncio.Future[Any] = await self._producer.send(topic, value, key=key)
        return future

    async def submit_generate(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        adapter_id: str | None = None,
        sampling: SamplingSpec | dict[str, Any] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        ttft_ms: float | None = None,
        tpot_ms: float | None = None,
        priority: int = 0,
        stream: bool = False,
        request_id: str | None = None,
    ) -> str:
        """Publish a GenerateRequest with one of ``prompt`` (raw text), ``prompt_token_ids`` or
        ``messages`` (chat turns ``{"role", "content"}``); returns its request_id (the idempotency key)."""
        spec = dict(sampling.model_dump() if isinstance(sampling, SamplingSpec) else (sampling or {}))
        if max_tokens is not None:
            spec["max_tokens"] = max_tokens
        if temperature is not None:
            spec["temperature"] = temperature
        request_id = request_id or new_id("req")
        slo = {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms} if ttft_ms is not None or tpot_ms is not None else None
        req = GenerateRequest.model_validate(
            {
                "request_id": request_id,
                "adapter_id": adapter_id,
                "prompt": prompt,
                "prompt_token_ids": prompt_token_ids,
                "messages": messages,
                "sampling": spec,
                "slo": slo,
                "priority": priority,
                "stream": stream,
            },
            strict=False,
        )
        await self.send(self.kafka.requests_topic, req, request_id)
        return request_id

    async def submit_training(self, job: TrainingJobRecord | dict[str, Any]) -> str:
        """Publish a TrainingJobRecord (a dict gets a job_id when it has none); returns the job_id."""
        if not isinstance(job, TrainingJobRecord):
            job = TrainingJobRecord.model_validate({"job_id": new_id("job"), **job}, strict=False)
        await self.send(self.kafka.training_topic, job, job.job_id)
        return job.job_id

    @overload
    async def control(
        self,
        action: str,
        target_id: str,
        *,
        path: str | None = ...,
        source: str | None = ...,
        worker_id: str | None = ...,
        token: str | None = ...,
        command_id: str | None = ...,
        wait: Literal[False] = ...,
        timeout: float = ...,
    ) -> str: ...

    @overload
    async def control(
        self,
        action: str,
        target_id: str,
        *,
        path: str | None = ...,
        source: str | None = ...,
        worker_id: str | None = ...,
        token: str | None = ...,
        command_id: str | None = ...,
        wait: Literal[True],
        timeout: float = ...,
    ) -> ControlAck: ...

    async def control(
        self,
        action: str,
        target_id: str,
        *,
        path: str | None = None,
        source: str | None = None,
        worker_id: str | None = None,
        token: str | None = None,
        command_id: str | None = None,
        wait: bool = False,
        timeout: float = 30.0,
    ) -> str | ControlAck:
        """Publish a ControlCommand (load/unload/cancel/pause/resume/drain).

        Returns its command_id; with ``wait=True``, the worker's ``control_ack`` for it
        (``ack.ok``, ``ack.code``, ``ack.message``, ``ack.adapter_version``), or
        ``TimeoutError`` after ``timeout`` seconds. ``drain`` needs the operator ``token``.
        """
        command_id = command_id or new_id("cmd")
        cmd = ControlCommand.model_validate(
            {
                "command_id": command_id,
                "action": action,
                "target_id": target_id,
                "path": path,
                "source": source,
                "worker_id": worker_id,
                "token": token,
            },
            strict=False,
        )
        if not wait:
            await self.send(self.kafka.control_topic, cmd, target_id)
            return command_id
        acks = self.results([command_id])  # reads from where this client started: the ack cannot be missed
        first = asyncio.ensure_future(anext(acks))
        try:
            await self.send(self.kafka.control_topic, cmd, target_id)
            ack = await asyncio.wait_for(first, timeout)
        finally:
            first.cancel()
            await acks.aclose()
        if not isinstance(ack, ControlAck):
            raise RuntimeError(f"expected a control_ack for {command_id}, got {ack.type!r}")
        return ack

    # --- results ---------------------------------------------------------------------------

    async def _end_offsets(self) -> dict[TopicPartition, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(self.kafka.results_topic) or set()
            if not parts:
                await consumer.topics()  # refresh metadata once
                parts = consumer.partitions_for_topic(self.kafka.results_topic) or set()
            tps = [TopicPartition(self.kafka.results_topic, p) for p in parts]
            return dict(await consumer.end_offsets(tps)) if tps else {}
        finally:
            await consumer.stop()

    async def results(
        self,
        ids: Iterable[str] | None = None,
        *,
        follow: bool = False,
        since_ms: int | None = None,
        from_beginning: bool = False,
    ) -> AsyncGenerator[Any, None]:
        """Result records for ``ids`` (None: all), in arrival order; see the module doc."""
        wanted = set(ids) if ids is not None else None
        open_ids = set(wanted or ())
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.kafka.max_record_bytes + 64 * 1024,
        )
        await consumer.start()
        try:
            await self._position(consumer, since_ms, from_beginning)
            while follow or open_ids or wanted is None:
                batches = await consumer.getmany(timeout_ms=200)
                if not batches:
                    await self._rewind_shrunk(consumer)
                for records in batches.values():
                    for msg in records:
                        try:
                            record = decode_record("results", msg.value)
                        except RecordError:
                            continue
                        rid = _record_id(record)
                        if wanted is not None and rid not in wanted:
                            continue
                        if not self._is_ours(record, rid):
                            continue  # another producer's record under this id was refused
                        yield record
                        if record.type in FINAL_TYPES:
                            open_ids.discard(rid)
                if wanted is not None and not open_ids and not follow:
                    return
        finally:
            await consumer.stop()

    @staticmethod
    async def _rewind_shrunk(consumer: AIOKafkaConsumer) -> None:
        """Seek to the start of every partition whose log end fell below our position."""
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            if end is not None and end < await consumer.position(tp):
                consumer.seek(tp, 0)

    async def _position(self, consumer: AIOKafkaConsumer, since_ms: int | None, from_beginning: bool) -> None:
        topic = self.kafka.results_topic
        parts: set[int] = set()
        for _ in range(50):
            parts = consumer.partitions_for_topic(topic) or set()
            if parts:
                break
            await consumer.topics()
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
            return
        if since_ms is not None:
            found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                if hit is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, hit.offset)
            return
        for tp in tps:
            consumer.seek(tp, self._start_offsets.get(tp, 0))

    async def wait_result(self, request_id: str, timeout: float = 60.0) -> Any:
        """The final record ("result" or "error") of one request."""

        async def first() -> Any:
            async for record in self.results([request_id]):
                if record.type in FINAL_TYPES:
                    return record
            raise RuntimeError("results ended without a final record")

        return await asyncio.wait_for(first(), timeout)


def _record_id(record: Any) -> str | None:
    """The id a result record answers: request_id, job_id, or a control ack's command_id."""
    for name in ("request_id", "job_id", "command_id"):
        value = getattr(record, name, None)
        if value is not None:
            return str(value)
    return None


def now_ms() -> int:
    return int(time.time() * 1000)
