"""Scheduler tests against a synthetic cost model (no torch, no model): fast and deterministic."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

import pytest

from benchmarks.harness.synthetic import FakeJob, FakeKV, sampled_tokens, step_time
from loquetier.engine.scheduling import GraphPaths, Scheduler, SchedulerConfig
from loquetier.engine.scheduling.budget import FairShare, JobDemand, decode_budget
from loquetier.engine.scheduling.pricing import StepCost, StepFeatures, StepTimeModel, is_eager
from loquetier.engine.scheduling.slo import RequestMetrics
from loquetier.engine.scheduling.train_scale import TrainScale
from loquetier.engine.sequence import (
    RequestState,
    SamplingParams,
    ScheduledBatch,
    SequenceStatus,
    StepResult,
    TrainWork,
)

# The "hardware": what a step really costs. The scheduler starts from a prior that is off by ~2x.
TRUE_COST = StepCost(
    const_s=5e-3,
    prefill_token_s=5e-5,
    decode_row_s=2e-4,
    train_token_s=1.5e-4,
    eval_token_s=5e-5,
    kv_token_s=2e-7,
)
PRIOR = StepCost(
    const_s=2e-3,
    prefill_token_s=1e-4,
    decode_row_s=1e-4,
    train_token_s=3e-4,
    eval_token_s=1e-4,
    kv_token_s=1e-6,
)
TOKEN = 7


class FakeSlots:
    """``capacity`` GPU slots with reference-counted pins; unpinned adapters are evicted on demand."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.refs: dict[str, int] = {}

    def ensure_loaded(self, adapter_id: str) -> bool:
        if adapter_id not in self.refs:
            idle = [a for a, n in self.refs.items() if n == 0]
            if len(self.refs) >= self.capacity:
                if not idle:
                    return False
                del self.refs[idle[0]]
            self.refs[adapter_id] = 0
        self.refs[adapter_id] += 1
        return True

    def release(self, adapter_id: str) -> None:
        self.refs[adapter_id] -= 1
        assert self.refs[adapter_id] >= 0


@dataclass
class Sim:
    """Drives a scheduler on a virtual clock with the synthetic cost model."""

    sched: Scheduler
    now: float = 0.0
    batches: list[ScheduledBatch] = field(default_factory=list)
    finished: list[RequestState] = field(default_factory=list)
    metrics: list[RequestMetrics] = field(default_factory=list)
    noise: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    cost: StepCost = TRUE_COST
    eager_tail: float = 0.0  # synthetic.step_time: skewed jitter on eager steps
    times: list[float] = field(default_factory=list)

    def step(self) -> ScheduledBatch:
        batch = self.sched.schedule(self.now)
        t = (step_time(batch, self.sched.graphs, self.cost, self.rng, self.noise, self.eager_tail)
             if not batch.is_empty else 1e-3)
        self.now += t
        self.times.append(t)
        sampled = sampled_tokens(batch, TOKEN)
        events = self.sched.postprocess(
            batch, StepResult(now=self.now, step_time_s=t, sampled_token_ids=sampled)
        )
        self.finished.extend(events.finished)
        self.metrics.extend(events.request_metrics)
        self.batches.append(batch)
        return batch

    def run(self, num_steps: int) -> None:
        for _ in range(num_steps):
            self.step()

    def add(self, seq_id: str, prompt_len: int = 64, **kw: object) -> RequestState:
        sampling = kw.pop("sampling", SamplingParams(max_tokens=16))
        seq = RequestState(seq_id, [1] * prompt_len, sampling=sampling, arrival_time=self.now, **kw)  # type: ignore[arg-type]
        self.sched.add_request(seq)
        return seq


# The scheduler these tests were written against: one TPOT target per step, no borrowing, no coalescing
# (the engine's defaults bank and borrow: the tests that need it say so).
SIM_DEFAULTS: dict[str, object] = {"max_num_batched_tokens": 2048, "max_prefill_chunk": 512, "default_tpot_ms": 50.0,
                                   "tpot_burst": 1.0, "tpot_lookahead": 0, "prefill_coalesce_ms": 0.0}


def make_sim(
    kv: FakeKV | None = None, slots: FakeSlots | None = None, noise: float = 0.0,
    cost: StepCost = TRUE_COST, prior: StepCost = PRIOR, **cfg: object
) -> Sim:
    graphs = GraphPaths(decode=bool(cfg.pop("decode_graphs", False)), max_rows=int(cfg.pop("graph_max_rows", 0)),  # type: ignore[call-overload]
                        max_mean_context=int(cfg.pop("graph_max_mean_context", 0)))  # type: ignore[call-overload]
    config = SchedulerConfig(**{**SIM_DEFAULTS, **cfg})  # type: ignore[arg-type]
    return Sim(Scheduler(config, kv or FakeKV(), slots, graphs=graphs, prior_cost=prior), noise=noise, cost=cost)


# ---- dataclasses and config ---------------------------------------------------------------------


def test_sampling_params_validation() -> None:
    sp = SamplingParams(max_tokens=4, temperature=0.0, stop=["\n"], stop_token_ids=[2])  # type: ignore[arg-type]
    assert sp.stop == ("\n",) and sp.stop_token_ids == (2,) and sp.is_greedy
    hash(sp)
    for bad in (
        {"max_tokens": 0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_k": -1},
        {"stop": [""]},
        {"stop_token_ids": [-1]},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]


def test_config_and_sequence_validation() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError):
        SchedulerConfig(max_prefill_chunk=0)
    with pytest.raises(ValueError):
        SchedulerConfig(train_decrease=1.5)
    with pytest.raises(ValueError):
        RequestState("s", [])
    with pytest.raises(ValueError):
        RequestState("s", [1], priority=-1)
    assert isinstance(FakeJob("j"), TrainWork)


def test_step_model_learns_true_costs() -> None:
    rng = random.Random(1)
    model = StepTimeModel(PRIOR, window=64)
    for _ in range(200):
        f = StepFeatures(
            rng.randint(0, 512), rng.randint(0, 64), rng.randint(0, 2048), 0, rng.randint(0, 20_000)
        )
        model.observe(f, TRUE_COST.predict(f))
    c = model.cost
    assert c.train_token_s == pytest.approx(TRUE_COST.train_token_s, rel=0.02)
    assert c.prefill_token_s == pytest.approx(TRUE_COST.prefill_token_s, rel=0.05)
    assert c.eval_token_s == PRIOR.eval_token_s  # never observed: stays at the prior
    probe = StepFeatures(100, 8, 500, 0, 4000)
    assert model.predict(probe) == pytest.approx(TRUE_COST.predict(probe), rel=0.05)


