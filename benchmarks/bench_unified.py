"""Unified serving + fine-tuning, in one process.

The inference trace follows the step-rate pattern (the rate steps up and back down) over 32 rank-16
adapters; every request carries the TTFT / TPOT targets (1 s / 60 ms). Systems, in this order:

1. PEFT alternating: one HF training step (jobs round-robin), then one PEFT ``generate`` batch;
2. our engine, training only: the 4 jobs alone (the training ceiling);
3. our engine, serving only: the trace alone;
4. our engine, unified: the 4 jobs and the trace together; the window ends when the trace is served.

    python -m benchmarks.bench_unified --model 8b --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

from .harness import common, report
from .harness.baselines_hf import make_peft_jobs, replay_peft_unified
from .harness.common import LR, RANK, Jobs, job_data
from .harness.metrics import (
    DEFAULT_TPOT_S,
    DEFAULT_TTFT_S,
    RequestRecord,
    ServingSummary,
    TrainingSummary,
    ratio,
    summarize_serving,
)
from .harness.models import adapter_ranks, prepare_adapters, prepare_base, write_adapters
from .harness.replay import add_training_jobs, cancel_jobs, make_engine, replay_engine, warmup
from .harness.workload import Trace, make_trace

PEFT = "PEFT alternating (train step / generate batch)"
TRAIN_ONLY = "loquetier training only"
SERVE_ONLY = "loquetier serving only"
UNIFIED = "loquetier unified"
BORROW = "loquetier unified, tpot_lookahead {}"


@dataclass
class Measured:
    """What the replays measured, by system label, and what failed."""

    serving: dict[str, tuple[list[RequestRecord], ServingSummary]] = field(default_factory=dict)
    training: dict[str, TrainingSummary] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    log = common.Logger()
    spec, prof = args.spec, args.profile
    n = prof.num_adapters
    ids16 = [f"r16-{i:02d}" for i in range(n)]
    trace = make_trace(
        pattern="step",
        rate=prof.unified_rate,
        duration_s=prof.unified_duration_s,
        vocab_size=spec.vocab_size,
        max_context=prof.max_context,
        prompt_mean=prof.prompt_mean,
        output_mean=prof.output_mean,
        adapter_ids=ids16,
        popularity="uniform",
        seed=args.seed + 3,
    )
    data = job_data(args)
    log(
        f"trace: {len(trace)} requests over {trace.duration_s:.1f}s (step-rate pattern); "
        f"{len(data)} jobs x {prof.examples_per_job} examples"
    )
    out = Measured()
    hf, model_dir = prepare_base(spec, args.cache, args.device, args.dtype, seed=args.seed, log=log)
    adapters16 = args.cache / f"adapters-{spec.name}-r16"
    if args.no_baselines:  # our engine alone: adapters written directly, no PEFT model
        peft_model = None
        write_adapters(spec, adapters16, ids16, adapter_ranks(n, False), seed=args.seed, log=log)
    else:
        peft_model = prepare_adapters(hf, adapters16, ids16, adapter_ranks(n, False), seed=args.seed, log=log)
        common.attempt(PEFT, out.errors, log, peft_run, args, peft_model, trace, data, out, log)
    hf = peft_model = None
    common.release()

    engine = make_engine(
        model_dir,
        args.device,
        args.dtype,
        common.engine_limits(
            args,
            max_adapter_slots=n + prof.num_jobs,
            num_train_slots=prof.num_jobs,
            max_lora_rank=RANK,
            max_num_batched_tokens=max(prof.max_num_batched_tokens, prof.num_jobs * prof.micro_batch_tokens),
        ),
        log,
    )
    for a in ids16:
        engine.load_adapter(a, adapters16 / a)
    warmup(engine, spec.vocab_size, ids16, training=True, micro_batch_tokens=prof.micro_batch_tokens,
           num_jobs=prof.num_jobs, log=log)
    borrow = BORROW.format(args.lookahead)
    Replays(engine, args, trace, data, out, log).run_all(borrow)
    engine = None
    common.release()
    print(write_page(args, trace, out, borrow))
    return 1 if out.errors else 0


def peft_run(args: argparse.Namespace, peft_model: Any, trace: Trace, data: Jobs, out: Measured,
             log: common.Logger) -> None:
    """PEFT alternates one training step (jobs round-robin) with one ``generate`` batch."""
    prof = args.profile
    model, jobs = make_peft_jobs(
        peft_model,
        [(f"peft-{k}", ex) for k, ex in data],
        rank=RANK,
        batch_size=prof.peft_batch_size,
        lr=LR,
    )
    records, window, train = replay_peft_unified(
        model,
        trace,
        jobs,
        max_batch=prof.max_batch,
        time_limit_s=prof.unified_limit_s,
        device=args.device,
        log=log,
    )
    out.serving[PEFT] = (records, summarize_serving(records, window))
    out.training[PEFT] = train


class Replays:
    """Our engine's replays of the run, each recording into ``out``: training only, serving only, unified."""

    def __init__(self, engine: Any, args: argparse.Namespace, trace: Trace, data: Jobs, out: Measured,
                 log: common.Logger) -> None:
        self.engine, self.args, self.trace, self.data, self.out, self.log = engine, args, trace, data, out, log
        self.slo: dict[str, Any] = {"ttft_ms": DEFAULT_TTFT_S * 1e3, "tpot_ms": DEFAULT_TPOT_S * 1e3}

    def run_all(self, borrow: str) -> None:
        """Training only, serving only, unified; then unified with ``--lookahead`` unless that is the
        engine's default (label ``borrow``). A failed replay is recorded and the next one runs."""
        runs = [(TRAIN_ONLY, self.train_only), (SERVE_ONLY, self.serve_only), (UNIFIED, self.unified)]
        if self.args.lookahead != self.engine.scheduler.config.tpot_lookahead:
            runs.append((borrow, lambda: self.unified_borrowing(borrow)))
        for label, fn in runs:
            common.attempt(label, self.out.errors, self.log, fn)

    def _jobs(self, tag: str) -> list[str]:
        return add_training_jobs(
            self.engine,
            [(f"{tag}-{name}", ex) for name, ex in self.data],
            rank=RANK,
            lr=LR,
            micro_batch_tokens=self.args.profile.micro_batch_tokens,
        )

    def train_only(self) -> None:
        job_ids = self._jobs("solo")
        run = replay_engine(
            self.engine,
            None,
            time_limit_s=self.args.profile.train_only_s,
            job_ids=job_ids,
            device=self.args.device,
            log=self.log,
            label=TRAIN_ONLY,
        )
        cancel_jobs(self.engine, job_ids)
        assert run.training is not None
        self.out.training[TRAIN_ONLY] = run.training

    def serve_only(self) -> None:
        run = replay_engine(
            self.engine,
            self.trace.renamed("serve"),
            time_limit_s=self.args.profile.unified_limit_s,
            device=self.args.device,
            log=self.log,
            label=SERVE_ONLY,
            **self.slo,
        )
        self.out.serving[SERVE_ONLY] = (run.records, summarize_serving(run.records, run.window_s))

    def unified(self, label: str = UNIFIED, tag: str = "uni") -> None:
        job_ids = self._jobs(tag)
        run = replay_engine(
            self.engine,
            self.trace.renamed(tag),
            time_limit_s=self.args.profile.unified_limit_s,
            job_ids=job_ids,
            device=self.args.device,
            log=self.log,
            label=label,
            **self.slo,
        )
        cancel_jobs(self.engine, job_ids)
        self.out.serving[label] = (run.records, summarize_serving(run.records, run.window_s))
        assert run.training is not None
        self.out.training[label] = run.training

    def unified_borrowing(self, label: str) -> None:
        """The unified replay with training allowed to borrow against the decoders' next tokens."""
        default = self.engine.scheduler.config
        self.engine.scheduler.config = dataclasses.replace(default, tpot_lookahead=self.args.lookahead)
        try:
            self.unified(label, "uni-la")
        finally:
            self.engine.scheduler.config = default


