"""Job-event lanes: in order within a job, side by side across jobs, never waited for by the pump."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest

from loquetier.workers.lanes import Lanes


async def test_a_lane_keeps_order_and_blocks_neither_the_caller_nor_other_lanes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lanes = Lanes("job event handling")
    gate = asyncio.Event()
    done: list[str] = []

    async def work(name: str, wait: bool = False, fail: bool = False) -> None:
        if wait:
            await gate.wait()
        if fail:
            raise RuntimeError(f"{name} broke")
        done.append(name)

    lanes.submit("job-a", functools.partial(work, "a1", wait=True))  # a slow database write
    lanes.submit("job-a", functools.partial(work, "a2", fail=True))
    lanes.submit("job-a", functools.partial(work, "a3"))
    lanes.submit("job-b", functools.partial(work, "b1"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert done == ["b1"]  # the other job's lane went on; submit returned at once
    assert lanes.num_busy == 1
    gate.set()
    with caplog.at_level(logging.ERROR):
        await lanes.drain()
    assert done == ["b1", "a1", "a3"]  # in order; a failure is logged and does not stop the lane
    assert "a2 broke" in caplog.text
    assert lanes.num_busy == 0


async def test_drain_waits_for_work_submitted_while_draining() -> None:
    lanes = Lanes()
    done: list[int] = []

    async def chain(k: int) -> None:
        await asyncio.sleep(0.01)
        done.append(k)
        if k < 3:
            lanes.submit("job", functools.partial(chain, k + 1))

    lanes.submit("job", functools.partial(chain, 0))
    await asyncio.wait_for(lanes.drain(), 5.0)
    assert done == [0, 1, 2, 3]


async def test_cancelling_a_lane_task_spares_the_work_before_it() -> None:
    lanes = Lanes()
    gate = asyncio.Event()
    called: list[str] = []
    done: list[str] = []

    async def work(name: str) -> None:
        called.append(name)
        await gate.wait()
        done.append(name)

    lanes.submit("job", functools.partial(work, "first"))
    second = lanes.submit("job", functools.partial(work, "second"))
    await asyncio.sleep(0)
    second.cancel()
    drained = asyncio.create_task(lanes.drain())
    await asyncio.sleep(0)
    drained.cancel()  # giving up on the drain cancels nothing either
    gate.set()
    await asyncio.wait_for(lanes.drain(), 5.0)
    assert done == ["first"] and second.cancelled()
    assert called == ["first"]  # work cancelled before its turn is never even called


async def test_only_the_newest_waiting_value_of_a_slot_is_handled() -> None:
    lanes = Lanes()
    gate = asyncio.Event()
    done: list[str] = []

    async def write(name: str) -> None:  # a checkpoint write that takes long
        if name == "c1":
            await gate.wait()
        done.append(name)

    async def handle(value: str) -> None:
        if value.startswith("c"):
            await write(value)
        else:
            done.append(value)

    assert lanes.submit_latest("job", "ckpt", "c1", handle)
    for _ in range(3):
        await asyncio.sleep(0)  # c1 is being written now
    assert lanes.submit_latest("job", "progress", "p2", handle)
    assert lanes.submit_latest("job", "ckpt", "c2", handle)
    for step in range(3, 1000):  # every step's report and checkpoint while c1 is written
        assert not lanes.submit_latest("job", "progress", f"p{step}", handle)
        assert not lanes.submit_latest("job", "ckpt", f"c{step}", handle)
    lanes.submit("job", functools.partial(write, "finished"))
    assert lanes.num_replaced == {"progress": 997, "ckpt": 997}
    assert len(lanes._latest) == 2  # two values wait, not 2,000
    gate.set()
    await asyncio.wait_for(lanes.drain(), 5)
    assert done == ["c1", "p999", "c999", "finished"]  # in order, the newest of each
    assert lanes.submit_latest("job", "ckpt", "c1000", handle)  # nothing waits: queued again
    await asyncio.wait_for(lanes.drain(), 5)
    assert done[-1] == "c1000"


async def test_a_latest_value_cancelled_before_its_turn_leaves_its_slot_free() -> None:
    lanes = Lanes()
    gate = asyncio.Event()
    done: list[str] = []

    async def handle(value: str) -> None:
        if value == "first":
            await gate.wait()
        done.append(value)

    lanes.submit_latest("job", "p", "first", handle)
    await asyncio.sleep(0)
    lanes.submit_latest("job", "c", "doomed", handle)
    doomed = lanes._tails["job"]
    doomed.cancel()
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(lanes.drain(), 5)
    assert done == ["first"] and lanes._latest == {}
    assert lanes.submit_latest("job", "c", "again", handle)
    await asyncio.wait_for(lanes.drain(), 5)
    assert done == ["first", "again"]
