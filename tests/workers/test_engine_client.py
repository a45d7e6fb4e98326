"""The engine thread's failure is visible at once: a broken engine (EngineBroken) ends the event
stream with its reason, and no coroutine waits forever on a command nobody will run; an engine
runs only a bounded number of steps ahead of a loop that falls behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from loquetier.engine.sequence import SamplingParams
from loquetier.workers.engine_client import EngineClient, EngineStopped, StepFailed
from tests.fakes import FakeEngine

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


async def test_a_broken_engine_stops_its_thread_and_says_why(make_engine: Callable[..., Any]) -> None:
    engine = make_engine()
    forward = engine.model.forward

    def broken(fb: Any, kv: Any = None) -> Any:
        if (fb.input_ids == 200).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(fb, kv)

    engine.model.forward = broken
    client = EngineClient(engine)
    await client.start()
    try:
        await client.submit("ok", prompt_token_ids=[5, 6, 7], sampling=GREEDY)
        events = await asyncio.wait_for(client.next_events(), 30)
        assert events  # the engine serves until the device fails
        await client.submit("bad", prompt_token_ids=[200, 3], sampling=GREEDY)
        with pytest.raises(StepFailed) as caught:
            while True:
                await asyncio.wait_for(client.next_events(), 30)
        assert "device failed" in caught.value.reason and "illegal memory access" in caught.value.reason
        await asyncio.wait_for(asyncio.to_thread(client._thread.join, 10), 15)  # type: ignore[union-attr]
        assert not client.is_running
        with pytest.raises(EngineStopped, match="device failed"):
            await asyncio.wait_for(client.submit("late", prompt_token_ids=[5], sampling=GREEDY), 5)
    finally:
        await client.stop()


async def test_commands_queued_when_the_thread_ends_fail_instead_of_hanging(make_engine: Callable[..., Any]) -> None:
    engine = make_engine()
    client = EngineClient(engine)
    await client.start()
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(e: Any) -> None:  # holds the engine thread while more commands queue up
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        raise KeyboardInterrupt  # a BaseException: ends the thread's loop like a crash would

    first = asyncio.create_task(client.call(slow))
    await asyncio.wait_for(started.wait(), 10)
    queued = [asyncio.create_task(client.stats()) for _ in range(3)]
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(EngineStopped, match="while running this command"):
        await asyncio.wait_for(first, 5)
    for task in queued:
        with pytest.raises(EngineStopped, match="KeyboardInterrupt"):
            await asyncio.wait_for(task, 5)
    await client.stop()


async def test_the_engine_waits_for_a_loop_that_falls_behind_and_still_answers_commands() -> None:
    engine = FakeEngine()
    engine.add_training_job("a", [], SimpleNamespace(max_steps=10**9, checkpoint_every=0, seed=0), job_id="j")
    client = EngineClient(engine, max_steps_ahead=5)
    await client.start()
    try:
        await asyncio.sleep(0.5)  # the loop takes nothing: a fake step takes microseconds
        assert engine.jobs["j"].step == 5
        assert (await asyncio.wait_for(client.stats(), 5))["num_jobs"] == 1  # commands still run
        events = await asyncio.wait_for(client.next_events(), 5)
        assert [ev.step for ev in events] == [1, 2, 3, 4, 5]
        seen = [ev.step for ev in await asyncio.wait_for(client.next_events(), 5)]
        assert seen[0] == 6 and len(seen) <= 5  # woken at once, and bounded again
        await asyncio.sleep(0.3)
        assert engine.jobs["j"].step == seen[-1] + 5
    finally:
        await client.stop()
