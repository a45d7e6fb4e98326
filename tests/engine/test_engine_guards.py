"""The engine's own guards (it is also a library): values no wire check stands in front of are
refused with a clear EngineError or made harmless, and none of them crashes, hangs or allocates
before its limit is checked. The real engine on the tiny model, CPU."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loquetier import Engine, EngineError, SamplingParams, TrainingParams
from loquetier.engine.events import EngineEvent, JobFinished, RequestFinished
from loquetier.kernels import force_backend
from loquetier.lora import checkpoint as ckpt_module
from loquetier.lora import job as job_module
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.config import AdapterError, LoRAConfig
from loquetier.lora.data import DataError, PreparedData, read_examples
from tests.tiny import make_tiny_model

LORA = dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module", autouse=True)
def _reference_backend():
    force_backend("reference")
    yield
    force_backend(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def make_engine(model_dir: Path, **limits: Any) -> Engine:
    base = dict(num_kv_blocks=96, block_size=8, max_num_batched_tokens=256, max_prefill_chunk=64,
                max_adapter_slots=4, num_train_slots=2, max_lora_rank=16)
    return Engine.from_pretrained(model_dir, **(base | limits))


def prompt(rng: random.Random, n: int = 12) -> list[int]:
    return [rng.randrange(3, 300) for _ in range(n)]


def drain(engine: Engine, max_steps: int = 300) -> list[EngineEvent]:
    events: list[EngineEvent] = []
    for _ in range(max_steps):
        if not engine.has_work():
            return events
        events += engine.step()
    raise AssertionError("the engine did not finish its work")


# ---- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("slo", [dict(tpot_ms=float("inf")), dict(ttft_ms=float("nan")), dict(tpot_ms=-1.0)])
def test_non_finite_latency_targets_are_refused(model_dir: Path, slo: dict[str, float]) -> None:
    engine = make_engine(model_dir)
    with pytest.raises(EngineError) as caught:
        engine.add_request("r", prompt_token_ids=[4, 5], **slo)
    assert caught.value.code == "invalid_request" and "finite" in caught.value.message
    assert not engine.has_work()


@pytest.mark.parametrize("arrived_at", [float("nan"), float("inf"), "yesterday", True])
def test_an_arrival_time_that_is_not_a_time_is_refused(model_dir: Path, arrived_at: Any) -> None:
    engine = make_engine(model_dir)
    with pytest.raises(EngineError) as caught:
        engine.add_request("r", prompt_token_ids=[4, 5], arrived_at=arrived_at)
    assert caught.value.code == "invalid_request" and "arrived_at" in caught.value.message
    assert not engine.has_work()


def test_the_wait_before_add_request_counts_toward_ttft_within_bounds(model_dir: Path) -> None:
    """A request that waited 2 s before the engine saw it reports its TTFT from then; one from the
    future counts from now; one from long ago is capped at an hour, not years."""
    rng = random.Random()
    engine = make_engine(model_dir)
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    now = time.time()
    engine.add_request("waited", prompt_token_ids=prompt(rng), sampling=greedy, arrived_at=now - 2.0)
    engine.add_request("future", prompt_token_ids=prompt(rng), sampling=greedy, arrived_at=now + 30.0)
    engine.add_request("ancient", prompt_token_ids=prompt(rng), sampling=greedy, arrived_at=now - 1e9)
    engine.add_request("plain", prompt_token_ids=prompt(rng), sampling=greedy)
    ttft = {e.request_id: e.timings.ttft_ms for e in drain(engine) if isinstance(e, RequestFinished)}
    took = time.time() - now
    assert 2000.0 <= ttft["waited"] <= 2000.0 + took * 1000.0
    assert ttft["future"] <= took * 1000.0 and ttft["plain"] <= took * 1000.0
    assert 3600e3 <= ttft["ancient"] <= 3600e3 + took * 1000.0


def test_an_earlier_arrival_is_served_first_though_added_later(model_dir: Path) -> None:
    rng = random.Random()
    engine = make_engine(model_dir, max_num_seqs=1, default_ttft_ms=600_000.0)  # neither is late
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request("added-first", prompt_token_ids=prompt(rng), sampling=greedy)
    engine.add_request("arrived-first", prompt_token_ids=prompt(rng), sampling=greedy, arrived_at=time.time() - 5.0)
    order = [e.request_id for e in drain(engine) if isinstance(e, RequestFinished)]
    assert order == ["arrived-first", "added-first"]


def test_an_infinite_budget_never_reaches_the_schedulers_floor(model_dir: Path) -> None:
    """A decoding sequence whose TPOT target became infinite (past every check) beside a new
    arrival: the scheduler plans with a bounded token count instead of raising OverflowError."""
    rng = random.Random()
    engine = make_engine(model_dir)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine.add_request("slow", prompt_token_ids=prompt(rng), sampling=greedy)
    engine.step()
    engine.scheduler.get("slow").tpot_ms = float("inf")  # type: ignore[union-attr]
    engine.scheduler.get("slow").ttft_ms = float("inf")  # type: ignore[union-attr]
    engine.step()
    engine.add_request("next", prompt_token_ids=prompt(rng), sampling=greedy)
    done = {e.request_id for e in drain(engine) if isinstance(e, RequestFinished)}
    assert done == {"slow", "next"}


def test_a_huge_top_k_keeps_the_whole_vocabulary(model_dir: Path) -> None:
    rng = random.Random()
    p, seed = prompt(rng), rng.randrange(2**31)
    engine = make_engine(model_dir)
    plain, huge = (engine.generate([p], None, SamplingParams(max_tokens=8, seed=seed, top_k=k))[0].token_ids
                   for k in (0, 2**64 - 1))
    assert huge == plain
    engine.add_request("r", prompt_token_ids=p, sampling=SamplingParams(top_k=2**70))
    assert engine.scheduler.get("r").sampling.top_k == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("kwargs", [dict(temperature=float("inf")), dict(temperature=float("nan")),
                                    dict(top_p=float("nan")), dict(stop=[""])])
def test_sampling_values_that_cannot_sample_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# ---- jobs -------------------------------------------------------------------------------------


def test_a_trillion_epochs_start_at_once_and_every_step_stays_short(model_dir: Path) -> None:
    rng = random.Random()
    engine = make_engine(model_dir)
    data = [{"prompt_token_ids": prompt(rng, 3), "completion_token_ids": prompt(rng, 3)} for _ in range(50)]
    started = time.perf_counter()
    engine.add_training_job("t", data, TrainingParams(epochs=10**12, micro_batch_tokens=24, lr_schedule="cosine"),
                            lora=LORA, job_id="j")
    assert time.perf_counter() - started < 10.0  # it once counted steps for good
    total = engine.jobs.stats()["j"]["total_steps"]
    assert total > 10**12  # extrapolated from the epochs it packed
    engine.add_request("r", prompt_token_ids=prompt(rng), sampling=SamplingParams(max_tokens=4, temperature=0.0))
    events: list[EngineEvent] = []
    for _ in range(12):
        events += engine.step()
    assert any(isinstance(e, RequestFinished) for e in events)
    assert engine.jobs.stats()["j"]["step"] > 0
    assert engine.cancel_job("j")
    assert any(isinstance(e, JobFinished) and e.status == "cancelled" for e in engine.step())


def test_the_step_count_of_a_run_does_not_change_when_it_resumes(model_dir: Path) -> None:
    rng = random.Random()
    data = [{"prompt_token_ids": prompt(rng, 2), "completion_token_ids": prompt(rng, 2)} for _ in range(300)]
    params = TrainingParams(epochs=5000, micro_batch_tokens=24, checkpoint_every=1, lr_schedule="linear")
    first = make_engine(model_dir)
    first.add_training_job("t", data, params, lora=LORA, job_id="j")
    total = first.jobs.stats()["j"]["total_steps"]
    checkpoint = next(e for _ in range(20) for e in first.step() if e.__class__.__name__ == "JobCheckpoint")
    second = make_engine(model_dir)
    second.add_training_job("t", data, params, lora=LORA, job_id="j", checkpoint=checkpoint.data)  # type: ignore[attr-defined]
    assert second.jobs.stats()["j"]["total_steps"] == total


def test_a_rank_above_the_limit_is_refused_before_anything_is_allocated(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(model_dir)
    allocated: list[int] = []
    new = LoRAAdapter.new

    def spy(config: LoRAConfig, *args: Any, **kwargs: Any) -> LoRAAdapter:
        allocated.append(config.rank)
        return new(config, *args, **kwargs)

    monkeypatch.setattr(LoRAAdapter, "new", spy)
    data = [{"prompt_token_ids": [3, 4], "completion_token_ids": [5, 6]}]
    for rank in (17, 100_000, 10**9):
        with pytest.raises(EngineError) as caught:
            engine.add_training_job("t", data, TrainingParams(max_steps=1), lora=LORA | {"rank": rank})
        assert caught.value.code == "bad_adapter" and "max_lora_rank 16" in caught.value.message
    assert allocated == []
    engine.add_training_job("t", data, TrainingParams(max_steps=1), lora=LORA | {"rank": 16}, job_id="ok")
    assert allocated == [16]


# ---- adapters ---------------------------------------------------------------------------------


def _peft_dir(tmp: Path, engine: Engine, name: str, alpha: float = 8.0, poison: float | None = None,
              rank: int = 4) -> Path:
    adapter = LoRAAdapter.new(LoRAConfig(rank=rank, alpha=1.0, target_modules=("q_proj",)), engine.model.dims,
                              seed=random.randrange(1000))
    adapter.save(tmp / name)  # a valid adapter, then its files tampered with
    if poison is not None:
        weights = tmp / name / "adapter_model.safetensors"
        tensors = load_file(weights)
        key = next(k for k in sorted(tensors) if "layers.1." in k and "lora_B" in k)
        tensors[key][3, 1] = poison
        save_file(tensors, weights)
    config = json.loads((tmp / name / "adapter_config.json").read_text())
    (tmp / name / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": alpha}))
    return tmp / name


@pytest.mark.parametrize(("name", "kwargs", "reason"), [
    ("nan-weight", dict(poison=float("nan")), "non-finite"),
    ("inf-weight", dict(poison=float("-inf")), "non-finite"),
    ("huge-weight", dict(poison=3e5), "above"),
    ("alpha-1e30", dict(alpha=1e30), "scale"),
    ("alpha-inf", dict(alpha=float("inf")), "finite"),
])
def test_poisoned_adapters_are_refused_at_load(model_dir: Path, tmp_path: Path, name: str,
                                               kwargs: dict[str, Any], reason: str) -> None:
    engine = make_engine(model_dir)
    path = _peft_dir(tmp_path, engine, name, **kwargs)
    with pytest.raises(EngineError) as caught:
        engine.load_adapter(name, path)
    assert caught.value.code == "bad_adapter" and reason in caught.value.message, caught.value
    assert not engine.has_adapter(name)
    ok = _peft_dir(tmp_path, engine, "fine", alpha=16.0)
    assert engine.load_adapter("fine", ok) >= 1


def test_an_adapter_blob_above_the_rank_limit_is_refused_before_its_tensors_are_read(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(model_dir, max_lora_rank=4)
    blob = LoRAAdapter.new(LoRAConfig(rank=8, alpha=8, target_modules=("v_proj",)), engine.model.dims).to_bytes()
    from loquetier.lora import tensor_io

    monkeypatch.setattr(tensor_io, "unpack", lambda data: pytest.fail("tensors read before the rank check"))
    with pytest.raises(EngineError, match="max_lora_rank 4"):
        engine.load_adapter_bytes("big", blob)


def test_non_finite_weights_in_memory_are_refused() -> None:
    dims_config = LoRAConfig(rank=2, alpha=4, target_modules=("q_proj",))
    adapter = LoRAAdapter(dims_config, {(0, "q_proj"): (torch.randn(2, 8), torch.full((8, 2), float("nan")))})
    with pytest.raises(AdapterError, match="non-finite"):
        adapter.validate()


# ---- a job's set-up off the step path -----------------------------------------------------------


def test_data_prepared_on_another_thread_while_the_engine_steps(model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 text examples are tokenized on a second thread while the engine keeps stepping; the
    job then starts from the prepared data without tokenizing again, and its checkpoints reuse the
    fingerprint instead of hashing every sequence each time."""
    rng = random.Random()
    engine = make_engine(model_dir)
    words = ["fox", "dog", "pirate", "sea", "model", "tune"]
    data = [{"prompt": " ".join(rng.choices(words, k=3)), "completion": rng.choice(words)} for _ in range(20_000)]
    prepared: list[PreparedData] = []
    worker = threading.Thread(target=lambda: prepared.append(engine.prepare_data(data, 64)))
    engine.add_request("r", prompt_token_ids=prompt(rng), sampling=SamplingParams(max_tokens=200, temperature=0.0,
                                                                                  ignore_eos=True))
    worker.start()
    steps_during = 0
    while worker.is_alive() and engine.has_work():
        engine.step()
        steps_during += 1
    worker.join()
    assert steps_during >= 3, "the engine did not step while the data was prepared"
    [ready] = prepared
    assert len(ready.sequences) == 20_000 and ready.max_tokens == 64

    hashed: list[int] = []
    fingerprint = job_module.data_fingerprint
    counted = lambda s: hashed.append(len(s)) or fingerprint(s)  # noqa: E731
    monkeypatch.setattr(ckpt_module, "_fingerprint", counted)
    monkeypatch.setattr(job_module, "data_fingerprint", counted)
    monkeypatch.setattr("loquetier.engine.jobs.tokenize_examples", lambda *a, **k: pytest.fail("tokenized again"))
    started = time.perf_counter()
    engine.add_training_job("t", ready, TrainingParams(max_steps=3, micro_batch_tokens=64, checkpoint_every=1),
                            lora=LORA, job_id="j")
    assert time.perf_counter() - started < 5.0
    events = drain(engine)
    assert sum(e.__class__.__name__ == "JobCheckpoint" for e in events) == 3
    assert hashed == []


