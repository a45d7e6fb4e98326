"""Hostile values end to end: the real embedded broker, real PostgreSQL, a worker on the real
engine (tiny Llama, CPU). Values outside the wire's limits are refused at the border with their
code; values that pass it but break a step fail only their own request or job; a concurrent valid
request is answered exactly, and the worker keeps serving."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgpack
import pytest

from loquetier.engine.sequence import SamplingParams
from tests.workers.conftest import client_for, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

POISON = 311  # rows holding it make the engine's forward raise
LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
INF = float("inf")


def pack(obj: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb({"schema": 1, **obj}, use_bin_type=True))


def train_data(rng: random.Random, poison: bool = False) -> list[dict[str, list[int]]]:
    data = [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(3)],
             "completion_token_ids": [rng.randrange(3, 300) for _ in range(3)]} for _ in range(6)]
    if poison:
        for example in data:
            example["completion_token_ids"].append(POISON)
    return data


async def test_hostile_requests_and_jobs_fail_alone_and_the_worker_serves_on(
    topics: Any, database_url: str, make_engine: Any
) -> None:
    rng = random.Random()
    prompt = [rng.randrange(3, 300) for _ in range(12)]
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    expected = make_engine().generate([prompt], sampling=greedy)[0].token_ids

    engine = make_engine()
    forward = engine.model.forward

    def poisoned(fb: Any, kv: Any = None) -> Any:
        if (fb.input_ids == POISON).any():
            raise ValueError("a row this engine cannot run")
        return forward(fb, kv)

    engine.model.forward = poisoned
    settings = await topics()
    kafka = settings.kafka
    refused = {  # outside the documented limits: refused at the border
        "req-tpot-inf": (kafka.requests_topic, {"request_id": "req-tpot-inf", "prompt": "hi",
                                                "slo": {"tpot_ms": INF}}),
        "req-topk-huge": (kafka.requests_topic, {"request_id": "req-topk-huge", "prompt": "hi",
                                                 "sampling": {"top_k": 2**64 - 1}}),
        "req-stop-empty": (kafka.requests_topic, {"request_id": "req-stop-empty", "prompt": "hi",
                                                  "sampling": {"stop": [""]}}),
        "job-lr-inf": (kafka.training_topic, {"job_id": "job-lr-inf", "adapter_id": "h1",
                                              "data": train_data(rng), "params": {"lr": INF}}),
        "job-epochs": (kafka.training_topic, {"job_id": "job-epochs", "adapter_id": "h2",
                                              "data": train_data(rng), "params": {"epochs": 10**12}}),
        "job-rank": (kafka.training_topic, {"job_id": "job-rank", "adapter_id": "h3", "data": train_data(rng),
                                            "lora": {"rank": 100_000}}),
    }
    async with running_worker(engine, settings) as worker, client_for(settings) as client:
        good = await client.submit_generate(prompt_token_ids=prompt, max_tokens=24, temperature=0.0)
        sent = [await client.send_raw(topic, pack(value), key=key.encode()) for key, (topic, value) in refused.items()]
        await asyncio.gather(*sent)
        bad_request = await client.submit_generate(prompt_token_ids=[5, POISON, 6], max_tokens=4)
        bad_job = await client.submit_training({"adapter_id": "h4", "data": train_data(rng, poison=True),
                                                "lora": LORA, "params": {"max_steps": 4, "micro_batch_tokens": 32}})
        big_job = await client.submit_training({"adapter_id": "h5", "data": train_data(rng),  # rank > max_lora_rank
                                                "lora": LORA | {"rank": 1000}, "params": {"max_steps": 2}})
        ids = [good, *refused, bad_request, bad_job, big_job]
        records = [r async for r in client.results(ids)]
        final = {getattr(r, "request_id", None) or r.job_id: r for r in records
                 if r.type in ("result", "error", "job_done")}

        assert final[good].type == "result" and final[good].token_ids == expected
        for key in refused:
            assert final[key].type == "error" and final[key].code == "invalid_value", final[key]
            assert not any(w in final[key].message for w in ("SELECT", "INSERT", "Traceback", "sqlalchemy"))
        assert final[bad_request].type == "error" and final[bad_request].code == "execution_failed"
        assert final[bad_job].type == "job_done" and final[bad_job].status == "failed"
        assert "ValueError" in (final[bad_job].error or "")
        assert final[big_job].status == "failed" and "max_lora_rank" in (final[big_job].error or "")

        after = await client.submit_generate(prompt_token_ids=prompt, max_tokens=24, temperature=0.0)
        again = await client.wait_result(after, timeout=60)
        assert again.type == "result" and again.token_ids == final[good].token_ids
        # the poisoned request and job may share one step: one isolated step can pin both
        assert worker.client.is_running and engine.isolation.num_isolated_steps >= 1
