"""Decode windows (engine/decode_window.py): several graph decode steps with one host synchronization
must give every request exactly the tokens, stops, logprobs and streamed text of one step at a time,
and leave the KV cache and the prefix cache as the plain steps leave them.

Graphs run their static layout eagerly here (``cuda_graphs="eager"``), as in test_graphs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loquetier import Engine, SamplingParams
from loquetier.engine.events import RequestFinished
from loquetier.kernels import force_backend
from tests.engine.same_tokens import check_same, reference_kernels, sampling_mix, stream  # noqa: F401
from tests.engine.test_engine import make_engine
from tests.tiny import make_tiny_model

PROMPTS = ["the quick brown fox", "what is the capital", "a pirate says", "fine tuning and",
           "one two three", "hello there"]
ADAPTERS = ["a", None, "b", "a", None, "b"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-window") / "llama")


def _stream(engine: Engine, sampling: list[SamplingParams]) -> tuple[dict[str, RequestFinished], dict[str, str]]:
    return stream(engine, PROMPTS, ADAPTERS, sampling)


def _engine(model_dir: Path, window: int, **limits) -> Engine:
    engine = make_engine(model_dir, cuda_graphs="eager", decode_window=window, seed=5, **limits)
    return engine


def test_windows_give_the_tokens_of_one_step_at_a_time(model_dir: Path) -> None:
    plain = _engine(model_dir, 1, async_steps=False)
    windowed = _engine(model_dir, 4)
    # a stop token the greedy request really meets: its third token in the plain run
    probe = plain.generate([PROMPTS[3]], ["a"], SamplingParams(max_tokens=5, temperature=0.0))[0].token_ids
    sampling = sampling_mix(probe[2])
    decoded_before = plain.scheduler.metrics.num_decode_tokens
    want, want_text = _stream(plain, sampling)
    got, got_text = _stream(windowed, sampling)
    assert windowed.window.num_windows > 0 and plain.window.num_windows == 0
    check_same(want, got, want_text, got_text)
    assert want["r3"].finish_reason == "stop" and want["r3"].token_ids[-1] == probe[2]
    assert want["r5"].finish_reason == "length" and len(want["r5"].token_ids) == 3
    # every block back, reserved ones included
    assert windowed.blocks.num_free_blocks == windowed.blocks.num_blocks
    windowed.blocks.check_invariants()
    # the step count and the scheduler's accounting see every token's step
    plain_decoded = plain.scheduler.metrics.num_decode_tokens - decoded_before
    assert windowed.scheduler.metrics.num_decode_tokens == plain_decoded


def test_a_window_waits_for_nothing_and_stops_for_arrivals(model_dir: Path) -> None:
    engine = _engine(model_dir, 8)
    greedy = SamplingParams(max_tokens=20, temperature=0.0)
    engine.add_request("a", prompt=PROMPTS[0], sampling=greedy)
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    while engine.steps.in_flight:  # the prompt's step, queued ahead, is applied (the window scheduled)
        engine.step()
    before = engine.num_steps
    engine.step()  # decode only, nothing waits: one window of 8 steps
    assert engine.num_steps - before == 8 and engine.window.num_windows == 1
    engine.add_request("b", prompt=PROMPTS[1], sampling=greedy)
    before = engine.num_steps
    engine.step()  # a request waits: one plain step admits it
    assert engine.num_steps - before == 1 and engine.window.num_windows == 1
    engine.run_until_idle()


def test_windows_keep_the_prefix_cache_right(model_dir: Path) -> None:
    """Blocks filled inside a window are published with their real tokens: a later request over the
    same prefix reuses them and gets the tokens a fresh engine computes from scratch."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    engine = _engine(model_dir, 4)
    first = engine.generate([PROMPTS[0]], sampling=greedy)[0]
    follow = engine.tokenizer(PROMPTS[0])["input_ids"] + first.token_ids + [5, 6, 7]
    hits = engine.blocks.num_prefix_hits
    again = engine.generate([follow], sampling=SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert engine.blocks.num_prefix_hits > hits  # blocks written during windows were reused
    fresh = _engine(model_dir, 1).generate([follow], sampling=SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert again.token_ids == fresh.token_ids


def test_a_window_ends_inside_the_context(model_dir: Path) -> None:
    engine = _engine(model_dir, 8, max_model_len=40)
    prompt = list(range(3, 33))  # 30 tokens: room for 10
    out = engine.generate([prompt], sampling=SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    assert engine.window.num_windows > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_window_size_is_checked() -> None:
    from loquetier.engine.config import EngineConfig

    with pytest.raises(ValueError, match="decode_window"):
        EngineConfig(decode_window=0)


def test_windows_through_the_triton_kernels(model_dir: Path) -> None:
    """The paged-decode and SMLM Triton kernels read the context lengths, slot mapping and block tables
    that ``advance`` writes on the device (the interpreter runs them on the CPU)."""
    import os

    from loquetier.engine.graphs import DecodeGraphs

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")
    force_backend("triton")
    outs = []
    for window in (1, 4):
        engine = _engine(model_dir, window)
        engine.model.attn_impl = "triton"
        engine.runner.graphs = DecodeGraphs(engine.model, engine.kv, engine.config.scheduler.max_num_seqs,
                                            engine.max_model_len, engine.blocks.num_blocks, mode="eager")
        sampling = [SamplingParams(max_tokens=7, temperature=0.0),
                    SamplingParams(max_tokens=6, temperature=0.8, seed=2)]
        outs.append(engine.generate(PROMPTS[:3], ADAPTERS[:3], (sampling * 2)[:3]))
        assert (engine.window.num_windows > 0) == (window > 1)
    assert [o.token_ids for o in outs[1]] == [o.token_ids for o in outs[0]]


def _sampled(max_tokens: int) -> list[SamplingParams]:
    """Greedy, seeded and unseeded sampling (the engine draws those seeds), equal lengths."""
    return [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=3, ignore_eos=True),
            SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=30, ignore_eos=True)] * 2


def test_chained_windows_give_the_tokens_of_one_step_at_a_time(model_dir: Path) -> None:
    """A window whose successor is known queues it on the device before the host applies its own
    tokens (``chain``); the next step takes it. Tokens, unseeded draws included, are those of one step
    at a time and of unchained windows; every block (the chained windows' reservations too) is back."""
    outs = {}
    for name, window, chain in (("plain", 1, False), ("windows", 4, False), ("chained", 4, True)):
        engine = _engine(model_dir, window, chain_windows=chain)
        finished, streamed = _stream(engine, _sampled(17))
        outs[name] = {rid: (f.token_ids, f.text, streamed[rid]) for rid, f in finished.items()}
        if name == "chained":
            assert engine.window.num_chained >= 2 and engine.window.num_dropped == 0
            assert engine.window._chained is None  # the last window had no successor
            assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
            engine.blocks.check_invariants()
        else:
            assert engine.window.num_chained == 0
    assert outs["chained"] == outs["plain"] == outs["windows"]


def test_a_chained_window_is_dropped_when_the_next_step_is_another(model_dir: Path) -> None:
    """Rows that stop inside a window (stop token, shorter lengths) and a request that arrives make the
    next step differ from the chained window: it is dropped and its unseeded draws undone, so every
    token is the one of unchained windows (and, for greedy and seeded rows, of one step at a time;
    unseeded rows draw seeds for rows that end inside a window too, chained or not)."""
    plain = _engine(model_dir, 1, async_steps=False)
    probe = plain.generate([PROMPTS[3]], ["a"], SamplingParams(max_tokens=5, temperature=0.0))[0].token_ids
    sampling = _sampled(15)
    sampling[3] = SamplingParams(max_tokens=15, temperature=0.0, stop_token_ids=(probe[2],))
    sampling[5] = SamplingParams(max_tokens=6, temperature=0.8)  # ends inside the second window
    want, _ = _stream(plain, sampling)
    unchained, chained = _engine(model_dir, 4, chain_windows=False), _engine(model_dir, 4)
    outs = [{r: f.token_ids for r, f in _stream(e, sampling)[0].items()} for e in (unchained, chained)]
    assert chained.window.num_dropped > 0
    assert outs[1] == outs[0]
    seeded = [f"r{i}" for i, sp in enumerate(sampling) if sp.temperature == 0 or sp.seed is not None]
    assert {r: outs[1][r] for r in seeded} == {r: want[r].token_ids for r in seeded}
    late = SamplingParams(max_tokens=12, temperature=0.7)
    for e in (unchained, chained):  # an arrival while a chained window waits
        e.add_request("x", prompt=PROMPTS[0], sampling=late)
        while e.scheduler.waiting or any(s.is_prefilling for s in e.scheduler.running):
            e.step()
        e.step()  # the prompt's step, queued ahead, is applied; the window after it is scheduled
        e.step()  # the window runs (and the chained one queues its successor)
    assert chained.window._chained is not None
    dropped = chained.window.num_dropped
    for e in (unchained, chained):
        e.add_request("y", prompt=PROMPTS[1], sampling=late)
    late_outs = [{o.request_id: o.token_ids for o in _drain(e)} for e in (unchained, chained)]
    assert chained.window.num_dropped > dropped  # the arrival dropped it (and later stops maybe more)
    assert late_outs[1] == late_outs[0]


def _drain(engine: Engine) -> list[RequestFinished]:
    done = []
    while engine.has_work():
        done += [e for e in engine.step() if isinstance(e, RequestFinished)]
    return done
