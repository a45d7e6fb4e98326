"""A key's requests per minute count each choice of a call: ``n`` choices of k prompts are k x n
requests for the workers, so a key limited to N a minute cannot ask for N x 64 of them."""

from __future__ import annotations

import random

import pytest
from starlette.requests import Request

from loquetier.db.keys_repo import KeyOwner
from loquetier.gateway.auth import Auth
from loquetier.gateway.errors import APIError


def _request(key: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/completions",
                    "headers": [(b"authorization", f"Bearer {key}".encode())]})


async def test_each_choice_of_a_call_takes_a_request_of_the_key() -> None:
    rpm = random.randint(6, 20)
    owner = KeyOwner("key-1", "tenant-1", rpm)

    async def lookup(key: str) -> KeyOwner | None:
        return owner if key == "lq-good" else None

    auth = Auth(lookup, cache_s=10)
    calls = 0
    while True:  # calls of 3 choices: the first taken by owner(), two by charge()
        try:
            found = await auth.owner(_request("lq-good"))
            auth.charge(found, 2)
        except APIError as exc:
            assert exc.status == 429 and exc.code == "rate_limit_exceeded" and "retry in" in exc.message
            break
        calls += 1
        assert calls <= rpm
    assert calls == rpm // 3  # a burst of rpm requests, three a call

    fresh = Auth(lookup, cache_s=10)
    for _ in range(3):  # refused calls cost the key nothing
        found = await fresh.owner(_request("lq-good"))
        with pytest.raises(APIError) as too_big:  # more choices in one call than the key's whole minute
            fresh.charge(found, rpm)
        assert too_big.value.status == 429 and "send fewer choices" in too_big.value.message
    for _ in range(rpm):  # the whole minute is still there, one request a call
        await fresh.owner(_request("lq-good"))
    with pytest.raises(APIError):
        await fresh.owner(_request("lq-good"))

    free = KeyOwner("key-2", "tenant-2", None)  # no limit: charging is free
    for _ in range(100):
        Auth(lookup, cache_s=10).charge(free, 64)
