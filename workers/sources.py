"""A Kafka record as the request path knows it, and the key its request row remembers it by.

A row lists the records its outcome was published for (``answered_records``). Offsets alone can
repeat: tansu keeps its log in memory, so a restarted broker numbers a partition from 0 again and a
client's retry can land on an offset an answered record had. The record's timestamp tells such a new
record apart from a redelivery of the answered one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from loquetier.messages import RecordRef


class Source(NamedTuple):
    """Where a request record came from, and what marks it done."""

    part: Any  # aiokafka's TopicPartition
    offset: int
    epoch: int  # the offset tracker's, passed back with the offset to mark the record done
    timestamp: int | None  # ms, the record's own (producer's clock, or the broker's append time)

    def ref(self) -> RecordRef:
        """The record's place, as a refusal of this record alone names it."""
        return RecordRef(topic=self.part.topic, partition=self.part.partition, offset=self.offset)

    def key(self) -> dict[str, Any]:
        """The record as ``answered_records`` lists it (JSON: compared by value)."""
        return {
            "topic": getattr(self.part, "topic", None),
            "partition": getattr(self.part, "partition", None),
            "offset": self.offset,
            "timestamp": self.timestamp,
        }


def record_timestamp(record: Any) -> int | None:
    """A consumed record's timestamp in ms; None when it has none (-1 on the wire)."""
    stamp = getattr(record, "timestamp", None)
    return stamp if isinstance(stamp, int) and stamp >= 0 else None


def record_ref(record: Any) -> RecordRef:
    """A consumed record's place (aiokafka's ConsumerRecord)."""
    return RecordRef(topic=record.topic, partition=record.partition, offset=record.offset)
