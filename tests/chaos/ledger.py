"""Counting outcomes: for every id sent, how many final records came back on the results topic.

A final record is a request's "result" or "error", a job's "job_done" (or its "error" when it
was refused before running), a command's "control_ack". The whole results topic is read to
the fetched high watermark, so a late duplicate is counted too.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from loquetier.codec import RecordError
from loquetier.messages import decode_record

FINAL = {"result", "error", "job_done", "control_ack"}


@dataclass
class Tally:
    """One scenario's outcome (a row of docs/reliability.md)."""

    scenario: str
    sent: int = 0
    once: int = 0
    twice: int = 0  # answered more than once
    lost: int = 0  # never answered
    is_alive: bool = False  # the worker served a fresh request afterwards
    notes: list[str] = field(default_factory=list)  # for people (the table's last column)
    facts: dict[str, Any] = field(default_factory=dict)  # for assertions
    seconds: float = 0.0

    def add(self, counts: dict[str, int], ids: list[str]) -> None:
        self.sent += len(ids)
        self.once += sum(1 for i in ids if counts.get(i, 0) == 1)
        self.twice += sum(1 for i in ids if counts.get(i, 0) > 1)
        self.lost += sum(1 for i in ids if counts.get(i, 0) == 0)


async def final_records(bootstrap: str, topic: str, ids: list[str]) -> dict[str, list[Any]]:
    """Every final record of each id in ``ids``, in topic order per partition."""
    wanted = set(ids)
    found: dict[str, list[Any]] = collections.defaultdict(list)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not parts:
            return found
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        while True:
            batches = await consumer.getmany(timeout_ms=300)
            for records in batches.values():
                for msg in records:
                    try:
                        record = decode_record("results", msg.value)
                    except RecordError:
                        continue
                    key = next((getattr(record, n, None) for n in ("request_id", "job_id", "command_id")
                                if getattr(record, n, None) is not None), None)
                    if record.type in FINAL and key in wanted:
                        found[key].append(record)
            if batches:
                continue
            positions = [await consumer.position(p) for p in parts]
            ends = [consumer.highwater(p) for p in parts]
            if all(e is not None and e <= pos for e, pos in zip(ends, positions, strict=True)):
                return found
    finally:
        await consumer.stop()


def counts_of(found: dict[str, list[Any]], *, job_ids: set[str] | None = None) -> dict[str, int]:
    """Final records per id; a job counts its job_done records (an error record alone when refused)."""
    counts = {}
    for key, records in found.items():
        if job_ids and key in job_ids and any(r.type == "job_done" for r in records):
            counts[key] = sum(1 for r in records if r.type == "job_done")
        else:
            counts[key] = len(records)
    return counts