def write_page(args: argparse.Namespace, trace: Trace, out: Measured, borrow: str) -> str:
    """Writes ``unified.md`` / ``unified.json`` (and the plots) under ``args.out``; returns the page."""
    prof = args.profile
    summaries = {k: v[1] for k, v in out.serving.items()}
    targets = unified_targets(summaries, out.training, borrow)
    files = report.plot_timeline(
        args.out, "unified_ttft", {k: v[0] for k, v in out.serving.items()}, max(trace.duration_s, 1.0)
    )
    files += report.plot_bars(
        args.out, "unified_train", {k: v.real_tokens_per_s for k, v in out.training.items()}, "training tokens/s"
    )
    sections = [
        (
            "Workload",
            f"{len(trace)} requests, step-rate pattern around {prof.unified_rate}/s for "
            f"{prof.unified_duration_s}s, {prof.num_adapters} rank-16 adapters uniform; SLO {DEFAULT_TTFT_S:.0f} s "
            f"TTFT / {DEFAULT_TPOT_S * 1e3:.0f} ms TPOT; {prof.num_jobs} fine-tuning jobs (rank {RANK}, "
            f"{prof.micro_batch_tokens}-token micro-batches).",
        ),
        ("Serving", report.markdown_table(report.SERVING_HEADERS, report.serving_rows(summaries))),
        ("Training", report.markdown_table(report.TRAINING_HEADERS, report.training_rows(out.training))),
        ("Plots", report.images_section(files)),
    ]
    if out.errors:
        sections.append(("Errors", "\n".join(f"- {k}: {v}" for k, v in out.errors.items())))
    results = {
        "serving": {k: v.to_dict() for k, v in summaries.items()},
        "training": {k: v.to_dict() for k, v in out.training.items()},
        "trace": trace.meta,
        "errors": out.errors,
    }
    return report.write_report(
        args.out,
        "unified",
        "Unified serving + fine-tuning",
        env=common.environment(args),
        sections=sections,
        targets=targets,
        results=results,
    )


