"""The clients of ``bench_service``: independent producers (requests, training jobs, control
commands, each its own Kafka producer) and one reader of the results topic, with the ledger of what
was published and what came back.

Times are ``time.perf_counter()`` of this process: a request's arrival is the moment just before its
record is handed to the producer, its first token the moment the reader decoded the first record
carrying one of its tokens, its finish the moment its ``result`` record was decoded. So TTFT and TPOT
are what a client of the service sees, broker and both fetch waits included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .metrics import RequestRecord

FINAL_TYPES = ("result", "error")


@dataclass
class Ledger:
    """Published ids and every record read back, by id."""

    t0: float = 0.0
    published: dict[str, float] = field(default_factory=dict)  # request_id -> publish time
    records: dict[str, RequestRecord] = field(default_factory=dict)
    last_token_s: dict[str, float] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)  # request_id -> final records read
    usage: dict[str, int] = field(default_factory=dict)  # request_id -> completion tokens (result)
    errors: dict[str, str] = field(default_factory=dict)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)  # command_id -> control_ack
    job_done: Counter[str] = field(default_factory=Counter)
    job_status: dict[str, str] = field(default_factory=dict)
    progress: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # job -> (time, tokens)
    counts: Counter[str] = field(default_factory=Counter)  # results read, by record type
    counts_in_window: Counter[str] = field(default_factory=Counter)
    num_token_ids: int = 0
    in_window: bool = False
    engine_timings: dict[str, dict[str, float]] = field(default_factory=dict)  # request_id -> result.timings

    def take(self, raw: bytes, now: float) -> None:
        obj = msgpack.unpackb(raw, raw=False)
        kind = obj.get("type", "?")
        self.counts[kind] += 1
        if self.in_window:
            self.counts_in_window[kind] += 1
        rid = obj.get("request_id")
        rec = self.records.get(rid) if rid is not None else None
        if kind == "token" and rec is not None:
            ids = obj.get("token_ids") or []
            self.num_token_ids += len(ids)
            if ids:
                if rec.first_token_s is None:
                    rec.first_token_s = now
                self.last_token_s[rid] = now
                rec.num_output_tokens = max(rec.num_output_tokens, int(obj.get("index", 0)) + len(ids))
        elif kind in FINAL_TYPES and rid is not None:
            self.answers[rid] += 1
            if rec is not None and rec.finish_s is None:
                rec.finish_s = now
                if kind == "result":
                    self.engine_timings[rid] = {k: float(v) for k, v in (obj.get("timings") or {}).items()
                                                if v is not None}
                    n = int(obj["usage"]["completion_tokens"])
                    self.usage[rid] = n
                    rec.num_output_tokens = n
                    if rec.first_token_s is None:  # nothing streamed before the result
                        rec.first_token_s = now
                    last = self.last_token_s.get(rid, now)
                    rec.tpot_s = (last - rec.first_token_s) / (n - 1) if n > 1 else None
                else:
                    self.errors[rid] = f"{obj.get('code')}: {obj.get('message')}"
        elif kind == "control_ack":
            self.acks[str(obj.get("command_id"))] = obj
        elif kind == "progress":
            self.progress.setdefault(obj["job_id"], []).append((now, int(obj.get("tokens_processed") or 0)))
        elif kind == "job_done":
            self.job_done[obj["job_id"]] += 1
            self.job_status[obj["job_id"]] = obj.get("status", "?")
        elif kind == "error" and obj.get("job_id"):
            self.job_done[obj["job_id"]] += 1
            self.job_status[obj["job_id"]] = f"error {obj.get('code')}"

    def num_answered(self, ids: Any) -> int:
        return sum(1 for r in ids if self.answers[r] > 0)


class ResultsReader:
    """Reads the whole results topic from its end at start, with a short fetch wait (20 ms)."""

    def __init__(self, bootstrap: str, topic: str, ledger: Ledger, fetch_wait_ms: int = 20) -> None:
        from aiokafka import AIOKafkaConsumer

        self.topic, self.ledger = topic, ledger
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                         fetch_max_wait_ms=fetch_wait_ms, auto_offset_reset="latest",
                                         max_partition_fetch_bytes=8 << 20, client_id="svcbench-reader")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import TopicPartition

        await self.consumer.start()
        parts = self.consumer.partitions_for_topic(self.topic) or set()
        assigned = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(assigned)
        await self.consumer.seek_to_end(*assigned)
        for tp in assigned:  # resolve the positions now: records published from here on are read
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._run(), name="results-reader")

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.perf_counter()
            for records in batches.values():
                for r in records:
                    self.ledger.take(r.value, now)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(asyncio.CancelledError, Exception):  # aiokafka's own cancelled fetch
            await self.consumer.stop()


class Producer:
    """One independent producer (its own client and connection) for one kind of record."""

    def __init__(self, bootstrap: str, name: str) -> None:
        from aiokafka import AIOKafkaProducer

        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id=f"svcbench-{name}", acks="all",
                                         linger_ms=0, max_request_size=8 << 20)
        self.num_sent = 0

    async def start(self) -> None:
        await self.producer.start()

    async def send(self, topic: str, record: Any, key: str) -> None:
        from loquetier.messages import encode_record

        await self.producer.send_and_wait(topic, encode_record(record), key=key.encode())
        self.num_sent += 1

    async def stop(self) -> None:
        await self.producer.stop()