# ---- the step -----------------------------------------------------------------------------------


def test_training_fills_idle_capacity() -> None:
    sim = make_sim()
    sim.sched.add_job(FakeJob("a"))
    sim.sched.add_job(FakeJob("b", is_eval=True))
    sim.run(20)
    for b in sim.batches:
        assert b.num_train_tokens + b.num_eval_tokens >= 0.9 * 2048
    assert sim.sched.metrics.train_tokens_by_job["a"] > 0
    assert sim.sched.metrics.eval_tokens_by_job["b"] > 0


def test_decode_never_starves() -> None:
    sim = make_sim(max_num_seqs=32)
    sim.sched.add_job(FakeJob("train", min_share=0.05))
    seqs = [sim.add(f"r{i}", prompt_len=300, sampling=SamplingParams(max_tokens=40)) for i in range(48)]
    for _ in range(200):
        decoding = [s for s in sim.sched.running if not s.is_prefilling]
        batch = sim.step()
        # Every sequence that was decoding got a row, however much prefill and training is waiting.
        assert all(s in batch.decode_seqs for s in decoding)
        if not sim.sched.has_unfinished_requests:
            break
    assert all(s.is_finished and s.num_output_tokens == 40 for s in seqs)
    # Once decoding, a sequence gets a token every step: no gaps between its decode rows.
    for s in seqs:
        rows = [i for i, b in enumerate(sim.batches) if s in b.decode_seqs]
        assert rows == list(range(rows[0], rows[0] + len(rows)))


def test_burst_drops_training_and_attainment_recovers() -> None:
    sim = make_sim(noise=0.05, max_num_seqs=64)
    sim.sched.add_job(FakeJob("train"))
    sim.run(30)
    assert sim.batches[-1].num_train_tokens == 2048
    burst_step = len(sim.batches)
    seqs = [
        sim.add(f"b{i}", prompt_len=128, ttft_ms=2000.0, sampling=SamplingParams(max_tokens=64))
        for i in range(32)
    ]
    sim.run(400)
    after = sim.batches[burst_step : burst_step + 3]
    assert min(b.num_train_tokens for b in after) < 0.5 * 2048
    assert all(s.is_finished for s in seqs)
    # Attainment recovers: the end of the burst meets TPOT, and almost every request met its SLO.
    assert sim.sched.slo.window_attainment >= 0.95
    assert sim.sched.slo.request_attainment >= 0.9
    # When inference is gone, training takes the whole step again.
    assert sim.batches[-1].num_train_tokens == 2048


def test_decode_step_time_tracks_tpot_with_training() -> None:
    sim = make_sim(max_num_seqs=16)
    sim.sched.add_job(FakeJob("train"))
    for i in range(16):
        sim.add(f"r{i}", prompt_len=32, tpot_ms=40.0, sampling=SamplingParams(max_tokens=200))
    sim.run(150)
    steady = [b for b in sim.batches[50:] if b.decode_seqs and not b.prefill_chunks]
    assert steady
    train = [b.num_train_tokens for b in steady]
    assert min(train) > 0  # training uses the slack left by decodes...
    times = [
        TRUE_COST.predict(StepFeatures(0, b.num_decode_rows, b.num_train_tokens, 0, b.num_kv_tokens_read))
        for b in steady
    ]
    assert max(times) <= 0.040  # ...without pushing the step past the TPOT target


def test_priorities_order_prefill() -> None:
    # Only one prefill fits a step: the high-priority request goes first even though it came later.
    sim = make_sim(max_num_batched_tokens=512, max_prefill_chunk=512, max_num_seqs=4)
    low = sim.add("low", prompt_len=500, priority=0)
    high = sim.add("high", prompt_len=500, priority=3)
    first = sim.step()
    assert first.prefill_chunks[0].seq is high and first.prefill_chunks[0].length == 500
    assert high.num_output_tokens == 1 and low.num_output_tokens == 0


def test_earliest_deadline_prefilled_first() -> None:
    sim = make_sim(max_num_batched_tokens=512, max_prefill_chunk=512, max_num_seqs=4)
    relaxed = sim.add("relaxed", prompt_len=500, ttft_ms=5000.0)
    urgent = sim.add("urgent", prompt_len=500, ttft_ms=200.0)
    first = sim.step().prefill_chunks
    assert first[0].seq is urgent and first[0].length == 500
    assert urgent.num_output_tokens == 1 and relaxed.num_output_tokens == 0


def test_job_priorities_weight_token_shares() -> None:
    sim = make_sim()
    sim.sched.add_job(FakeJob("low", priority=0))
    sim.sched.add_job(FakeJob("high", priority=1))
    sim.run(50)
    by_job = sim.sched.metrics.train_tokens_by_job
    assert by_job["high"] / by_job["low"] == pytest.approx(2.0, rel=0.02)


def test_equal_priority_jobs_get_equal_shares() -> None:
    sim = make_sim(noise=0.05)
    for name in ("a", "b", "c"):
        sim.sched.add_job(FakeJob(name, priority=2))
    rng = random.Random(3)
    for step in range(300):
        if rng.random() < 0.1:
            sim.add(
                f"r{step}",
                prompt_len=rng.randint(16, 400),
                sampling=SamplingParams(max_tokens=rng.randint(1, 30)),
            )
        sim.step()
    by_job = sim.sched.metrics.train_tokens_by_job
    mean = sum(by_job.values()) / 3
    assert all(v == pytest.approx(mean, rel=0.01) for v in by_job.values()), by_job


def test_late_joining_job_does_not_get_banked_credit() -> None:
    sim = make_sim()
    sim.sched.add_job(FakeJob("early"))
    sim.run(20)
    sim.sched.add_job(FakeJob("late"))
    before = dict(sim.sched.metrics.train_tokens_by_job)
    sim.run(20)
    gained = {k: v - before.get(k, 0) for k, v in sim.sched.metrics.train_tokens_by_job.items()}
    assert gained["early"] == pytest.approx(gained["late"], rel=0.01)


