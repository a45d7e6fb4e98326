"""A call that ends before its answers (the client left, a stalled stream) keeps its key's places
until each request's worker says it is over, so a key that calls and leaves over and over cannot
hold more of the workers than its limit."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from loquetier.db.keys_repo import KeyOwner
from loquetier.gateway import answers
from loquetier.gateway.auth import Auth
from loquetier.gateway.completions import _Call


class _Bus:
    def __init__(self) -> None:
        self.waiting: set[str] = set()
        self.published: list[tuple[str, Any]] = []

    def forget(self, rid: str) -> None:
        self.waiting.discard(rid)

    async def publish(self, topic: str, record: Any, key: str) -> None:
        self.published.append((topic, record))


class _Gateway:
    def __init__(self) -> None:
        self.bus = _Bus()
        self.settings = SimpleNamespace(kafka=SimpleNamespace(control_topic="control"))
        self.held: dict[str, int] = {}
        self.auth = Auth(_nobody, cache_s=1.0)

    def release(self, key_id: str, num: int) -> None:
        self.held[key_id] -= num


OWNER = KeyOwner("k", "t", None)  # no rate limits: the places alone are under test


async def _nobody(key: str) -> KeyOwner | None:
    return None


def _waiter(timeout_s: float = 30.0) -> answers.Waiter:
    return answers.Waiter(asyncio.Queue(), time.monotonic() + timeout_s)


async def test_an_ended_call_holds_the_places_of_its_running_requests_until_they_end() -> None:
    gw = _Gateway()
    rids = ["r0", "r1", "r2", "r3"]
    gw.bus.waiting.update(rids[:3])
    gw.held["k"] = 4
    answered, running, failing = _waiter(), _waiter(), _waiter()
    answered.done = True
    call = _Call(gw, OWNER, [SimpleNamespace(rid=r) for r in rids], [0] * 4, [answered, running, failing])  # type: ignore[arg-type]
    call.end()  # r3 was never published
    await asyncio.sleep(0.05)
    assert gw.held["k"] == 2 and gw.bus.waiting == {"r1", "r2"}
    assert sorted(r.target_id for _, r in gw.bus.published) == ["r1", "r2"]  # cancels went out
    assert all(r.action == "cancel" for _, r in gw.bus.published)
    running.queue.put_nowait(SimpleNamespace(type="token", record=None))
    await asyncio.sleep(0.05)
    assert gw.held["k"] == 2  # a token is not the end
    running.queue.put_nowait(SimpleNamespace(type="result", record=None))
    await asyncio.sleep(0.05)
    assert gw.held["k"] == 1 and gw.bus.waiting == {"r2"}
    failing.queue.put_nowait(SimpleNamespace(type="error", record=None, code="worker_stopped", message="stopping"))
    await asyncio.sleep(0.05)
    assert gw.held["k"] == 0 and not gw.bus.waiting
    call.end()  # once
    assert gw.held["k"] == 0


async def test_a_request_whose_worker_never_answers_frees_its_place_at_its_deadline() -> None:
    gw = _Gateway()
    gw.bus.waiting.add("r0")
    gw.held["k"] = 1
    call = _Call(gw, OWNER, [SimpleNamespace(rid="r0")], [0], [_waiter(timeout_s=0.3)])  # type: ignore[arg-type]
    call.end()
    await asyncio.sleep(0.1)
    assert gw.held["k"] == 1
    await asyncio.sleep(0.4)
    assert gw.held["k"] == 0 and not gw.bus.waiting
