"""What OpenAI's clients (and those written for vLLM's server) send, through the official client against a
real worker: several choices (``n``) and several prompts in one call, merged streams, a previous answer
sent back as a turn, no ``max_tokens``, top-level ``top_k`` / ``ignore_eos``, ``logprobs`` with their
``top_logprobs``, and a refused request that is an HTTP error before a stream starts."""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import openai
import pytest

from loquetier.engine.sequence import SamplingParams
from loquetier.messages import GenerateRequest
from tests.gateway.conftest import MODEL, client, gateway_settings, new_key, running_gateway
from tests.gateway.test_gateway_chat import chat_model_dir  # noqa: F401 - the fixture
from tests.gateway.test_gateway_errors import assert_error
from tests.workers.conftest import ENGINE_LIMITS, running_worker

pytestmark = [
    pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow,
    pytest.mark.skipif("messages" not in GenerateRequest.model_fields,
                       reason="the wire's chat 'messages' field is not in this version"),
]


def by_index(chunks: list[Any]) -> dict[int, str]:
    texts: dict[int, str] = defaultdict(str)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += (choice.delta.content or "") if hasattr(choice, "delta") else choice.text
    return dict(texts)


async def test_what_openai_and_vllm_clients_send(
    topics: Any, database_url: str, chat_model_dir: Path, reference_backend: Any  # noqa: F811
) -> None:
    from loquetier.engine.engine import Engine

    settings = gateway_settings(await topics(), chat_model_dir)
    key = await new_key(database_url, f"oa-{uuid.uuid4().hex[:6]}")
    tag = uuid.uuid4().hex[:6]
    prompts = [f"the red fox {tag}", f"a green tree by the road {tag}"]
    reference = Engine.from_pretrained(chat_model_dir, **ENGINE_LIMITS)
    greedy = reference.generate(prompts, sampling=SamplingParams(max_tokens=5, temperature=0.0))
    ids = [reference.tokenizer.encode(p) for p in prompts]
    max_len = reference.max_model_len
    async with running_worker(Engine.from_pretrained(chat_model_dir, **ENGINE_LIMITS), settings), \
            running_gateway(settings) as url:
        api = client(url, key)
        # several prompts in one call, as text and as token ids: one choice each, in order
        batch = await api.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
        assert [c.index for c in batch.choices] == [0, 1]
        assert [c.text for c in batch.choices] == [g.text for g in greedy]
        singles = [await api.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0) for p in prompts]
        assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
        assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
        by_ids = await api.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
        assert [c.text for c in by_ids.choices] == [g.text for g in greedy]
        one = await api.completions.create(model=MODEL, prompt=[ids[1]], max_tokens=5, temperature=0)
        assert [c.text for c in one.choices] == [greedy[1].text]

        # n choices: the prompt counted once; seeded choices differ from each other and repeat call to call
        sampled = dict(model=MODEL, prompt=prompts[0], max_tokens=12, temperature=1.0, n=3, seed=11)
        three = await api.completions.create(**sampled)
        assert [c.index for c in three.choices] == [0, 1, 2]
        assert three.usage.prompt_tokens == singles[0].usage.prompt_tokens
        assert len({c.text for c in three.choices}) > 1
        assert [c.text for c in (await api.completions.create(**sampled)).choices] == [c.text for c in three.choices]
        chunks = [c async for c in await api.completions.create(**sampled, stream=True,
                                                                stream_options={"include_usage": True})]
        assert by_index(chunks) == {c.index: c.text for c in three.choices}
        assert chunks[-1].usage.completion_tokens == three.usage.completion_tokens
        assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]

        # vLLM's top-level knobs: top_k=1 is greedy at any temperature; ignore_eos runs to the limit
        top1 = await api.completions.create(model=MODEL, prompt=prompts[0], max_tokens=5, temperature=1.5,
                                            extra_body={"top_k": 1})
        assert top1.choices[0].text == greedy[0].text
        with pytest.raises(openai.BadRequestError) as unsupported:
            await api.completions.create(model=MODEL, prompt="x", extra_body={"repetition_penalty": 1.3})
        assert assert_error(unsupported.value, 400, "unsupported_value")["param"] == "repetition_penalty"

        # logprobs=1: each token's own log-probability, also as its top_logprobs entry
        scored = await api.completions.create(model=MODEL, prompt=prompts[0], max_tokens=5, temperature=0,
                                              logprobs=1)
        lp = scored.choices[0].logprobs
        assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs, strict=True)]

        # chat: no max_tokens means up to the context, and a previous answer goes back as it came
        question = [{"role": "user", "content": f"name a color {tag}"}]
        long = await api.chat.completions.create(model=MODEL, messages=question, temperature=0,
                                                 extra_body={"ignore_eos": True})
        assert long.choices[0].finish_reason == "length"
        assert long.usage.prompt_tokens + long.usage.completion_tokens == max_len
        first = await api.chat.completions.create(model=MODEL, messages=question, max_tokens=4, temperature=0)
        turn = first.choices[0].message.model_dump()  # refusal, audio, tool_calls... as the SDK has them
        assert "refusal" in turn and "tool_calls" in turn
        follow = await api.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
            *question, turn, {"role": "user", "content": "and another"}])
        assert follow.choices[0].message.content is not None and follow.usage.prompt_tokens > first.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError) as tool_turn:
            await api.chat.completions.create(model=MODEL, max_tokens=4, messages=[*question, {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])
        assert assert_error(tool_turn.value, 400, "unsupported_value")["param"] == "messages.1.tool_calls"
        two = await api.chat.completions.create(model=MODEL, messages=question, max_tokens=4, temperature=0, n=2)
        assert [c.message.content for c in two.choices] == [first.choices[0].message.content] * 2
        streamed = [c async for c in await api.chat.completions.create(
            model=MODEL, messages=question, max_tokens=4, temperature=0, n=2, stream=True)]
        assert by_index(streamed) == {0: first.choices[0].message.content, 1: first.choices[0].message.content}

        # a request the worker refuses is an HTTP error before a stream starts, not an event in a 200
        too_long = [5] * (max_len + 10)
        with pytest.raises(openai.BadRequestError) as refused:
            await api.completions.create(model=MODEL, prompt=too_long, max_tokens=2, stream=True)
        assert_error(refused.value, 400, "prompt_too_long")
        await api.close()
