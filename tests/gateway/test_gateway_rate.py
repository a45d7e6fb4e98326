"""A key's rate limits. Its requests per minute count each choice of a call: ``n`` choices of k
prompts are k x n requests for the workers, so a key limited to N a minute cannot ask for N x 64 of
them. Its tokens per minute are taken before a call runs (prompts, and max_tokens for each choice)
and settled by each choice's usage."""

from __future__ import annotations

import random
import re

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


async def _lookup_none(key: str) -> KeyOwner | None:
    return None


def test_a_calls_tokens_are_taken_before_it_runs_and_settled_by_its_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from loquetier.gateway import auth as auth_module

    # the buckets refill with time: a still clock, so that a slow machine changes no count
    monkeypatch.setattr(auth_module, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    tpm = random.randint(1_000, 5_000)
    owner = KeyOwner("key-t", "tenant-t", None, tpm)
    auth = Auth(_lookup_none, cache_s=10)
    first = random.randint(tpm // 2 + 1, tpm - 10)
    auth.charge(owner, 0, first)
    assert int(auth.headers(owner)["x-ratelimit-remaining-tokens"]) in range(tpm - first, tpm - first + 2)
    with pytest.raises(APIError) as waiting:  # the rest of the minute does not hold another such call
        auth.charge(owner, 0, first)
    assert waiting.value.status == 429 and "tokens per minute reached" in waiting.value.message
    assert waiting.value.retry_after is not None and waiting.value.retry_after > 0
    used = random.randint(1, 9)  # the call below takes first again: first + used <= tpm
    auth.settle_tokens(owner, first, used)  # the answer used far less than it took: the rest comes back
    left = int(auth.headers(owner)["x-ratelimit-remaining-tokens"])
    assert left in range(tpm - used, tpm - used + 2)
    auth.charge(owner, 0, first)  # and holds the same call now
    auth.settle_tokens(owner, 0, 3 * tpm)  # a call that asked no max_tokens pays its completion afterwards
    with pytest.raises(APIError) as below_zero:
        auth.charge(owner, 0, 1)
    assert below_zero.value.retry_after is not None and below_zero.value.retry_after > 60  # refills at tpm/min
    assert auth.headers(owner)["x-ratelimit-remaining-tokens"] == "0"
    reset = re.fullmatch(r"(\d+)m(\d+)s", auth.headers(owner)["x-ratelimit-reset-tokens"])  # as OpenAI writes it
    assert reset is not None and 3 <= int(reset.group(1)) <= 4 and int(reset.group(2)) < 60  # below zero
    with pytest.raises(APIError) as too_big:
        Auth(_lookup_none, cache_s=10).charge(owner, 0, tpm + 1)
    assert too_big.value.status == 429 and "allows at once" in too_big.value.message
    assert KeyOwner("k", "t", None).max_tokens_per_minute is None
    assert Auth(_lookup_none, cache_s=10).headers(KeyOwner("k", "t", None)) == {}  # no limits: no headers


async def test_a_call_refused_for_its_tokens_costs_no_requests() -> None:
    rpm, tpm = random.randint(5, 9), random.randint(100, 200)
    owner = KeyOwner("key-b", "tenant-b", rpm, tpm)

    async def lookup(key: str) -> KeyOwner | None:
        return owner

    auth = Auth(lookup, cache_s=10)
    for _ in range(3 * rpm):  # each refused for its tokens: the requests it took go back
        found = await auth.owner(_request("lq-b"))
        with pytest.raises(APIError):
            auth.charge(found, 1, tpm + 1)
    headers = auth.headers(owner)
    assert headers["x-ratelimit-remaining-requests"] == str(rpm) and headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_each_prompt_is_taken_and_settled_once_for_its_choices() -> None:
    from types import SimpleNamespace

    from loquetier.gateway.completions import _Call, _Choice, _token_takes, prompt_tokens_estimate
    from loquetier.messages import GenerateResult

    ids = [random.randrange(50_000) for _ in range(random.randint(5, 40))]
    text = "x" * random.randint(1, 400)
    prompts = [{"prompt_token_ids": ids}, {"prompt": text}]
    n, asked = random.randint(1, 4), random.randint(1, 64)
    choices = [_Choice(f"r-{p * n + j}", b"", p, first=j == 0) for p in range(2) for j in range(n)]
    takes = _token_takes(choices, prompts, asked)
    assert prompt_tokens_estimate(prompts[0]) == len(ids) and prompt_tokens_estimate(prompts[1]) == -(-len(text) // 4)
    assert takes == [asked + len(ids)] + [asked] * (n - 1) + [asked - (-len(text) // 4)] + [asked] * (n - 1)
    owner = KeyOwner("key-c", "tenant-c", None, 10**6)
    settled: list[tuple[int, int]] = []
    gw = SimpleNamespace(auth=SimpleNamespace(settle_tokens=lambda o, taken, used: settled.append((taken, used))))
    call = _Call(gw, owner, choices, takes)  # type: ignore[arg-type]
    for index in range(len(choices)):
        prompt, completion = random.randint(1, 99), random.randint(0, 99)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        result = GenerateResult(request_id=choices[index].rid, token_ids=[1] * completion, text="",
                                finish_reason="length", usage=usage,
                                timings={"queued_ms": 1.0, "ttft_ms": 1.0, "tpot_ms": 1.0})
        call.settler(index)(result)
        counts_prompt = index % n == 0
        assert settled[-1] == (takes[index], completion + (prompt if counts_prompt else 0))
