"""Run 4 of issue 9: fine-tuning only. Our engine, 4 concurrent jobs over packed 1,024-token
micro-batches, vs. HF PEFT training the same jobs one after another with a plain torch loop over
padded batches (AdamW, same lr, same clipping). Real (non-pad) tokens per second, in one process.

Both sides run under a wall-clock limit and are measured over what they did inside it.

    python -m benchmarks.bench_finetune --model 8b --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import sys

from .harness import common, report
from .harness.baselines_hf import make_peft_jobs, peft_train_sequential
from .harness.metrics import TrainingSummary, ratio
from .harness.models import prepare_base
from .harness.replay import add_training_jobs, cancel_jobs, make_engine, replay_engine, warmup
from .harness.workload import pack_micro_batches, padded_batches, padding_stats, synthetic_examples

PEFT = "PEFT sequential, padded"
OURS = "loquetier, concurrent, packed"
LR = 1e-4
RANK = 16


def job_data(args: argparse.Namespace) -> list[tuple[str, list[dict[str, list[int]]]]]:
    prof = args.profile
    return [
        (
            f"ft-{k}",
            synthetic_examples(
                prof.examples_per_job,
                args.spec.vocab_size,
                args.seed + 17 * k,
                prompt_mean=prof.prompt_mean,
                completion_mean=prof.output_mean,
                max_tokens=prof.micro_batch_tokens,
            ),
        )
        for k in range(prof.num_jobs)
    ]


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    log = common.Logger()
    spec, prof, dev, dtype = args.spec, args.profile, args.device, args.dtype
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

    hf, model_dir = prepare_base(spec, args.cache, dev, dtype, seed=args.seed, log=log)
    if not args.no_baselines:

        def peft_run() -> TrainingSummary:
            peft_model, jobs = make_peft_jobs(
                hf, [(f"peft-{n}", ex) for n, ex in data], rank=RANK, batch_size=prof.peft_batch_size, lr=LR
            )
            return peft_train_sequential(
                peft_model, jobs, time_limit_s=prof.peft_train_limit_s, device=dev, log=log
            )

        got = common.attempt(PEFT, errors, log, peft_run)
        if got is not None:
            summaries[PEFT] = got
    hf = None
    common.release()

    def ours() -> TrainingSummary:
        engine = make_engine(
            model_dir,
            dev,
            dtype,
            common.engine_limits(
                args,
                max_adapter_slots=prof.num_jobs + 1,
                num_train_slots=prof.num_jobs,
                max_lora_rank=RANK,
                max_num_batched_tokens=max(
                    prof.max_num_batched_tokens, prof.num_jobs * prof.micro_batch_tokens
                ),
            ),
            log,
        )
        warmup(
            engine, spec.vocab_size, [], training=True, micro_batch_tokens=prof.micro_batch_tokens,
            num_jobs=prof.num_jobs, log=log,
        )
        job_ids = add_training_jobs(
            engine, data, rank=RANK, lr=LR, micro_batch_tokens=prof.micro_batch_tokens
        )
        run = replay_engine(
            engine, None, time_limit_s=prof.finetune_limit_s, job_ids=job_ids, device=dev, log=log, label=OURS
        )
        cancel_jobs(engine, job_ids)
        assert run.training is not None
        return run.training

    got = common.attempt(OURS, errors, log, ours)
    if got is not None:
        summaries[OURS] = got
    common.release()

    nan = float("nan")
    speedup = (
        ratio(summaries[OURS].real_tokens_per_s, summaries[PEFT].real_tokens_per_s)
        if OURS in summaries and PEFT in summaries
        else nan
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
        "data": {"real_tokens": real, "peft_padded_tokens": padded, "packed_micro_batches": len(packed)},
    }
    print(
        report.write_report(
            args.out,
            "finetune",
            "Fine-tuning: concurrent packed jobs vs PEFT",
            env=common.environment(args),
            sections=sections,
            targets=targets,
            results=results,
        )
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
