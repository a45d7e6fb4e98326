"""Step isolation on the real engine (tiny model, CPU): a failure inside a step is pinned on the
request or job whose rows caused it; everything else finishes exactly as if it had run alone; a
broken engine says so with EngineBroken instead of blaming its inputs."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loquetier import Engine, SamplingParams, TrainingParams
from loquetier.engine.errors import EngineBroken, EngineError
from loquetier.engine.events import EngineEvent, JobFinished, RequestFailed, RequestFinished
from loquetier.engine.sampler import SamplingTensors
from loquetier.kernels import force_backend
from loquetier.lora.adapter import LoRAAdapter
from tests.tiny import make_tiny_model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LORA = dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
POISON = 311  # a token id only the guilty inputs carry


@pytest.fixture(scope="module", autouse=True)
def _reference_backend():
    force_backend("reference")
    yield
    force_backend(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def make_engine(model_dir: Path) -> Engine:
    return Engine.from_pretrained(model_dir, num_kv_blocks=128, block_size=8, max_num_batched_tokens=256,
                                  max_prefill_chunk=64, max_adapter_slots=4, num_train_slots=2, max_lora_rank=8)


def poison_forward(engine: Engine, is_bad: Callable[[torch.Tensor], bool] | None = None,
                   error: Exception | None = None) -> list[int]:
    """Make the model's forward raise for batches holding POISON (or ``is_bad``) in their training,
    eval or prompt rows; returns a list that counts the forwards that raised. Decode rows are left
    out: their tokens are the model's own, and a good request may generate POISON (the tiny
    vocabulary has 320 ids), which would make it look guilty."""
    forward, raised = engine.model.forward, []
    is_bad = is_bad or (lambda ids: bool((ids == POISON).any()))

    def guarded(fb: Any, kv: Any = None) -> Any:
        if is_bad(fb.input_ids[: fb.num_tokens - fb.num_decode]):
            raised.append(1)
            raise error or ValueError("a row this engine cannot run")
        return forward(fb, kv)

    engine.model.forward = guarded  # type: ignore[method-assign]
    return raised


def prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


def train_data(seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randrange(2, 8))],
             "completion_token_ids": [rng.randrange(3, 300) for _ in range(rng.randrange(2, 8))]}
            for _ in range(12)]


def params(seed: int, **overrides: Any) -> TrainingParams:
    base: dict[str, Any] = dict(optimizer="adamw", lr=3e-3, max_steps=6, micro_batch_tokens=24, grad_accum=2,
                                seed=seed)
    return TrainingParams(**(base | overrides))


def drain(engine: Engine, max_steps: int = 400) -> list[EngineEvent]:
    events: list[EngineEvent] = []
    for _ in range(max_steps):
        if not engine.has_work():
            return events
        events += engine.step()
    raise AssertionError("the engine did not finish its work")


def poison_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sampling raise for a step holding a request seeded POISON (after the backward of the
    step's training rows has run)."""
    build = SamplingTensors.build

    def guarded(params: Any, *args: Any, **kwargs: Any) -> SamplingTensors:
        if any(p.seed == POISON for p in params):
            raise ValueError("a row this sampler cannot take")
        return build(params, *args, **kwargs)

    monkeypatch.setattr(SamplingTensors, "build", guarded)


@pytest.mark.parametrize("stage", ["forward", "sampling"])
def test_a_failing_request_fails_alone_and_the_rest_matches_solo_runs(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """The request fails in the forward (no gradient touched: the job's piece runs again as it was)
    or in sampling, after the training rows' backward (the job restarts its accumulation window):
    either way the other requests and the job end exactly as they would alone."""
    seed = random.randrange(10**6)
    good = prompts(seed, 5)
    expected = [o.token_ids for o in make_engine(model_dir).generate(good, None, GREEDY)]
    solo = make_engine(model_dir)
    solo.add_training_job("t", train_data(seed), params(seed), lora=LORA, job_id="j")
    solo_done = [e for e in drain(solo) if isinstance(e, JobFinished)]

    engine = make_engine(model_dir)
    if stage == "forward":
        poison_forward(engine)
        bad = dict(prompt_token_ids=[5, POISON, 7], sampling=GREEDY)
    else:
        poison_sampling(monkeypatch)
        bad = dict(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=6, seed=POISON))
    engine.add_training_job("t", train_data(seed), params(seed), lora=LORA, job_id="j")
    engine.step()  # the job is mid-window when the requests arrive
    for i, p in enumerate(good[:3]):
        engine.add_request(f"r{i}", prompt_token_ids=p, sampling=GREEDY)
    engine.add_request("bad", **bad)  # type: ignore[arg-type]
    events = engine.step()
    for i, p in enumerate(good[3:], 3):
        engine.add_request(f"r{i}", prompt_token_ids=p, sampling=GREEDY)
    events += drain(engine)

    failed = [e for e in events if isinstance(e, RequestFailed)]
    assert [(e.request_id, e.code) for e in failed] == [("bad", "execution_failed")]
    assert "ValueError" in failed[0].message and "\n" not in failed[0].message
    finished = {e.request_id: e.token_ids for e in events if isinstance(e, RequestFinished)}
    assert [finished[f"r{i}"] for i in range(5)] == expected
    assert engine.isolation.num_isolated_steps >= 1
    assert_same_job(events, solo_done)
    assert not engine.has_work() and engine.blocks.num_free_blocks == engine.blocks.num_blocks