def test_min_share_honoured_under_inference_pressure() -> None:
    sim = make_sim(max_num_seqs=64)
    sim.sched.add_job(FakeJob("floor", min_share=0.1))
    sim.sched.add_job(FakeJob("best_effort"))
    for i in range(64):
        sim.add(f"r{i}", prompt_len=200, tpot_ms=10.0, sampling=SamplingParams(max_tokens=50))
    sim.run(60)
    floor = math.ceil(0.1 * 2048)
    for b in sim.batches:
        grant = {c.job_id: c.num_tokens for c in b.train_chunks}
        assert grant.get("floor", 0) >= floor
    by_job = sim.sched.metrics.train_tokens_by_job
    assert by_job["floor"] > by_job.get("best_effort", 0)


def test_fair_share_unit() -> None:
    fs = FairShare()
    demands = [JobDemand("a", 1.0, 0, 10_000, 1e-4), JobDemand("b", 3.0, 0, 10_000, 1e-4)]
    assert fs.allocate(demands, 400, None) == {"a": 100, "b": 300}
    # A capped job leaves its share to the other; floors are granted even past the time budget.
    capped = [JobDemand("a", 1.0, 0, 50, 1e-4), JobDemand("b", 1.0, 0, 10_000, 1e-4)]
    assert FairShare().allocate(capped, 400, None) == {"a": 50, "b": 350}
    floors = [JobDemand("a", 1.0, 64, 10_000, 1e-4), JobDemand("b", 1.0, 0, 10_000, 1e-4)]
    assert FairShare().allocate(floors, 400, 0.0) == {"a": 64}
    scale = TrainScale(0.5, 0.1, 0.05)
    assert scale.update(violated=True, attainment=1.0, target=0.9) == 0.5
    assert scale.update(violated=False, attainment=0.5, target=0.9) == 0.5
    assert scale.update(violated=False, attainment=0.95, target=0.9) == pytest.approx(0.6)


# ---- memory, slots, abort, misses ---------------------------------------------------------------


def test_preemption_by_recompute_and_resume() -> None:
    kv = FakeKV(num_blocks=12, block_size=16)  # 192 tokens for everyone
    sim = make_sim(kv=kv, max_num_seqs=4)
    vip = sim.add("vip", prompt_len=60, priority=1, sampling=SamplingParams(max_tokens=60))
    low = sim.add("low", prompt_len=60, priority=0, sampling=SamplingParams(max_tokens=60))
    preempted_at = None
    for i in range(400):
        batch = sim.step()
        assert kv.num_free_blocks >= 0
        if low in batch.preempted and preempted_at is None:
            preempted_at = i
            assert low.status is SequenceStatus.PREEMPTED and low.num_computed_tokens == 0
            assert "low" not in kv.tokens
            assert vip not in batch.preempted
        if not sim.sched.has_unfinished_requests:
            break
    assert preempted_at is not None
    assert low.num_preemptions >= 1 and vip.num_preemptions == 0
    # The preempted sequence was recomputed (prompt + its outputs so far) and finished in full.
    recompute = [c for b in sim.batches[preempted_at + 1 :] for c in b.prefill_chunks if c.seq is low]
    assert recompute and recompute[0].start == 0 and sum(c.length for c in recompute) > 60
    assert low.is_finished and low.num_output_tokens == 60 and low.finish_reason == "length"
    assert vip.is_finished and vip.num_output_tokens == 60
    assert kv.tokens == {} and sim.sched.metrics.num_preemptions >= 1


def test_abort_frees_kv_and_adapter() -> None:
    kv = FakeKV(num_blocks=100)
    slots = FakeSlots(capacity=2)
    sim = make_sim(kv=kv, slots=slots)
    running = sim.add("running", prompt_len=100, adapter_id="x", sampling=SamplingParams(max_tokens=100))
    sim.run(3)
    assert running.status is SequenceStatus.RUNNING and kv.num_free_blocks < 100 and slots.refs["x"] == 1
    waiting = sim.add("waiting", prompt_len=10)
    m = sim.sched.abort("running", sim.now)
    assert m is not None and m.finish_reason == "abort"
    assert kv.num_free_blocks == 100 and slots.refs["x"] == 0
    assert sim.sched.abort("waiting", sim.now) is not None and waiting.is_finished
    assert sim.sched.abort("waiting", sim.now) is None and sim.sched.abort("nope", sim.now) is None
    assert not sim.sched.has_unfinished_requests
    assert sim.sched.metrics.num_requests_aborted == 2 and sim.sched.slo.num_requests == 0
    sim.run(2)  # nothing left to run, nothing breaks


def test_abort_between_schedule_and_postprocess() -> None:
    sim = make_sim()
    seq = sim.add("s", prompt_len=10, sampling=SamplingParams(max_tokens=5))
    batch = sim.sched.schedule(sim.now)
    sim.sched.abort("s", sim.now)
    events = sim.sched.postprocess(
        batch, StepResult(now=1.0, step_time_s=0.01, sampled_token_ids={"s": TOKEN})
    )
    assert events.new_tokens == [] and seq.num_output_tokens == 0


def test_adapter_slots_gate_admission() -> None:
    slots = FakeSlots(capacity=1)
    sim = make_sim(slots=slots)
    a = sim.add("a", adapter_id="A", sampling=SamplingParams(max_tokens=5))
    b = sim.add("b", adapter_id="B", sampling=SamplingParams(max_tokens=5))
    base = sim.add("base", sampling=SamplingParams(max_tokens=5))
    sim.step()
    assert a.status is SequenceStatus.RUNNING and base.status is SequenceStatus.RUNNING
    assert b.status is SequenceStatus.WAITING  # slot busy with A: B waits, base bypasses
    sim.run(20)
    assert a.is_finished and b.is_finished and base.is_finished and slots.refs == {"B": 0}


def test_late_request_is_served_and_counted_as_miss() -> None:
    sim = make_sim()
    sim.sched.add_job(FakeJob("train"))
    late = sim.add("late", prompt_len=1000, ttft_ms=1.0, sampling=SamplingParams(max_tokens=4))
    ok = sim.add("ok", prompt_len=10, ttft_ms=5000.0, sampling=SamplingParams(max_tokens=4))
    sim.run(30)
    assert late.is_finished and late.num_output_tokens == 4 and ok.is_finished
    metrics = {m.seq_id: m for m in sim.metrics}
    assert not metrics["late"].met_ttft and not metrics["late"].met_slo
    assert metrics["ok"].met_slo
    assert sim.sched.slo.num_ttft_misses == 1 and sim.sched.slo.request_attainment == 0.5


