"""Serving: LoRA overhead, and inference vs HF PEFT / transformers, in one process.

One saturating Poisson trace (32 adapters, uniform popularity, ShareGPT-like lengths) is replayed
against, in this order:

1. transformers ``generate`` on the base model, no adapters (requests batched as a user would);
2. PEFT mixed-adapter ``generate`` (``adapter_names``) with the 32 adapters resident;
3. our engine, no adapters (the same requests with ``adapter_id=None``);
4. our engine, 32 rank-16 adapters;
5. our engine, 32 mixed-rank adapters (8/16/64);

then decode steps at batch 64 are timed on our engine (no adapters, and 64 rows over 32 adapters)
and compared with the memory floor (weight bytes / 4.27 TB/s). The HF baselines run under a wall-clock
limit and are measured at the rate they produced tokens; requests they never served count as misses.

    python -m benchmarks.bench_serving --model 8b --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import common, report
from .harness.baselines_hf import replay_hf
from .harness.metrics import (
    DEFAULT_TPOT_S,
    DEFAULT_TTFT_S,
    H200_BANDWIDTH_BPS,
    RequestRecord,
    ServingSummary,
    decode_floor_s,
    kv_bytes_read,
    ratio,
    summarize_serving,
)
from .harness.models import adapter_ranks, prepare_adapters, prepare_base, write_adapters
from .harness.replay import decode_step_times, make_engine, replay_engine, warmup
from .harness.workload import Trace, make_trace

BASE_HF = "transformers base (no adapters)"
PEFT = "PEFT mixed (32 adapters)"
OURS_BASE = "loquetier (no adapters)"
OURS_R16 = "loquetier (32 adapters r16)"
OURS_MIXED = "loquetier (32 adapters r8/16/64)"
OURS_R16_SYNC = "loquetier (32 adapters r16, async steps off)"
OURS_R16_AGAIN = "loquetier (32 adapters r16, async steps on, again)"


LOAD_MIXED = "load mixed-rank adapters"


@dataclass
class Measured:
    """What the replays measured, by system label, and what failed."""

    runs: dict[str, tuple[list[RequestRecord], ServingSummary]] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def record(self, label: str, got: tuple[list[RequestRecord], float] | None) -> None:
        if got is not None:
            self.runs[label] = (got[0], summarize_serving(got[0], got[1]))


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    log = common.Logger()
    spec, prof = args.spec, args.profile
    n = prof.num_adapters
    ids16 = [f"r16-{i:02d}" for i in range(n)]
    ids_mixed = [f"mixed-{i:02d}" for i in range(n)]
    trace = make_trace(
        pattern="poisson",
        rate=prof.rate,
        duration_s=prof.duration_s,
        vocab_size=spec.vocab_size,
        max_context=prof.max_context,
        prompt_mean=prof.prompt_mean,
        output_mean=prof.output_mean,
        adapter_ids=ids16,
        popularity="uniform",
        seed=args.seed,
    )
    to_mixed = dict(zip(ids16, ids_mixed, strict=True))
    mixed_trace = trace.with_adapters(
        [to_mixed[r.adapter_id] if r.adapter_id else None for r in trace.requests]
    )
    log(f"trace: {len(trace)} requests over {trace.duration_s:.1f}s, {trace.num_output_tokens} output tokens")
    out = Measured()
    model_dir = run_baselines(args, trace, ids16, ids_mixed, out, log)
    run_engine(args, model_dir, trace, mixed_trace, ids16, ids_mixed, out, log)
    print(write_page(args, trace, out))
    return 1 if out.errors else 0


def run_baselines(args: argparse.Namespace, trace: Trace, ids16: list[str], ids_mixed: list[str], out: Measured,
                  log: common.Logger) -> Path:
    """Builds the base model and both adapter sets, replays transformers and PEFT (unless
    ``--no-baselines``); returns the model directory our engine loads."""
    spec, prof, dev, n = args.spec, args.profile, args.device, args.profile.num_adapters
    hf, model_dir = prepare_base(spec, args.cache, dev, args.dtype, seed=args.seed, log=log)
    hf_kw = {"max_batch": prof.max_batch, "time_limit_s": prof.baseline_limit_s, "device": dev, "log": log}
    if not args.no_baselines:
        out.record(
            BASE_HF,
            common.attempt(
                BASE_HF, out.errors, log, replay_hf, hf, trace.without_adapters(), use_adapters=False, **hf_kw
            ),
        )
    peft_model = prepare_adapters(hf, _adapter_dir(args, "r16"), ids16, adapter_ranks(n, False), seed=args.seed,
                                  log=log)
    if not args.no_mixed_ranks:
        write_adapters(spec, _adapter_dir(args, "mixed"), ids_mixed, adapter_ranks(n, True), seed=args.seed + 1,
                       log=log)
    if not args.no_baselines:
        out.record(
            PEFT, common.attempt(PEFT, out.errors, log, replay_hf, peft_model, trace, use_adapters=True, **hf_kw)
        )
    del hf, peft_model
    common.release()
    return model_dir


def run_engine(args: argparse.Namespace, model_dir: Path, trace: Trace, mixed_trace: Trace, ids16: list[str],
               ids_mixed: list[str], out: Measured, log: common.Logger) -> None:
    """Our engine: the trace without adapters, with 32 rank-16 adapters, decode steps at the decode
    batch, then (unless ``--no-mixed-ranks``) the trace over mixed-rank adapters."""
    prof, dev = args.profile, args.device
    adapters16, adapters_mixed = _adapter_dir(args, "r16"), _adapter_dir(args, "mixed")
    engine = make_engine(
        model_dir,
        dev,
        args.dtype,
        common.engine_limits(args, max_adapter_slots=prof.num_adapters, num_train_slots=0, max_lora_rank=64),
        log,
    )
    for a in ids16:
        engine.load_adapter(a, adapters16 / a)
    warmup(engine, args.spec.vocab_size, ids16, training=False, log=log)

    def serve(label: str, tr: Trace) -> tuple[list[RequestRecord], float]:
        run = replay_engine(engine, tr, time_limit_s=prof.serve_limit_s, device=dev, log=log, label=label,
                            ttft_ms=DEFAULT_TTFT_S * 1e3, tpot_ms=DEFAULT_TPOT_S * 1e3)
        log(f"[{label}] scheduler: {run.stats.get('scheduler', {})}; asynchronous steps so far: "
            f"{engine.steps.num_launched}")
        return run.records, run.window_s

    out.record(
        OURS_BASE,
        common.attempt(OURS_BASE, out.errors, log, serve, OURS_BASE, trace.without_adapters().renamed("base")),
    )
    out.record(OURS_R16, common.attempt(OURS_R16, out.errors, log, serve, OURS_R16, trace.renamed("r16")))
    if args.async_ab:  # the same trace with asynchronous steps off, then on again (drift between replays)
        for label, on, tag in ((OURS_R16_SYNC, False, "r16-sync"), (OURS_R16_AGAIN, True, "r16-again")):
            engine.steps.enabled = on
            out.record(label, common.attempt(label, out.errors, log, serve, label, trace.renamed(tag)))
        engine.steps.enabled = True

    # decode steps at batch 64: no adapters, and every row on an adapter (32 adapters, 2 rows each)
    for label, ids in (("no adapters", []), ("32 adapters r16", ids16)):
        got = common.attempt(f"decode {label}", out.errors, log, decode_step, engine, args, ids, len(out.decode))
        if got is not None:
            out.decode[label] = got
            log(
                f"decode b={prof.decode_batch} {label}: {got['median_ms']:.2f} ms = "
                f"{got['x_floor_weights']:.2f}x weight floor"
            )

    def swap_to_mixed() -> None:
        for a in ids16:
            engine.unload_adapter(a)
        for a in ids_mixed:
            engine.load_adapter(a, adapters_mixed / a)

    if not args.no_mixed_ranks:
        common.attempt(LOAD_MIXED, out.errors, log, swap_to_mixed)
        if LOAD_MIXED not in out.errors:
            out.record(
                OURS_MIXED,
                common.attempt(OURS_MIXED, out.errors, log, serve, OURS_MIXED, mixed_trace.renamed("mixed")),
            )
    engine = None
    common.release()


def _adapter_dir(args: argparse.Namespace, kind: str) -> Path:
    return args.cache / f"adapters-{args.spec.name}-{kind}"  # type: ignore[no-any-return]


def write_page(args: argparse.Namespace, trace: Trace, out: Measured) -> str:
    """Writes ``serving.md`` / ``serving.json`` (and the plots) under ``args.out``; returns the page."""
    prof = args.profile
    summaries = {k: v[1] for k, v in out.runs.items()}
    targets = serving_targets(summaries, out.decode)
    files = report.plot_serving(args.out, "serving", out.runs)
    decode_rows = [
        [k, v["median_ms"], v["floor_weights_ms"], v["x_floor_weights"], v["floor_all_ms"], v["x_floor_all"]]
        for k, v in out.decode.items()
    ]
    decode_headers = ["rows", "median ms", "weight floor ms", "x weight floor", "floor incl. KV+LoRA ms",
                      "x full floor"]
    sections = [
        (
            "Trace",
            f"{len(trace)} requests, Poisson {prof.rate}/s for {prof.duration_s}s, {prof.num_adapters} adapters "
            f"uniform, prompt/output log-normal means {prof.prompt_mean}/{prof.output_mean}; "
            f"SLO {DEFAULT_TTFT_S:.0f} s TTFT / {DEFAULT_TPOT_S * 1e3:.0f} ms TPOT; HF batch "
            f"{prof.max_batch}, HF wall limit {prof.baseline_limit_s}s.",
        ),
        (
            "Serving (runs 1 and 2)",
            report.markdown_table(report.SERVING_HEADERS, report.serving_rows(summaries)),
        ),
        (
            f"Decode step at batch {prof.decode_batch}",
            report.markdown_table(decode_headers, decode_rows)
            + f"\n\nFloor: bytes / {H200_BANDWIDTH_BPS / 1e12:.2f} TB/s (H200 copy bandwidth).",
        ),
        ("Plots", report.images_section(files)),
    ]
    if out.errors:
        sections.append(("Errors", "\n".join(f"- {k}: {v}" for k, v in out.errors.items())))
    results = {
        "serving": {k: s.to_dict() for k, s in summaries.items()},
        "decode": out.decode,
        "trace": trace.meta,
        "errors": out.errors,
    }
    return report.write_report(
        args.out,
        "serving",
        "Serving: LoRA overhead and inference vs PEFT",
        env=common.environment(args),
        sections=sections,
        targets=targets,
        results=results,
    )


def decode_step(engine: Any, args: Any, adapter_ids: list[str], seed: int) -> dict[str, float]:
    spec, prof = args.spec, args.profile
    times, ctx = decode_step_times(
        engine,
        batch=prof.decode_batch,
        prompt_len=prof.decode_prompt_len,
        num_steps=prof.decode_steps,
        vocab_size=spec.vocab_size,
        adapter_ids=adapter_ids,
        device=args.device,
        seed=seed,
    )
    floor_w = decode_floor_s(spec.decode_weight_bytes())
    kv = kv_bytes_read([ctx] * prof.decode_batch, spec.num_layers, spec.num_kv_heads, spec.head_dim)
    floor_all = decode_floor_s(spec.decode_weight_bytes(), kv + spec.lora_bytes(16) * len(set(adapter_ids)))
    med = statistics.median(times)
    return {
        "median_ms": med * 1e3,
        "min_ms": min(times) * 1e3,
        "steps": len(times),
        "floor_weights_ms": floor_w * 1e3,
        "floor_all_ms": floor_all * 1e3,
        "x_floor_weights": med / floor_w,
        "x_floor_all": med / floor_all,
    }


def serving_targets(s: dict[str, ServingSummary], decode: dict[str, Any]) -> list[report.Target]:
    nan = float("nan")

    def tps(label: str) -> float:
        return s[label].output_tokens_per_s if label in s else nan

    def p99(label: str) -> float:
        return s[label].ttft_p99_s if label in s else nan

    ours = OURS_R16
    targets = []
    if OURS_R16_SYNC in s:
        targets.append(report.Target(
            "Asynchronous steps: on / off (32 adapters), out tok/s",
            ">= 1.0x (info)",
            ratio(min(tps(OURS_R16), tps(OURS_R16_AGAIN)), tps(OURS_R16_SYNC)),
            1.0,
            note="the lower of the two replays with them on",
        ))
    targets += [
        report.Target(
            "LoRA overhead: 32 adapters / no adapters, out tok/s",
            ">= 0.85x",
            ratio(tps(ours), tps(OURS_BASE)),
            0.85,
        ),
        report.Target(
            "LoRA overhead, mixed ranks 8/16/64 / no adapters",
            ">= 0.85x (info)",
            ratio(tps(OURS_MIXED), tps(OURS_BASE)),
            0.85,
        ),
        report.Target(
            "Inference vs PEFT mixed, out tok/s",
            ">= 100x at <= p99 TTFT",
            ratio(tps(ours), tps(PEFT)),
            100.0,
            extra_ok=not p99(ours) > p99(PEFT),
            note=f"p99 TTFT {report.fmt(p99(ours), 2)} s vs {report.fmt(p99(PEFT), 2)} s",
        ),
        report.Target(
            "Inference (32 adapters) vs transformers base, out tok/s",
            ">= 3x at <= p99 TTFT",
            ratio(tps(ours), tps(BASE_HF)),
            3.0,
            extra_ok=not p99(ours) > p99(BASE_HF),
            note=f"p99 TTFT {report.fmt(p99(ours), 2)} s vs {report.fmt(p99(BASE_HF), 2)} s",
        ),
    ]
    if "no adapters" in decode:
        targets.append(
            report.Target(
                "Decode step at batch 64 / weight floor",
                "<= 1.5x",
                decode["no adapters"]["x_floor_weights"],
                1.5,
                higher_is_better=False,
                note=f"{decode['no adapters']['median_ms']:.2f} ms",
            )
        )
    if "32 adapters r16" in decode:
        targets.append(
            report.Target(
                "Decode step at batch 64, 32 adapters / weight floor",
                "<= 1.5x (info)",
                decode["32 adapters r16"]["x_floor_weights"],
                1.5,
                higher_is_better=False,
                note=f"{decode['32 adapters r16']['median_ms']:.2f} ms",
            )
        )
    return targets


if __name__ == "__main__":
    sys.exit(main())
