"""Replay an arrival trace through the scheduler on a synthetic cost model (no model, no GPU).

    python -m benchmarks.sim_scheduler                       # all three traces
    python -m benchmarks.sim_scheduler --trace burst --rate 6 --jobs 2 --duration 120
    python -m benchmarks.sim_scheduler --set ttft_headroom=0.6 --count-from-add   # knobs, arrival mode

Traces: ``poisson`` (constant rate), ``burst`` (a base rate with periodic bursts of ``--burst-x``
times the rate), ``step`` (the rate steps 0.25x -> 1x -> 2x -> 0.5x over four equal phases).
Each request draws its prompt and output lengths from the given ranges; ``--jobs`` training jobs
(equal priority unless ``--job-priorities``) keep work ready all the time. The step time comes from
the synthetic GPU in ``benchmarks/harness/synthetic.py`` (a known price list with multiplicative noise,
and with ``--eager-tail`` a skewed jitter on eager steps);
the scheduler starts from a prior that is off by 2x (1.5x with ``--profile h200-8b``) and fits the truth
online.

Each request's clock starts at its arrival, as the engine's does with ``add_request(arrived_at=)``;
``--count-from-add`` starts it when the scheduler takes it (after the step in flight). ``--set``
puts ``SchedulerConfig`` fields on top of the profile's.

Prints, per trace: SLO attainment (requests, and the final token-level window), TTFT and TPOT
percentiles, training tokens/s per job against training alone, preemptions and step overruns, then
a per-phase table (attainment and training share over time) so recovery after load changes shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.synthetic import FakeJob, FakeKV, sampled_tokens, step_time  # noqa: E402
from loquetier.engine.scheduling import GraphPaths, Scheduler, SchedulerConfig, StepCost, StepFeatures  # noqa: E402
from loquetier.engine.scheduling.slo import RequestMetrics  # noqa: E402
from loquetier.engine.sequence import RequestState, SamplingParams, StepResult  # noqa: E402

# Roughly a 1B-parameter decoder on one modern GPU, in seconds.
TRUE_COST = StepCost(
    const_s=6e-3,
    prefill_token_s=4e-5,
    decode_row_s=1.5e-4,
    train_token_s=1.2e-4,
    eval_token_s=4e-5,
    kv_token_s=3e-8,
)
PRIOR = StepCost(*(2.0 * c for c in TRUE_COST.as_tuple()))
# The Llama-3-8B shape on one H200, fitted from the engine's step dumps (LOQUETIER_BENCH_STEP_DUMP):
# decode-only and small prompt steps replay CUDA graphs; any other step runs eagerly at a fixed price
# (mixed_s), and a training step pays a further fixed price for its backward and optimizers.
H200_8B_COST = StepCost(
    const_s=6e-3,
    prefill_token_s=1.4e-5,
    decode_row_s=5e-5,
    train_token_s=4.1e-5,
    eval_token_s=5e-5,
    kv_token_s=1e-6,
    mixed_s=0.07,
    train_step_s=0.12,
)


@dataclass(frozen=True)
class Arrival:
    time: float
    prompt_len: int
    max_tokens: int
    priority: int


def poisson_times(rng: random.Random, rate_at: object, duration: float, peak: float) -> Iterator[float]:
    """Non-homogeneous Poisson arrivals by thinning: ``rate_at(t)`` <= ``peak``."""
    assert callable(rate_at)
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return
        if rng.random() * peak <= rate_at(t):
            yield t


def make_trace(name: str, args: argparse.Namespace, rng: random.Random) -> list[Arrival]:
    rate, duration = args.rate, args.duration
    if name == "unified":  # bench_unified's trace itself (step-rate pattern, ShareGPT-like lengths)
        from benchmarks.harness.workload import make_trace as bench_trace

        trace = bench_trace(pattern="step", rate=rate, duration_s=duration, max_context=2048, prompt_mean=200,
                            output_mean=200, seed=args.seed + 3)
        pri = args.request_priorities
        return [Arrival(r.arrival_s, r.num_prompt_tokens, r.max_tokens, pri[i % len(pri)])
                for i, r in enumerate(trace.requests)]
    if name == "poisson":

        def rate_at(t: float) -> float:
            return float(rate)

        peak = rate
    elif name == "burst":

        def rate_at(t: float) -> float:
            in_burst = (t % args.burst_every) < args.burst_len
            return float(rate * args.burst_x if in_burst else rate)

        peak = rate * args.burst_x
    elif name == "step":
        levels = (0.25, 1.0, 2.0, 0.5)

        def rate_at(t: float) -> float:
            return rate * levels[min(len(levels) - 1, int(4 * t / duration))]

        peak = rate * max(levels)
    else:
        raise ValueError(f"unknown trace {name!r}")
    return [
        Arrival(
            time=t,
            prompt_len=rng.randint(*args.prompt_len),
            max_tokens=rng.randint(*args.output_len),
            priority=rng.choice(args.request_priorities),
        )
        for t in poisson_times(rng, rate_at, duration, peak)
    ]


@dataclass
class Phase:
    """Counters for one slice of simulated time."""

    steps: int = 0
    busy_s: float = 0.0
    train_tokens: int = 0
    batched_tokens: int = 0
    requests: int = 0
    requests_met: int = 0


def _config(args: argparse.Namespace) -> tuple[SchedulerConfig, GraphPaths, StepCost, StepCost]:
    """(scheduler config, graph paths, true cost, prior) of ``args.profile``."""
    base = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                max_prefill_chunk=args.max_prefill_chunk, default_ttft_ms=args.ttft_ms,
                default_tpot_ms=args.tpot_ms, tpot_lookahead=args.lookahead,
                train_amortize=args.amortize)
    for item in args.set:
        key, _, raw = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(SchedulerConfig)}:
            raise SystemExit(f"--set {item!r}: {key!r} is not a SchedulerConfig field")
        try:
            base[key] = json.loads(raw)
        except json.JSONDecodeError:
            base[key] = raw
    if args.profile == "h200-8b":  # as the engine configures itself on a GPU with CUDA graphs
        config = SchedulerConfig(**({"tpot_burst": 8.0, "prefill_coalesce_ms": 100.0} | base))
        graphs = GraphPaths(decode=True, max_rows=256, max_mean_context=256)
        true = dataclasses.replace(H200_8B_COST, mixed_s=args.mixed_s)
        return config, graphs, true, StepCost(*(1.5 * c for c in true.as_tuple()))
    config = SchedulerConfig(**({"tpot_burst": args.tpot_burst, "prefill_coalesce_ms": 0.0} | base))
    return config, GraphPaths(), TRUE_COST, PRIOR


def simulate(name: str, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    noise_rng = random.Random(args.seed + 1)
    trace = make_trace(name, args, rng)
    config, graphs, true_cost, prior = _config(args)
    sched = Scheduler(config, FakeKV(args.kv_blocks), graphs=graphs, prior_cost=prior)
    priorities = args.job_priorities or [0] * args.jobs
    for i in range(args.jobs):
        sched.add_job(FakeJob(f"job{i}", priority=priorities[i % len(priorities)], min_share=args.min_share))

    num_phases = args.phases
    phases = [Phase() for _ in range(num_phases)]
    finished: list[RequestMetrics] = []
    now, next_arrival = 0.0, 0
    while (now < args.duration or sched.has_unfinished_requests) and now < args.max_time:
        while next_arrival < len(trace) and trace[next_arrival].time <= now:
            a = trace[next_arrival]
            sched.add_request(
                RequestState(
                    f"r{next_arrival}",
                    [1] * a.prompt_len,
                    sampling=SamplingParams(max_tokens=a.max_tokens, ignore_eos=True),
                    priority=a.priority,
                    # the engine counts from the arrival (add_request's arrived_at); --count-from-add:
                    # from the moment the scheduler takes it, after the step in flight
                    arrival_time=now if args.count_from_add else a.time,
                )
            )
            next_arrival += 1
        batch = sched.schedule(now)
        if batch.is_empty:  # nothing at all to do: jump to the next arrival
            if next_arrival >= len(trace):
                break
            now = trace[next_arrival].time
            continue
        step_s = step_time(batch, sched.graphs, true_cost, noise_rng, args.noise, args.eager_tail)
        now += step_s
        events = sched.postprocess(
            batch, StepResult(now=now, step_time_s=step_s, sampled_token_ids=sampled_tokens(batch, 1))
        )
        phase = phases[min(num_phases - 1, int(num_phases * (now - step_s) / args.duration))]
        phase.steps += 1
        phase.busy_s += step_s
        phase.train_tokens += batch.num_train_tokens
        phase.batched_tokens += batch.num_batched_tokens
        for m in events.request_metrics:
            finished.append(m)
            p = phases[min(num_phases - 1, int(num_phases * m.arrival_time / args.duration))]
            p.requests += 1
            p.requests_met += int(m.met_slo)

    unfinished = len(sched.running) + len(sched.waiting)
    report(name, args=args, sched=sched, finished=finished, phases=phases, end=now, true_cost=true_cost,
           unfinished=unfinished)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def report(
    name: str,
    *,
    args: argparse.Namespace,
    sched: Scheduler,
    finished: list[RequestMetrics],
    phases: list[Phase],
    end: float,
    true_cost: StepCost = TRUE_COST,
    unfinished: int = 0,
) -> None:
    m = sched.metrics
    ttft = [x.ttft_s * 1e3 for x in finished if x.ttft_s is not None]
    tpot = [x.mean_tpot_s * 1e3 for x in finished if x.mean_tpot_s is not None]
    alone = args.max_num_batched_tokens / true_cost.predict(
        StepFeatures(train_tokens=args.max_num_batched_tokens, mixed=1, training=1)
    )
    print(f"\n== trace {name}: {len(finished)} requests over {args.duration:.0f}s (ran to {end:.1f}s)"
          + (f", {unfinished} unfinished" if unfinished else ""))
    print(
        f"SLO attainment: requests {sched.slo.request_attainment:.3f}"
        f"  (TTFT misses {sched.slo.num_ttft_misses}, TPOT misses {sched.slo.num_tpot_misses})"
        f"  token-window {sched.slo.window_attainment:.3f}"
    )
    print(f"TTFT ms  p50 {pct(ttft, 0.5):8.1f}  p90 {pct(ttft, 0.9):8.1f}  p99 {pct(ttft, 0.99):8.1f}")
    print(f"TPOT ms  p50 {pct(tpot, 0.5):8.1f}  p90 {pct(tpot, 0.9):8.1f}  p99 {pct(tpot, 0.99):8.1f}")
    total = sum(m.train_tokens_by_job.values())
    print(
        f"training: {total / end:,.0f} tok/s total = {total / end / alone:.1%} of training alone"
        f" ({alone:,.0f} tok/s); steps {m.num_steps}, preemptions {m.num_preemptions},"
        f" overruns {m.num_step_overruns}"
    )
    for job_id, n in sorted(m.train_tokens_by_job.items()):
        print(
            f"  {job_id}: {n / end:,.0f} tok/s ({n / total:.1%} of training)" if total else f"  {job_id}: 0"
        )
    print("phase  requests  attainment  train-share-of-tokens  train tok/s")
    width = args.duration / len(phases)
    for i, p in enumerate(phases):
        span = width if i < len(phases) - 1 else max(width, end - i * width)  # the last one runs to the end
        att = p.requests_met / p.requests if p.requests else math.nan
        share = p.train_tokens / p.batched_tokens if p.batched_tokens else math.nan
        print(
            f"{i * width:5.0f}s  {p.requests:8d}  {att:10.3f}  {share:21.3f}  {p.train_tokens / span:11,.0f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", choices=("poisson", "burst", "step", "unified", "all"), default="all",
                    help="unified: bench_unified's trace (use --rate 6 --duration 30)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    ap.add_argument("--rate", type=float, default=4.0, help="requests/s (base rate)")
    ap.add_argument("--burst-x", type=float, default=8.0, help="rate multiplier inside a burst")
    ap.add_argument("--burst-every", type=float, default=20.0)
    ap.add_argument("--burst-len", type=float, default=3.0)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--request-priorities", type=int, nargs="+", default=[0])
    ap.add_argument("--ttft-ms", type=float, default=1000.0)
    ap.add_argument("--tpot-ms", type=float, default=50.0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--job-priorities", type=int, nargs="*", default=None)
    ap.add_argument("--min-share", type=float, default=0.0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-prefill-chunk", type=int, default=512)
    ap.add_argument("--kv-blocks", type=int, default=4096)
    ap.add_argument("--noise", type=float, default=0.05, help="relative step-time noise")
    ap.add_argument("--eager-tail", type=float, default=0.0,
                    help="eager steps take a further 1 + this x Exp(1) times their price (host jitter)")
    ap.add_argument("--phases", type=int, default=8, help="rows of the per-phase table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", choices=("default", "h200-8b"), default="default",
                    help="cost model and engine settings: a generic GPU, or the 8B shape on an H200 with graphs")
    ap.add_argument("--lookahead", type=int, default=0, help="scheduler tpot_lookahead")
    ap.add_argument("--amortize", type=float, default=1.0, help="scheduler train_amortize")
    ap.add_argument("--mixed-s", type=float, default=0.07, help="h200-8b: the eager step's fixed price, s")
    ap.add_argument("--tpot-burst", type=float, default=1.0, help="scheduler tpot_burst (default profile)")
    ap.add_argument("--max-time", type=float, default=600.0, help="stop the simulation at this time")
    ap.add_argument("--count-from-add", action="store_true",
                    help="each request's clock starts when the scheduler takes it, not at its arrival")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a SchedulerConfig field on top of the profile's, e.g. --set ttft_headroom=0.6")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for name in ("poisson", "burst", "step") if args.trace == "all" else (args.trace,):
        simulate(name, args)


if __name__ == "__main__":
    main()
