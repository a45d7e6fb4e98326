"""Scheduler knobs on the service trace: SLO attainment against the training share, engine alone.

    python -m benchmarks.bench_slo_knobs --model 8b --device cuda --out $OUT
    python -m benchmarks.bench_slo_knobs --model tiny --device cpu --quick --out /tmp/knobs
    ... --variant "cap 0.3:ttft_step_share=0.3" --variant "target 0.99:slo_target=0.99"
    ... --variant "before:arrival=add_request"   # the engine counts from add_request, not the arrival

The trace and the 4 training jobs of ``bench_service`` (same seed, same SmolLM2-vocabulary model,
the engine built from the worker's own settings) replayed into one engine once per variant of the
scheduler's knobs (``SchedulerConfig`` fields set on top of the defaults, fresh jobs each time),
then the jobs alone once (the training-only rate). Every variant sees the same requests at the same
times, each from a cold prefix cache (``BlockManager.drop_cached``: the prompts repeat, and cached
prefixes would make every replay after the first one cheaper); the step model keeps what it learned
from one replay to the next, as a long-running worker's does, and a first replay of the defaults,
not reported, lets it fit the served mix before any variant counts. The default variants alternate
(A, B, A, B), so the drift between two runs of the same knobs is measured in the same run.

Writes ``slo_knobs.json`` (with its ``targets``: the issue-21 SLO and training-share goals, for the
defaults) and ``slo_knobs.md``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import fields, replace
from typing import Any

from .bench_service import engine_limits, ensure_model, parse_args, workload
from .harness import common, report
from .harness.metrics import DEFAULT_TPOT_S, DEFAULT_TTFT_S, summarize_serving
from .harness.models import adapter_ranks, write_adapters

# not a SchedulerConfig field: "add_request" replays without ``arrived_at`` (the engine then counts each
# request from the moment it took it, after the step in flight, and plans with that much more slack)
ARRIVAL = "arrival"

DEFAULT_VARIANTS = [
    ("defaults", {}),
    ("planned at the fit's mean", {"plan_quantile": 0.0}),
    ("defaults again", {}),
    ("planned at the fit's mean again", {"plan_quantile": 0.0}),
]


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:field=value,field=value"`` (values as JSON, else strings) -> (NAME, overrides)."""
    from loquetier.engine.scheduling import SchedulerConfig

    name, _, body = text.partition(":")
    known = {f.name for f in fields(SchedulerConfig)}
    knobs: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        key = key.strip()
        if key == ARRIVAL:
            if raw.strip() not in ("trace", "add_request"):
                raise SystemExit(f"--variant {text!r}: {ARRIVAL} is 'trace' or 'add_request'")
            knobs[key] = raw.strip()
            continue
        if key not in known:
            raise SystemExit(f"--variant {text!r}: {key!r} is not a SchedulerConfig field")
        knobs[key] = common._parse_value(raw.strip())
    # refuse what the scheduler would refuse, before any model is built
    SchedulerConfig(**{k: v for k, v in knobs.items() if k != ARRIVAL})
    return name.strip() or body, knobs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    variants: list[tuple[str, dict[str, Any]]] = []
    while "--variant" in argv:
        i = argv.index("--variant")
        variants.append(parse_variant(argv[i + 1]))
        del argv[i : i + 2]
    variants = variants or DEFAULT_VARIANTS
    args = parse_args(argv)
    log = common.Logger()
    from .harness.replay import add_training_jobs, cancel_jobs, make_engine, replay_engine, warmup

    prof, dev, spec = args.profile, args.device, args.spec
    model_dir = ensure_model(spec, args.cache, dev, args.dtype, args.seed, log)
    trace, ids, jobs = workload(args)
    adapter_root = args.cache / f"adapters-{spec.name}-r16"
    write_adapters(spec, adapter_root, ids, adapter_ranks(len(ids), False), seed=args.seed, log=log)
    engine = make_engine(model_dir, dev, args.dtype, engine_limits(args), log)
    for a in ids:
        engine.load_adapter(a, adapter_root / a)
    warmup(engine, spec.vocab_size, ids, training=True, micro_batch_tokens=prof.micro_batch_tokens,
           num_jobs=prof.num_jobs, log=log)
    base = engine.scheduler.config
    errors: dict[str, str] = {}
    results: dict[str, Any] = {"variants": {}, "trace": trace.meta, "base_config": {
        f.name: getattr(base, f.name) for f in fields(base)}}

    def one(tag: str, knobs: dict[str, Any]) -> dict[str, Any]:
        engine.scheduler.config = replace(base, **{k: v for k, v in knobs.items() if k != ARRIVAL})
        engine.scheduler.train_scale.reset()
        dropped = engine.blocks.drop_cached()
        overruns = engine.scheduler.metrics.num_step_overruns
        job_ids = add_training_jobs(engine, [(f"{tag}-{k}", ex) for k, (_, ex) in enumerate(jobs)],
                                    rank=common.RANK, lr=common.LR, micro_batch_tokens=prof.micro_batch_tokens,
                                    epochs=1)
        try:
            run = replay_engine(engine, trace.renamed(tag), time_limit_s=prof.serve_limit_s, job_ids=job_ids,
                                ttft_ms=DEFAULT_TTFT_S * 1e3, tpot_ms=DEFAULT_TPOT_S * 1e3, device=dev, log=log,
                                label=tag, arrival_from_trace=knobs.get(ARRIVAL, "trace") == "trace")
        finally:
            cancel_jobs(engine, job_ids)
        s = summarize_serving(run.records, run.window_s)
        t0 = min((r.arrival_s for r in run.records), default=0.0)
        misses = [{"arrival_s": round(r.arrival_s - t0, 3), "ttft_ms": round(r.ttft_s * 1e3, 1),
                   "tpot_ms": None if r.tpot_s is None else round(r.tpot_s * 1e3, 1),
                   "prompt_tokens": r.num_prompt_tokens, "finished": r.is_finished}
                  for r in sorted(run.records, key=lambda r: r.arrival_s)
                  if not r.meets_slo(DEFAULT_TTFT_S, DEFAULT_TPOT_S)]
        return {"knobs": knobs, "summary": s.to_dict(), "misses": misses, "prefixes_dropped": dropped,
                "training_tokens_per_s": run.training.real_tokens_per_s if run.training else math.nan,
                "step_overruns": engine.scheduler.metrics.num_step_overruns - overruns}

    # a first replay, not reported: the step-time model fits the served mix (the warm-up's steps are
    # not this trace's), which otherwise makes whichever variant comes first look worse
    if common.attempt("warm-up replay", errors, log, one, "w", {}) is not None:
        log("[warm-up replay] done (not reported)")
    for k, (name, knobs) in enumerate(variants):
        r = common.attempt(name, errors, log, one, f"v{k}", knobs)
        if r is not None:
            results["variants"][name] = r
            s = r["summary"]
            log(f"[{name}] SLO {s['slo_attainment']:.1%}, TTFT p99 {s['ttft_p99_s'] * 1e3:.0f} ms, "
                f"{s['output_tokens_per_s']:.0f} out tok/s, training {r['training_tokens_per_s']:.0f} tok/s")
    engine.scheduler.config = base

    def train_only() -> float:
        job_ids = add_training_jobs(engine, [(f"train-{k}", ex) for k, (_, ex) in enumerate(jobs)],
                                    rank=common.RANK, lr=common.LR, micro_batch_tokens=prof.micro_batch_tokens,
                                    epochs=1)
        try:
            run = replay_engine(engine, None, time_limit_s=prof.train_only_s, job_ids=job_ids, device=dev, log=log,
                                label="training only")
        finally:
            cancel_jobs(engine, job_ids)
        return run.training.real_tokens_per_s if run.training else math.nan

    alone = common.attempt("training only", errors, log, train_only)
    results["training_only_tokens_per_s"] = alone
    print(write(args, results, errors))
    return 1 if errors else 0


