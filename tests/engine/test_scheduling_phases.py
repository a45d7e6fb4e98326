"""Each phase of ``Scheduler.schedule`` on its own, through the scheduling package's public functions."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from benchmarks.harness.synthetic import FakeJob, FakeKV
from loquetier.engine.scheduling import GraphPaths, Scheduler, SchedulerConfig, StepCost
from loquetier.engine.scheduling.budget import FairShare, prefill_time_limit
from loquetier.engine.scheduling.config import AUTO_PREFILL_COALESCE_MS, resolve_coalesce
from loquetier.engine.scheduling.decode import add_decode_rows, set_decode_budgets
from loquetier.engine.scheduling.plan import StepPlan
from loquetier.engine.scheduling.prefill import (
    add_prefill_chunks,
    chunk_allowance,
    graph_room,
    hold_new_prefills,
    prefill_order,
    start_prefill,
)
from loquetier.engine.scheduling.queue import RequestQueue
from loquetier.engine.scheduling.training import (
    fill_training,
    fill_training_idle,
    grant_training,
    reserve_training_floors,
    serving_step_cap,
    train_pays,
)
from loquetier.engine.sequence import PrefillChunk, RequestState, SamplingParams, ScheduledBatch, SequenceStatus

COST = StepCost(const_s=5e-3, prefill_token_s=1e-4, decode_row_s=2e-4, train_token_s=3e-4, eval_token_s=1e-4,
                kv_token_s=0.0)
CONFIG = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_prefill_chunk=128, default_tpot_ms=50.0,
                         tpot_burst=1.0, tpot_lookahead=0, prefill_coalesce_ms=0.0)


def make_plan(now: float = 0.0, config: SchedulerConfig = CONFIG, graphs: GraphPaths | None = None,
              cost: StepCost = COST) -> StepPlan:
    return StepPlan(batch=ScheduledBatch(step_id=0, now=now), cost=cost, graphs=graphs or GraphPaths(),
                    train_scale=1.0, tokens_left=config.max_num_batched_tokens)


def seq(seq_id: str, prompt_len: int = 32, *, arrival: float = 0.0, priority: int = 0, max_tokens: int = 16,
        ttft_ms: float = 1000.0, tpot_ms: float = 50.0) -> RequestState:
    return RequestState(seq_id, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), priority=priority,
                    ttft_ms=ttft_ms, tpot_ms=tpot_ms, arrival_time=arrival)


def decoding(queue: RequestQueue, s: RequestState, now: float, num_out: int = 1) -> RequestState:
    """``s`` admitted, prefilled and holding ``num_out`` output tokens, the last sampled at ``now``."""
    queue.add(s)
    assert queue.admit(s)
    s.output_token_ids += [7] * num_out
    s.num_computed_tokens = s.num_tokens - 1
    s.first_token_time = s.last_token_time = now
    return s


# ---- the queue ----------------------------------------------------------------------------------


def test_queue_admits_within_slots_and_kv() -> None:
    queue = RequestQueue(max_num_seqs=1, kv=FakeKV(num_blocks=4, block_size=16))
    a, b = seq("a", 40), seq("b", 8)
    queue.add(a)
    queue.add(b)
    with pytest.raises(ValueError, match="duplicate"):
        queue.add(seq("a"))
    assert queue.admit(a) and a.status is SequenceStatus.RUNNING and queue.running == [a]
    assert not queue.admit(b)  # no sequence slot left
    assert queue.importance(a) > queue.importance(b)  # same priority and arrival: added first wins
    queue.remove(a)
    assert queue.get("a") is None and queue.running == [] and queue.kv.num_free_blocks == 4  # type: ignore[attr-defined]


def test_make_room_preempts_the_least_important() -> None:
    kv = FakeKV(num_blocks=2, block_size=16)
    queue = RequestQueue(max_num_seqs=4, kv=kv)
    low = decoding(queue, seq("low", 16, priority=0), 0.0)  # admitted with 16 tokens: a full block
    high = decoding(queue, seq("high", 16, priority=1), 0.0)
    batch = ScheduledBatch(step_id=0, now=0.0)
    assert queue.make_room(high, set(), batch)  # its next token needs a block: low gives its up
    assert batch.preempted == [low] and low.status is SequenceStatus.PREEMPTED and low.num_computed_tokens == 0
    assert queue.waiting == [low]


# ---- decode -------------------------------------------------------------------------------------


def test_decode_rows_and_their_budgets() -> None:
    queue = RequestQueue(max_num_seqs=8, kv=FakeKV())
    ahead = decoding(queue, seq("ahead", max_tokens=100), now=0.0, num_out=10)  # ahead of a 50 ms mean
    prefilling = seq("new")
    queue.add(prefilling)
    assert queue.admit(prefilling)
    plan = make_plan(now=0.1)
    add_decode_rows(plan, queue)
    assert plan.batch.decode_seqs == [ahead] and plan.tokens_left == CONFIG.max_num_batched_tokens - 1
    set_decode_budgets(plan, CONFIG)  # tpot_burst 1: one target
    assert plan.time_budget == pytest.approx(0.050) and plan.burst_cap == pytest.approx(0.050)
    banking = SchedulerConfig(**{**vars(CONFIG), "tpot_burst": 4.0})
    set_decode_budgets(plan, banking)  # banked 10 x 45 ms - 100 ms, capped at 4 targets
    assert plan.time_budget == pytest.approx(0.200) and plan.burst_cap == pytest.approx(0.200)


# ---- training floors and fill ---------------------------------------------------------------------


def test_floors_reserve_min_share() -> None:
    plan = make_plan()
    jobs = [FakeJob("a", min_share=0.25), FakeJob("b", ready=0)]
    reserve_training_floors(plan, jobs, CONFIG, num_decode_only=100)
    assert [d.job_id for d in plan.demands] == ["a"]  # b has nothing ready
    assert plan.reserved == 64 and plan.tokens_left == 256 - 64 and plan.mixed and not plan.probe_due


def test_fill_training_spends_spare_time_and_grants_it() -> None:
    plan = make_plan()
    reserve_training_floors(plan, [FakeJob("a")], CONFIG, num_decode_only=100)
    plan.train_budget = 0.050
    plan.predicted = 0.005
    fill_training(plan, CONFIG, has_backlog=False, prior=COST)
    assert plan.time_budget == pytest.approx(0.050)
    assert plan.train_time == pytest.approx(0.050 * 0.9 - 0.005)
    grant_training(plan, FairShare(), {"a": FakeJob("a")})
    assert plan.batch.num_train_tokens == int(plan.train_time / COST.train_token_s + 1e-9)
    assert plan.last_train_at == 0.0
    backlog = make_plan()
    reserve_training_floors(backlog, [FakeJob("a", min_share=0.1)], CONFIG, num_decode_only=100)
    backlog.train_budget = 0.050
    fill_training(backlog, CONFIG, has_backlog=True, prior=COST)  # a backlog waits: floors only
    assert backlog.train_time == pytest.approx(backlog.reserved * COST.train_token_s)


def test_train_pays_for_its_fixed_price() -> None:
    plan = make_plan(cost=StepCost(train_token_s=1e-4, mixed_s=0.02))
    plan.batch.decode_seqs.append(seq("d"))
    plan.burst_cap = 0.4
    assert not train_pays(0.01, 0.02, plan, CONFIG)  # less work than the price it triggers
    assert train_pays(0.02, 0.02, plan, CONFIG)
    assert not train_pays(0.0, 0.0, plan, CONFIG)  # no work never pays


# ---- prefill --------------------------------------------------------------------------------------


def test_prefill_order_is_by_weighted_slack() -> None:
    queue = RequestQueue(max_num_seqs=8, kv=FakeKV())
    relaxed, urgent, heavy = seq("relaxed", ttft_ms=2000.0), seq("urgent", ttft_ms=500.0), seq("heavy", priority=3)
    for s in (relaxed, urgent, heavy):
        queue.add(s)
    # slack / weight: urgent 0.5 / 1, heavy 1.0 / 4, relaxed 2.0 / 1
    assert [s.seq_id for s in prefill_order(queue, 0.0, COST)] == ["heavy", "urgent", "relaxed"]


def test_prefill_chunks_fill_the_time_the_decoders_leave() -> None:
    queue = RequestQueue(max_num_seqs=8, kv=FakeKV())
    queue.add(seq("p", prompt_len=400))
    plan = make_plan()
    plan.time_budget = 0.025
    start_prefill(plan, queue, CONFIG)
    assert plan.predicted == pytest.approx(COST.const_s) and not plan.hold_new
    room = graph_room(plan, queue.waiting[0])
    assert room == 0  # no prefill graphs
    allowance = chunk_allowance(plan, queue.waiting[0], CONFIG, plan.tokens_left, room)
    assert allowance == math.floor((0.025 * 0.9 - COST.const_s) / COST.prefill_token_s)  # ~175
    add_prefill_chunks(plan, queue, CONFIG)
    (chunk,) = plan.batch.prefill_chunks
    assert chunk.length == min(allowance, CONFIG.max_prefill_chunk) and plan.tokens_left == 256 - chunk.length


def test_graph_room_keeps_a_step_on_the_graph_path() -> None:
    graphs = GraphPaths(decode=True, max_rows=64, max_mean_context=100)
    plan = make_plan(graphs=graphs)
    plan.batch.decode_seqs.extend(seq(f"d{i}") for i in range(10))
    s = seq("p", prompt_len=200)
    assert graph_room(plan, s) == 54
    s.num_computed_tokens = 90  # rows read 91, 92, ...: the mean stays within 100 for 19 rows
    assert graph_room(plan, s) == 19
    plan.mixed = True  # an eager step: no graph to stay on
    assert graph_room(plan, s) == 0


def test_new_prefills_are_held_to_be_coalesced() -> None:
    config = SchedulerConfig(**{**vars(CONFIG), "prefill_coalesce_ms": 100.0})
    queue = RequestQueue(max_num_seqs=8, kv=FakeKV())
    decoder = decoding(queue, seq("d"), now=0.0)
    queue.add(seq("new", arrival=0.0))
    plan = make_plan(now=0.05)
    plan.batch.decode_seqs.append(decoder)
    assert hold_new_prefills(plan, queue, config, mixed_step_s=0.01)  # waited 50 of 100 ms
    assert not hold_new_prefills(make_plan(now=0.1), queue, config, mixed_step_s=0.01)  # no decode rows
    late = make_plan(now=0.15)
    late.batch.decode_seqs.append(decoder)
    assert not hold_new_prefills(late, queue, config, mixed_step_s=0.01)  # waited long enough


# ---- the spine's inputs ---------------------------------------------------------------------------


def test_coalescing_default_follows_the_graph_paths() -> None:
    auto = SchedulerConfig()
    assert resolve_coalesce(auto, GraphPaths()).prefill_coalesce_ms == 0.0
    assert resolve_coalesce(auto, GraphPaths(decode=True)).prefill_coalesce_ms == AUTO_PREFILL_COALESCE_MS
    assert resolve_coalesce(auto, GraphPaths(decode=True, max_rows=256)).prefill_coalesce_ms == 0.0
    chosen = SchedulerConfig(prefill_coalesce_ms=5.0)
    assert resolve_coalesce(chosen, GraphPaths(decode=True)).prefill_coalesce_ms == 5.0


def test_graph_fallback_is_an_event_not_a_config_edit() -> None:
    graphs = GraphPaths(decode=True, max_rows=256, max_mean_context=64)
    sched = Scheduler(SchedulerConfig(), FakeKV(), graphs=graphs)
    config = sched.config
    sched.fall_back_from_prefill_graphs(decode_graphs=True)
    assert sched.graphs == GraphPaths(decode=True, max_rows=0, max_mean_context=64)
    assert sched.config is config and sched.num_graph_fallbacks == 1
    # coalescing was decided when the scheduler was built (with prefill graphs: off) and stays so
    assert sched.config.prefill_coalesce_ms == 0.0


def test_one_config_tree_with_one_default_per_knob() -> None:
    from loquetier.engine.config import EngineConfig

    config = EngineConfig()
    assert not {f for f in vars(config) if f != "scheduler"} & set(vars(config.scheduler))  # no field twice
    # the defaults engine users had when EngineConfig copied its own into SchedulerConfig
    assert (config.scheduler.tpot_burst, config.scheduler.tpot_lookahead) == (8.0, 16)
    assert config.scheduler.prefill_coalesce_ms is None
    flat = EngineConfig.from_kwargs(max_num_seqs=8, tpot_burst=2.0, block_size=8)
    assert flat.block_size == 8 and (flat.scheduler.max_num_seqs, flat.scheduler.tpot_burst) == (8, 2.0)
    nested = EngineConfig.from_kwargs(scheduler=SchedulerConfig(max_num_seqs=4), tpot_lookahead=2)
    assert (nested.scheduler.max_num_seqs, nested.scheduler.tpot_lookahead) == (4, 2)
    with pytest.raises(TypeError, match="unknown engine limits"):
        EngineConfig.from_kwargs(max_num_sequences=8)
    with pytest.raises(ValueError, match="tpot_burst"):
        EngineConfig.from_kwargs(tpot_burst=0.5)


def test_a_served_step_keeps_within_its_share_of_the_ttft_target() -> None:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, max_prefill_chunk=128,
                             default_tpot_ms=50.0, default_ttft_ms=400.0, tpot_burst=8.0, tpot_lookahead=0,
                             prefill_coalesce_ms=0.0, ttft_step_share=0.25, serving_idle_s=2.0)
    assert serving_step_cap(config, 10.0, serving=True, last_arrival=None) == pytest.approx(0.1)
    assert serving_step_cap(config, 10.0, serving=False, last_arrival=9.0) == pytest.approx(0.1)
    assert serving_step_cap(config, 10.0, serving=False, last_arrival=7.0) is None  # idle long enough
    assert serving_step_cap(replace(config, ttft_step_share=0.0), 10.0, serving=True, last_arrival=9.9) is None
    # decoders that banked time would let a training step last 0.3 s; the cap keeps it to 0.1 s
    plan = make_plan(config=config)
    reserve_training_floors(plan, [FakeJob("a", ready=4096)], config, num_decode_only=100)
    plan.train_budget, plan.predicted = 0.3, 0.005
    plan.step_cap = serving_step_cap(config, 0.0, serving=True, last_arrival=0.0)
    fill_training(plan, config, has_backlog=False, prior=COST)
    assert plan.time_budget == pytest.approx(0.1)
    assert plan.train_time == pytest.approx(0.1 * 0.9 - 0.005)
    # nothing in the system but an arrival 1 s ago: the idle step keeps to the cap as well
    idle = make_plan(config=config)
    reserve_training_floors(idle, [FakeJob("a", ready=4096)], config, num_decode_only=100)
    idle.step_cap = serving_step_cap(config, 1.0, serving=False, last_arrival=0.0)
    fill_training_idle(idle, config)
    grant_training(idle, FairShare(), {"a": FakeJob("a", ready=4096)})
    assert 0 < idle.batch.num_train_tokens <= math.ceil(0.1 * 0.9 / COST.train_token_s)
    with pytest.raises(ValueError, match="ttft_step_share"):
        SchedulerConfig(ttft_step_share=1.5)


def test_the_scheduler_caps_training_steps_while_requests_arrive() -> None:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, max_prefill_chunk=512,
                             default_ttft_ms=400.0, default_tpot_ms=50.0, tpot_burst=8.0, tpot_lookahead=0,
                             prefill_coalesce_ms=0.0, ttft_step_share=0.25, serving_idle_s=2.0)
    capped = Scheduler(config, FakeKV(1 << 20), prior_cost=COST)
    free = Scheduler(replace(config, ttft_step_share=0.0), FakeKV(1 << 20), prior_cost=COST)
    for sch in (capped, free):
        sch.add_job(FakeJob("a", ready=4096))
        sch.add_request(seq("r", arrival=0.0))
    # the request's own first step, then nothing in the system 1 s after its arrival
    steps = {}
    for name, sch in (("capped", capped), ("free", free)):
        sch.abort("r", 0.5)
        steps[name] = sch.schedule(1.0)
    assert steps["capped"].num_train_tokens * COST.train_token_s <= 0.1
    assert steps["free"].num_train_tokens == 4096  # idle: the whole step, as before
    later = capped.schedule(3.5)  # 3.5 s after the last arrival: idle again, no cap
    assert later.num_train_tokens == 4096


def test_a_prefill_step_keeps_ttft_headroom_of_the_slack() -> None:
    """A prompt that waited out a training step has 0.5 s of its TTFT left: its last prefill step is
    planned to ``ttft_headroom`` of that, training included."""
    base = replace(CONFIG, max_num_batched_tokens=4096, tpot_burst=8.0)
    for headroom, want in ((0.9, 0.5), (0.6, 0.5 * 0.6 / 0.9)):
        config = replace(base, ttft_headroom=headroom)
        plan = make_plan(now=0.5, config=config)
        late = seq("late", prompt_len=64, arrival=0.0, ttft_ms=1000.0)
        plan.batch.prefill_chunks.append(PrefillChunk(late, 0, 64))
        assert prefill_time_limit(plan.batch, 0.5, config) == pytest.approx(want)
        reserve_training_floors(plan, [FakeJob("a", ready=4096)], config, num_decode_only=100)
        plan.train_budget, plan.predicted = 0.4, 0.01  # the decoders would allow a 0.4 s step
        fill_training(plan, config, has_backlog=False, prior=COST)
        assert plan.time_budget == pytest.approx(min(0.4, want))
        # the first token is planned within the headroom's share of the 0.5 s left
        assert plan.predicted + plan.train_time <= headroom * 0.5 + 1e-9
    with pytest.raises(ValueError, match="ttft_headroom"):
        SchedulerConfig(ttft_headroom=0.0)
