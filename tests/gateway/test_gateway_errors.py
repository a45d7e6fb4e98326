"""Every error status of the gateway, in OpenAI's shape, and bad bodies that leave nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from typing import Any

import httpx
import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import func, select

from loquetier.db import keys_repo
from loquetier.db.models import FileRow, JobRow, RequestRow
from loquetier.messages import GenerateRequest
from tests.gateway.conftest import MODEL, client, new_key, running_gateway
from tests.workers.conftest import running_worker
from tests.workers.test_worker_e2e import query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def assert_error(exc: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert exc.status_code == status, exc
    error = exc.body if isinstance(exc.body, dict) and "message" in exc.body else exc.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert parts
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(parts)).items()}
    finally:
        await consumer.stop()


async def counts(database_url: str) -> tuple[int, int, int]:
    async def fn(s: Any) -> tuple[int, int, int]:
        return (int(await s.scalar(select(func.count()).select_from(RequestRow))),
                int(await s.scalar(select(func.count()).select_from(FileRow))),
                int(await s.scalar(select(func.count()).select_from(JobRow))))
    return await query(database_url, fn)


async def test_a_keys_tokens_per_minute_through_the_openai_client(gateway_setup: Any, database_url: str,
                                                                  make_engine: Any) -> None:
    """A call is refused for the tokens it may use, settled by what it used, and the key's state
    shows in OpenAI's x-ratelimit headers; a key without limits gets none."""
    settings = await gateway_setup()
    tpm = 80
    limited = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}", tpm=tpm, rpm=1000)
    free = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    msgs = [{"role": "user", "content": "hello there"}]
    async with running_worker(make_engine(), settings), running_gateway(settings) as url:
        api = client(url, limited)
        with pytest.raises(openai.RateLimitError) as too_big:  # its prompt and max_tokens exceed a minute
            await api.chat.completions.create(model=MODEL, messages=msgs, max_tokens=tpm)
        assert "allows at once" in assert_error(too_big.value, 429, "rate_limit_exceeded")["message"]
        t0 = time.monotonic()
        raw = await api.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=6,
                                                                   temperature=0.0)
        refill = math.ceil((time.monotonic() - t0) * tpm / 60) + 1  # the bucket refills at tpm a minute
        used = raw.parse().usage.total_tokens
        headers = raw.headers
        assert headers["x-ratelimit-limit-tokens"] == str(tpm) and headers["x-ratelimit-limit-requests"] == "1000"
        left = int(headers["x-ratelimit-remaining-tokens"])
        assert tpm - used <= left <= tpm - used + refill  # settled by its usage
        assert headers["x-ratelimit-reset-tokens"].endswith("s")
        with pytest.raises(openai.RateLimitError) as spent:  # what is left does not hold this call's take
            await api.completions.create(model=MODEL, prompt=[7] * (left + 3 - 6 + refill), max_tokens=6)
        message = assert_error(spent.value, 429, "rate_limit_exceeded")["message"]
        assert "tokens per minute" in message  # reached, or (a slow machine's refill) past a minute at once
        assert "reached" not in message or spent.value.response.headers.get("retry-after") is not None
        plain = await client(url, free).chat.completions.with_raw_response.create(model=MODEL, messages=msgs,
                                                                                  max_tokens=2)
        assert not [h for h in plain.headers if h.startswith("x-ratelimit")]
        # chats that ask no max_tokens, at once: each gets what the key's minute holds, not the context
        small = client(url, await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}", tpm=50))
        outcomes = await asyncio.gather(*(small.chat.completions.create(
            model=MODEL, messages=msgs, temperature=0.0, extra_body={"ignore_eos": True}) for _ in range(6)),
            return_exceptions=True)
        answered = [o for o in outcomes if not isinstance(o, BaseException)]
        assert answered and all(isinstance(o, openai.RateLimitError) for o in outcomes if o not in answered)
        assert all(a.choices[0].finish_reason == "length" for a in answered)
        # the completions fit the minute (the prompts are estimated before and settled after: a chat
        # template's own tokens make the bucket run below zero, and the next call waits)
        assert sum(a.usage.completion_tokens for a in answered) <= 50
        with pytest.raises(openai.RateLimitError):
            await small.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)


