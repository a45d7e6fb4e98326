"""Two gateways over one worker: each gets the answers to its own requests on its own reply topic."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from loquetier.gateway.bus import reply_topic
from loquetier.settings import GatewaySettings
from tests.gateway.conftest import MODEL, client, new_key, running_gateway
from tests.gateway.test_gateway_reply_to import read_topic
from tests.workers.conftest import running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


async def test_each_gateway_reads_only_its_own_replies(gateway_setup: Any, database_url: str,
                                                       make_engine: Any) -> None:
    first = await gateway_setup()
    second = first.model_copy(update={"gateway": GatewaySettings(id=f"{first.gateway.id}-b", model_name=MODEL)})
    key = await new_key(database_url, f"t-{uuid.uuid4().hex[:6]}")
    async with running_worker(make_engine(), first), running_gateway(first) as url_a, \
            running_gateway(second) as url_b:
        api_a, api_b = client(url_a, key), client(url_b, key)
        prompts = [f"the quick brown fox {i}" for i in range(4)]
        answers = await asyncio.gather(
            *(api.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
              for p in prompts for api in (api_a, api_b)))
        assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
        ids_a = {a.id for a in answers[0::2]}
        ids_b = {a.id for a in answers[1::2]}
        for settings, ids in ((first, ids_a), (second, ids_b)):
            topic = reply_topic(settings.kafka, settings.gateway.id)
            records = await read_topic(settings.kafka.bootstrap or "", topic, want=len(ids) + 1, timeout=3)
            assert sorted(r.request_id for r in records) == sorted(ids)  # its own results, once each, only those
        same = [a.choices[0].text for a in answers]
        assert same[0::2] == same[1::2]  # the same prompt gives the same text through either gateway
        await api_a.close()
        await api_b.close()
