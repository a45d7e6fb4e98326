"""The offset tracker: commit only below the lowest unfinished record, per partition."""

from __future__ import annotations

import random

import pytest

from loquetier.workers.offsets import OffsetTracker, PartitionOffsets


def test_nothing_done_nothing_to_commit() -> None:
    p = PartitionOffsets()
    for o in range(5):
        assert p.accept(o) == 0
    assert p.commit_point() is None
    assert p.num_pending == 5


def test_out_of_order_finish_waits_for_the_head() -> None:
    p = PartitionOffsets()
    for o in (10, 11, 12):
        p.accept(o)
    p.done(12)
    p.done(11)
    assert p.commit_point() is None  # 10 still runs
    p.done(10)
    assert p.commit_point() == 13
    assert p.num_pending == 0


def test_partial_prefix() -> None:
    p = PartitionOffsets()
    for o in range(6):
        p.accept(o)
    for o in (0, 1, 3, 5):
        p.done(o)
    assert p.commit_point() == 2
    p.mark_committed(2)
    assert p.commit_point() is None
    p.done(2)
    assert p.commit_point() == 4
    p.done(4)
    assert p.commit_point() == 6


def test_gaps_in_offsets_are_fine() -> None:
    p = PartitionOffsets()
    for o in (3, 7, 20):
        p.accept(o)
    p.done(7)
    assert p.commit_point() is None
    p.done(3)
    assert p.commit_point() == 8
    p.done(20)
    assert p.commit_point() == 21


def test_done_is_idempotent_and_unknown_offsets_are_ignored() -> None:
    p = PartitionOffsets()
    assert p.accept(5) == 0
    p.done(5)
    p.done(5)
    p.done(99)  # never accepted: ignored
    p.done(1)
    assert p.commit_point() == 6
    assert p.num_pending == 0


def test_offsets_going_back_start_a_new_epoch() -> None:
    """A broker that lost its log (or an offset reset) restarts numbering: old finishes
    must not mark the new records with the same offsets done."""
    p = PartitionOffsets()
    old = [p.accept(o) for o in (40, 41, 42)]
    assert old == [0, 0, 0]
    p.done(40, 0)
    assert p.commit_point() == 41
    p.mark_committed(41)
    assert p.accept(0) == 1 and p.accept(1) == 1
    p.done(41, 0)  # a record of the old epoch finishing late
    p.done(0, 0)  # same number, old epoch: ignored
    assert p.commit_point() is None and p.num_pending == 2
    p.done(0, 1)
    assert p.commit_point() == 1  # lower than before the reset, and allowed
    p.done(1, 1)
    assert p.commit_point() == 2


def test_negative_offset_rejected() -> None:
    with pytest.raises(ValueError):
        PartitionOffsets().accept(-1)


def test_committed_position_never_goes_back() -> None:
    p = PartitionOffsets()
    p.accept(0)
    p.done(0)
    p.mark_committed(1)
    p.mark_committed(0)
    assert p.commit_point() is None


def test_tracker_partitions_are_independent_and_forgettable() -> None:
    t: OffsetTracker[tuple[str, int]] = OffsetTracker()
    a, b = ("req", 0), ("req", 1)
    t.accept(a, 0)
    t.accept(a, 1)
    t.accept(b, 0)
    t.done(a, 1)
    t.done(b, 0)
    assert t.commit_points() == {b: 1}
    assert t.num_pending() == 1 and t.num_pending(a) == 1 and t.num_pending(b) == 0
    t.mark_committed({b: 1})
    assert t.commit_points() == {}
    t.forget([a])
    assert t.num_pending() == 0
    t.done(a, 0)  # a late finish of a revoked partition is harmless
    assert t.commit_points() == {}
    assert t.commit_points({b}) == {}
    assert t.partitions() == [b]


@pytest.mark.parametrize("seed", range(30))
def test_random_against_a_reference(seed: int) -> None:
    """Random accept/finish orders, with gaps and duplicates, versus the obvious definition."""
    rng = random.Random(seed)
    p = PartitionOffsets()
    offsets: list[int] = []
    o = rng.randrange(0, 100)
    for _ in range(rng.randrange(1, 200)):
        offsets.append(o)
        o += rng.choice((1, 1, 1, 2, 5))
    for off in offsets:
        assert p.accept(off) == 0
    done: set[int] = set()
    last_committed: int | None = None
    order = offsets[:]
    rng.shuffle(order)
    for off in order:
        p.done(off)
        if rng.random() < 0.3:
            p.done(off)
        done.add(off)
        # the reference: one past the longest fully-done prefix
        prefix = None
        for x in offsets:
            if x not in done:
                break
            prefix = x + 1
        point = p.commit_point()
        if prefix is None or prefix == last_committed:
            assert point is None
        else:
            assert point == prefix
            if rng.random() < 0.5:
                p.mark_committed(point)
                last_committed = point
        assert p.num_pending == len(offsets) - len(done)
    assert p.num_pending == 0


def test_a_reassigned_partition_never_reuses_an_epoch() -> None:
    """A partition revoked and assigned again (e.g. a broker that lost its log) starts over at
    the same offsets: a late finish of the old record 0 must not mark the new record 0 done."""
    t: OffsetTracker[tuple[str, int]] = OffsetTracker()
    a = ("req", 0)
    old = t.accept(a, 0)
    t.forget([a])
    new = t.accept(a, 0)
    assert new != old
    t.done(a, 0, old)
    assert t.num_pending(a) == 1 and t.commit_points() == {}
    t.done(a, 0, new)
    assert t.commit_points() == {a: 1}