def unified_targets(
    s: dict[str, ServingSummary], t: dict[str, TrainingSummary], borrow: str = ""
) -> list[report.Target]:
    nan = float("nan")
    att = s[UNIFIED].slo_attainment if UNIFIED in s else nan
    share = (
        ratio(t[UNIFIED].real_tokens_per_s, t[TRAIN_ONLY].real_tokens_per_s)
        if UNIFIED in t and TRAIN_ONLY in t
        else nan
    )
    extra = []
    if borrow in s and borrow in t and TRAIN_ONLY in t:
        extra = [
            report.Target(f"{borrow}: SLO attainment", "(info)", s[borrow].slo_attainment, 0.99),
            report.Target(f"{borrow}: training share", "(info)",
                          ratio(t[borrow].real_tokens_per_s, t[TRAIN_ONLY].real_tokens_per_s), 0.5),
        ]
    return [
        report.Target("Unified: SLO attainment (1 s / 60 ms) with 4 jobs", ">= 0.99", att, 0.99),
        report.Target("Unified: training tokens/s / training-only", ">= 0.5", share, 0.5),
        report.Target(
            "Unified: admitted-within-6 s attainment",
            ">= 0.99 (info)",
            s[UNIFIED].admit6_attainment if UNIFIED in s else nan,
            0.99,
        ),
        report.Target(
            "Serving only: SLO attainment",
            "(info)",
            s[SERVE_ONLY].slo_attainment if SERVE_ONLY in s else nan,
            0.99,
        ),
        report.Target(
            "PEFT alternating: SLO attainment",
            "(report)",
            s[PEFT].slo_attainment if PEFT in s else nan,
            0.99,
            note=f"admit<=6s {report.fmt(s[PEFT].admit6_attainment, 3) if PEFT in s else 'n/a'}",
        ),
        *extra,
    ]


if __name__ == "__main__":
    sys.exit(main())