def test_stop_tokens_eos_and_external_finish() -> None:
    config = SchedulerConfig(max_num_batched_tokens=256, max_prefill_chunk=128, tpot_burst=1.0, tpot_lookahead=0)
    sim = Sim(Scheduler(config, FakeKV(), eos_token_id=TOKEN, prior_cost=PRIOR))
    eos = sim.add("eos", sampling=SamplingParams(max_tokens=10))
    ignore = sim.add("ignore", sampling=SamplingParams(max_tokens=3, ignore_eos=True))
    stop_id = sim.add(
        "stop_id", sampling=SamplingParams(max_tokens=10, stop_token_ids=(TOKEN,), ignore_eos=True)
    )
    stop = sim.add("stop", sampling=SamplingParams(max_tokens=10, ignore_eos=True))
    sim.step()
    assert eos.finish_reason == "stop" and eos.num_output_tokens == 1
    assert stop_id.finish_reason == "stop" and stop_id.num_output_tokens == 1
    assert sim.sched.finish("stop", "stop", sim.now) is not None and stop.finish_reason == "stop"
    sim.run(5)
    assert ignore.finish_reason == "length" and ignore.num_output_tokens == 3


def test_chunked_prefill_splits_long_prompt() -> None:
    sim = make_sim(max_prefill_chunk=128, max_num_batched_tokens=256)
    seq = sim.add("long", prompt_len=300, sampling=SamplingParams(max_tokens=2))
    chunks = []
    while not seq.is_finished:
        chunks += [(c.start, c.length) for c in sim.step().prefill_chunks]
    assert chunks == [(0, 128), (128, 128), (256, 44)]
    assert seq.ttft_s is not None and seq.num_output_tokens == 2


def test_prefix_cache_hits_skip_prefill() -> None:
    sim = make_sim(kv=FakeKV(prefix_hit=48))
    seq = sim.add("s", prompt_len=100, sampling=SamplingParams(max_tokens=2))
    chunk = sim.step().prefill_chunks[0]
    assert (chunk.start, chunk.length) == (48, 52) and seq.num_output_tokens == 1
    short = sim.add("short", prompt_len=10, sampling=SamplingParams(max_tokens=1))
    chunk = sim.step().prefill_chunks[0]
    assert chunk.seq is short and (chunk.start, chunk.length) == (9, 1)  # at least one token computed


# ---- decode graphs: mean-TPOT banking, prefill coalescing, training in amortized chunks ------------

# A GPU whose decode-only steps replay a CUDA graph (8 ms) while any other step runs eagerly and pays
# a fixed 40 ms more; the scheduler's prior knows neither number.
GRAPH_COST = StepCost(const_s=8e-3, prefill_token_s=2.5e-5, decode_row_s=3e-5, train_token_s=8e-5,
                      eval_token_s=2.5e-5, kv_token_s=1e-8, mixed_s=4e-2)


def _graph_sim(**cfg: object) -> Sim:
    base = {"max_num_seqs": 128, "max_num_batched_tokens": 4096, "max_prefill_chunk": 2048,
            "default_tpot_ms": 60.0, "default_ttft_ms": 1000.0, "decode_graphs": True}
    return make_sim(cost=GRAPH_COST, prior=StepCost(), **{**base, **cfg})


def _decoders(sim: Sim, n: int, max_tokens: int = 400) -> list[RequestState]:
    seqs = [sim.add(f"d{i}", prompt_len=64, sampling=SamplingParams(max_tokens=max_tokens)) for i in range(n)]
    for _ in range(200):
        if all(not s.is_prefilling and s.status is SequenceStatus.RUNNING for s in seqs):
            break
        sim.step()
    return seqs


def _finish(sim: Sim, seqs: list[RequestState], limit_s: float) -> None:
    """Steps ``sim`` until every one of ``seqs`` finished or the clock reaches ``limit_s``."""
    while not all(s.is_finished for s in seqs) and sim.now < limit_s:
        sim.step()


@pytest.mark.parametrize("burst", [1.0, 4.0])
def test_banked_tpot_lets_a_long_prompt_in_sooner_and_keeps_mean_tpot(burst: float) -> None:
    results = {}
    for b in (1.0, burst):
        sim = _graph_sim(tpot_burst=b)
        decoders = _decoders(sim, 32)
        sim.run(30)  # the step model learns the decode-only cost; decoders run ahead of their mean
        start = len(sim.times)
        long = sim.add("long", prompt_len=3000, sampling=SamplingParams(max_tokens=4))
        for _ in range(400):
            if long.is_finished:
                break
            sim.step()
        assert long.is_finished
        sim.run(5)
        for d in decoders:  # every decoder's mean TPOT so far is within target
            assert d.mean_tpot_s is not None and d.mean_tpot_s <= 0.060, (b, d.mean_tpot_s)
        assert long.ttft_s is not None
        results[b] = long.ttft_s
        if b == 1.0:  # without banking no step may pass one TPOT target once the model has learned
            assert max(sim.times[start + 1 :]) <= 0.060 * 1.05  # the first one teaches it mixed_s
    if burst > 1.0:
        # banked time goes to the prompt: it is prefilled in far fewer, longer steps
        assert results[burst] < 0.6 * results[1.0], results


def _arrivals(sim: Sim, every_s: float, duration_s: float, tag: str = "r", max_tokens: int = 20,  # noqa: PLR0913
              drain: bool = True) -> list[RequestState]:
    """Requests (96-token prompts) arriving every ``every_s`` on the virtual clock for ``duration_s``;
    with ``drain``, then up to 500 more steps for them to finish."""
    seqs, next_at, end = [], sim.now, sim.now + duration_s
    while sim.now < end:
        while next_at <= sim.now:
            seqs.append(sim.add(f"{tag}{len(seqs)}", prompt_len=96, sampling=SamplingParams(max_tokens=max_tokens)))
            next_at += every_s
        sim.step()
    for _ in range(500 if drain else 0):
        if all(s.is_finished for s in seqs):
            break
        sim.step()
    return seqs