async def test_statuses_400_401_404_429(gateway_setup: Any, database_url: str, make_engine: Any) -> None:
    settings = await gateway_setup(max_inflight=1)
    key = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    limited = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}", rpm=1)
    async with running_worker(make_engine(), settings), running_gateway(settings) as url:
        api = client(url, key)
        msgs = [{"role": "user", "content": "hello"}]
        with pytest.raises(openai.AuthenticationError) as bad_key:
            await client(url, "lq-not-a-key").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert_error(bad_key.value, 401, "invalid_api_key")
        async with httpx.AsyncClient() as raw:
            answer = await raw.post(f"{url}/completions", json={"model": MODEL, "prompt": "x"})
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.NotFoundError) as unknown:
            await api.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
        assert assert_error(unknown.value, 404, "model_not_found")["param"] == "model"
        for kwargs, param in [({"n": 2}, "n"), ({"n": 65}, "n"), ({"temperature": "hot"}, "temperature"),
                              ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                              ({"max_tokens": 0}, "max_tokens"),
                              ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"),
                              ({"extra_body": {"top_k": 2**40}}, "top_k"),
                              ({"extra_body": {"loquetier": {"priority": 1}}}, "loquetier.priority")]:
            with pytest.raises(openai.BadRequestError) as bad:
                await api.chat.completions.create(model=MODEL, messages=msgs, **kwargs)
            assert assert_error(bad.value, 400)["param"] == param, kwargs
        with pytest.raises(openai.BadRequestError) as misspelt:
            await api.completions.create(model=MODEL, prompt="x", extra_body={"max_tokenz": 3})
        assert_error(misspelt.value, 400, "unknown_parameter")
        rate = client(url, limited)
        await rate.completions.create(model=MODEL, prompt="hello", max_tokens=2, temperature=0)
        with pytest.raises(openai.RateLimitError) as limited_exc:
            await rate.completions.create(model=MODEL, prompt="hello", max_tokens=2, temperature=0)
        assert_error(limited_exc.value, 429, "rate_limit_exceeded")
        assert 1 <= int(limited_exc.value.response.headers["retry-after"]) <= 60
        # the stream holds the gateway's only in-flight place until its last token is sent: long enough
        # (EOS ignored) that it is still running when the next call comes
        stream = await api.completions.create(model=MODEL, prompt="open stream", max_tokens=400, stream=True,
                                              extra_body={"ignore_eos": True})
        first = await stream.__anext__()
        assert first.id.startswith("cmpl-")
        with pytest.raises(openai.RateLimitError) as full:
            await api.completions.create(model=MODEL, prompt="hello", max_tokens=2)
        assert_error(full.value, 429, "too_many_requests")
        rest = [c async for c in stream]
        assert rest[-1].choices[0].finish_reason == "length"
        again = await api.completions.create(model=MODEL, prompt="hello", max_tokens=2, temperature=0)
        assert again.usage.completion_tokens >= 1
        await api.close()
        await rate.close()


