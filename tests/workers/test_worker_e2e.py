"""End to end on the real engine (tiny Llama, CPU), a real broker and real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sqlalchemy import select

from loquetier.db import repo
from loquetier.db.models import AdapterRow, CheckpointRow
from loquetier.db.session import create_engine, session_factory
from loquetier.engine.sequence import SamplingParams
from loquetier.lora.adapter import LoRAAdapter
from loquetier.workers.convert import from_stored
from tests.workers.conftest import client_for, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

PROMPTS = ["the quick brown fox", "what is the capital", "a pirate says"]
LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]}


def train_data(offset: int = 0) -> list[dict[str, Any]]:
    return [{"prompt_token_ids": [1, 10 + i + offset, 11 + i], "completion_token_ids": [40 + i + offset, 41, 42 + i]}
            for i in range(6)]


async def query(database_url: str, fn: Any) -> Any:
    db = create_engine(database_url)
    try:
        async with session_factory(db).begin() as s:
            return await fn(s)
    finally:
        await db.dispose()


async def test_requests_match_engine_generate_and_redelivery_republishes(
    topics: Any, database_url: str, make_engine: Any
) -> None:
    expected = make_engine().generate(PROMPTS, sampling=SamplingParams(max_tokens=8, temperature=0.0))
    settings = await topics()
    async with running_worker(make_engine(), settings) as worker, client_for(settings) as client:
        ids = [await client.submit_generate(p, max_tokens=8, temperature=0.0, stream=(i == 0))
               for i, p in enumerate(PROMPTS)]
        records = [r async for r in client.results(ids)]
        results = {r.request_id: r for r in records if r.type == "result"}
        assert [results[i].token_ids for i in ids] == [list(o.token_ids) for o in expected]
        assert [results[i].text for i in ids] == [o.text for o in expected]
        tokens = [r for r in records if r.type == "token" and r.request_id == ids[0]]
        assert tokens and "".join(r.text for r in tokens) == results[ids[0]].text
        assert [r.index for r in tokens] == sorted(r.index for r in tokens)
        computed = worker.inference.num_computed
        again = await client.submit_generate(PROMPTS[1], max_tokens=8, temperature=0.0, request_id=ids[1])
        replayed = await client.wait_result(again, timeout=30)
        assert replayed.model_dump() == results[ids[1]].model_dump()
        assert worker.inference.num_computed == computed  # republished, not recomputed
    for rid in ids:
        row = await query(database_url, lambda s, rid=rid: repo.get_request(s, rid))
        assert row.status == "succeeded" and row.completion_tokens == 8 and row.finished_at is not None
        assert row.ttft_ms is not None and row.queued_ms is not None and row.tpot_ms is not None
        assert row.worker_id == settings.worker.id and from_stored(row.result).token_ids == results[rid].token_ids


async def test_training_job_then_serving_the_new_adapter(topics: Any, database_url: str, make_engine: Any) -> None:
    settings = await topics()
    job = {"adapter_id": "e2e-adapter", "data": train_data(), "lora": LORA,
           "params": {"lr": 5e-3, "max_steps": 6, "micro_batch_tokens": 20, "seed": 1, "checkpoint_every": 2}}
    async with running_worker(make_engine(), settings), client_for(settings) as client:
        job_id = await client.submit_training(job)
        records = [r async for r in client.results([job_id])]
        types = [r.type for r in records]
        assert "progress" in types and "checkpoint" in types and types[-1] == "job_done"
        done = records[-1]
        assert done.status == "succeeded" and done.step == 6 and done.adapter_version == 1 and done.loss is not None
        rid = await client.submit_generate(PROMPTS[2], adapter_id="e2e-adapter", max_tokens=8, temperature=0.0)
        served = await client.wait_result(rid, timeout=60)
        eval_id = await client.submit_training({"kind": "evaluate", "adapter_id": "e2e-adapter", "data": train_data()})
        evaluated = [r async for r in client.results([eval_id])][-1]
        assert evaluated.type == "job_done" and evaluated.status == "succeeded" and evaluated.eval_loss is not None

    async def rows(s: Any) -> Any:
        ckpts = (await s.scalars(select(CheckpointRow.step).where(CheckpointRow.job_id == job_id))).all()
        adapter = await s.scalar(select(AdapterRow).where(AdapterRow.adapter_id == "e2e-adapter"))
        return sorted(ckpts), adapter, await repo.get_job(s, job_id)

    steps, adapter, job_row = await query(database_url, rows)
    assert {2, 4} <= set(steps)
    assert adapter.status == "ready" and adapter.version == 1 and adapter.rank == 4 and adapter.job_id == job_id
    assert job_row.status == "succeeded" and job_row.step == 6 and job_row.last_loss is not None
    reference = make_engine()
    reference.load_adapter_bytes("e2e-adapter", adapter.data)
    expected = reference.generate([PROMPTS[2]], adapter_ids=["e2e-adapter"],
                                  sampling=SamplingParams(max_tokens=8, temperature=0.0))
    base = reference.generate([PROMPTS[2]], sampling=SamplingParams(max_tokens=8, temperature=0.0))
    assert served.type == "result" and served.adapter_id == "e2e-adapter"
    assert served.token_ids == list(expected[0].token_ids)
    assert served.token_ids != list(base[0].token_ids) or served.text == base[0].text
    trained = LoRAAdapter.from_bytes(adapter.data)
    assert any(float(b.abs().sum()) > 0 for _, b in trained.weights.values())
    assert torch.is_tensor(next(iter(trained.weights.values()))[0])


async def test_a_job_waits_for_its_checkpoints_to_be_stored(topics: Any, database_url: str, make_engine: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint at every step while the database stores slowly: the job stops two checkpoints ahead
    of the store (``max_unstored_checkpoints``) instead of piling up their bytes in the worker, and goes
    on once they are stored; every checkpoint is stored and the job's result is the one it would have."""
    import asyncio

    from loquetier.workers.jobs import LeasedJobs

    entered, gate = asyncio.Event(), asyncio.Event()
    original = LeasedJobs._checkpoint

    async def slow(self: LeasedJobs, ev: Any, rj: Any) -> None:
        if ev.step == 1:
            entered.set()
            await asyncio.wait_for(gate.wait(), 60)  # a database that takes its time
        await original(self, ev, rj)

    monkeypatch.setattr(LeasedJobs, "_checkpoint", slow)
    settings = await topics(max_unstored_checkpoints=2)
    steps = 7
    job = {"adapter_id": "e2e-held", "data": train_data(2), "lora": LORA,
           "params": {"lr": 5e-3, "max_steps": steps, "micro_batch_tokens": 20, "seed": 4, "checkpoint_every": 1}}
    async with running_worker(make_engine(), settings) as worker, client_for(settings) as client:
        job_id = await client.submit_training(job)
        await asyncio.wait_for(entered.wait(), 60)
        await asyncio.sleep(2.0)  # hundreds of tiny steps' time
        held = (await worker.client.stats())["jobs"][job_id]
        assert held["held"] and held["step"] == 2 and held["unstored_checkpoints"] == 2, held
        gate.set()
        records = [r async for r in client.results([job_id])]
    assert [r.step for r in records if r.type == "checkpoint"] == list(range(1, steps + 1))
    assert records[-1].type == "job_done" and records[-1].status == "succeeded" and records[-1].step == steps
    stored = await query(database_url, lambda s: s.scalars(select(CheckpointRow.step).where(
        CheckpointRow.job_id == job_id)))
    assert sorted(stored.all()) == list(range(steps - settings.worker.keep_checkpoints + 1, steps + 1))