def test_prefill_coalescing_keeps_most_steps_decode_only() -> None:
    out = {}
    for coalesce in (0.0, 100.0):
        sim = _graph_sim(tpot_burst=4.0, prefill_coalesce_ms=coalesce)
        _decoders(sim, 32, max_tokens=2000)
        start, t0 = len(sim.batches), sim.now
        seqs = _arrivals(sim, every_s=0.015, duration_s=1.5, tag=f"c{coalesce}-")
        window = sim.batches[start:]
        mixed = sum(1 for b in window if b.prefill_chunks)
        decoded = sum(b.num_decode_rows for b in window) / (sim.now - t0)
        ttfts = [s.ttft_s for s in seqs]
        assert all(s.is_finished for s in seqs) and all(t is not None for t in ttfts)
        out[coalesce] = (mixed / len(window), decoded, max(ttfts))  # type: ignore[type-var]
    plain, held = out[0.0], out[100.0]
    # Taken as they come, arrivals turn a step in three mixed (40 ms more each). Held for up to
    # 100 ms, they are prefilled together: far fewer steps leave the graph path, more decode tokens
    # per second, and the worst TTFT is the hold plus one prefill step.
    assert held[0] < 0.25 * plain[0], out
    assert held[1] > 1.3 * plain[1], out
    assert held[2] <= 0.100 + 0.150, out


def test_hold_ends_at_the_coalesce_time_or_half_the_ttft() -> None:
    sim = _graph_sim(tpot_burst=4.0, prefill_coalesce_ms=100.0)
    _decoders(sim, 8)
    sim.run(20)  # the step model learns what a decode-only step costs
    urgent = sim.add("urgent", prompt_len=32, ttft_ms=150.0)  # half its TTFT (75 ms) < 100 ms
    batch = sim.step()
    assert not batch.prefill_chunks  # held: decode-only
    for _ in range(20):
        if sim.step().prefill_chunks:
            break
    # released with time for its ~50 ms prefill step to land inside the TTFT
    assert urgent.ttft_s is not None and 0.030 <= urgent.ttft_s <= 0.150
    tight = sim.add("tight", prompt_len=32, ttft_ms=90.0)  # no room for a wait and a mixed step
    assert sim.step().prefill_chunks and tight.num_output_tokens == 1
    big = [sim.add(f"big{i}", prompt_len=1500) for i in range(3)]  # more than a step's tokens wait
    for _ in range(20):  # not held; a few decode-only steps bank time, then one large prefill step
        batch = sim.step()
        if batch.prefill_chunks:
            break
    assert batch.num_prefill_tokens >= 1024 and big[0].status is SequenceStatus.RUNNING


def test_training_leaves_the_graph_path_only_for_amortized_chunks() -> None:
    sim = _graph_sim(tpot_burst=4.0)
    decoders = _decoders(sim, 16, max_tokens=3000)
    sim.sched.add_job(FakeJob("train"))
    sim.run(300)
    steady = sim.batches[-200:]
    with_train = [b.num_train_tokens for b in steady if b.num_train_tokens]
    cost = sim.sched.step_model.cost
    # learned online (every mixed step here trains, so only the two fixed prices' sum is identifiable)
    assert cost.mixed_s + cost.train_step_s == pytest.approx(GRAPH_COST.mixed_s, rel=0.25)
    # decode-only steps bank time, then one step trains on at least mixed_s worth of tokens
    assert with_train and len(with_train) < len(steady)
    assert statistics.median(with_train) * GRAPH_COST.train_token_s >= GRAPH_COST.mixed_s
    assert min(with_train) * GRAPH_COST.train_token_s >= 0.5 * GRAPH_COST.mixed_s  # estimates settle
    assert all(d.mean_tpot_s is not None and d.mean_tpot_s <= 0.060 for d in decoders)
    trained = sum(with_train) / sum(sim.times[-200:])
    assert trained > 0.3 / GRAPH_COST.train_token_s  # well over a third of the training-only rate


def test_held_prompts_are_no_backlog_and_join_a_training_step() -> None:
    sim = _graph_sim(tpot_burst=4.0, prefill_coalesce_ms=100.0)
    decoders = _decoders(sim, 16, max_tokens=3000)
    sim.sched.add_job(FakeJob("train"))
    sim.run(100)
    start, trained_before = len(sim.batches), sim.sched.metrics.train_tokens_by_job["train"]
    t0 = sim.now
    seqs = _arrivals(sim, every_s=0.02, duration_s=1.5, tag="u")
    window = sim.batches[start:]
    trained = sim.sched.metrics.train_tokens_by_job["train"] - trained_before
    # training keeps going while prompts are held (they are no backlog)...
    assert trained / (sim.now - t0) > 0.25 / GRAPH_COST.train_token_s
    # ...and a step that trains anyway takes the held prompts along instead of a mixed step of its own
    assert any(b.prefill_chunks and b.train_chunks for b in window)
    assert all(s.is_finished and s.ttft_s is not None and s.ttft_s <= 1.0 for s in seqs)
    assert all(d.mean_tpot_s is not None and d.mean_tpot_s <= 0.060 for d in decoders)


def test_step_model_remembers_a_regime_the_window_no_longer_holds() -> None:
    model = StepTimeModel(StepCost(), window=32)
    rng = random.Random(5)
    for i in range(64):  # half the steps mixed (prefill): the model learns the mixed price
        mixed = i % 2
        f = StepFeatures(rng.randint(100, 2000) * mixed, rng.randint(8, 64), 0, 0, rng.randint(1000, 9000), mixed)
        model.observe(f, GRAPH_COST.predict(f))
    learned = model.cost.mixed_s
    assert learned == pytest.approx(GRAPH_COST.mixed_s, rel=0.1)
    for _ in range(64):  # a quiet spell: decode-only steps fill the whole window
        f = StepFeatures(0, rng.randint(8, 64), 0, 0, rng.randint(1000, 9000), 0)
        model.observe(f, GRAPH_COST.predict(f))
    assert model.num_decode_only == 32
    assert model.cost.mixed_s == pytest.approx(learned, rel=0.05)  # not back at the prior's 0
    assert model.cost.prefill_token_s == pytest.approx(GRAPH_COST.prefill_token_s, rel=0.1)


