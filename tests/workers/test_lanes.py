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
