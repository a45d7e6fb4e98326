"""An adapter id while a job trains it: requests never see the weights in training.

A job trains under a key of its own; a new adapter is unknown to requests until its job succeeds,
and an adapter that a job trains a new version of keeps serving the version before it. The trained
weights replace it when the job succeeds, or, while running sequences use it, once they have
finished (new ones wait for the new weights). Every comparison is against a second engine that
holds the expected weights and no job.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loquetier import Engine, EngineError, SamplingParams, TrainingParams
from loquetier.engine.events import EngineEvent, JobFinished, RequestFinished
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.job import TRAIN_KEY_PREFIX, train_key
from tests.engine.test_engine import LORA, make_engine, random_adapter, train_data

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [1, 17, 33, 5, 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-training-adapters") / "llama")


def params(seed: int, steps: int = 3) -> TrainingParams:
    # an lr large enough that the trained weights answer differently from the ones before
    return TrainingParams(optimizer="adamw", lr=5e-2, max_steps=steps, micro_batch_tokens=20, seed=seed)


def answer(engine: Engine, adapter_id: str | None, prompt: list[int] = PROMPT) -> list[int]:
    return engine.generate([prompt], [adapter_id], GREEDY)[0].token_ids


def run_job(engine: Engine, max_steps: int = 400) -> tuple[JobFinished, list[EngineEvent]]:
    events: list[EngineEvent] = []
    for _ in range(max_steps):
        events += engine.step()
        done = [e for e in events if isinstance(e, JobFinished)]
        if done:
            return done[0], events
    raise AssertionError("the job did not finish")


def reference(model_dir: Path, adapter_id: str, adapter: LoRAAdapter | bytes) -> Engine:
    engine = make_engine(model_dir)
    engine.load_adapter(adapter_id, adapter if isinstance(adapter, LoRAAdapter) else LoRAAdapter.from_bytes(adapter))
    return engine


def test_a_new_adapter_is_unknown_to_requests_until_its_job_succeeds(model_dir: Path) -> None:
    seed = random.randrange(10**6)
    engine = make_engine(model_dir)
    engine.add_training_job("fresh", train_data(seed % 50), params(seed), lora=LORA, job_id="jf")
    engine.step()
    assert not engine.has_adapter("fresh")
    with pytest.raises(EngineError, match="being trained by job 'jf'") as err:
        engine.add_request("r0", prompt_token_ids=PROMPT, adapter_id="fresh", sampling=GREEDY)
    assert err.value.code == "unknown_adapter"
    with pytest.raises(EngineError) as err:  # the job's own key is not a name requests can use
        engine.add_request("r1", prompt_token_ids=PROMPT, adapter_id=train_key("jf"), sampling=GREEDY)
    assert err.value.code == "invalid_request"
    assert not engine.has_adapter(train_key("jf"))

    finished, _ = run_job(engine)
    assert finished.status == "succeeded" and engine.has_adapter("fresh")
    assert not [k for k in engine.adapters.adapter_ids if k.startswith(TRAIN_KEY_PREFIX)]
    assert answer(engine, "fresh") == answer(reference(model_dir, "fresh", finished.adapter), "fresh")


def test_a_second_job_on_an_adapter_in_training_is_refused(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    engine.add_training_job("t", train_data(0), params(1), lora=LORA, job_id="j1")
    with pytest.raises(EngineError, match="already being trained by job 'j1'") as err:
        engine.add_training_job("t", train_data(1), params(2), lora=LORA, job_id="j2")
    assert err.value.code == "adapter_busy"
    engine.cancel_job("j1")
    assert not engine.has_adapter("t") and engine.adapters.adapter_ids == ["a", "b"]


def test_an_adapter_keeps_serving_its_version_while_a_job_trains_the_next(model_dir: Path) -> None:
    """"a" is served with its own weights at every step of a job that trains a new version of it from
    "b"'s weights; cancelled, the job leaves "a" as it was (its success is the next tests' case)."""
    seed = random.randrange(10**6)
    engine = make_engine(model_dir, default_ttft_ms=600_000.0, default_tpot_ms=600_000.0)
    before = answer(engine, "a")
    version = engine.adapter_version("a")
    engine.add_training_job("a", train_data(seed % 50), params(seed, steps=40), base_adapter="b", job_id="jn")
    trained_steps = 0
    for i in range(3):  # each one served while the job trains
        engine.add_request(f"mid{i}", prompt_token_ids=PROMPT, adapter_id="a", sampling=GREEDY)
        done: list[list[int]] = []
        while not done:
            before_step = engine.runner.num_backward_rows
            done = [e.token_ids for e in engine.step() if isinstance(e, RequestFinished)]
            trained_steps += engine.runner.num_backward_rows > before_step
        assert done == [before], f"request {i} did not get the version before"
    assert engine.jobs.training_job_of("a") == "jn" and trained_steps > 0, "the requests did not meet the training"
    engine.cancel_job("jn")
    engine.step()
    assert engine.adapter_version("a") == version and answer(engine, "a") == before


def test_trained_weights_wait_for_the_running_sequences_of_their_adapter(model_dir: Path) -> None:
    """A job ends while a request decodes on the version before: that request finishes on it, a
    request that comes after the job waits, then runs on the trained weights."""
    seed = random.randrange(10**6)
    engine = make_engine(model_dir, default_ttft_ms=600_000.0, default_tpot_ms=600_000.0)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want_old = engine.generate([PROMPT], ["a"], long)[0].token_ids
    engine.add_request("old", prompt_token_ids=PROMPT, adapter_id="a", sampling=long)
    engine.step()
    engine.add_training_job("a", train_data(seed % 50), params(seed, steps=1),
                            lora=dict(LORA, rank=4), job_id="jw")
    finished, events = run_job(engine)
    assert not [e for e in events if isinstance(e, RequestFinished)], "the request ended before the job"
    assert engine.jobs.install_pending("a")  # "old" still decodes on the version before
    engine.add_request("new", prompt_token_ids=PROMPT, adapter_id="a", sampling=GREEDY)
    results: dict[str, list[int]] = {}
    while engine.has_work():
        for e in engine.step():
            if isinstance(e, RequestFinished):
                results[e.request_id] = e.token_ids
                if e.request_id == "old":
                    assert "new" not in results
    assert results["old"] == want_old
    assert results["new"] == answer(reference(model_dir, "a", finished.adapter), "a")
    assert not engine.jobs.install_pending("a")


def test_a_load_of_an_adapter_in_use_is_refused_and_the_trained_weights_still_go_in(model_dir: Path) -> None:
    seed = random.randrange(10**6)
    engine = make_engine(model_dir, default_ttft_ms=600_000.0, default_tpot_ms=600_000.0)
    engine.add_request("old", prompt_token_ids=PROMPT, adapter_id="a",
                       sampling=SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.add_training_job("a", train_data(seed % 50), params(seed, steps=1), lora=LORA, job_id="jx")
    finished, _ = run_job(engine)
    assert engine.jobs.install_pending("a")
    with pytest.raises(EngineError, match="running sequence"):  # "old" still uses it
        engine.load_adapter("a", random_adapter(engine, 77, 4, ("q_proj",)))
    assert engine.jobs.install_pending("a")
    engine.run_until_idle()
    assert not engine.jobs.install_pending("a")
    assert answer(engine, "a") == answer(reference(model_dir, "a", finished.adapter), "a")
    operator = random_adapter(engine, 78, 4, ("q_proj", "v_proj"))
    engine.load_adapter("a", operator)  # idle now: an operator's load replaces the trained version
    assert answer(engine, "a") == answer(reference(model_dir, "a", operator), "a")


def test_a_caller_that_installs_results_itself_gets_them_in_the_event(model_dir: Path) -> None:
    """``install=False`` (a worker stores and accepts a result first): the job's end changes no
    adapter; ``replace_adapter`` with the event's bytes then does what the install would have."""
    seed = random.randrange(10**6)
    engine = make_engine(model_dir)
    before = answer(engine, "a")
    engine.add_training_job("a", train_data(seed % 50), params(seed, steps=2), lora=LORA, job_id="ji", install=False)
    finished, _ = run_job(engine)
    assert finished.status == "succeeded" and finished.adapter is not None
    assert answer(engine, "a") == before  # not installed
    with pytest.raises(EngineError) as err:
        engine.replace_adapter("a", b"not an adapter")
    assert err.value.code == "bad_adapter" and answer(engine, "a") == before
    assert engine.replace_adapter("a", finished.adapter)  # idle: at once
    assert answer(engine, "a") == answer(reference(model_dir, "a", finished.adapter), "a")


def test_an_adapter_in_training_exports_and_reloads_its_served_weights(model_dir: Path) -> None:
    """``export_adapter`` gives what requests get (the version before, not the job's weights in
    training); a load of new weights under the id while the job trains is what is served and exported."""
    seed = random.randrange(10**6)
    engine = make_engine(model_dir)
    served = engine.export_adapter("a")
    engine.add_training_job("a", train_data(seed % 50), params(seed, steps=40), base_adapter="b", job_id="je")
    for _ in range(4):
        engine.step()
    assert engine.jobs.training_job_of("a") == "je" and engine.export_adapter("a") == served
    operator = random_adapter(engine, 79, 4, ("q_proj", "v_proj"))
    engine.load_adapter("a", operator)
    assert engine.export_adapter("a") == operator.to_bytes()
    assert answer(engine, "a") == answer(reference(model_dir, "a", operator), "a")
    engine.cancel_job("je")
