"""Chat completions: ``messages`` reach the worker as they were sent, streams equal whole answers,
and a ``{"messages"}`` training file fine-tunes an adapter. Needs the wire's ``messages`` field."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from loquetier.messages import GenerateRequest
from tests.gateway.conftest import MODEL, client, gateway_settings, new_key, running_gateway
from tests.gateway.test_gateway_fine_tuning import OPTIONS, wait_job
from tests.workers.conftest import ENGINE_LIMITS, client_for, running_worker

pytestmark = [
    pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow,
    pytest.mark.skipif("messages" not in GenerateRequest.model_fields,
                       reason="the wire's chat 'messages' field is not in this version"),
]

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from tests.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("chat-tiny") / "llama", seed=5)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


async def test_chat_matches_the_worker_and_streams(
    topics: Any, database_url: str, chat_model_dir: Path, reference_backend: Any
) -> None:
    from loquetier.engine.engine import Engine

    settings = gateway_settings(await topics(), chat_model_dir)
    key = await new_key(database_url, f"chat-{uuid.uuid4().hex[:6]}")
    question = f"what is the capital {uuid.uuid4().hex[:4]}"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}]
    async with running_worker(Engine.from_pretrained(chat_model_dir, **ENGINE_LIMITS), settings), \
            running_gateway(settings) as url, client_for(settings) as kafka:
        api = client(url, key)
        whole = await api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
        rid = f"direct-{uuid.uuid4().hex}"  # the same messages straight to the worker, no gateway
        record = GenerateRequest.model_validate({"request_id": rid, "messages": messages,
                                                 "sampling": {"max_tokens": 6, "temperature": 0.0}}, strict=False)
        await kafka.send(settings.kafka.requests_topic, record, rid)
        direct = await kafka.wait_result(rid, timeout=60)
        assert whole.choices[0].message.content == direct.text
        assert whole.usage.completion_tokens == len(direct.token_ids)
        parts = [{"role": "developer", "content": "be brief"},
                 {"role": "user", "content": [{"type": "text", "text": question[:5]},
                                              {"type": "text", "text": question[5:]}]}]
        chunks = [c async for c in await api.chat.completions.create(
            model=MODEL, messages=parts, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True})]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

        rows = [{"messages": [{"role": "user", "content": f"color {i}"}, {"role": "assistant", "content": "blue"}]}
                for i in range(6)]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        upload = await api.files.create(file=("chat.jsonl", data), purpose="fine-tune")
        job = await api.fine_tuning.jobs.create(model=MODEL, training_file=upload.id,
                                                extra_body={"loquetier": OPTIONS})
        done = await wait_job(api, job.id)
        assert done.status == "succeeded", done.error
        tuned = await api.chat.completions.create(model=done.fine_tuned_model, max_tokens=4, temperature=0,
                                                  messages=[{"role": "user", "content": "color 9"}])
        assert tuned.choices[0].message.content
        await api.close()
