"""What the engine tests of steps that run ahead of the host share (decode windows, asynchronous
steps): the reference kernels, a mix of sampling settings, requests streamed to the end, and the
check that two runs gave every request the same tokens, stops, texts and logprobs."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from loquetier import Engine, SamplingParams
from loquetier.engine.events import RequestFinished, TokenEvent
from loquetier.kernels import force_backend


@pytest.fixture(autouse=True)
def reference_kernels():
    force_backend("reference")
    yield
    force_backend(None)


def sampling_mix(stop_token: int, unseeded_tokens: int = 6) -> list[SamplingParams]:
    """Greedy with logprobs, seeded sampling, unseeded sampling with a seed drawn by the engine, a stop
    token, a stop string, a short length."""
    return [SamplingParams(max_tokens=11, temperature=0.0, logprobs=True),
            SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, seed=7),
            SamplingParams(max_tokens=unseeded_tokens, temperature=0.7, top_k=20),
            SamplingParams(max_tokens=13, temperature=0.0, stop_token_ids=(stop_token,)),
            SamplingParams(max_tokens=10, temperature=1.0, seed=11, stop=["e"]),
            SamplingParams(max_tokens=3, temperature=0.0)]


def stream(engine: Engine, prompts: Sequence[str], adapters: Sequence[str | None], sampling: Sequence[SamplingParams],
           arrive_every: int = 0) -> tuple[dict[str, RequestFinished], dict[str, str]]:
    """Request ``r{i}`` for each prompt (all at once, or one every ``arrive_every`` steps) streamed to
    its end: the finished events and the streamed text, by request."""
    finished: dict[str, RequestFinished] = {}
    streamed = {f"r{i}": "" for i in range(len(prompts))}
    todo = list(enumerate(zip(prompts, adapters, sampling, strict=True)))
    step = 0
    while todo or engine.has_work():
        while todo and (not arrive_every or step % arrive_every == 0):
            i, (prompt, adapter, sp) = todo.pop(0)
            engine.add_request(f"r{i}", prompt=prompt, adapter_id=adapter, sampling=sp, stream=True)
            if arrive_every:
                break
        step += 1
        for event in engine.step():
            if isinstance(event, TokenEvent):
                streamed[event.request_id] += event.text
            elif isinstance(event, RequestFinished):
                finished[event.request_id] = event
    return finished, streamed


def check_same(want: dict[str, RequestFinished], got: dict[str, RequestFinished],
               want_text: dict[str, str], got_text: dict[str, str]) -> None:
    assert set(got) == set(want)
    for rid, w in want.items():
        g = got[rid]
        assert (g.token_ids, g.finish_reason, g.text) == (w.token_ids, w.finish_reason, w.text), rid
        assert got_text[rid] == want_text[rid] == w.text
        if w.logprobs is not None:
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
