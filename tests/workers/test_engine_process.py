"""The engine in its own process (``workers/engine_process.py``): the same answers as the engine in
this process, errors that keep their code, a job's data prepared there, and a death that is seen."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from loquetier.engine.errors import EngineError
from loquetier.engine.events import JobFinished, RequestFinished, TokenEvent
from loquetier.engine.sequence import SamplingParams
from loquetier.lora.params import TrainingParams
from loquetier.workers.engine_client import EngineStopped, StepFailed
from loquetier.workers.engine_process import (
    EngineProcessFailed,
    EngineSpec,
    ProcessEngineClient,
)
from tests.workers.conftest import ENGINE_LIMITS

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _data(rng: random.Random) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": [rng.randrange(3, 200) for _ in range(4)],
             "completion_token_ids": [rng.randrange(3, 200) for _ in range(3)]} for _ in range(6)]


def _params() -> TrainingParams:
    return TrainingParams(optimizer="adamw", lr=5e-3, max_steps=4, micro_batch_tokens=24, seed=3)


def _spec(model_dir: Any) -> EngineSpec:
    return EngineSpec(str(model_dir), "cpu", "float32", dict(ENGINE_LIMITS), log_level="WARNING")


async def _until(client: ProcessEngineClient, done: Any, timeout_s: float = 120.0) -> list[Any]:
    seen: list[Any] = []
    while not done(seen):
        seen.extend(await asyncio.wait_for(client.next_events(), timeout_s))
    return seen


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the engine process runs the torch reference ops


async def test_an_engine_process_answers_as_the_engine_here(tiny_model_dir: Path, make_engine: Any,
                                                            no_interpreter: None) -> None:
    rng = random.Random(11)
    prompts = {f"r{i}": [rng.randrange(3, 250) for _ in range(5 + 3 * i)] for i in range(3)}
    data = _data(rng)

    here = make_engine()  # the reference: the same model and limits in this process
    for rid, ids in prompts.items():
        here.add_request(rid, prompt_token_ids=ids, sampling=GREEDY, stream=rid == "r0")
    expected = {ev.request_id: ev.token_ids for ev in here.run_until_idle() if isinstance(ev, RequestFinished)}
    assert all(len(ids) == GREEDY.max_tokens for ids in expected.values())
    here.add_training_job("ft", here.prepare_data(data, 24), _params(), lora=LORA, job_id="j")
    here.run_until_idle()
    expected_adapter = load(here.export_adapter("ft"))

    steps: list[float] = []
    client = ProcessEngineClient(_spec(tiny_model_dir), on_step=lambda s, _events: steps.append(s))
    info = await asyncio.to_thread(client.launch, 300.0)
    assert info["device"] == "cpu" and info["pid"] != os.getpid()
    await client.start()
    try:
        for rid, ids in prompts.items():
            await client.submit(rid, prompt_token_ids=ids, sampling=GREEDY, stream=rid == "r0")
        with pytest.raises(EngineError) as caught:  # an engine error crosses with its code
            await client.submit("bad", prompt_token_ids=[5, 6], sampling=GREEDY, adapter_id="nope")
        assert caught.value.code == "unknown_adapter"
        events = await _until(client, lambda seen: sum(isinstance(e, RequestFinished) for e in seen) == 3)
        assert {ev.request_id: ev.token_ids for ev in events if isinstance(ev, RequestFinished)} == expected
        streamed = [t for ev in events if isinstance(ev, TokenEvent) and ev.request_id == "r0" for t in ev.token_ids]
        assert streamed == expected["r0"]  # token events cross in step order
        assert steps and client.num_steps == len(steps)

        prepared = await client.prepare_data(data, 24)  # tokenized on this side, its sequences cross
        assert prepared == here.prepare_data(data, 24)
        job_id = await client.add_job("ft", prepared, _params(), lora=LORA, job_id="j")
        await _until(client, lambda seen: any(isinstance(e, JobFinished) and e.job_id == job_id for e in seen))
        adapter = load(await client.export_adapter("ft"))
        assert adapter.keys() == expected_adapter.keys()
        for name, tensor in adapter.items():
            torch.testing.assert_close(tensor, expected_adapter[name], rtol=1e-4, atol=1e-5)
        assert any(t.abs().sum() > 0 for t in adapter.values())
        assert (await client.stats())["num_running"] == 0
    finally:
        await client.stop()
    assert client._process.exitcode == 0 and not client.is_running
    with pytest.raises(EngineStopped):
        await client.stats()


async def test_a_killed_engine_process_is_seen_at_once(tiny_model_dir: Path, no_interpreter: None) -> None:
    client = ProcessEngineClient(_spec(tiny_model_dir))
    await asyncio.to_thread(client.launch, 300.0)
    await client.start()
    try:
        await client.submit("r", prompt_token_ids=[5, 6, 7], sampling=GREEDY)
        assert await asyncio.wait_for(client.next_events(), 60)
        assert client.pid is not None
        os.kill(client.pid, signal.SIGKILL)
        with pytest.raises(StepFailed) as caught:
            while True:
                await asyncio.wait_for(client.next_events(), 30)
        assert f"exit code {-signal.SIGKILL}" in caught.value.reason
        assert getattr(client.failure, "crashed", False)  # the worker leaves its requests for redelivery
        with pytest.raises(EngineStopped, match="exit code"):
            await asyncio.wait_for(client.stats(), 10)
    finally:
        await client.stop()


async def test_a_signal_to_the_process_group_leaves_the_engine_to_its_worker(tiny_model_dir: Path,
                                                                            no_interpreter: None) -> None:
    """SIGTERM and SIGINT reach the engine process too when the worker's process group is signalled:
    the engine goes on serving (the worker drains, then stops it), and still stops when told."""
    client = ProcessEngineClient(_spec(tiny_model_dir))
    await asyncio.to_thread(client.launch, 300.0)
    await client.start()
    try:
        assert client.pid is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(client.pid, sig)
        await asyncio.sleep(0.5)
        await client.submit("r", prompt_token_ids=[5, 6, 7], sampling=GREEDY)
        seen = await _until(client, lambda s: any(isinstance(e, RequestFinished) for e in s))
        assert [e.request_id for e in seen if isinstance(e, RequestFinished)] == ["r"]
        assert client.is_running and client.failure is None
    finally:
        await client.stop()
    assert not client.is_running and client._process.exitcode == 0


def test_an_engine_that_cannot_start_says_why(tmp_path: Path, no_interpreter: None) -> None:
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": "many"}')
    client = ProcessEngineClient(_spec(model))
    with pytest.raises(EngineProcessFailed) as caught:
        client.launch(120.0)
    assert caught.value.reason and not client.is_running


async def test_an_engine_process_waits_for_a_loop_that_falls_behind(tiny_model_dir: Path,
                                                                     no_interpreter: None) -> None:
    client = ProcessEngineClient(dataclasses.replace(_spec(tiny_model_dir), max_steps_ahead=3))
    await asyncio.to_thread(client.launch, 300.0)
    await client.start()
    try:
        streamed = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        await client.submit("r", prompt_token_ids=[5, 6, 7], sampling=streamed, stream=True)
        await asyncio.sleep(2.0)  # the loop takes nothing; a tiny step takes milliseconds
        assert client.num_steps == 3
        stats = await asyncio.wait_for(client.stats(), 10)  # answers still cross
        assert stats["num_steps"] == 3 and stats["num_running"] == 1
        tokens = [t for ev in await asyncio.wait_for(client.next_events(), 10) for t in ev.token_ids]
        assert 3 <= len(tokens) < 40
        events = await _until(client, lambda seen: any(isinstance(ev, RequestFinished) for ev in seen), 60)
        assert len(tokens) + sum(len(ev.token_ids) for ev in events if isinstance(ev, TokenEvent)) == 40
    finally:
        await client.stop()
