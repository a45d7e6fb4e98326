"""The unified engine end to end on CPU: serving beside training, API behaviour, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loquetier import Engine, EngineError, SamplingParams, TrainingParams
from loquetier.engine.events import JobCheckpoint, JobFinished, RequestFinished, TokenEvent
from loquetier.kernels import force_backend
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.config import LoRAConfig
from tests.tiny import make_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPTS = ["the quick brown fox", "what is the capital", "a pirate says", "fine tuning and"]


@pytest.fixture(scope="module", autouse=True)
def _reference_backend():
    force_backend("reference")  # the Triton interpreter is exercised by the kernel tests
    yield
    force_backend(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def random_adapter(engine: Engine, seed: int, rank: int, targets: tuple[str, ...]) -> LoRAAdapter:
    adapter = LoRAAdapter.new(LoRAConfig(rank=rank, alpha=2 * rank, target_modules=targets),
                              engine.model.dims, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for a, b in adapter.weights.values():
        b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
        a.mul_(2.0)
    return adapter


def make_engine(model_dir: Path, **limits) -> Engine:
    base = dict(num_kv_blocks=96, block_size=8, max_num_batched_tokens=256, max_prefill_chunk=64,
                max_adapter_slots=6, num_train_slots=2, max_lora_rank=16)
    base.update(limits)
    engine = Engine.from_pretrained(model_dir, **base)
    engine.load_adapter("a", random_adapter(engine, 10, 4, ("q_proj", "v_proj")))
    engine.load_adapter("b", random_adapter(engine, 20, 8, ("q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj")))
    return engine


def train_data(offset: int) -> list[dict]:
    return [{"prompt_token_ids": [1, 10 + i + offset, 11 + i], "completion_token_ids": [40 + i + offset, 41, 42 + i]}
            for i in range(6)]


def job_params(seed: int) -> TrainingParams:
    return TrainingParams(optimizer="adamw", lr=5e-3, max_steps=6, micro_batch_tokens=20, seed=seed,
                          checkpoint_every=2)


LORA = dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])


def test_base_generation_matches_transformers(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    outs = engine.generate(PROMPTS, sampling=GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref[: len(out.token_ids)]
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


def test_training_never_corrupts_serving_and_jobs_match_solo_runs(model_dir: Path) -> None:
    adapters = ["a", None, "b", "a"]
    expected = [o.token_ids for o in make_engine(model_dir).generate(PROMPTS, adapters, GREEDY)]

    # SLOs far above any step time: training shares steps with serving however loaded the machine
    engine = make_engine(model_dir, default_ttft_ms=600_000.0, default_tpot_ms=600_000.0)
    engine.add_training_job("t1", train_data(0), job_params(1), lora=LORA, job_id="j1")
    engine.add_training_job("t2", train_data(3), job_params(2), lora=LORA, job_id="j2", priority=1)
    for _ in range(3):
        engine.step()  # the jobs are mid-run when the requests arrive
    for i, (prompt, adapter) in enumerate(zip(PROMPTS, adapters, strict=True)):
        engine.add_request(f"r{i}", prompt=prompt, adapter_id=adapter, sampling=GREEDY)
    results: dict[str, list[int]] = {}
    finished: dict[str, JobFinished] = {}
    mixed_steps = 0
    while engine.has_work():
        before = engine.runner.num_backward_rows
        events = engine.step()
        mixed = engine.runner.num_backward_rows > before and len(results) < 4
        mixed_steps += int(mixed)
        for e in events:
            if isinstance(e, RequestFinished):
                results[e.request_id] = e.token_ids
            if isinstance(e, JobFinished):
                finished[e.job_id] = e
    assert mixed_steps > 0, "serving and training never shared a step"
    assert [results[f"r{i}"] for i in range(4)] == expected
    assert {e.status for e in finished.values()} == {"succeeded"}

    for job_id, adapter_id, offset, seed in (("j1", "t1", 0, 1), ("j2", "t2", 3, 2)):
        solo = make_engine(model_dir)
        solo.add_training_job(adapter_id, train_data(offset), job_params(seed), lora=LORA, job_id=job_id)
        solo.run_until_idle()
        together = LoRAAdapter.from_bytes(finished[job_id].adapter)
        alone = solo.adapters.get(adapter_id)
        for key, (a, b) in alone.weights.items():
            torch.testing.assert_close(together.weights[key][0], a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(together.weights[key][1], b, rtol=1e-5, atol=1e-6)


def test_eager_steps_lay_out_each_adapters_rows_side_by_side(model_dir: Path) -> None:
    prompts, adapters = PROMPTS * 2, ["a", None, "b", "a", "b", None, "a", "b"]
    solo = make_engine(model_dir)
    expected = [solo.generate([p], [a], GREEDY)[0].token_ids for p, a in zip(prompts, adapters, strict=True)]
    engine = make_engine(model_dir)
    batches, forward = [], engine.model.forward

    def recording(batch, kv=None):  # type: ignore[no-untyped-def]
        batches.append(batch)
        return forward(batch, kv)

    engine.model.forward = recording  # type: ignore[method-assign]
    got = [o.token_ids for o in engine.generate(prompts, adapters, GREEDY)]
    assert got == expected  # every row's tokens went back to its own request
    mixed = 0
    for b in batches:
        prefill = list(b.host_slots[b.num_train + b.num_eval :][: b.num_prefill])
        decode = list(b.host_slots[len(b.host_slots) - b.num_decode :])
        assert prefill == sorted(prefill) and decode == sorted(decode)
        mixed += len(set(decode)) > 2
    assert mixed  # decode steps of three adapters (and none) ran


def test_backward_covers_only_training_rows(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    engine.add_training_job("t1", train_data(0), job_params(1), lora=LORA)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt=prompt, adapter_id="a", sampling=GREEDY)
    trained_tokens = 0
    while engine.has_work():
        engine.step()
        trained_tokens = sum(engine.scheduler.metrics.train_tokens_by_job.values())
    assert engine.runner.num_backward_rows == trained_tokens > 0


def test_checkpoint_resume_in_a_fresh_engine_matches_uninterrupted(model_dir: Path) -> None:
    full = make_engine(model_dir)
    full.add_training_job("t1", train_data(0), job_params(5), lora=LORA, job_id="j")
    events = full.run_until_idle()
    checkpoints = [e for e in events if isinstance(e, JobCheckpoint)]
    assert [c.step for c in checkpoints] == [2, 4, 6]
    final = next(e for e in events if isinstance(e, JobFinished))

    resumed = make_engine(model_dir)
    resumed.add_training_job("t1", train_data(0), job_params(5), lora=LORA, job_id="j",
                             checkpoint=checkpoints[0].data)
    again = next(e for e in resumed.run_until_idle() if isinstance(e, JobFinished))
    for key, (a, b) in LoRAAdapter.from_bytes(final.adapter).weights.items():
        other = LoRAAdapter.from_bytes(again.adapter).weights[key]
        torch.testing.assert_close(other[0], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other[1], b, rtol=1e-5, atol=1e-6)
    assert again.metrics["loss"] == pytest.approx(final.metrics["loss"], rel=1e-5)


def test_a_checkpoint_asked_for_mid_job_resumes_to_the_uninterrupted_weights(model_dir: Path) -> None:
    """``checkpoint_job``: a job that checkpoints only at its end is checkpointed as it stands (a
    pause): between optimizer steps at once, mid-accumulation at the end of the step in progress;
    a fresh engine resumed from it ends with the weights of the run that was never stopped."""
    params = TrainingParams(optimizer="adamw", lr=5e-3, max_steps=6, micro_batch_tokens=20, seed=4,
                            grad_accum=2)
    full = make_engine(model_dir)
    full.add_training_job("t1", train_data(2), params, lora=LORA, job_id="j")
    final = next(e for e in full.run_until_idle() if isinstance(e, JobFinished))

    stopped = make_engine(model_dir)
    assert not stopped.checkpoint_job("j")  # unknown
    stopped.add_training_job("t1", train_data(2), params, lora=LORA, job_id="j")
    events: list = []
    while stopped.jobs.stats().get("j", {"step": 0})["step"] < 2:
        events += stopped.step()
    assert not any(isinstance(e, JobCheckpoint) for e in events)
    while stopped.jobs._train["j"].job.at_boundary:  # into the next step's accumulation (2 micro-batches)
        events += stopped.step()
    step = stopped.jobs.stats()["j"]["step"]
    assert stopped.checkpoint_job("j")
    while not any(isinstance(e, JobCheckpoint) for e in events):
        events += stopped.step()
    checkpoint = next(e for e in events if isinstance(e, JobCheckpoint))
    assert checkpoint.step == step + 1  # the step in progress, once its gradients were all in
    assert stopped.jobs._train["j"].job.at_boundary  # between optimizer steps: one at once, as it stands
    assert stopped.checkpoint_job("j")
    now = [e for e in stopped.step() if isinstance(e, JobCheckpoint)]
    assert [e.step for e in now] == [checkpoint.step] and now[0].data == checkpoint.data
    assert stopped.cancel_job("j")

    resumed = make_engine(model_dir)
    resumed.add_training_job("t1", train_data(2), params, lora=LORA, job_id="j", checkpoint=checkpoint.data)
    again = next(e for e in resumed.run_until_idle() if isinstance(e, JobFinished))
    for key, (a, b) in LoRAAdapter.from_bytes(final.adapter).weights.items():
        other = LoRAAdapter.from_bytes(again.adapter).weights[key]
        torch.testing.assert_close(other[0], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other[1], b, rtol=1e-5, atol=1e-6)


def test_a_job_waits_while_its_checkpoints_are_not_stored_and_trains_the_same(model_dir: Path) -> None:
    """With a checkpoint window of 1, a job that checkpoints every step stops after each checkpoint
    (no step, no work for the engine) until it is said stored; its steps, checkpoints and weights are
    those of a job that never waits."""
    params = TrainingParams(optimizer="adamw", lr=5e-3, max_steps=5, micro_batch_tokens=20, seed=3,
                            checkpoint_every=1)
    free = make_engine(model_dir)
    free.add_training_job("t1", train_data(1), params, lora=LORA, job_id="j")
    unheld = free.run_until_idle()

    held = make_engine(model_dir)
    held.set_checkpoint_window(1)
    held.add_training_job("t1", train_data(1), params, lora=LORA, job_id="j")
    events: list = []
    for expected_step in range(1, 6):
        while not any(isinstance(e, JobCheckpoint) and e.step == expected_step for e in events):
            assert held.has_work()
            events += held.step()
        if expected_step == 5:
            break
        stats = held.jobs.stats()["j"]
        assert stats["held"] and stats["unstored_checkpoints"] == 1 and stats["step"] == expected_step
        assert not held.has_work()  # nothing to step: the worker's engine thread waits for a command
        for _ in range(3):
            events += held.step()
        assert held.jobs.stats()["j"]["step"] == expected_step
        assert held.checkpoint_stored("j")
        assert not held.jobs.stats()["j"]["held"]
    events += held.run_until_idle()
    assert not held.checkpoint_stored("j")  # finished: unknown
    steps = [e.step for e in events if isinstance(e, JobCheckpoint)]
    assert steps == [e.step for e in unheld if isinstance(e, JobCheckpoint)] == [1, 2, 3, 4, 5]
    mine, theirs = (next(e for e in evs if isinstance(e, JobFinished)) for evs in (events, unheld))
    assert mine.status == theirs.status == "succeeded"
    for key, (a, b) in LoRAAdapter.from_bytes(theirs.adapter).weights.items():
        other = LoRAAdapter.from_bytes(mine.adapter).weights[key]
        torch.testing.assert_close(other[0], a, rtol=0, atol=0)
        torch.testing.assert_close(other[1], b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_unstored"):
        held.set_checkpoint_window(-1)


def test_streaming_stop_strings_abort_and_kv_reclaimed(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    total_blocks = engine.blocks.num_free_blocks
    full = engine.generate(["the quick brown fox"], sampling=SamplingParams(max_tokens=12, temperature=0))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    engine.add_request("s", prompt="the quick brown fox", sampling=SamplingParams(
        max_tokens=12, temperature=0, stop=[stop]), stream=True)
    engine.add_request("x", prompt="a pirate says", sampling=SamplingParams(max_tokens=50, temperature=0,
                                                                            ignore_eos=True))
    streamed, streamed_ids, finals = "", [], {}
    for step in range(200):
        for e in engine.step():
            if isinstance(e, TokenEvent):
                assert e.request_id == "s"
                streamed += e.text
                streamed_ids += e.token_ids
            elif isinstance(e, RequestFinished):
                finals[e.request_id] = e
        if step == 3:
            assert engine.abort("x")
        if not engine.has_work():
            break
    assert finals["s"].finish_reason == "stop" and finals["s"].text == full.text[:2] == streamed
    assert streamed_ids == finals["s"].token_ids
    assert finals["x"].finish_reason == "abort"
    assert engine.blocks.num_free_blocks == total_blocks


def test_preemption_under_kv_pressure_keeps_outputs(model_dir: Path) -> None:
    roomy = make_engine(model_dir).generate(PROMPTS, sampling=SamplingParams(max_tokens=20, temperature=0))
    tight = make_engine(model_dir, num_kv_blocks=9)
    outs = tight.generate(PROMPTS, sampling=SamplingParams(max_tokens=20, temperature=0))
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.scheduler.metrics.num_preemptions > 0


def test_seeded_sampling_and_logprobs(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    sp = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=7, logprobs=True)
    one = engine.generate(["the quick brown fox"], sampling=sp)[0]
    crowd = engine.generate(["a pirate", "the quick brown fox", "what is"], sampling=[
        SamplingParams(max_tokens=6, temperature=1.0), sp, SamplingParams(max_tokens=3)])[1]
    assert one.token_ids == crowd.token_ids
    assert one.logprobs is not None and len(one.logprobs) == len(one.token_ids)
    assert all(lp <= 0 for lp in one.logprobs)


@pytest.mark.parametrize(("kwargs", "code"), [
    (dict(prompt="hi", prompt_token_ids=[1, 2]), "invalid_request"),
    (dict(), "invalid_request"),
    (dict(prompt_token_ids=[1, 99999]), "invalid_request"),
    (dict(prompt="hi", adapter_id="nope"), "unknown_adapter"),
    (dict(prompt_token_ids=[5] * 600), "prompt_too_long"),
    (dict(prompt="hi", priority=-1), "invalid_request"),
])
def test_bad_requests_get_clear_errors(model_dir: Path, kwargs: dict, code: str) -> None:
    engine = make_engine(model_dir)
    with pytest.raises(EngineError) as info:
        engine.add_request("r", **kwargs)
    assert info.value.code == code
    assert not engine.has_work()


def test_bad_jobs_get_clear_errors(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    with pytest.raises(EngineError, match="invalid_data"):
        engine.add_training_job("t", [{"prompt": 3}], job_params(1), lora=LORA)
    long = [{"prompt_token_ids": [5] * engine.max_model_len, "completion_token_ids": [6]}]
    for prepare in (False, True):  # inline, and prepared ahead on another thread
        with pytest.raises(EngineError, match="exceed the model's context"):
            data = engine.prepare_data(long, 4 * engine.max_model_len) if prepare else long
            engine.add_training_job("t", data, TrainingParams(micro_batch_tokens=4 * engine.max_model_len), lora=LORA)
    with pytest.raises(EngineError, match="invalid_job"):
        engine.add_training_job("t", train_data(0), {"lr": -1}, lora=LORA)
    with pytest.raises(EngineError, match="bad_adapter|invalid_job"):
        engine.add_training_job("t", train_data(0), job_params(1), lora=dict(rank=4, target_modules=["wq"]))
    engine.add_training_job("t", train_data(0), job_params(1), lora=LORA, job_id="j")
    with pytest.raises(EngineError, match="duplicate_job"):
        engine.add_training_job("t2", train_data(0), job_params(1), lora=LORA, job_id="j")
    assert engine.cancel_job("j")
    events = engine.step()
    assert any(isinstance(e, JobFinished) and e.status == "cancelled" for e in events)
    assert not engine.has_work()


def test_pause_resume_and_evaluate(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    engine.add_training_job("t", train_data(0), job_params(1), lora=LORA, job_id="j")
    engine.step()
    engine.pause_job("j")
    step = engine.jobs.stats()["j"]["step"]
    for _ in range(3):
        engine.step()
    assert engine.jobs.stats()["j"]["step"] == step
    assert not engine.has_work()  # a paused job needs no step
    engine.resume_job("j")
    engine.run_until_idle()
    trained = engine.evaluate("t", train_data(0))
    base = engine.evaluate(None, train_data(0))
    assert trained["loss"] < base["loss"]
    assert 0.0 <= trained["token_accuracy"] <= 1.0


def test_coalesced_prefill_and_banked_tpot_change_when_not_what(model_dir: Path) -> None:
    """The scheduler's time knobs (prefill_coalesce_ms, tpot_burst) move prompts between steps but
    never change a token: held prompts wait out the hold while decodes continue, then are served."""
    adapters = ["a", None, "b", "a"]
    expected = [o.token_ids for o in make_engine(model_dir).generate(PROMPTS, adapters, GREEDY)]
    engine = make_engine(model_dir, prefill_coalesce_ms=1500.0, tpot_burst=4.0, default_ttft_ms=20_000.0)
    assert engine.scheduler.config.prefill_coalesce_ms == 1500.0 and engine.scheduler.config.tpot_burst == 4.0
    engine.add_request("r0", prompt=PROMPTS[0], adapter_id=adapters[0], sampling=GREEDY)
    engine.step()  # nothing decoding yet: nothing to protect, no hold
    for i in range(1, 4):
        engine.add_request(f"r{i}", prompt=PROMPTS[i], adapter_id=adapters[i], sampling=GREEDY)
    before = engine.scheduler.metrics.num_prefill_tokens
    engine.step()
    assert engine.scheduler.metrics.num_prefill_tokens == before  # held: a decode-only step
    assert engine.scheduler.num_waiting == 3
    results: dict[str, list[int]] = {}
    while engine.has_work():
        for e in engine.step():
            if isinstance(e, RequestFinished):
                results[e.request_id] = e.token_ids
    assert [results[f"r{i}"] for i in range(4)] == expected


def test_warmup_leaves_the_engine_as_it_found_it(model_dir: Path) -> None:
    """Engine.warmup runs prompts of several lengths and decode batches of several sizes, with and
    without a temporary adapter, and training steps beside prompt and decode rows; afterwards nothing
    of it is left and the engine serves the same tokens as one that never warmed up."""
    adapters = ["a", None, "b", "a"]
    expected = [o.token_ids for o in make_engine(model_dir).generate(PROMPTS, adapters, GREEDY)]
    engine = make_engine(model_dir)
    loaded = sorted(a for a in ("a", "b") if engine.has_adapter(a))
    seen, run = [], engine.runner.run

    def recording(batch, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((batch.num_train_tokens, batch.num_decode_rows, batch.num_prefill_tokens))
        return run(batch, *args, **kwargs)

    engine.runner.run = recording  # type: ignore[method-assign]
    report = engine.warmup()
    engine.runner.run = run  # type: ignore[method-assign]
    assert report["steps"] > 10 and report["adapters"] == 1 and report["training"]
    assert report["lora_launch_layouts"] == 0  # the reference backend builds nothing (test_smlm: Triton)
    # training rows ran beside decode rows and beside prompt rows (eager steps with their own variants)
    assert any(t and d for t, d, _ in seen) and any(t and p for t, _, p in seen)
    assert not engine.has_work() and engine.scheduler.num_running == 0
    assert not any(engine.has_adapter(a) for a in ("__loquetier_warmup__", "__loquetier_warmup_train__"))
    assert sorted(a for a in ("a", "b") if engine.has_adapter(a)) == loaded
    assert all(engine.adapters.slot_of(a) is not None for a in loaded)  # resident, as load left them
    assert engine.scheduler.step_model.num_observed == 0  # compile-time steps teach it nothing
    assert engine.blocks.num_free_blocks == make_engine(model_dir).blocks.num_free_blocks
    assert [o.token_ids for o in engine.generate(PROMPTS, adapters, GREEDY)] == expected
    engine.add_request("busy", prompt=PROMPTS[0], sampling=GREEDY)
    with pytest.raises(EngineError, match="idle"):
        engine.warmup()
