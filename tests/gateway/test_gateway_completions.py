"""Text and chat completions through the gateway with the official client, against a real worker."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest

from loquetier.engine.sequence import SamplingParams
from tests.gateway.conftest import MODEL, client, new_key, running_gateway
from tests.workers.conftest import running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


async def test_text_completion_equals_engine_and_stream_equals_whole(
    gateway_setup: Any, database_url: str, make_engine: Any
) -> None:
    prompt = f"the quick brown fox {uuid.uuid4().hex[:6]}"
    expected = make_engine().generate([prompt], sampling=SamplingParams(max_tokens=6, temperature=0.0))[0]
    settings = await gateway_setup(max_priority=5)
    key = await new_key(database_url, f"tenant-{uuid.uuid4().hex[:6]}")
    async with running_worker(make_engine(), settings), running_gateway(settings) as url:
        api = client(url, key)
        whole = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert whole.object == "text_completion" and whole.model == MODEL
        assert whole.choices[0].text == expected.text
        assert whole.choices[0].finish_reason == expected.finish_reason
        assert whole.usage.completion_tokens == len(expected.token_ids)
        assert whole.usage.prompt_tokens > 0
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        chunks = [c async for c in await api.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True})]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        # our own knobs: top_k=1 samples greedily at any temperature; priority and latency targets pass through
        ours = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, extra_body={
            "loquetier": {"top_k": 1, "priority": 3, "ttft_ms": 900.0, "tpot_ms": 200.0}})
        assert ours.choices[0].text == expected.text
        with pytest.raises(openai.BadRequestError) as above:  # past the gateway's max_priority
            await api.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                         extra_body={"loquetier": {"priority": 6}})
        assert above.value.body["param"] == "loquetier.priority" and "maximum, 5" in above.value.body["message"]
        scored = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
        lp = scored.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == scored.usage.completion_tokens
        assert all(v <= 0.0 for v in lp.token_logprobs) and not any(t.startswith("token_id:") for t in lp.tokens)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        async with httpx.AsyncClient() as raw:  # a worker runs: ready
            ready = await raw.get(url.removesuffix("/v1") + "/ready")
        assert ready.status_code == 200 and ready.json()["worker"] == "ok"
        await api.close()