async def test_503_without_a_worker(gateway_setup: Any, database_url: str) -> None:
    settings = await gateway_setup(worker_alive_s=1.0, key_cache_s=0.0)  # stopped or killed workers do not count
    key = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    revoked = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    before = await end_offsets(settings.kafka.bootstrap or "", settings.kafka.requests_topic)
    async with running_gateway(settings) as url:
        api = client(url, key)
        with pytest.raises(openai.InternalServerError) as none:
            await api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert_error(none.value, 503, "no_worker")
        models = await api.models.list()  # the rest of the API works without workers
        assert [m.id for m in models.data][0] == MODEL
        gone = client(url, revoked)
        await gone.models.list()
        owner = await query(database_url, lambda s: keys_repo.find_key(s, revoked))
        assert await query(database_url, lambda s: keys_repo.revoke_key(s, owner.key_id))
        with pytest.raises(openai.AuthenticationError):
            await gone.models.list()  # key_cache_s=0: at once
        async with httpx.AsyncClient() as raw:
            health = (await raw.get(url.removesuffix("/v1") + "/health")).json()
            ready = await raw.get(url.removesuffix("/v1") + "/ready")
            metrics = (await raw.get(url.removesuffix("/v1") + "/metrics")).text
        assert health["status"] == "ok" and health["worker"] == "no_worker"
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"  # alive, but not ready to serve
        assert ready.json()["status"] == "not_ready" and ready.json()["worker"] == "no_worker"
        assert 'loquetier_gateway_http_requests_total{route="/v1/completions",status="503"}' in metrics
        await api.close()
        await gone.close()
    assert await end_offsets(settings.kafka.bootstrap or "", settings.kafka.requests_topic) == before