def test_prefill_graph_steps_are_not_mixed_steps() -> None:
    """With graph_max_rows, an inference step with prompt rows replays a graph too: the scheduler
    neither charges it the eager price nor holds prompts back, so arrivals get their first token in
    about one step while the decoders keep their TPOT."""
    out = {}
    for rows in (0, 4096):
        sim = _graph_sim(tpot_burst=8.0, prefill_coalesce_ms=0.0, graph_max_rows=rows)
        decoders = _decoders(sim, 32, max_tokens=2000)
        start = len(sim.batches)
        seqs = _arrivals(sim, every_s=0.015, duration_s=1.5, tag=f"g{rows}-")
        window = sim.batches[start:]
        assert all(d.mean_tpot_s is not None and d.mean_tpot_s <= 0.060 for d in decoders)
        eager = sum(1 for b in window if is_eager(sim.sched.graphs, b.num_prefill_tokens, b.num_decode_rows, 0))
        out[rows] = (max(s.ttft_s for s in seqs if s.ttft_s is not None), eager, sum(b.num_decode_rows for b in window))
    assert out[4096][1] == 0 < out[0][1], out  # no step left the graph path
    assert out[4096][0] < 0.5 * out[0][0], out  # first tokens far sooner
    assert is_eager(GraphPaths(decode=True, max_rows=64), 60, 8, 0) == 1  # past the rows
    assert is_eager(GraphPaths(decode=True, max_rows=64), 50, 8, 0) == 0
    assert is_eager(GraphPaths(decode=True, max_rows=64), 0, 8, 5) == 1  # training rows
    # a prompt's tail far into its context runs eagerly: mean keys per prompt row past the limit
    deep = GraphPaths(decode=True, max_rows=64, max_mean_context=256)
    assert is_eager(deep, 2, 8, 0, prefill_reads=2 * 300) == 1
    assert is_eager(deep, 40, 8, 0, prefill_reads=40 * 21) == 0


def test_lookahead_lets_young_sequences_repay_a_training_step() -> None:
    """A dense stream of requests (20/s) always holds a sequence that has banked nothing yet. Without
    lookahead it caps every step at one TPOT target, below a training step's fixed price, so training
    barely runs; borrowing against the next tokens (repaid by graph-replayed decode steps) lets long
    training steps in, and every request, run to its max_tokens, still ends within its mean TPOT."""
    cost = StepCost(**{**vars(GRAPH_COST), "train_step_s": 0.1})  # an eager training step: 148 ms fixed
    out = {}
    for ahead in (0, 16):
        sim = _graph_sim(tpot_burst=8.0, tpot_lookahead=ahead, graph_max_rows=4096)
        sim.cost = cost
        sim.sched.add_job(FakeJob("train"))
        seqs = _arrivals(sim, every_s=0.05, duration_s=6.0, max_tokens=100, drain=False)
        trained = sim.sched.metrics.train_tokens_by_job["train"] / sim.now
        _finish(sim, seqs, limit_s=20.0)
        done = [s for s in seqs if s.is_finished]
        assert len(done) == len(seqs) and all(s.finish_reason == "length" for s in done)
        assert all(s.mean_tpot_s is not None and s.mean_tpot_s <= 0.060 for s in done), ahead
        assert all(s.ttft_s is not None and s.ttft_s <= 1.0 for s in done), ahead
        out[ahead] = trained
    assert out[16] > 5.0 * out[0], out
    assert out[16] > 0.4 / cost.train_token_s, out  # over 40 % of the training-only token rate


def test_lookahead_never_borrows_past_max_tokens() -> None:
    sim = _graph_sim(tpot_burst=8.0, tpot_lookahead=16)
    short = sim.add("short", sampling=SamplingParams(max_tokens=2))
    long = sim.add("long", sampling=SamplingParams(max_tokens=200))
    sim.step()  # both prefilled: one token each
    assert short.first_token_time is not None and long.first_token_time is not None
    now = short.first_token_time
    # the short one has one token left: nothing to borrow against, one target it is
    assert decode_budget(short, now, sim.sched.config, 0.008) == pytest.approx(0.060)
    assert decode_budget(long, now, sim.sched.config) == pytest.approx(0.060)  # prefill does not borrow
    # the long one borrows 16 tokens' worth: 17 targets minus 16 decode steps, capped at the burst
    assert decode_budget(long, now, sim.sched.config, 0.008) == pytest.approx(8 * 0.060)
    # planned against tpot_headroom (0.9) of the target: 17 x 54 ms minus 16 decode steps
    assert decode_budget(long, now, sim.sched.config, 0.045) == pytest.approx(17 * 0.060 * 0.9 - 16 * 0.045)
    with pytest.raises(ValueError):
        SchedulerConfig(tpot_lookahead=-1)
    with pytest.raises(ValueError):
        SchedulerConfig(train_amortize=0.0)


def test_step_model_shrugs_off_a_one_off_slow_step() -> None:
    """A step that compiled a kernel (a second for one prompt token) must not price every prefill token
    at a second, while a lasting change in cost is still learned."""
    model = StepTimeModel(StepCost(), window=64)
    rng = random.Random(3)

    def step(prefill: int) -> StepFeatures:
        return StepFeatures(prefill, rng.randint(8, 64), 0, 0, rng.randint(1000, 9000), 0)

    for _ in range(64):
        f = step(rng.choice((0, 0, rng.randint(50, 500))))
        model.observe(f, GRAPH_COST.predict(f))
    model.observe(step(1), 1.0)
    assert model.num_clipped == 1
    assert model.cost.prefill_token_s < 3 * GRAPH_COST.prefill_token_s
    assert model.predict(step(200)) < 0.05
    slower = StepCost(**{**vars(GRAPH_COST), "const_s": 0.03})  # every step now costs 22 ms more
    for _ in range(128):  # the windows of both regimes (decode-only, with prompt rows) turn over
        f = step(rng.choice((0, 0, rng.randint(50, 500))))
        model.observe(f, slower.predict(f))
    assert model.cost.const_s == pytest.approx(0.03, rel=0.1)
    with pytest.raises(ValueError):
        StepTimeModel(outlier_factor=0.5)


