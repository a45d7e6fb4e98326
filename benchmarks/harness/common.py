"""What every benchmark script shares: the command line, run sizes per model, engine limits, setup.

Sizes (``Profile``) are chosen so each script finishes in a few minutes on one H200 with the 8B shape
(``--quick``: well under a minute of measuring) and in seconds on a CPU with the tiny shape.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .models import SPECS, ModelSpec, default_dtype
from .workload import synthetic_examples

# Every fine-tuning job of the runs, ours and the PEFT baselines': a fresh LoRA of this rank, AdamW at this lr.
RANK = 16
LR = 1e-4

Jobs = list[tuple[str, list[dict[str, list[int]]]]]  # (job name, training examples) per job


@dataclass(frozen=True)
class Profile:
    # serving trace (bench_serving)
    rate: float  # requests/s
    duration_s: float
    prompt_mean: float
    output_mean: float
    max_context: int
    num_adapters: int
    serve_limit_s: float  # wall limit of one engine replay
    baseline_limit_s: float  # wall limit of one HF baseline replay
    max_batch: int  # HF generate batch
    decode_batch: int
    decode_steps: int
    decode_prompt_len: int
    # unified trace (bench_unified)
    unified_rate: float
    unified_duration_s: float
    unified_limit_s: float
    train_only_s: float
    # fine-tuning (bench_unified, bench_finetune)
    num_jobs: int
    examples_per_job: int
    micro_batch_tokens: int
    finetune_limit_s: float
    peft_train_limit_s: float
    peft_batch_size: int
    # engine limits
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_memory_gb: float


PROFILES: dict[str, Profile] = {
    "8b": Profile(
        rate=32.0,
        duration_s=10.0,
        prompt_mean=200,
        output_mean=200,
        max_context=2048,
        num_adapters=32,
        serve_limit_s=45.0,
        baseline_limit_s=30.0,
        max_batch=32,
        decode_batch=64,
        decode_steps=20,
        decode_prompt_len=128,
        unified_rate=6.0,
        unified_duration_s=30.0,
        unified_limit_s=60.0,
        train_only_s=20.0,
        num_jobs=4,
        examples_per_job=1500,
        micro_batch_tokens=1024,
        finetune_limit_s=30.0,
        peft_train_limit_s=30.0,
        peft_batch_size=4,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        kv_memory_gb=40.0,
    ),
    "small": Profile(
        rate=48.0,
        duration_s=10.0,
        prompt_mean=200,
        output_mean=200,
        max_context=2048,
        num_adapters=32,
        serve_limit_s=40.0,
        baseline_limit_s=20.0,
        max_batch=32,
        decode_batch=64,
        decode_steps=20,
        decode_prompt_len=128,
        unified_rate=12.0,
        unified_duration_s=20.0,
        unified_limit_s=40.0,
        train_only_s=15.0,
        num_jobs=4,
        examples_per_job=1500,
        micro_batch_tokens=1024,
        finetune_limit_s=20.0,
        peft_train_limit_s=20.0,
        peft_batch_size=4,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        kv_memory_gb=8.0,
    ),
    "tiny": Profile(
        rate=20.0,
        duration_s=0.3,
        prompt_mean=12,
        output_mean=6,
        max_context=96,
        num_adapters=4,
        serve_limit_s=20.0,
        baseline_limit_s=10.0,
        max_batch=4,
        decode_batch=4,
        decode_steps=3,
        decode_prompt_len=16,
        unified_rate=20.0,
        unified_duration_s=0.3,
        unified_limit_s=20.0,
        train_only_s=1.0,
        num_jobs=2,
        examples_per_job=6,
        micro_batch_tokens=64,
        finetune_limit_s=3.0,
        peft_train_limit_s=2.0,
        peft_batch_size=2,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        kv_memory_gb=0.05,
    ),
}


def quick(p: Profile, model: str) -> Profile:
    if model == "tiny":
        return p
    return replace(
        p,
        duration_s=p.duration_s / 3,
        serve_limit_s=p.serve_limit_s / 2,
        baseline_limit_s=p.baseline_limit_s / 3,
        decode_steps=8,
        unified_duration_s=p.unified_duration_s / 3,
        unified_limit_s=p.unified_limit_s / 2,
        train_only_s=p.train_only_s / 3,
        examples_per_job=p.examples_per_job // 4,
        finetune_limit_s=p.finetune_limit_s / 3,
        peft_train_limit_s=p.peft_train_limit_s / 3,
    )


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", choices=sorted(SPECS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "docs/benchmarks")))
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("LOQUETIER_BENCH_CACHE", "/tmp/loquetier-bench")),
        help="where the random model and adapter directories are written (reused)",
    )
    ap.add_argument("--quick", action="store_true", help="a short run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra or overriding Engine.from_pretrained limit (repeatable)",
    )
    ap.add_argument("--no-baselines", action="store_true", help="skip the HF / PEFT baselines")
    ap.add_argument("--no-mixed-ranks", action="store_true", help="bench_serving: skip the mixed-rank replay")
    ap.add_argument("--async-ab", action="store_true",
                    help="bench_serving: replay the 32-adapter trace again with asynchronous steps off, then on")
    ap.add_argument("--lookahead", type=int, default=0, metavar="N",
                    help="bench_unified: one more unified replay with the scheduler's tpot_lookahead = N "
                         "(default 0: the comparison without borrowing; skipped when N is the engine's default)")
    ap.add_argument("--smlm-fused-decode", choices=("0", "1"), default=None,
                    help="one SMLM launch per LoRA module in decode-sized steps (1) or two (0); default: "
                         "the LOQUETIER_SMLM_FUSED_DECODE environment variable, else 0")
    ap.add_argument("--smlm-deterministic", choices=("0", "1"), default=None,
                    help="forward SMLM shrinks sum their K splits in a fixed order (1) or with atomics (0); "
                         "default: the LOQUETIER_SMLM_DETERMINISTIC environment variable, else 0")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a run-size field of the profile, e.g. --set rate=16 (repeatable)",
    )
    args = ap.parse_args(argv)
    args.dtype = args.dtype or default_dtype(args.device)
    args.spec = SPECS[args.model]
    prof = PROFILES.get(args.model, PROFILES["small"])
    prof = quick(prof, args.model) if args.quick else prof
    for item in args.set:
        key, _, raw = item.partition("=")
        if key not in Profile.__dataclass_fields__:
            ap.error(f"--set: unknown field {key!r}; known: {sorted(Profile.__dataclass_fields__)}")
        kind = type(getattr(prof, key))
        prof = replace(prof, **{key: kind(raw)})
    args.profile = prof
    apply_fused_decode(args.smlm_fused_decode)
    apply_deterministic(args.smlm_deterministic)
    if args.device == "cpu":
        # a CPU run is a smoke run: the torch reference, not Triton's interpreter (TRITON_INTERPRET=1)
        from loquetier.kernels.ops import force_backend

        force_backend("reference")
    args.command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    return args


def apply_fused_decode(value: str | None) -> bool:
    """Set the SMLM one-launch decode switch from a ``--smlm-fused-decode`` value (None: leave the
    environment's setting); returns whether it is on. Set before the engine captures its graphs."""
    from loquetier.kernels import fused_decode_enabled, set_fused_decode

    if value is not None:
        os.environ["LOQUETIER_SMLM_FUSED_DECODE"] = value
        set_fused_decode(value == "1")
    return fused_decode_enabled()


def apply_deterministic(value: str | None) -> bool:
    """Set the SMLM fixed-order split sums from a ``--smlm-deterministic`` value (None: leave the
    environment's setting); returns whether they are on. Set before the engine captures its graphs."""
    from loquetier.kernels import deterministic_enabled, set_deterministic

    if value is not None:
        os.environ["LOQUETIER_SMLM_DETERMINISTIC"] = value
        set_deterministic(value == "1")
    return deterministic_enabled()


def job_data(args: argparse.Namespace) -> Jobs:
    """The run's fine-tuning jobs: ``(name, synthetic examples)`` for each of the profile's ``num_jobs``."""
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


# The profiles' KV memory is sized for the H200 (141 GB). A card of less memory keeps this fraction of it
# for KV: on an H100 80GB, 40 GB of KV beside the 8B shape's 16 GB of weights left too little for
# 4 jobs' training activations, and every training step ran out of memory.
KV_FRACTION_OF_CARD = 0.2


def kv_memory_gb(profile_gb: float, device: str) -> float:
    """The profile's KV memory, at most ``KV_FRACTION_OF_CARD`` of the card's (on CUDA)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return profile_gb
    card_gb = torch.cuda.get_device_properties(torch.device(device)).total_memory / (1 << 30)
    return profile_gb if card_gb >= 120 else min(profile_gb, round(KV_FRACTION_OF_CARD * card_gb))


def engine_limits(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    p: Profile = args.profile
    limits: dict[str, Any] = {
        "max_num_seqs": p.max_num_seqs,
        "max_num_batched_tokens": p.max_num_batched_tokens,
        "max_prefill_chunk": min(512, p.max_num_batched_tokens),
        "kv_memory_gb": kv_memory_gb(p.kv_memory_gb, getattr(args, "device", "cpu")),
        "max_model_len": p.max_context,
        "adapter_cache_bytes": 64 << 30,
        "seed": args.seed,
    }
    limits.update(overrides)
    for item in args.engine_arg:
        key, _, raw = item.partition("=")
        limits[key] = _parse_value(raw)
    return limits


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def spec_of(args: argparse.Namespace) -> ModelSpec:
    return args.spec  # type: ignore[no-any-return]


def captured(fn: Any, warmups: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn``, after ``warmups`` calls on a side stream (kernels compiled, the
    allocator warm), ready to ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def release(*objs: Any) -> None:
    """Drop references and give the memory back before the next system runs."""
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(args: argparse.Namespace) -> dict[str, Any]:
    gpu = (
        torch.cuda.get_device_name(0)
        if str(args.device).startswith("cuda") and torch.cuda.is_available()
        else "cpu"
    )
    import peft
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": gpu,
        "command": args.command,
        "model": args.model,
        "dtype": args.dtype,
        "quick": bool(args.quick),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "profile": asdict(args.profile),
        "smlm_fused_decode": apply_fused_decode(None),
        "smlm_deterministic": apply_deterministic(None),
        "lora_overlap": _lora_overlap(),
    }


def attempt(label: str, errors: dict[str, str], logger: Any, fn: Any, /, *a: Any, **kw: Any) -> Any:
    """``fn(*a, **kw)``, or None with the error recorded: one failing system must not lose the others."""
    try:
        return fn(*a, **kw)
    except Exception as exc:
        import traceback

        errors[label] = f"{type(exc).__name__}: {exc}"
        logger(f"FAILED {label}: {errors[label]}\n{traceback.format_exc()}")
        release()
        return None


class Logger:
    """Timestamped progress lines on stderr (stdout is kept for the final table)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _lora_overlap() -> bool:
    from loquetier.kernels import lora_overlap

    return lora_overlap()


def tuner_parser(doc: str, env: str, picks: str) -> argparse.ArgumentParser:
    """The command line of a launch-parameter tuner (``tune_smlm``, ``tune_attention``): ``--out``,
    ``--from-json`` (the page from an earlier run's JSON, no GPU) and ``--pick-env`` (the value of
    ``env`` that ``picks`` names, written to a file)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--from-json", type=Path, help="write the page from an earlier run's JSON (no GPU)")
    ap.add_argument("--pick-env", type=Path, default=None,
                    help=f"write {env}'s value for {picks} into this file (empty when none beats the defaults by 3 %%)")
    return ap


def tuner_outputs(args: argparse.Namespace, name: str, results: dict[str, Any], pick: str, page: str) -> None:
    """A tuner's run written out: ``NAME.json``, the page ``NAME.md`` (printed too) and the pick."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pick_env is not None:
        args.pick_env.parent.mkdir(parents=True, exist_ok=True)
        args.pick_env.write_text(pick)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{name}.md").write_text(page)
    print(page)