def write(args: Any, results: dict[str, Any], errors: dict[str, str]) -> str:
    alone = results.get("training_only_tokens_per_s") or math.nan
    rows = []
    for name, r in results["variants"].items():
        s = r["summary"]
        share = r["training_tokens_per_s"] / alone if alone and math.isfinite(alone) else math.nan
        r["training_share"] = share
        rows.append([name, ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "–",
                     f"{s['slo_attainment']:.1%}", report.fmt(s["ttft_p50_s"] * 1e3), report.fmt(s["ttft_p99_s"] * 1e3),
                     report.fmt(s["tpot_p99_s"] * 1e3, 1), report.fmt(s["output_tokens_per_s"]),
                     report.fmt(r["training_tokens_per_s"]), report.fmt(share, 3), r["step_overruns"]])
    trace = results["trace"]
    setup = (f"Engine alone, built from the worker's settings (`EngineSettings`), 32 rank-16 adapters; the trace "
             f"of `bench_service` ({trace.get('num_requests', '?')} requests, {trace.get('pattern', 'poisson')}, "
             f"{trace.get('rate', '?')}/s for {trace.get('duration_s', '?')} s) with its 4 training jobs, replayed "
             f"once per variant in this order after one unreported replay of the defaults (the step model fits the "
             f"served mix); training only: {report.fmt(alone)} tok/s. SLO "
             f"{DEFAULT_TTFT_S:.0f} s TTFT / {DEFAULT_TPOT_S * 1e3:.0f} ms TPOT. Step overruns: steps that ran past "
             "their planned time budget, in the replay.")
    sections = [("Setup", setup),
                ("Variants", report.markdown_table(
                    ["variant", "knobs", "SLO att.", "TTFT p50 ms", "TTFT p99 ms", "TPOT p99 ms", "out tok/s",
                     "training tok/s", "of training only", "step overruns"], rows))]
    missed = [f"- {name}: " + ("; ".join(
        f"{m['arrival_s']:.2f} s ({m['ttft_ms']:.0f} ms"
        + (f", {m['tpot_ms']:.0f} ms/token" if m["tpot_ms"] is not None else "") + ")"
        for m in r["misses"][:12]) or "none") + (" ..." if len(r["misses"]) > 12 else "")
        for name, r in results["variants"].items()]
    sections.append(("Requests that missed",
                     "Each missed request's arrival (seconds into the trace) and its TTFT (and mean TPOT):\n\n"
                     + "\n".join(missed)))
    if errors:
        sections.append(("Errors", "\n".join(f"- {k}: {v}" for k, v in errors.items())))
    d = results["variants"].get("defaults")
    slo = d["summary"]["slo_attainment"] if d else math.nan
    share = d["training_share"] if d else math.nan
    targets = [report.Target("SLO attainment with 4 jobs training, defaults", ">= 0.99", slo, 0.99),
               report.Target("Training beside the trace / training only, defaults", ">= 0.5x", share, 0.5)]
    return report.write_report(args.out, "slo_knobs", "Scheduler knobs on the service trace",
                               env=common.environment(args), sections=sections, targets=targets,
                               results={**results, "errors": errors})


if __name__ == "__main__":
    sys.exit(main())