def test_step_model_fits_rare_regimes_beside_a_stream_of_graph_steps() -> None:
    """The H200 pattern: ~93 % of steps replay decode graphs, a few carry prompt rows, 2 % train (some
    with a few prompt tokens), step times vary +-15 % and every fourth training step runs the optimizer.
    One shared window of 128 steps then holds a handful of training steps whose prompt tokens stand in for
    their cost, and clamping one unconstrained fit turned that into a price per prompt token ~80x the true
    one (seen on the GPU: 74 ms per prompt token). Per-regime windows and a bounded solve keep every kind
    of step predicted within half its true time (the old fit: 86x off), all along the run."""
    rng = random.Random(11)
    model = StepTimeModel(PRIOR_8B, window=128)
    probes = {"train": StepFeatures(0, 20, 2500, 0, 6000, 1, 1), "graph prefill": StepFeatures(100, 20, 0, 0, 6000),
              "eager prefill": StepFeatures(400, 20, 0, 0, 6000, 1), "decode": StepFeatures(0, 30, 0, 0, 9000)}
    worst = dict.fromkeys(probes, 0.0)
    num_train = 0
    for i in range(3000):
        u, rows = rng.random(), rng.randint(5, 40)
        kv = rows * rng.randint(100, 400)
        if u < 0.93:
            f = StepFeatures(0, rows, 0, 0, kv)
        elif u < 0.97:
            f = StepFeatures(rng.randint(5, 60), rows, 0, 0, kv)
        elif u < 0.98:
            f = StepFeatures(rng.randint(300, 512), rows, 0, 0, kv, 1)
        else:
            prompt = rng.randint(1, 15) if rng.random() < 0.5 else 0
            f = StepFeatures(prompt, rows if rng.random() < 0.8 else 0, rng.randint(2800, 3600), 0, kv, 1, 1)
        t = H200_8B.predict(f) * rng.uniform(0.85, 1.15)
        if f.training:
            num_train += 1
            t += 0.03 if num_train % 4 == 0 else 0.0
        model.observe(f, t)
        if i >= 500:
            for name, g in probes.items():
                worst[name] = max(worst[name], abs(model.predict(g) / H200_8B.predict(g) - 1.0))
    assert max(worst.values()) < 0.5, worst
    assert model.num_samples <= 4 * 128  # one window per regime seen (four here)
    assert 128 < model.num_decode_only <= 2 * 128  # graph steps with and without prompt rows


def test_step_model_never_calls_training_tokens_free() -> None:
    """Training steps of one size cannot tell the fixed price from the per-token one. Fitted alone, the
    window may put it all on the fixed price (seen on the H200), and then no token count amortizes
    it beside decode rows; the token price stays at a quarter of the prior's at least."""
    model = StepTimeModel(PRIOR_8B, window=64)
    rng = random.Random(2)
    for i in range(200):
        if i % 10 == 0:  # all-fixed-price training steps: 0.35 s whatever they carry
            model.observe(StepFeatures(0, 0, rng.randint(3300, 3500), 0, 0, 1, 1), 0.35)
        else:
            model.observe(StepFeatures(0, rng.randint(8, 40), 0, 0, rng.randint(1000, 9000)), 0.009)
    assert model.cost.train_token_s == pytest.approx(0.25 * PRIOR_8B.train_token_s)
    assert model.predict(StepFeatures(0, 0, 3400, 0, 0, 1, 1)) == pytest.approx(0.35, rel=0.05)
    with pytest.raises(ValueError):
        StepTimeModel(token_floor=2.0)


# What the 8B shape costs on one H200 (fitted by the benchmarks: docs/benchmarks/unified.md): graph
# steps ~8 ms, an eager training step ~110 ms more than its tokens; and the engine's prior for it.
H200_8B = StepCost(const_s=0.0075, prefill_token_s=4.4e-5, decode_row_s=1.8e-4, train_token_s=7.7e-5,
                   eval_token_s=5e-5, kv_token_s=0.0, mixed_s=0.033, train_step_s=0.076)
PRIOR_8B = StepCost(const_s=0.0073, prefill_token_s=5.3e-5, decode_row_s=5.3e-5, train_token_s=1.6e-4,
                    eval_token_s=5.3e-5, kv_token_s=4e-8, mixed_s=0.016, train_step_s=0.096)


class _FirstTrainingStepBuildsKernels:
    """H200_8B, except that the first training step that carries decode rows also compiles kernels
    (half a second more), as a shape the warm-up missed does."""

    def __init__(self) -> None:
        self.pending = True

    def predict(self, f: StepFeatures) -> float:
        t = H200_8B.predict(f)
        if self.pending and f.train_tokens and f.decode_rows:
            self.pending = False
            t += 0.5
        return t


def test_a_training_probe_recovers_from_an_inflated_fixed_price() -> None:
    """One slow training step makes the fitted fixed price of training larger than any step the
    decoders allow; without probes no training step runs again with decoders present, so the price
    is never corrected (the H200 unified run saw training fall to 3 % of its solo rate this way).
    Probes measure it again, and training gets a large share back while the SLO holds."""
    out = {}
    for probe in (0.0, 2.0):
        sim = make_sim(cost=H200_8B, prior=PRIOR_8B, max_num_seqs=256, max_num_batched_tokens=4096,
                       max_prefill_chunk=512, default_tpot_ms=60.0, default_ttft_ms=1000.0, decode_graphs=True,
                       graph_max_rows=4096, tpot_burst=8.0, train_probe_s=probe)
        sim.cost = _FirstTrainingStepBuildsKernels()  # type: ignore[assignment]
        sim.sched.add_job(FakeJob("train"))
        rng = random.Random(7)
        seqs, next_at = [], 0.0
        while sim.now < 20.0:
            while next_at <= sim.now:
                seqs.append(sim.add(f"r{len(seqs)}", prompt_len=rng.randint(50, 500),
                                    sampling=SamplingParams(max_tokens=rng.randint(20, 400))))
                next_at += rng.expovariate(6.0)
            sim.step()
        trained = sim.sched.metrics.train_tokens_by_job["train"] / sim.now
        while not all(s.is_finished for s in seqs) and sim.now < 60.0:
            sim.step()
        met = [s.ttft_s is not None and s.ttft_s <= 1.0 and s.mean_tpot_s is not None and s.mean_tpot_s <= 0.060
               for s in seqs]
        out[probe] = (trained, sum(met) / len(met))
    solo = 4096 / H200_8B.predict(StepFeatures(0, 0, 4096, 0, 0, 1, 1))  # training alone: full steps
    assert out[0.0][0] < 0.1 * solo, out  # starved
    assert out[2.0][0] > 0.3 * solo, out
    assert out[2.0][1] >= 0.97, out
    with pytest.raises(ValueError):
        SchedulerConfig(train_probe_s=-1.0)


