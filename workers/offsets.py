"""Which offsets may be committed: the highest position below which every record is done.

Continuous batching finishes records out of order, so the committed position of a
partition is the lowest offset that is accepted but not yet done (or one past the last
accepted record when nothing is pending). Committing ``offset + 1`` of a finished record
while an earlier one still runs would lose the earlier one on a crash (STYLE.md habit 10).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

P = TypeVar("P")  # a partition key, e.g. aiokafka's TopicPartition


class PartitionOffsets:
    """Offsets of one partition, accepted in increasing order, finished in any order."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch  # bumped when offsets go back (a reset or a broker that lost its log)
        self._pending: deque[int] = deque()  # accepted, in order; the head may be done
        self._done: set[int] = set()  # done but not yet below the commit point
        self._last_accepted: int | None = None
        self._position: int | None = None  # every offset < position is done
        self._committed: int | None = None

    @property
    def num_pending(self) -> int:
        """Accepted records not finished yet."""
        return len(self._pending) - len(self._done)

    def accept(self, offset: int) -> int:
        """Track a received record; returns the epoch to pass to :meth:`done`.

        Offsets normally only grow. One at or below the last accepted means the consumer's
        position moved back (offset reset, a broker that lost its log): the partition
        starts a new epoch, and finishes of records from older epochs are ignored, so an
        old record can never mark a new one with the same offset done.
        """
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if self._last_accepted is not None and offset <= self._last_accepted:
            self.epoch += 1
            self._pending.clear()
            self._done.clear()
            self._position = self._committed = None
        self._last_accepted = offset
        self._pending.append(offset)
        return self.epoch

    def done(self, offset: int, epoch: int | None = None) -> None:
        """Mark an accepted record finished (idempotent; unknown offsets are ignored)."""
        if epoch is not None and epoch != self.epoch:
            return
        if offset in self._done or not self._pending or offset < self._pending[0]:
            return
        if offset > self._pending[-1]:
            return
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            head = self._pending.popleft()
            self._done.discard(head)
            self._position = head + 1

    def commit_point(self) -> int | None:
        """The offset to commit (next record to read), or ``None`` when nothing new is done."""
        if self._position is None or self._position == self._committed:
            return None
        return self._position

    def mark_committed(self, position: int) -> None:
        self._committed = position if self._committed is None else max(self._committed, position)


class OffsetTracker(Generic[P]):
    """Per-partition :class:`PartitionOffsets` for the partitions this consumer owns."""

    def __init__(self) -> None:
        self._parts: dict[P, PartitionOffsets] = {}
        self._next_epoch: dict[P, int] = {}  # survives forget(): a re-assigned partition never reuses an epoch

    def accept(self, part: P, offset: int) -> int:
        offsets = self._parts.get(part)
        if offsets is None:
            offsets = self._parts[part] = PartitionOffsets(self._next_epoch.get(part, 0))
        epoch = offsets.accept(offset)
        self._next_epoch[part] = epoch + 1
        return epoch

    def done(self, part: P, offset: int, epoch: int | None = None) -> None:
        offsets = self._parts.get(part)
        if offsets is not None:
            offsets.done(offset, epoch)

    def is_current(self, part: P, epoch: int) -> bool:
        """Whether a record accepted in ``epoch`` of ``part`` still counts: the partition is still
        owned here and its offsets have not gone back since."""
        offsets = self._parts.get(part)
        return offsets is not None and offsets.epoch == epoch

    def num_pending(self, part: P | None = None) -> int:
        if part is not None:
            found = self._parts.get(part)
            return found.num_pending if found else 0
        return sum(p.num_pending for p in self._parts.values())

    def commit_points(self, parts: set[P] | None = None) -> dict[P, int]:
        """``{partition: offset}`` that moved since the last :meth:`mark_committed`."""
        points = {}
        for part, offsets in self._parts.items():
            if parts is not None and part not in parts:
                continue
            point = offsets.commit_point()
            if point is not None:
                points[part] = point
        return points

    def mark_committed(self, points: dict[P, int]) -> None:
        for part, position in points.items():
            offsets = self._parts.get(part)
            if offsets is not None:
                offsets.mark_committed(position)

    def forget(self, parts: set[P] | list[P]) -> None:
        """Drop revoked partitions; their pending records are redelivered to the new owner.

        Records of a forgotten partition that finish later carry their old epoch, which a
        re-assigned partition never reuses, so they cannot mark a new record done."""
        for part in parts:
            self._parts.pop(part, None)

    def partitions(self) -> list[P]:
        return list(self._parts)
