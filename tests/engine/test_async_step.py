"""Asynchronous steps (engine/async_step.py): a graph step scheduled and queued while the one before
runs, its decode rows fed the tokens the host has not read yet, stop checks one step behind. Every
request must get exactly the tokens, stops, logprobs and streamed text of steps whose tokens are
read before the next is scheduled, and leave the KV cache and the prefix cache as those leave them.

Graphs run their static layout eagerly here (``cuda_graphs="eager"``), as in test_graphs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loquetier import Engine, SamplingParams
from loquetier.engine.events import RequestFinished, TokenEvent
from loquetier.engine.kv_cache import PENDING_TOKEN
from loquetier.kernels import force_backend
from tests.engine.same_tokens import check_same, reference_kernels, sampling_mix, stream  # noqa: F401
from tests.engine.test_engine import make_engine, train_data
from tests.tiny import make_tiny_model

PROMPTS = ["the quick brown fox jumps over the lazy dog", "what is the capital", "a pirate says",
           "fine tuning and serving many adapters at once", "one two three", "hello there"]
ADAPTERS = ["a", None, "b", "a", None, "b"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-async") / "llama")


def _engine(model_dir: Path, on: bool, **limits) -> Engine:
    base = dict(cuda_graphs="eager", decode_window=1, seed=5, max_prefill_chunk=16, async_steps=on)
    base.update(limits)
    return make_engine(model_dir, **base)


def _sampling(stop_token: int) -> list[SamplingParams]:
    return sampling_mix(stop_token, unseeded_tokens=14)


def _run(engine: Engine, sampling: list[SamplingParams]) -> tuple[dict[str, RequestFinished], dict[str, str]]:
    """One request every two steps, so that prompt chunks share steps with decode rows."""
    return stream(engine, PROMPTS, ADAPTERS, sampling, arrive_every=2)


def _stop_token(model_dir: Path) -> int:
    """A stop token the greedy request r3 really meets: its third token."""
    probe = _engine(model_dir, False).generate([PROMPTS[3]], ["a"], SamplingParams(max_tokens=5, temperature=0.0))
    return probe[0].token_ids[2]


@pytest.mark.parametrize("window", [1, 4])
def test_async_steps_give_the_tokens_of_steps_read_one_by_one(model_dir: Path, window: int) -> None:
    stop = _stop_token(model_dir)
    sync, ahead = _engine(model_dir, False, decode_window=window), _engine(model_dir, True, decode_window=window)
    want, want_text = _run(sync, _sampling(stop))
    got, got_text = _run(ahead, _sampling(stop))
    check_same(want, got, want_text, got_text)
    assert want["r3"].finish_reason == "stop" and want["r3"].token_ids[-1] == stop
    assert want["r4"].finish_reason == "stop" and "e" not in want["r4"].text  # the stop string ended it
    assert sync.steps.num_launched == 0
    assert ahead.steps.num_launched > 0 and ahead.runner.num_graph_prefill_steps > 0
    assert not ahead.steps.in_flight
    # every sequence's pending tokens were applied, every block is back
    assert ahead.blocks.num_free_blocks == ahead.blocks.num_blocks
    ahead.blocks.check_invariants()
    # stops are seen one step late: the rows given to stopped sequences are the only extra work
    extra = ahead.scheduler.metrics.num_decode_tokens - sync.scheduler.metrics.num_decode_tokens
    assert 0 <= extra <= 2  # r3 and r4 end on a stop (max_tokens ends are known ahead)


def test_async_steps_keep_the_prefix_cache_right(model_dir: Path) -> None:
    """Blocks whose tokens were pending when they were appended are published with the real tokens:
    a later request over the same prefix reuses them and gets a fresh engine's tokens."""
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine = _engine(model_dir, True)
    engine.add_request("busy", prompt=PROMPTS[3], sampling=SamplingParams(max_tokens=40, temperature=0.0))
    engine.step()
    first = engine.generate([PROMPTS[0]], sampling=greedy)[0]
    assert engine.steps.num_launched > 0
    follow = engine.tokenizer(PROMPTS[0])["input_ids"] + first.token_ids + [5, 6, 7]
    hits = engine.blocks.num_prefix_hits
    engine.add_request("busy2", prompt=PROMPTS[1], sampling=SamplingParams(max_tokens=40, temperature=0.0))
    again = engine.generate([follow], sampling=SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert engine.blocks.num_prefix_hits > hits  # blocks filled by asynchronous steps were reused
    fresh = _engine(model_dir, False).generate([follow], sampling=SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert again.token_ids == fresh.token_ids
    engine.run_until_idle()
    for state in engine.blocks._seqs.values():
        assert PENDING_TOKEN not in state.token_ids


def test_an_abort_while_a_step_is_in_flight(model_dir: Path) -> None:
    engine = _engine(model_dir, True)
    long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request("keep", prompt=PROMPTS[0], sampling=long)
    engine.add_request("gone", prompt=PROMPTS[1], sampling=long)
    while not engine.steps.in_flight or not engine.scheduler.get("gone").output_token_ids:
        engine.step()
    assert engine.steps.in_flight and engine.scheduler.get("gone").num_pending == 1
    assert engine.abort("gone")
    after = [e for e in engine.run_until_idle() if getattr(e, "request_id", None) == "gone"]
    assert all(not isinstance(e, TokenEvent) for e in after)  # nothing of it after the abort
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.blocks.check_invariants()


def _blocks_hold_the_tokens(engine: Engine) -> None:
    """Every running sequence's blocks hold its tokens, position by position (a pending one as
    PENDING_TOKEN), and no position past the ones its steps feed."""
    for seq in engine.scheduler.running:
        if not engine.blocks.has_seq(seq.seq_id):
            continue
        held = engine.blocks._seqs[seq.seq_id].token_ids
        assert len(held) <= seq.num_tokens + seq.num_pending, seq.seq_id
        known = seq.token_ids[: len(held)]
        assert held[: len(known)] == known, seq.seq_id
        assert all(t == PENDING_TOKEN for t in held[len(known):]), seq.seq_id


def test_no_step_is_scheduled_ahead_while_a_job_trains_or_kv_is_short(model_dir: Path) -> None:
    """Training steps run eagerly and read their own results; short KV could preempt a sequence whose
    token is pending. Tokens are the synchronous engine's either way, and the blocks hold each
    sequence's tokens through preemptions and recomputes (a recompute whose last token is fed as a
    decode row, max_prefill_chunk 16, included)."""
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = []
    for on in (False, True):
        engine = _engine(model_dir, on, num_kv_blocks=12, block_size=4)  # 48 slots for 6 sequences
        engine.add_training_job("a", train_data(0), {"micro_batch_tokens": 32, "max_steps": 2})
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt=prompt, sampling=greedy)
        done = {}
        while engine.has_work():
            done |= {e.request_id: e.token_ids for e in engine.step() if isinstance(e, RequestFinished)}
            _blocks_hold_the_tokens(engine)
        outs.append(done)
        engine.blocks.check_invariants()
        assert engine.scheduler.metrics.num_preemptions > 0  # the KV was short
    assert outs[1] == outs[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize("window", [1, 4])
def test_async_steps_on_captured_graphs_on_cuda(model_dir: Path, window: int) -> None:
    """On a GPU, fp32, captured graphs, the Triton kernels: arrivals while others decode, so steps
    carry prompt chunks and decode rows fed on the device; tokens, stops and texts are those of steps
    read one by one."""
    force_backend(None)
    stop = _stop_token(model_dir)
    runs = []
    for on in (False, True):
        engine = _engine(model_dir, on, device="cuda", cuda_graphs="on", decode_window=window)
        assert engine.capture_graphs() > 0
        runs.append((engine, *_run(engine, _sampling(stop))))
    (sync, want, want_text), (ahead, got, got_text) = runs
    check_same(want, got, want_text, got_text)
    assert ahead.steps.num_launched > 0 and sync.steps.num_launched == 0
    assert ahead.runner.num_graph_prefill_steps > 0
    assert ahead.blocks.num_free_blocks == ahead.blocks.num_blocks


def _tokens_of(events: list, rid: str) -> list[int]:
    return [t for e in events if isinstance(e, TokenEvent) and e.request_id == rid for t in e.token_ids]


def test_a_landed_step_s_tokens_go_out_before_a_training_step(model_dir: Path) -> None:
    """The call that applies a step in flight returns its tokens at once: they never wait behind the
    (long, eager) training step that a job brings, which the next call runs."""
    engine = _engine(model_dir, True)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine.add_request("r", prompt=PROMPTS[0], sampling=greedy, stream=True)
    while not (engine.steps.in_flight and engine.scheduler.get("r").output_token_ids):
        engine.step()
    engine.add_training_job("a", train_data(0), {"micro_batch_tokens": 32, "max_steps": 2})
    rows, steps = engine.runner.num_backward_rows, engine.num_steps
    events = engine.step()
    assert _tokens_of(events, "r") and not engine.steps.in_flight
    assert (engine.runner.num_backward_rows, engine.num_steps) == (rows, steps)  # nothing else ran
    for _ in range(3):
        engine.step()
    assert engine.runner.num_backward_rows > rows  # the calls after it train
    engine.run_until_idle()


def test_a_step_scheduled_ahead_for_a_window_runs_on_the_next_call(model_dir: Path) -> None:
    """A step scheduled while one is in flight that a decode window takes (nothing waits any more):
    the call returns the landed step's token, the next call runs the window."""
    engine = _engine(model_dir, True, decode_window=4)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine.add_request("r", prompt=PROMPTS[2], sampling=greedy, stream=True)
    events = engine.step()  # the whole prompt in one asynchronous step
    assert engine.steps.in_flight and not _tokens_of(events, "r")
    windows = engine.window.num_windows
    events = engine.step()
    got = _tokens_of(events, "r")
    assert len(got) == 1 and engine._ready is not None
    assert engine.window.num_windows == windows
    events = engine.step()
    got += _tokens_of(events, "r")
    assert len(got) == 5 and engine.window.num_windows == windows + 1 and engine._ready is None
    got += _tokens_of(engine.run_until_idle(), "r")
    want = _engine(model_dir, False, decode_window=4).generate([PROMPTS[2]], sampling=greedy)[0].token_ids
    assert got == want and len(want) == 20