def test_prepared_data_is_checked_against_the_jobs_micro_batch(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    ready = engine.prepare_data([{"prompt_token_ids": [3] * 30, "completion_token_ids": [4] * 10}], 64)
    with pytest.raises(EngineError, match="invalid_data"):
        engine.add_training_job("t", ready, TrainingParams(max_steps=1, micro_batch_tokens=32), lora=LORA)
    with pytest.raises(EngineError, match="invalid_data"):
        engine.prepare_data("/no/such/file.jsonl")


def test_data_files_are_bounded_before_they_are_read(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"prompt_token_ids": [random.randrange(3, 99)], "completion_token_ids": [5]} for _ in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert len(read_examples(path)) == 10
    with pytest.raises(DataError, match="bytes, the limit is 100"):
        read_examples(path, max_file_bytes=100)
    with pytest.raises(DataError, match="more than 9 examples"):
        read_examples(path, max_examples=9)
    with pytest.raises(DataError, match="11 examples, the limit is 10"):
        read_examples(rows + rows[:1], max_examples=10)


def test_an_adapter_request_without_any_inference_slot_is_refused_not_left_waiting(model_dir: Path) -> None:
    from tests.engine.test_engine import random_adapter

    engine = Engine.from_pretrained(model_dir, num_kv_blocks=64, block_size=8, max_adapter_slots=2,
                                    num_train_slots=2, max_lora_rank=8)
    engine.load_adapter("a", random_adapter(engine, 3, 4, ("q_proj", "v_proj")))
    with pytest.raises(EngineError) as refused:
        engine.add_request("r-a", prompt_token_ids=[5, 6, 7], adapter_id="a", sampling=SamplingParams(max_tokens=2))
    assert refused.value.code == "no_slot" and "max_adapter_slots" in str(refused.value)
    out = engine.generate([[5, 6, 7]], sampling=SamplingParams(max_tokens=2, temperature=0.0))  # base rows still run
    assert len(out[0].token_ids) == 2


def test_an_adapter_whose_directory_went_away_fails_its_requests_alone(model_dir: Path, tmp_path: Path) -> None:
    """An adapter dropped from memory is read again from its directory when a request needs a slot
    for it; with the directory deleted meanwhile, that request fails ``adapter_unavailable`` and the
    adapter is unloaded (so it can be loaded again), while the step goes on for everyone else."""
    import shutil

    from loquetier.engine.events import RequestFailed

    probe = make_engine(model_dir)
    size = LoRAAdapter.load(_peft_dir(tmp_path / "probe", probe, "p"), probe.model.dims, 16).num_bytes
    # one inference slot, memory for two adapters' weights
    engine = make_engine(model_dir, max_adapter_slots=3, num_train_slots=2, adapter_cache_bytes=int(2.5 * size))
    dirs = {name: _peft_dir(tmp_path, engine, name) for name in ("a0", "a1", "a2")}
    for name, path in dirs.items():
        engine.load_adapter(name, path)  # a2 drops a0's weights from memory (a0 keeps the slot for now)
    shutil.rmtree(dirs["a0"])
    rng = random.Random()
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    engine.add_request("r1", prompt_token_ids=prompt(rng), adapter_id="a1", sampling=sampling)  # takes a0's slot
    done = {getattr(ev, "request_id", None): ev for ev in drain(engine)}
    assert isinstance(done["r1"], RequestFinished)
    engine.add_request("r0", prompt_token_ids=prompt(rng), adapter_id="a0", sampling=sampling)
    engine.add_request("base", prompt_token_ids=prompt(rng), sampling=sampling)
    done = {getattr(ev, "request_id", None): ev for ev in drain(engine)}
    assert isinstance(done["r0"], RequestFailed) and done["r0"].code == "adapter_unavailable", done["r0"]
    assert "does not exist" in done["r0"].message
    assert isinstance(done["base"], RequestFinished) and len(done["base"].token_ids) == 4
    assert not engine.has_adapter("a0")
    engine.load_adapter("a0", _peft_dir(tmp_path / "again", engine, "a0"))
    engine.add_request("r0-again", prompt_token_ids=prompt(rng), adapter_id="a0", sampling=sampling)
    done = {getattr(ev, "request_id", None): ev for ev in drain(engine)}
    assert isinstance(done["r0-again"], RequestFinished)


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(model_dir: Path) -> None:
    """Tokenizing runs on the engine thread: a prompt longer in characters than the context can hold
    in tokens (no token covers more characters than the vocabulary's widest piece) is refused
    ``prompt_too_long`` without tokenizing it; token ids past the context without checking each."""
    engine = make_engine(model_dir)
    assert engine.tokenizer is not None
    widest = max(len(piece) for piece in engine.tokenizer.get_vocab())
    calls: list[int] = []
    real = engine.requests.tokenizer

    class Counting:  # the tokenizer, its calls on a text counted
        def __call__(self, text: str, **kwargs: Any) -> Any:
            calls.append(len(text))
            return real(text, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    engine.requests.tokenizer = Counting()
    engine.requests._widest = widest
    too_long = "ab " * (engine.max_model_len * widest // 3 + 1)
    with pytest.raises(EngineError) as caught:
        engine.add_request("long", prompt=too_long)
    assert caught.value.code == "prompt_too_long" and "characters" in caught.value.message and calls == []
    with pytest.raises(EngineError) as caught:
        engine.add_request("ids", prompt_token_ids=[5] * engine.max_model_len + [10**9])
    assert caught.value.code == "prompt_too_long"  # not the out-of-vocabulary id at its end
    fits = "ab " * 20
    engine.add_request("short", prompt=fits, sampling=SamplingParams(max_tokens=2))
    assert calls == [len(fits)]
    done = [ev for ev in drain(engine) if isinstance(ev, RequestFinished)]
    assert [ev.request_id for ev in done] == ["short"]