async def test_malformed_bodies_are_4xx_and_record_nothing(
    gateway_setup: Any, database_url: str, make_engine: Any
) -> None:
    settings = await gateway_setup(max_body_bytes=64 * 1024, max_file_bytes=128 * 1024)
    key = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    headers = {"Authorization": f"Bearer {key}"}
    bootstrap = settings.kafka.bootstrap or ""
    async with running_worker(make_engine(), settings), running_gateway(settings) as url:
        before = (await counts(database_url), await end_offsets(bootstrap, settings.kafka.requests_topic),
                  await end_offsets(bootstrap, settings.kafka.training_topic))
        huge = "x" * (256 * 1024)
        cases: list[tuple[str, str, Any, int]] = [
            ("POST", "/completions", b"{not json", 400),
            ("POST", "/completions", b"", 400),
            ("POST", "/completions", b"[1, 2]", 400),
            ("POST", "/completions", json.dumps({"model": MODEL, "prompt": 42}).encode(), 400),
            ("POST", "/completions", json.dumps({"model": MODEL, "prompt": "hi", "stream": "yes"}).encode(), 400),
            ("POST", "/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -5}).encode(), 400),
            ("POST", "/completions", json.dumps({"model": MODEL, "prompt": huge}).encode(), 413),
            ("POST", "/chat/completions", json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400),
            ("POST", "/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400),
            ("POST", "/chat/completions",
             json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
            ("POST", "/chat/completions", b'{"model": "' + b"\xff\xfe" + b'"}', 400),
            ("POST", "/fine_tuning/jobs", json.dumps({"model": MODEL, "training_file": 7}).encode(), 400),
            ("POST", "/fine_tuning/jobs", json.dumps({"model": MODEL, "training_file": "file-0"}).encode(), 404),
            ("POST", "/fine_tuning/jobs", json.dumps({"model": MODEL, "training_file": "f",
                                                     "hyperparameters": {"n_epochs": "many"}}).encode(), 400),
            ("POST", "/files", b"plain body", 400),
            # each list stops at its first bad item; a map wider than any body has is refused before validation
            ("POST", "/chat/completions", json.dumps({"model": MODEL, "messages": [{}] * 15_000}).encode(), 400),
            ("POST", "/completions", json.dumps({"model": MODEL, "prompt": [-1] * 12_000}).encode(), 400),
            ("POST", "/completions", json.dumps({"model": MODEL, "prompt": "hi",
                                                 **{f"x{i}": 0 for i in range(2000)}}).encode(), 400),
            ("GET", "/fine_tuning/jobs?limit=abc", None, 400),
            # more digits than Python converts, and NUL characters PostgreSQL cannot hold: 400s, not 500 or 503
            ("GET", "/fine_tuning/jobs?limit=" + "9" * 5000, None, 400),
            ("GET", "/files?limit=" + "9" * 5000, None, 400),
            ("GET", "/fine_tuning/jobs/a%00b", None, 400),
            ("POST", "/fine_tuning/jobs/a%00b/cancel", None, 400),
            ("GET", "/files/a%00b", None, 400),
            ("GET", "/fine_tuning/jobs?after=%00", None, 400),
            ("POST", "/completions", json.dumps({"model": "a\u0000b", "prompt": "hi"}).encode(), 400),
            ("POST", "/fine_tuning/jobs", json.dumps({"model": MODEL, "training_file": "f\u0000"}).encode(), 400),
            ("GET", "/fine_tuning/jobs/ftjob-nope", None, 404),
            ("DELETE", "/models", None, 405),
            ("GET", "/no/such/path", None, 404),
            ("GET", "/files/", None, 404),  # a JSON 404, not a bodiless redirect to /files
            ("POST", "/completions", json.dumps({"model": MODEL, "prompt": "hi", "stop": ["s"] * 17}).encode(), 400),
        ]
        async with httpx.AsyncClient(timeout=30) as raw:
            for method, path, body, status in cases:
                answer = await raw.request(method, url + path, content=body, headers=headers)
                assert answer.status_code == status, (path, body and body[:80], answer.text)
                assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
                if body and b'"x1999"' in body:
                    assert "too many fields" in answer.json()["error"]["message"]
                if body and b'"stop"' in body:
                    assert answer.json()["error"]["message"] == "stop holds 17 strings, more than 16"
            files = [("not jsonl", b"hello\n", 400), ("bad example", b'{"prompt": "a"}\n', 400),
                     ("deep", b"[" * 50_000 + b"]" * 50_000 + b"\n", 400),
                     ("bigint", b'{"prompt_token_ids": [' + b"9" * 5000 + b'], "completion_token_ids": [1]}\n', 400),
                     ("empty", b"\n\n", 400), ("too big", b'{"prompt": "a", "completion": "b"}\n' * 5000, 413)]
            for name, data, status in files:
                answer = await raw.post(url + "/files", headers=headers, data={"purpose": "fine-tune"},
                                        files={"file": (f"{name}.jsonl", data)})
                assert answer.status_code == status, (name, answer.text)
            answer = await raw.post(url + "/files", headers=headers, data={"purpose": "assistants"},
                                    files={"file": ("x.jsonl", b'{"prompt": "a", "completion": "b"}\n')})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "purpose"
            form = (b'--right\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                    b'--right\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
                    b'{"prompt": "a", "completion": "b"}\n\r\n--right--\r\n')
            wrong = await raw.post(url + "/files", content=form,
                                   headers=headers | {"Content-Type": "multipart/form-data; boundary=wrong"})
            assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_body", wrong.text
            assert "boundary" in wrong.json()["error"]["message"]
            empty = await raw.post(url + "/files", content=b"",
                                   headers=headers | {"Content-Type": "multipart/form-data; boundary=right"})
            assert empty.status_code == 400 and empty.json()["error"]["code"] == "invalid_body", empty.text
            assert "no parts" in empty.json()["error"]["message"]
            chunked = await raw.post(url + "/completions", headers=headers,
                                     content=_chunks(json.dumps({"model": MODEL, "prompt": huge}).encode()))
            assert chunked.status_code == 413
        after = (await counts(database_url), await end_offsets(bootstrap, settings.kafka.requests_topic),
                 await end_offsets(bootstrap, settings.kafka.training_topic))
    assert after == before


async def _chunks(data: bytes) -> Any:
    for start in range(0, len(data), 16 * 1024):  # no Content-Length: the limit is enforced as bytes arrive
        yield data[start:start + 16 * 1024]


@pytest.mark.skipif("messages" in GenerateRequest.model_fields,
                    reason="this version carries chat messages")
async def test_chat_without_wire_messages_says_so(gateway_setup: Any, database_url: str) -> None:
    settings = await gateway_setup()
    key = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    async with running_gateway(settings) as url:
        api = client(url, key)
        with pytest.raises(openai.BadRequestError) as err:
            await api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert_error(err.value, 400, "chat_unavailable")
        await api.close()


async def test_one_key_cannot_hold_the_gateway(gateway_setup: Any, database_url: str, make_engine: Any) -> None:
    """A key has at most ``max_inflight_per_key`` requests in flight; other keys are not held up, and the
    key calls again once its requests are answered."""
    import asyncio

    settings = await gateway_setup(max_inflight_per_key=16)
    key, other_key = [await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}") for _ in range(2)]
    async with running_worker(make_engine(), settings), running_gateway(settings) as url:
        api, other = client(url, key), client(url, other_key)
        stream = await api.completions.create(model=MODEL, prompt="a long story", max_tokens=200, n=16,
                                              stream=True, extra_body={"ignore_eos": True})
        first = await stream.__anext__()
        with pytest.raises(openai.RateLimitError) as held:  # the stream holds all 16 of the key's places
            await api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert "API key" in assert_error(held.value, 429, "too_many_requests")["message"]
        assert int(held.value.response.headers["retry-after"]) >= 1
        assert (await other.completions.create(model=MODEL, prompt="hi", max_tokens=2)).usage.completion_tokens
        chunks = [first, *[c async for c in stream]]
        assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == list(range(16))
        again = await asyncio.wait_for(api.completions.create(model=MODEL, prompt="hi", max_tokens=2), 30)
        assert again.usage.completion_tokens >= 1
        await api.close()
        await other.close()


async def test_a_stream_whose_client_reads_nothing_lets_its_places_go() -> None:
    """An event that cannot be sent (the client's socket is full, so the server does not ask for the
    next one) for ``stream_stall_s``: the call ends and its requests are cancelled while the send
    still hangs; each running request's place is freed when its cancelled result comes."""
    import asyncio
    import time
    from types import SimpleNamespace

    from loquetier.gateway import completions
    from loquetier.gateway.answers import Waiter

    released: list[tuple[str, int]] = []
    forgotten: list[str] = []
    cancels: list[Any] = []

    async def publish(topic: str, record: Any, key: str) -> tuple[str, int, int]:
        cancels.append((topic, record.action, record.target_id))
        return (topic, 0, len(cancels))

    gw = SimpleNamespace(config=SimpleNamespace(stream_stall_s=0.3), settings=SimpleNamespace(
        kafka=SimpleNamespace(control_topic="ctl")), bus=SimpleNamespace(forget=forgotten.append, publish=publish),
        release=lambda key_id, num: released.append((key_id, num)),
        auth=SimpleNamespace(settle_tokens=lambda *args: None))
    choices = [completions._Choice(f"cmpl-x-{i}", b"", 0) for i in range(3)]
    waiters = [Waiter(asyncio.Queue(), time.monotonic() + 60) for _ in choices]
    waiters[1].done = True  # answered already: nothing to cancel
    call = completions._Call(gw, keys_repo.KeyOwner("key-1", "t", None), choices, [0] * 3, waiters)  # type: ignore[arg-type]
    completions.IN_FLIGHT.inc()

    async def events() -> Any:
        for i in range(1000):
            yield f"data: {i}\n\n".encode()

    sent = completions._streamed(call, events())
    assert await sent.__anext__() == b"data: 0\n\n"
    assert await sent.__anext__() == b"data: 1\n\n"  # the server asks for no more: its send hangs
    started = time.monotonic()
    while not call.ended:
        await asyncio.sleep(0.05)
        assert time.monotonic() - started < 5
    await asyncio.sleep(0.1)  # the cancels are published in the background
    assert released == [("key-1", 1)] and forgotten == [choices[1].rid]  # the answered one's place
    assert sorted(cancels) == [("ctl", "cancel", "cmpl-x-0"), ("ctl", "cancel", "cmpl-x-2")]
    for i in (0, 2):  # the cancelled results: the places of the running requests go with them
        waiters[i].queue.put_nowait(SimpleNamespace(type="result", record=None))
    await asyncio.sleep(0.1)
    assert sum(n for _, n in released) == 3 and sorted(forgotten) == sorted(c.rid for c in choices)
    stalled = await sent.__anext__()  # the send returned at last: the stream says why it ends
    assert json.loads(stalled.removeprefix(b"data: "))["error"]["code"] == "stream_stalled"
    assert await sent.__anext__() == b"data: [DONE]\n\n"
    with pytest.raises(StopAsyncIteration):
        await sent.__anext__()
    assert sum(n for _, n in released) == 3  # once


def test_a_call_is_bounded_in_bytes_before_its_copies_are_made() -> None:
    """n copies of a long prompt: 413 once the call's records would pass 16 MiB, checked from the first
    record; a call within the bound gets one record per choice, each with its own id and seed."""
    import random
    import time
    from types import SimpleNamespace

    from loquetier.gateway import completions
    from loquetier.gateway.schemas import CompletionRequest, parse
    from loquetier.messages import decode_record

    gw = SimpleNamespace(settings=SimpleNamespace(kafka=SimpleNamespace(max_record_bytes=4 * 2**20)),
                         bus=SimpleNamespace(topic="loquetier.reply.gw"), config=SimpleNamespace(max_priority=0))
    huge = parse(CompletionRequest, {"model": MODEL, "prompt": "\U0001f600" * 999_000, "n": 64, "max_tokens": 1})
    started = time.monotonic()
    with pytest.raises(completions.APIError) as caught:
        completions._choices("cmpl-x", gw, huge, None, [{"prompt": huge.prompt}], {"max_tokens": 1})  # type: ignore[arg-type]
    assert caught.value.status == 413 and caught.value.code == "request_too_large"
    assert time.monotonic() - started < 2  # refused from the first record, not after 64
    seed = random.randint(-(2**63), 2**63 - 1)
    body = parse(CompletionRequest, {"model": MODEL, "prompt": ["a b", "c d"], "n": 3, "seed": seed})
    made = completions._choices("cmpl-y", gw, body, None, [{"prompt": "a b"}, {"prompt": "c d"}],  # type: ignore[arg-type]
                                {"max_tokens": 4, "seed": seed})
    records = [decode_record("requests", c.value) for c in made]
    assert [c.rid for c in made] == [r.request_id for r in records] == [f"cmpl-y-{i}" for i in range(6)]
    assert [c.prompt for c in made] == [0, 0, 0, 1, 1, 1] and [r.prompt for r in records] == ["a b"] * 3 + ["c d"] * 3
    assert len({r.sampling.seed for r in records[:3]}) == 3 and records[0].sampling.seed == seed
    assert all(r.reply_to == "loquetier.reply.gw" for r in records)


async def test_a_client_that_stops_waiting_has_its_request_cancelled(
    gateway_setup: Any, database_url: str, make_engine: Any
) -> None:
    """A non-streaming client that gives up (the SDK's timeout) closes its connection: the gateway
    cancels its requests instead of computing them for nobody."""
    import asyncio
    import time

    from openai import AsyncOpenAI

    settings = await gateway_setup()
    key = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    topic = settings.kafka.requests_topic

    async def statuses() -> list[str]:
        rows = await query(database_url, lambda s: s.scalars(select(RequestRow).where(RequestRow.kafka_topic == topic)))
        return [r.status for r in rows.all()]

    async with running_worker(make_engine(), settings), running_gateway(settings) as url:
        impatient = AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            await impatient.completions.create(model=MODEL, prompt="a long story", max_tokens=480, n=2,
                                               extra_body={"ignore_eos": True})
        deadline = time.monotonic() + 30
        while (now := await statuses()) != ["cancelled", "cancelled"]:
            assert time.monotonic() < deadline and "succeeded" not in now, now
            await asyncio.sleep(0.2)
        await impatient.close()


def test_a_request_cut_off_by_its_worker_is_a_503_to_retry() -> None:
    """A worker that stopped (drain, restart) or whose engine failed before the request finished: a 503
    with Retry-After, which the SDKs retry, not a 500; the request itself was fine. A poisoned request
    (it broke engines) stays a 500, and a client error keeps its message."""
    from loquetier.gateway.errors import from_worker

    for code in ("worker_stopped", "engine_failed"):
        err = from_worker(code, "the worker is stopping")
        response = err.response()
        assert err.status == 503 and response.headers["retry-after"] == "1"
        assert json.loads(response.body)["error"]["code"] == code
    assert from_worker("poisoned", "x").status == 500
    bad = from_worker("prompt_too_long", "the prompt holds 9000 tokens")
    assert bad.status == 400 and bad.message == "the prompt holds 9000 tokens"


async def test_a_client_that_leaves_mid_body_is_a_499_not_a_gateway_error(gateway_setup: Any,
                                                                        database_url: str) -> None:
    """A body cut short by its client (Content-Length promised more): counted as 499, no 500."""
    import asyncio
    from urllib.parse import urlsplit

    from loquetier.gateway.metrics import HTTP_REQUESTS

    def count(route: str, status: str) -> float:
        return HTTP_REQUESTS.labels(route, status)._value.get()

    settings = await gateway_setup()
    key = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    async with running_gateway(settings) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        for path, ctype in (("/v1/chat/completions", "application/json"),
                            ("/v1/files", "multipart/form-data; boundary=xyz")):
            before = (count(path, "500"), count(path, "499"))
            for _ in range(3):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                             f"Content-Type: {ctype}\r\nContent-Length: 100\r\n\r\n--xyz".encode())
                await writer.drain()
                writer.close()
            deadline = asyncio.get_running_loop().time() + 10
            while count(path, "499") < before[1] + 3:
                assert asyncio.get_running_loop().time() < deadline, (path, count(path, "499"), count(path, "500"))
                await asyncio.sleep(0.05)
            assert count(path, "500") == before[0]


async def _closed_after(host: Any, port: Any, first: bytes, trickle: bytes = b"") -> float:
    """Seconds until the gateway closes a connection that sent ``first``, then ``trickle`` every
    0.2 s while no answer comes (at most 10 s: past it the socket was held)."""
    reader, writer = await asyncio.open_connection(host, port)
    t0 = asyncio.get_running_loop().time()
    writer.write(first)
    try:
        while True:
            try:
                data = await asyncio.wait_for(reader.read(4096), 0.2)
            except TimeoutError:
                if trickle:
                    writer.write(trickle)
                assert asyncio.get_running_loop().time() - t0 < 10, "the socket was held"
                continue
            if not data:
                return asyncio.get_running_loop().time() - t0
    finally:
        writer.close()


async def test_a_client_that_never_finishes_its_headers_loses_the_socket(gateway_setup: Any) -> None:
    """Slow headers (a byte now and then, or none at all) hold a socket only until
    ``header_timeout_s``; a request that completes its headers is served, and a keep-alive
    connection's next request gets its own deadline."""
    import asyncio
    from urllib.parse import urlsplit

    settings = await gateway_setup(header_timeout_s=0.6)
    async with running_gateway(settings) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port

        def closed_after(first: bytes, trickle: bytes = b"") -> Any:
            return _closed_after(host, port, first, trickle)  # trickle: one more header byte, still not a request

        assert 0.5 < await closed_after(b"") < 5  # opened, nothing sent
        assert 0.5 < await closed_after(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", b"X") < 5
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert answer.startswith(b"HTTP/1.1 200")
        writer.write(b"GET /health HTTP/1.1\r\nHo")  # the next request on the connection, never finished
        t0 = asyncio.get_running_loop().time()
        rest = b""
        while chunk := await asyncio.wait_for(reader.read(4096), 10):
            rest += chunk
        assert 0.5 < asyncio.get_running_loop().time() - t0 < 5
        writer.close()
        # a body that stops coming: the socket goes too (headers in time, 10 of 1,000 bytes sent)
        body = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n")
        assert 0.5 < await closed_after(body + b'{"model": ') < 5


async def test_a_body_that_trickles_in_loses_the_socket(gateway_setup: Any, database_url: str) -> None:
    """A body that comes a byte now and then (never stalling for ``header_timeout_s``) is cut once
    the grace is over and its average rate is under ``min_body_bytes_per_s``, with or without an
    API key; a body at a usual pace that takes longer than the grace is read whole and answered."""
    import asyncio
    from urllib.parse import urlsplit

    settings = await gateway_setup(header_timeout_s=0.6, min_body_bytes_per_s=2000)
    key = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    async with running_gateway(settings) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port

        def trickled(auth: bytes) -> Any:  # a body byte every 0.2 s: never a stall of 0.6 s
            return _closed_after(host, port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\n%sContent-Length: 1000000\r\n\r\n" % auth, b" ")

        assert 0.5 < await trickled(b"") < 5  # answered 401 at once; the socket still goes
        assert 0.5 < await trickled(b"Authorization: Bearer %s\r\n" % key.encode()) < 5

        body = json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x" * 12_000}]}).encode()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body)))
        t0 = asyncio.get_running_loop().time()
        for i in range(0, len(body), 600):  # about 6,000 bytes a second for 2 s: past the 0.6 s grace
            writer.write(body[i : i + 600])
            await asyncio.sleep(0.1)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert asyncio.get_running_loop().time() - t0 > 1.5
        assert answer.startswith(b"HTTP/1.1 404"), answer  # read whole: the model is looked up
        writer.close()


async def test_past_max_connections_a_json_503_until_sockets_close(gateway_setup: Any) -> None:
    """Past ``max_connections`` a request gets an OpenAI-style JSON 503 (not uvicorn's plain
    text) with Retry-After; once sockets close, requests are served again."""
    import asyncio
    from urllib.parse import urlsplit

    settings = await gateway_setup(max_connections=3, header_timeout_s=30)
    async with running_gateway(settings) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        health = url.removesuffix("/v1") + "/health"
        idle = [await asyncio.open_connection(host, port) for _ in range(3)]
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as raw:
            busy = await raw.get(health)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "too_many_connections"
        for _, writer in idle:
            writer.close()
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with httpx.AsyncClient() as raw:
                if (await raw.get(health)).status_code == 200:
                    break
            assert asyncio.get_running_loop().time() < deadline, "still 503 after the sockets closed"
            await asyncio.sleep(0.1)


async def test_request_headers_past_the_size_limit_get_431_and_the_socket_closes(gateway_setup: Any) -> None:
    """Header lines without end, or one header value streamed without end, are answered 431 once
    past the limit, whatever the pace: they are not held in memory while the clock runs."""
    import asyncio
    from urllib.parse import urlsplit

    settings = await gateway_setup()
    async with running_gateway(settings) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port

        async def answer_to(pieces: Any) -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            sent = 0

            async def send() -> None:
                nonlocal sent
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                for piece in pieces:
                    writer.write(piece)
                    sent += len(piece)
                    await writer.drain()
                    if sent > 16 * 2**20:
                        return

            sending = asyncio.ensure_future(send())
            try:
                answer = await asyncio.wait_for(reader.read(), 20)  # until the gateway closes its side
                assert sent < 16 * 2**20, "16 MiB of headers taken without an answer"
                return answer
            finally:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await sending
                writer.close()

        lines = (b"X-Pad-%d: %s\r\n" % (i, b"a" * 8000) for i in range(10**6))
        first = await answer_to(lines)
        assert first.startswith(b"HTTP/1.1 431") and b"headers_too_large" in first
        value = (b"X-Long: " if i == 0 else b"b" * 65536 for i in range(10**6))
        assert (await answer_to(value)).startswith(b"HTTP/1.1 431")
        async with httpx.AsyncClient() as raw:  # headers of a usual size still pass
            ok = await raw.get(url.removesuffix("/v1") + "/health", headers={f"x-h{i}": "v" * 100 for i in range(50)})
        assert ok.status_code == 200
