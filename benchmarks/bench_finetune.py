"""Fine-tuning only: our engine, 4 concurrent jobs over packed 1,024-token micro-batches, vs. HF PEFT
training the same jobs one after another with a plain torch loop over padded batches (AdamW, same lr,
same clipping). Real (non-pad) tokens per second, in one process.

Both sides run under a wall-clock limit and are measured over what they did inside it.

    python -m benchmarks.bench_finetune --model 8b --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .harness import common, report
from .harness.baselines_hf import make_peft_jobs, peft_train_sequential
from .harness.common import LR, RANK, Jobs, job_data
from .harness.metrics import TrainingSummary, ratio
from .harness.models import prepare_base
from .harness.replay import add_training_jobs, cancel_jobs, make_engine, replay_engine, warmup
from .harness.workload import pack_micro_batches, padded_batches, padding_stats

PEFT = "PEFT sequential, padded"
OURS = "loquetier, concurrent, packed"


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    log = common.Logger()
    prof = args.profile
    data = job_data(args)
    all_examples = [e for _, ex in data for e in ex]
    real, padded = padding_stats(all_examples, padded_batches(all_examples, prof.peft_batch_size))
    packed = pack_micro_batches(all_examples, prof.micro_batch_tokens)
    log(
        f"{prof.num_jobs} jobs x {prof.examples_per_job} examples: {real} tokens; PEFT batches of "
        f"{prof.peft_batch_size} pad to {padded} ({1 - real / padded:.0%} padding); "
        f"{len(packed)} packed micro-batches of <= {prof.micro_batch_tokens}"
    )
    summaries: dict[str, TrainingSummary] = {}
    errors: dict[str, str] = {}

    hf, model_dir = prepare_base(args.spec, args.cache, args.device, args.dtype, seed=args.seed, log=log)
    if not args.no_baselines:
        got = common.attempt(PEFT, errors, log, peft_run, args, hf, data, log)
        if got is not None:
            summaries[PEFT] = got
    hf = None
    common.release()

    got = common.attempt(OURS, errors, log, ours_run, args, model_dir, data, log)
    if got is not None:
        summaries[OURS] = got
    common.release()

    data_sizes = {"real_tokens": real, "peft_padded_tokens": padded, "packed_micro_batches": len(packed)}
    print(write_page(args, summaries, errors, data_sizes))
    return 1 if errors else 0


def peft_run(args: argparse.Namespace, hf: Any, data: Jobs, log: common.Logger) -> TrainingSummary:
    """PEFT trains the jobs one after another over padded batches."""
    prof = args.profile
    peft_model, jobs = make_peft_jobs(
        hf, [(f"peft-{n}", ex) for n, ex in data], rank=RANK, batch_size=prof.peft_batch_size, lr=LR
    )
    return peft_train_sequential(peft_model, jobs, time_limit_s=prof.peft_train_limit_s, device=args.device, log=log)


def ours_run(args: argparse.Namespace, model_dir: Path, data: Jobs, log: common.Logger) -> TrainingSummary:
    """Our engine trains all jobs at once over packed micro-batches."""
    prof = args.profile
    engine = make_engine(
        model_dir,
        args.device,
        args.dtype,
        common.engine_limits(
            args,
            max_adapter_slots=prof.num_jobs + 1,
            num_train_slots=prof.num_jobs,
            max_lora_rank=RANK,
            max_num_batched_tokens=max(prof.max_num_batched_tokens, prof.num_jobs * prof.micro_batch_tokens),
        ),
        log,
    )
    warmup(
        engine, args.spec.vocab_size, [], training=True, micro_batch_tokens=prof.micro_batch_tokens,
        num_jobs=prof.num_jobs, log=log,
    )
    job_ids = add_training_jobs(engine, data, rank=RANK, lr=LR, micro_batch_tokens=prof.micro_batch_tokens)
    run = replay_engine(
        engine, None, time_limit_s=prof.finetune_limit_s, job_ids=job_ids, device=args.device, log=log, label=OURS
    )
    cancel_jobs(engine, job_ids)
    assert run.training is not None
    return run.training


def write_page(args: argparse.Namespace, summaries: dict[str, TrainingSummary], errors: dict[str, str],
               data_sizes: dict[str, int]) -> str:
    """Writes ``finetune.md`` / ``finetune.json`` (and the plot) under ``args.out``; returns the page."""
    prof = args.profile
    speedup = (
        ratio(summaries[OURS].real_tokens_per_s, summaries[PEFT].real_tokens_per_s)
        if OURS in summaries and PEFT in summaries
        else float("nan")
    )
    targets = [report.Target("Fine-tuning: real tokens/s vs PEFT one-after-another", ">= 2x", speedup, 2.0)]
    files = report.plot_bars(
        args.out,
        "finetune",
        {k: v.real_tokens_per_s for k, v in summaries.items()},
        "real (non-pad) training tokens/s",
    )
    sections = [
        (
            "Jobs",
            f"{prof.num_jobs} jobs, {prof.examples_per_job} synthetic examples each (log-normal prompt/"
            f"completion means {prof.prompt_mean}/{prof.output_mean}), rank {RANK} on q,k,v,o,gate,up,down, "
            f"AdamW lr {LR}, clip 1.0. Ours: packed {prof.micro_batch_tokens}-token micro-batches, all jobs "
            f"concurrent, {prof.finetune_limit_s}s. PEFT: batches of {prof.peft_batch_size} padded to the "
            f"longest, jobs one after another, {prof.peft_train_limit_s}s in equal shares.",
        ),
        (
            "Fine-tuning (run 4)",
            report.markdown_table(report.TRAINING_HEADERS, report.training_rows(summaries)),
        ),
        ("Plots", report.images_section(files)),
    ]
    if errors:
        sections.append(("Errors", "\n".join(f"- {k}: {v}" for k, v in errors.items())))
    results = {
        "training": {k: v.to_dict() for k, v in summaries.items()},
        "errors": errors,
        "data": data_sizes,
    }
    return report.write_report(
        args.out,
        "finetune",
        "Fine-tuning: concurrent packed jobs vs PEFT",
        env=common.environment(args),
        sections=sections,
        targets=targets,
        results=results,
    )


if __name__ == "__main__":
    sys.exit(main())