def assert_same_job(events: list[EngineEvent], solo_done: list[JobFinished], job_id: str = "j") -> None:
    done = [e for e in events if isinstance(e, JobFinished) and e.job_id == job_id]
    assert [e.status for e in done] == ["succeeded"], done
    assert done[0].metrics["steps"] == solo_done[0].metrics["steps"]
    assert done[0].metrics["tokens"] == solo_done[0].metrics["tokens"]
    together, alone = LoRAAdapter.from_bytes(done[0].adapter), LoRAAdapter.from_bytes(solo_done[0].adapter)
    # The training rows share each step's GEMMs with other rows than when alone, so fp32 sums run in
    # another order: one weight in 512 came out 2.5e-6 apart (seeded at random, 2026-12-05). A step the
    # failure reached would show as NaN, another step count or a far larger change.
    for key, (a, b) in alone.weights.items():
        torch.testing.assert_close(together.weights[key][0], a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.weights[key][1], b, rtol=1e-4, atol=1e-5)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise ValueError("backward cannot take this row")


def test_a_job_failing_in_its_backward_fails_alone_and_its_neighbour_matches_its_solo_run(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Poisoned examples may sit in a later micro-batch of an accumulation window. The retries run
    the same pieces, so the guilty job fails at once; the other job, whose backward ran in the
    failed attempt, drops that step's work and restarts its window, and still ends as alone."""
    from loquetier.engine import runner as runner_module

    seed = random.randrange(10**6)
    solo = make_engine(model_dir)
    solo.add_training_job("t", train_data(seed), params(seed), lora=LORA, job_id="j")
    solo_done = [e for e in drain(solo) if isinstance(e, JobFinished)]

    engine = make_engine(model_dir)
    seen: list[bool] = []
    forward = engine.model.forward

    def spy(fb: Any, kv: Any = None) -> Any:
        seen.append(bool((fb.input_ids[: fb.num_train] == POISON).any()))
        return forward(fb, kv)

    engine.model.forward = spy  # type: ignore[method-assign]
    weighted_loss = runner_module.weighted_loss
    monkeypatch.setattr(runner_module, "weighted_loss",
                        lambda *a: _FailingBackward.apply(weighted_loss(*a)) if seen[-1] else weighted_loss(*a))
    bad = train_data(seed + 7)
    for example in bad:
        example["completion_token_ids"] = [POISON if t % 5 == 0 else t for t in example["completion_token_ids"]]
        example["prompt_token_ids"] = [t for t in example["prompt_token_ids"] if t % 5]
    engine.add_training_job("b", bad, params(seed + 7), lora=LORA, job_id="jb")
    engine.add_training_job("t", train_data(seed), params(seed), lora=LORA, job_id="j")
    engine.add_request("r", prompt_token_ids=prompts(seed, 1)[0], sampling=GREEDY)
    events = drain(engine)
    done = {e.job_id: e for e in events if isinstance(e, JobFinished)}
    assert done["jb"].status == "failed" and "backward cannot take this row" in (done["jb"].error or "")
    assert_same_job(events, solo_done)
    assert [e.request_id for e in events if isinstance(e, RequestFinished)] == ["r"]


def test_a_job_whose_rows_fail_fails_alone(model_dir: Path) -> None:
    seed = random.randrange(10**6)
    engine = make_engine(model_dir)
    poison_forward(engine)
    bad = train_data(seed)
    bad[3]["completion_token_ids"].append(POISON)
    engine.add_training_job("bad", bad, params(seed), lora=LORA, job_id="jb")
    engine.add_training_job("good", train_data(seed + 1), params(seed + 1), lora=LORA, job_id="jg")
    for i, p in enumerate(prompts(seed, 3)):
        engine.add_request(f"r{i}", prompt_token_ids=p, sampling=GREEDY)
    events = drain(engine)
    done = {e.job_id: e for e in events if isinstance(e, JobFinished)}
    assert done["jb"].status == "failed" and "ValueError" in (done["jb"].error or "")
    assert done["jg"].status == "succeeded" and done["jg"].metrics["steps"] == 6
    assert sorted(e.request_id for e in events if isinstance(e, RequestFinished)) == ["r0", "r1", "r2"]
    # the failed job leaves no adapter behind (its weights were never "bad"'s), the other job's is served
    assert not engine.jobs.has_work() and engine.adapters.adapter_ids == ["good"]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_an_absurd_learning_rate_fails_its_job_alone(model_dir: Path, optimizer: str) -> None:
    """lr 1e300: AdamW raises in its update (float32 overflow), SGD turns the weights infinite and
    the next loss non-finite; either way only that job fails, with the reason."""
    seed = random.randrange(10**6)
    engine = make_engine(model_dir)
    engine.add_training_job("hot", train_data(seed), params(seed, optimizer=optimizer, lr=1e300, grad_accum=1),
                            lora=LORA, job_id="hot")
    engine.add_training_job("calm", train_data(seed + 1), params(seed + 1), lora=LORA, job_id="calm")
    engine.add_request("r", prompt_token_ids=prompts(seed, 1)[0], sampling=GREEDY)
    events = drain(engine)
    done = {e.job_id: e for e in events if isinstance(e, JobFinished)}
    assert done["hot"].status == "failed", done["hot"]
    assert "training failed at step" in (done["hot"].error or "")
    assert done["calm"].status == "succeeded"
    assert [e.request_id for e in events if isinstance(e, RequestFinished)] == ["r"]
    assert engine.adapters.adapter_ids == ["calm"] and not engine.adapters.is_pinned("calm")


def test_one_request_alone_in_a_failing_step_is_blamed_when_the_engine_works(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    poison_forward(engine)
    engine.add_request("bad", prompt_token_ids=[POISON, 9], sampling=GREEDY)
    events = drain(engine)
    assert [(type(e).__name__, e.request_id) for e in events] == [("RequestFailed", "bad")]
    out = engine.generate([[4, 5, 6]], None, GREEDY)  # and the engine serves on
    assert len(out[0].token_ids) == GREEDY.max_tokens


def test_generate_raises_the_failure_of_its_own_request(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    poison_forward(engine)
    with pytest.raises(EngineError) as caught:
        engine.generate([[3, 4], [POISON]], None, GREEDY)
    assert caught.value.code == "execution_failed"


def test_a_device_error_is_fatal_at_once(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    raised = poison_forward(engine, error=RuntimeError("CUDA error: an illegal memory access was encountered"))
    for i, p in enumerate(prompts(1, 3)):
        engine.add_request(f"r{i}", prompt_token_ids=p, sampling=GREEDY)
    engine.add_request("bad", prompt_token_ids=[POISON], sampling=GREEDY)
    with pytest.raises(EngineBroken) as caught:
        engine.step()
    assert "device failed" in caught.value.reason and len(raised) == 1  # no retry on a lost context


def test_a_step_that_fails_whatever_it_runs_breaks_the_engine(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    raised = poison_forward(engine, is_bad=lambda ids: True, error=ValueError("kernel gone"))
    for i, p in enumerate(prompts(2, 4)):
        engine.add_request(f"r{i}", prompt_token_ids=p, sampling=GREEDY)
    with pytest.raises(EngineBroken) as caught:
        engine.step()
    assert "probe" in caught.value.reason and "kernel gone" in caught.value.reason
    assert len(raised) > 4  # it did try the parts, then the probe


def test_a_step_that_fails_only_as_a_whole_ends_its_jobs_instead_of_looping(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs whose backward fails only when both are in one step (memory, say): every part runs
    alone, nothing is to blame, both restart their windows; after MAX_REWINDS rewinds without an
    optimizer step they fail with the reason, and the engine goes on serving."""
    from loquetier.engine import runner as runner_module
    from loquetier.engine.isolation import MAX_REWINDS

    engine = make_engine(model_dir)
    num_jobs: list[int] = []
    forward = engine.model.forward

    def spy(fb: Any, kv: Any = None) -> Any:
        num_jobs.append(len(set(fb.host_slots[: fb.num_train])))
        return forward(fb, kv)

    engine.model.forward = spy  # type: ignore[method-assign]
    weighted_loss = runner_module.weighted_loss
    monkeypatch.setattr(runner_module, "weighted_loss",
                        lambda *a: _FailingBackward.apply(weighted_loss(*a)) if num_jobs[-1] > 1 else weighted_loss(*a))
    seed = random.randrange(10**6)
    engine.add_training_job("x", train_data(seed), params(seed, max_steps=50), lora=LORA, job_id="jx")
    engine.add_training_job("y", train_data(seed + 1), params(seed + 1, max_steps=50), lora=LORA, job_id="jy")
    engine.add_request("r", prompt_token_ids=prompts(seed, 1)[0], sampling=GREEDY)
    events = drain(engine)
    done = {e.job_id: e for e in events if isinstance(e, JobFinished)}
    assert {done["jx"].status, done["jy"].status} == {"failed"}
    assert engine.isolation.num_isolated_steps == MAX_REWINDS
    assert [e.request_id for e in events if isinstance(e, RequestFinished)] == ["r"]
