"""Chat through the worker: ``messages`` on the real engine (tiny Llama, CPU), broker and PostgreSQL."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from loquetier.chat import chat_prompt_ids
from loquetier.engine.sequence import SamplingParams
from tests.tiny import CORPUS
from tests.workers.conftest import ENGINE_LIMITS, client_for, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(" ".join(CORPUS).split()) for _ in range(n))


async def test_messages_are_served_with_the_chat_template_and_train(topics: Any, make_engine: Any) -> None:
    rng = random.Random()
    chats = [[{"role": "system", "content": _words(rng, 3)}, {"role": "user", "content": _words(rng, 5)}]
             for _ in range(2)]
    reference = make_engine()
    prompts = [chat_prompt_ids(reference.tokenizer, turns) for turns in chats]
    expected = reference.generate(prompts, sampling=SamplingParams(max_tokens=6, temperature=0.0))
    answer = _words(rng, 2)
    rows = [{"messages": [{"role": "user", "content": _words(rng, 4)}, {"role": "assistant", "content": answer}]}
            for _ in range(4)]
    job = {"adapter_id": f"chat-{uuid.uuid4().hex[:6]}", "data": rows, "lora": {"rank": 4, "alpha": 8},
           "params": {"lr": 1e-2, "max_steps": 3, "micro_batch_tokens": 128, "seed": rng.randint(0, 99)}}
    settings = await topics()
    async with running_worker(make_engine(), settings), client_for(settings) as client:
        ids = [await client.submit_generate(messages=turns, max_tokens=6, temperature=0.0, stream=(i == 0))
               for i, turns in enumerate(chats)]
        records = [r async for r in client.results(ids)]
        results = {r.request_id: r for r in records if r.type == "result"}
        assert [results[i].token_ids for i in ids] == [list(o.token_ids) for o in expected]
        assert [results[i].usage.prompt_tokens for i in ids] == [len(p) for p in prompts]
        streamed = "".join(r.text for r in records if r.type == "token" and r.request_id == ids[0])
        assert streamed == results[ids[0]].text
        job_id = await client.submit_training(job)
        done = [r async for r in client.results([job_id])][-1]
        assert done.type == "job_done" and done.status == "succeeded", done
        assert done.step == 3 and done.loss is not None


async def test_a_model_without_chat_template_says_so(
    topics: Any, reference_backend: Any, tmp_path: Path
) -> None:
    from loquetier.engine.engine import Engine
    from tests.tiny import make_tiny_model

    bare = make_tiny_model(tmp_path / "bare", chat_template=None)
    settings = await topics()
    async with running_worker(Engine.from_pretrained(bare, **ENGINE_LIMITS), settings), \
            client_for(settings) as client:
        rid = await client.submit_generate(messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        error = await client.wait_result(rid, timeout=60)
        assert error.type == "error" and error.code == "no_chat_template"
        assert "prompt" in error.message
        ok = await client.submit_generate("the quick brown", max_tokens=3, temperature=0.0)
        assert (await client.wait_result(ok, timeout=60)).type == "result"  # raw prompts still work