def test_a_prompt_tail_off_the_graphs_rides_in_a_training_step() -> None:
    """Borrowing for training keeps long eager training steps coming beside the decoders. A prompt whose
    tail reads too deep into its context for the graphs must run eagerly; it joins one of those training
    steps (no eager price of its own, within that step's time) instead of waiting until its deadline is
    near while training steps go by, which broke TTFT in the H200 replay's arithmetic."""
    cost = StepCost(**{**vars(GRAPH_COST), "train_step_s": 0.12})
    sim = _graph_sim(tpot_burst=8.0, tpot_lookahead=16, graph_max_rows=4096, graph_max_mean_context=256,
                     prefill_coalesce_ms=100.0)
    sim.cost = cost
    sim.sched.add_job(FakeJob("train"))
    _decoders(sim, 8, max_tokens=2000)
    sim.run(60)
    assert any(b.num_train_tokens and b.decode_seqs for b in sim.batches[-30:])  # training beside decoders
    start = len(sim.batches)
    late = sim.add("late", prompt_len=700, sampling=SamplingParams(max_tokens=8))
    while late.first_token_time is None and sim.now < 30.0:
        sim.step()
    assert late.ttft_s is not None and late.ttft_s <= 1.0
    chunks = [(b, c) for b in sim.batches[start:] for c in b.prefill_chunks if c.seq is late]
    # the head (rows reading 256 keys each on average) replays a graph; what starts past it cannot
    tail = [b for b, c in chunks if c.start >= 256]
    assert tail and all(b.num_train_tokens > 0 for b in tail)


def test_training_beside_decoders_when_no_step_can_amortize_its_fixed_price() -> None:
    """A training step's fixed prices (eager forward, backward, optimizers) can exceed the most training
    work any step carries: here 0.24 s against 4,096 tokens x 40 us = 0.16 s. Asking for work of at least
    the fixed price then kept training out of every step with decoders (probes only: what the H200's
    fit did to one replay while another, with a lower fit, trained steadily). The rule now asks for the
    most a step can carry in that case; training runs beside the decoders, requests keep their SLO."""
    cost = StepCost(**{**vars(GRAPH_COST), "train_token_s": 4e-5, "train_step_s": 0.2})
    sim = _graph_sim(tpot_burst=8.0, tpot_lookahead=16, graph_max_rows=4096)
    sim.cost = cost
    sim.sched.step_model = StepTimeModel(cost, window=sim.sched.config.step_model_window)  # a settled fit
    sim.sched.add_job(FakeJob("train"))
    seqs = _arrivals(sim, every_s=0.1, duration_s=8.0, max_tokens=100, drain=False)
    beside = [b for b in sim.batches if b.num_train_tokens and b.decode_seqs]
    assert len(beside) > 8.0 / sim.sched.config.train_probe_s + 4  # more than the probes
    assert sim.sched.metrics.train_tokens_by_job["train"] / sim.now > 0.3 / cost.train_token_s * 0.5
    _finish(sim, seqs, limit_s=30.0)
    assert all(s.mean_tpot_s is not None and s.mean_tpot_s <= 0.060 for s in seqs)
    assert all(s.ttft_s is not None and s.ttft_s <= 1.0 for s in seqs)


def test_step_model_margin_is_a_quantile_of_the_eager_error() -> None:
    """``margin(q)``: the q-quantile of measured over predicted time of the latest eager steps, each
    against the fit it was predicted with; graph steps do not count; clamped to [1, MAX_MARGIN]."""
    from loquetier.engine.scheduling.pricing import MAX_MARGIN, MIN_MARGIN_SAMPLES

    model = StepTimeModel(GRAPH_COST, window=64, robust_after=0, margin_window=40)
    eager = StepFeatures(prefill_tokens=300, decode_rows=16, kv_tokens_read=4000, mixed=1)
    graph = StepFeatures(decode_rows=16, kv_tokens_read=4000)
    assert model.margin(0.9) == 1.0
    rng = random.Random(3)
    errors = [1.0 + 0.5 * rng.random() for _ in range(40)]
    for k, err in enumerate(errors):
        if k == MIN_MARGIN_SAMPLES - 1:
            assert model.margin(0.9) == 1.0  # too few eager steps seen
        model.observe(eager, model.predict(eager) * err)
        model.observe(graph, model.predict(graph) * 3.0)  # graph steps: not in the margin
    assert model.num_eager_errors == 40
    ranked = sorted(errors)
    assert model.margin(0.9) == pytest.approx(ranked[35])  # the 36th of 40
    assert model.margin(0.5) == pytest.approx(ranked[19])
    assert model.margin(0.0) == 1.0  # off
    for _ in range(40):  # steps faster than the fit: never a discount
        model.observe(eager, model.predict(eager) * 0.5)
    assert model.margin(0.9) == 1.0
    for _ in range(40):  # a host that is suddenly far slower: at most MAX_MARGIN
        model.observe(eager, model.predict(eager) * 10.0)
    assert model.margin(0.9) == MAX_MARGIN
    with pytest.raises(ValueError, match="quantile"):
        model.margin(1.0)
    with pytest.raises(ValueError, match="margin_window"):
        StepTimeModel(margin_window=2)
    with pytest.raises(ValueError, match="plan_quantile"):
        SchedulerConfig(plan_quantile=-0.1)
    assert GRAPH_COST.scaled(2.0).mixed_s == pytest.approx(2 * GRAPH_COST.mixed_s)
    with pytest.raises(ValueError, match="scale factor"):
        GRAPH_COST.scaled(float("nan"))


def test_planning_training_at_a_quantile_cuts_step_overruns() -> None:
    """Eager steps whose time has a long tail (a host's jitter: 1 + 0.3 x Exp(1) times their price)
    overrun budgets planned at the fit's mean; planned at its 0.9 quantile (``plan_quantile``, the
    default) far fewer do, and training, the work the margin comes out of, keeps most of its rate."""
    runs = {}
    for q in (0.0, 0.9):
        sim = _graph_sim(tpot_burst=8.0, tpot_lookahead=16, plan_quantile=q)
        sim.rng, sim.noise, sim.eager_tail = random.Random(1), 0.05, 0.3
        for j in range(2):
            sim.sched.add_job(FakeJob(f"t{j}"))
        seqs = _arrivals(sim, every_s=0.05, duration_s=20.0, max_tokens=100)
        assert all(s.is_finished for s in seqs)
        m = sim.sched.metrics
        runs[q] = (m.num_step_overruns, sum(m.train_tokens_by_job.values()) / sim.now, sim.sched.margin)
    (over_mean, train_mean, margin_off), (over_q, train_q, margin_q) = runs[0.0], runs[0.9]
    assert margin_off == 1.0 and margin_q > 1.1
    assert over_q <= 0.6 * over_mean, runs
    assert train_q >= 0.8 * train_mean, runs
