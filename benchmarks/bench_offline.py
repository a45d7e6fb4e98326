"""Offline generation throughput against the weight-read floor, with and without 32 adapters.

    python -m benchmarks.bench_offline --model 8b --device cuda --out $OUT

One process, side by side, the same workload for every system: random 200-token prompts, 128 new
tokens each, greedy, EOS ignored. Our engine is built as the README shows (``max_num_seqs=128,
max_adapter_slots=40, kv_memory_gb=24``), its 32 rank-16 adapters (all seven targets) loaded and its
CUDA graphs captured first; rows take the adapters round robin. Cases:

- ours, no adapters and 32 adapters, at batch 32 and at batch 128 (fresh prompts each time), timed
  over the whole ``Engine.generate`` call (prefill included);
- transformers ``generate`` on the same weights (no adapters) and PEFT's mixed-adapter ``generate``
  (``adapter_names``) at batch 32, over fewer new tokens (``--baseline-tokens``): their step time
  does not depend on the output length, and the full 128 would take minutes of device time.

The floor of a step is the bytes of every weight it must read (all but the embedding table) over
4.27 TB/s; a batch of B rows makes B tokens a step, so the floor in tokens/s is B / floor_s.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from loquetier.kernels.launch import tuning_from_spec as launch_tuning

from .harness import common, report
from .harness.metrics import H200_BANDWIDTH_BPS
from .harness.models import prepare_adapters, prepare_base, write_adapters

PROMPT_TOKENS = 200
NEW_TOKENS = 128
NUM_ADAPTERS = 32
RANK = 16


def _prompts(n: int, vocab: int, gen: torch.Generator) -> list[list[int]]:
    return torch.randint(3, min(vocab, 30000), (n, PROMPT_TOKENS), generator=gen).tolist()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(engine: Any, batch: int, adapters: list[str | None], gen: torch.Generator, device: str,  # noqa: PLR0917
             new_tokens: int, repeats: int, prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """Tokens/s of ``Engine.generate`` over ``batch`` fresh prompts (median of ``repeats`` calls); the
    last call's tokens under ``"tokens"`` (``prompts``: these instead of fresh ones)."""
    from loquetier import SamplingParams

    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rates, seconds = [], []
    graph_steps = 0
    given = prompts
    for _ in range(repeats):
        prompts = given or _prompts(batch, engine.model.cfg.vocab_size, gen)
        ids = [adapters[i % len(adapters)] for i in range(batch)]
        before_steps, before_graph = engine.num_steps, engine.runner.num_graph_steps
        records = []
        record = engine.scheduler._record

        def keep(*a: Any, _record: Any = record, _records: list[Any] = records) -> Any:
            _records.append(_record(*a))
            return _records[-1]

        engine.scheduler._record = keep
        _sync(device)
        t0 = time.perf_counter()
        try:
            outs = engine.generate(prompts, ids, sampling)
            _sync(device)
        finally:
            del engine.scheduler._record  # the class's method again
        dt = time.perf_counter() - t0
        made = sum(len(o.token_ids) for o in outs)
        rates.append(made / dt)
        seconds.append(dt)
        graph_steps = engine.runner.num_graph_steps - before_graph
        steps = engine.num_steps - before_steps
    # the last call's steps by kind: steps with prompt tokens (prefill, maybe with decode rows) and
    # decode-only steps (a decode window's steps share its time equally)
    prompt_steps = [r for r in records if r.num_prefill_tokens]
    decode_steps = [r for r in records if not r.num_prefill_tokens]
    split = {"prompt_steps": len(prompt_steps), "prompt_steps_s": sum(r.step_time_s for r in prompt_steps),
             "decode_steps": len(decode_steps), "decode_steps_s": sum(r.step_time_s for r in decode_steps)}
    split["decode_step_ms"] = 1e3 * split["decode_steps_s"] / max(1, len(decode_steps))
    return {"tokens_per_s": statistics.median(rates), "runs_tokens_per_s": rates, "seconds": seconds, **split,
            "steps": steps, "graph_steps": graph_steps, "batch": batch, "new_tokens": new_tokens,
            "windows": engine.window.num_windows, "chained": engine.window.num_chained,
            "dropped": engine.window.num_dropped, "tokens": [o.token_ids for o in outs], "prompts": prompts}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_windows(engine: Any, batch: int, adapters: list[str | None], gen: torch.Generator,  # noqa: PLR0917
                    device: str, new_tokens: int) -> dict[str, Any]:
    """The same prompts with decode windows (twice) and one step at a time (prefix cache off, so every
    run prefills everything): tokens/s of each, the share of rows whose tokens are equal and the mean
    length of their common prefix. The second windowed run is the control: what differs between two
    runs of the same path (run-to-run nondeterminism, e.g. the shrink's fp32 atomics) is not the
    windows' doing."""
    prompts = _prompts(batch, engine.model.cfg.vocab_size, gen)
    window, caching = engine.window.max_steps, engine.blocks.enable_prefix_caching
    engine.blocks.enable_prefix_caching = False
    try:
        windowed = run_ours(engine, batch, adapters, gen, device, new_tokens, 1, prompts)
        again = run_ours(engine, batch, adapters, gen, device, new_tokens, 1, prompts)
        engine.window.max_steps = 1
        single = run_ours(engine, batch, adapters, gen, device, new_tokens, 1, prompts)
    finally:
        engine.window.max_steps, engine.blocks.enable_prefix_caching = window, caching

    def same(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
        pairs = list(zip(a["tokens"], b["tokens"], strict=True))
        return (sum(x == y for x, y in pairs) / batch,
                statistics.fmean(_common_prefix(x, y) for x, y in pairs))

    rows, prefix = same(windowed, single)
    rows_again, prefix_again = same(windowed, again)
    return {"windows_tokens_per_s": windowed["tokens_per_s"], "one_step_tokens_per_s": single["tokens_per_s"],
            "speedup": windowed["tokens_per_s"] / single["tokens_per_s"], "rows_with_same_tokens": rows,
            "mean_common_prefix": prefix, "control_rows_with_same_tokens": rows_again,
            "control_mean_common_prefix": prefix_again}


def run_hf(model: Any, batch: int, adapter_names: list[str] | None, gen: torch.Generator, device: str,
           new_tokens: int, vocab: int) -> dict[str, Any]:
    """Tokens/s of one HF ``generate`` call (greedy, exactly ``new_tokens`` each)."""
    ids = torch.tensor(_prompts(batch, vocab, gen), device=device)
    kwargs: dict[str, Any] = {} if adapter_names is None else {"adapter_names": adapter_names}
    with torch.inference_mode():
        model.generate(input_ids=ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, pad_token_id=0, **kwargs)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        _sync(device)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": batch * new_tokens / dt, "seconds": dt, "batch": batch, "new_tokens": new_tokens}


LORA_HALVES = ("both", "shrinks only", "expands only", "neither")


def set_lora_halves(which: str) -> Callable[[], None]:
    """Timing only (the tokens are not the model's): the decode-sized LoRA forwards
    (``smlm.split_shrink``) launch both halves ("both"), their shrinks alone, their expands alone
    (over zeros that stand in for the shrinks' partial sums: no launch, no NaN) or neither, for the
    graphs captured next. Returns what puts the real path back."""
    from loquetier.kernels import smlm

    real_split, real_launch, real_buffer = smlm.split_shrink, smlm.launch, smlm._split_buffer
    zeros: dict[tuple[tuple[int, int, int], torch.device], torch.Tensor] = {}

    def zero_buffer(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        key = (shape, torch.device(device))
        if key not in zeros:
            zeros[key] = torch.zeros(shape, dtype=torch.float32, device=device)
        return zeros[key]

    def no_shrink(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        if kernel not in (smlm.shrink_kernel, smlm.shrink_parts_kernel):
            real_launch(kernel, grid, *args, **meta)

    def shrinks_only(*args: Any, **kwargs: Any) -> Callable[[torch.Tensor], None]:
        real_split(*args, **kwargs)
        return smlm._nothing

    def restore() -> None:
        smlm.split_shrink, smlm.launch, smlm._split_buffer = real_split, real_launch, real_buffer

    if which == "shrinks only":
        smlm.split_shrink = shrinks_only
    elif which == "expands only":
        smlm.launch, smlm._split_buffer = no_shrink, zero_buffer
    elif which == "neither":
        smlm.split_shrink = lambda *args, **kwargs: smlm._nothing
    elif which != "both":
        raise ValueError(f"unknown LoRA halves {which!r}")
    return restore


def _take(argv: list[str], flag: str) -> str | None:
    """The value after ``flag`` in ``argv`` (both removed), or None when it is not there."""
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def main(argv: list[str] | None = None) -> int:
    pre = [a for a in (argv if argv is not None else sys.argv[1:])]
    baseline_tokens = int(_take(pre, "--baseline-tokens") or 16)
    # LoRA overlap off (0) / on (1), timed after the cases, graphs captured again
    overlaps = [m for m in (_take(pre, "--lora-overlap") or "").split(",") if m]
    chain_rounds = int(_take(pre, "--chain-ab") or 0)  # rounds of (chained windows off, on)
    async_rounds = int(_take(pre, "--async-ab") or 0)  # rounds of (asynchronous steps off, on), every case
    tuning_ab = (_take(pre, "--tuning-ab") or "").strip()  # Tuning overrides ("expand_tiles=4") vs the defaults
    attn_ab = (_take(pre, "--attn-ab") or "").strip()  # AttnTuning overrides ("block_n=64,warps=8") vs the defaults
    blas_ab = (_take(pre, "--blas-ab") or "").strip()  # a BLAS library ("cublaslt") vs the engine's, every case
    # rounds of (MLP output carried into the next norm, added per layer): llama.CARRY_MLP_OUTPUT, every case
    carry_rounds = int(_take(pre, "--carry-ab") or 0)
    # rounds of the adapter cases with both halves of the decode-sized LoRA forwards, the shrinks alone,
    # the expands alone and neither (timing only: what each half adds to a served step)
    halves_rounds = int(_take(pre, "--lora-halves") or 0)
    args = common.parse_args(__doc__.splitlines()[0], pre)
    log = common.Logger()
    spec, dev, dtype = args.spec, args.device, args.dtype
    is_gpu = dev.startswith("cuda")
    new_tokens = NEW_TOKENS if is_gpu else 8
    repeats = 1 if args.quick or not is_gpu else 2
    big_batch = 128 if is_gpu else 8
    small_batch = 32 if is_gpu else 4
    num_adapters = NUM_ADAPTERS if is_gpu else 4
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    gen = torch.Generator().manual_seed(args.seed)
    # every weight of the model once per step (embedding table included), the floor the targets are set on
    weight_bytes = spec.num_params() * 2
    floor_s = weight_bytes / H200_BANDWIDTH_BPS
    results["floor_step_ms"] = floor_s * 1e3
    adapter_ids = [f"r{RANK}-{i:02d}" for i in range(num_adapters)]

    hf_model, path = prepare_base(spec, args.cache, dev, dtype, seed=args.seed, log=log)
    if not args.no_baselines:
        log("transformers generate (no adapters)")
        results["transformers"] = common.attempt("transformers", errors, log, run_hf, hf_model, small_batch, None,
                                                 gen, dev, baseline_tokens, spec.vocab_size)
        log(f"  {results['transformers']}")
        peft_model = common.attempt("peft adapters", errors, log, prepare_adapters, hf_model,
                                    args.cache / "adapters-peft-r16", adapter_ids, [RANK] * num_adapters,
                                    seed=args.seed, log=log)
        if peft_model is not None:
            names = [adapter_ids[i % num_adapters] for i in range(small_batch)]
            log("PEFT mixed-adapter generate")
            results["peft_mixed"] = common.attempt("peft mixed", errors, log, run_hf, peft_model, small_batch,
                                                   names, gen, dev, baseline_tokens, spec.vocab_size)
            log(f"  {results['peft_mixed']}")
        common.release(peft_model)
    common.release(hf_model)
    del hf_model

    from loquetier import Engine

    write_adapters(spec, args.cache / "adapters-r16", adapter_ids, [RANK] * num_adapters, seed=args.seed, log=log)
    limits = common.engine_limits(args, max_num_seqs=big_batch, max_adapter_slots=num_adapters + 8,
                                  kv_memory_gb=24.0 if is_gpu else 0.25, max_num_batched_tokens=2048,
                                  max_prefill_chunk=512, max_model_len=1024)
    limits.pop("adapter_cache_bytes", None)
    engine = Engine.from_pretrained(path, device=dev, dtype=dtype, **limits)
    for adapter_id in adapter_ids:
        engine.load_adapter(adapter_id, args.cache / "adapters-r16" / adapter_id)
    t0 = time.perf_counter()
    results["capture"] = {"graphs": engine.capture_graphs(), "seconds": time.perf_counter() - t0}
    warm = engine.warmup() if is_gpu else {}
    results["warmup"] = {k: v for k, v in warm.items() if isinstance(v, int | float)}
    log(f"engine ready: {results['capture']} warm-up {results['warmup']}")
    cases = [("ours_base_b32", small_batch, [None]), ("ours_lora_b32", small_batch, list(adapter_ids)),
             ("ours_base_b128", big_batch, [None]), ("ours_lora_b128", big_batch, list(adapter_ids))]
    for name, batch, adapters in cases:
        r = common.attempt(name, errors, log, run_ours, engine, batch, adapters, gen, dev, new_tokens, repeats)
        if r is not None:
            r["floor_tokens_per_s"] = batch / floor_s
            r["x_floor"] = r["tokens_per_s"] / r["floor_tokens_per_s"]
            results[name] = r
            log(f"{name}: {r['tokens_per_s']:.0f} tok/s = {r['x_floor']:.3f}x floor "
                f"({r['graph_steps']}/{r['steps']} graph steps)")

    def compare(kind: str, settings: list[tuple[str, Callable[[], None]]], cases: list[tuple[str, int, list[Any]]],
                recapture: bool) -> None:
        """Each of ``cases`` again under each setting in turn (``apply`` sets it; the graphs captured
        again first when ``recapture``: a graph keeps the kernel paths of its capture), into
        ``results[kind]``."""
        for label, apply in settings:
            apply()
            if recapture:
                engine.capture_graphs(recapture=True)
            for name, batch, adapters in cases:
                r = common.attempt(f"{name} {kind} {label}", errors, log, run_ours, engine, batch, adapters, gen,
                                   dev, new_tokens, repeats)
                if r is not None:
                    r["x_floor"] = r["tokens_per_s"] * floor_s / batch
                    results.setdefault(kind, []).append({"setting": label, "case": name, **r})
                    log(f"{name}, {kind} {label}: {r['tokens_per_s']:.0f} tok/s = {r['x_floor']:.3f}x floor, "
                        f"decode steps {r['decode_step_ms']:.2f} ms")

    lora_cases = [("ours_lora_b32", small_batch, list(adapter_ids)), ("ours_lora_b128", big_batch, list(adapter_ids))]
    # the adapter cases with the graphs' LoRA shrinks on a side stream beside the base GEMMs (1) or not (0)
    from loquetier.kernels import lora_overlap, paged_attention, set_lora_overlap, smlm

    default_overlap = lora_overlap()
    try:
        compare("overlap", [("on" if m == "1" else "off", functools.partial(set_lora_overlap, m == "1"))
                            for m in overlaps], lora_cases, recapture=True)
    finally:
        set_lora_overlap(default_overlap)

    def launch_ab(kind: str, module: Any, spec: str, flag: str, cases: list[tuple[str, int, list[Any]]]) -> None:
        """``module.TUNING`` (a dataclass of launch parameters) with the overrides ``spec`` names (several
        sets: separated by ``;``) against its defaults, two rounds, graphs captured again for each; the
        module's setting after."""
        if not spec:
            return
        default, cls = module.TUNING, type(module.TUNING)
        tunings = {"defaults": cls(), **{one.strip(): launch_tuning(cls, one.strip(), flag)
                                         for one in spec.split(";") if one.strip()}}
        try:
            compare(kind, [(label, functools.partial(setattr, module, "TUNING", t))
                           for _ in range(2) for label, t in tunings.items()], cases, recapture=True)
        finally:
            module.TUNING = default

    launch_ab("tuning", smlm, tuning_ab, "--tuning-ab", lora_cases)  # SMLM launch parameters
    launch_ab("attention", paged_attention, attn_ab, "--attn-ab",  # paged decode attention's, every case
              [("ours_base_b32", small_batch, [None]), *lora_cases])
    if blas_ab:  # the base GEMMs' library (EngineConfig.blas) against the engine's own, two rounds
        from loquetier.engine.engine import apply_blas

        own = engine.blas or "torch"
        try:
            compare("blas", [(lib, functools.partial(apply_blas, lib, engine.device))
                             for _ in range(2) for lib in (own, blas_ab)], cases, recapture=True)
        finally:
            apply_blas(own, engine.device)
    if carry_rounds:
        from loquetier.models import llama

        try:
            compare("carry", [(label, functools.partial(setattr, llama, "CARRY_MLP_OUTPUT", label == "carried"))
                              for _ in range(carry_rounds) for label in ("carried", "added")], cases, recapture=True)
        finally:
            llama.CARRY_MLP_OUTPUT = True
    if halves_rounds:
        restore: list[Callable[[], None]] = []

        def halves(which: str) -> None:
            while restore:
                restore.pop()()
            restore.append(set_lora_halves(which))

        try:
            compare("halves", [(which, functools.partial(halves, which))
                               for _ in range(halves_rounds) for which in LORA_HALVES], lora_cases, recapture=True)
        finally:
            while restore:
                restore.pop()()
    if overlaps or tuning_ab or attn_ab or blas_ab or carry_rounds or halves_rounds:
        engine.capture_graphs(recapture=True)
    # decode windows chained (the next window queued before the host applies the last) or not
    default_chain = engine.window.chain
    try:
        compare("chain", [("on" if on else "off", functools.partial(setattr, engine.window, "chain", on))
                          for _ in range(chain_rounds) for on in (False, True)],
                [("ours_base_b32", small_batch, [None]), *lora_cases], recapture=False)
    finally:
        engine.window.chain = default_chain
    # steps scheduled and queued while the GPU runs the one before (engine/async_step.py) or not
    default_async = engine.steps.enabled
    try:
        compare("async", [("on" if on else "off", functools.partial(setattr, engine.steps, "enabled", on))
                          for _ in range(async_rounds) for on in (False, True)], cases, recapture=False)
    finally:
        engine.steps.enabled = default_async

    for name, batch, adapters in (("base_b32", small_batch, [None]), ("lora_b32", small_batch, list(adapter_ids))):
        r = common.attempt(f"windows {name}", errors, log, compare_windows, engine, batch, adapters, gen, dev,
                           new_tokens)
        if r is not None:
            results[f"windows_{name}"] = r
            log(f"decode windows, {name}: {r}")

    def rate(name: str) -> float:
        r = results.get(name)
        return float(r["tokens_per_s"]) if isinstance(r, dict) else float("nan")

    def x_floor(name: str) -> float:
        r = results.get(name)
        return float(r["x_floor"]) if isinstance(r, dict) else float("nan")

    overhead = rate("ours_lora_b32") / rate("ours_base_b32")
    targets = [
        report.Target("32 adapters, batch 32, of the floor", ">= 0.6x", x_floor("ours_lora_b32"), 0.6),
        report.Target("no adapters, batch 32, of the floor", ">= 0.7x", x_floor("ours_base_b32"), 0.7),
        report.Target("LoRA overhead offline (32 adapters / none, batch 32)", ">= 0.85x", overhead, 0.85),
        report.Target("32 adapters, batch 128, of the floor", ">= 0.4x", x_floor("ours_lora_b128"), 0.4),
    ]
    rows = []
    for label, key in (("HF PEFT, mixed adapters (adapter_names)", "peft_mixed"),
                       ("transformers, no adapters", "transformers"),
                       ("ours, no adapters, batch 32", "ours_base_b32"),
                       ("ours, 32 adapters, batch 32", "ours_lora_b32"),
                       ("ours, no adapters, batch 128", "ours_base_b128"),
                       ("ours, 32 adapters, batch 128", "ours_lora_b128")):
        r = results.get(key)
        if not isinstance(r, dict):
            rows.append([label, "n/a", "n/a", "n/a", errors.get(key, "not run")[:80]])
            continue
        xf = report.fmt(r["x_floor"], 3) if "x_floor" in r else "–"
        rows.append([label, report.fmt(r["tokens_per_s"]), r["batch"], xf, f"{r['new_tokens']} new tokens"])
    ratios = [["ours 32 adapters / PEFT mixed (batch 32)", report.fmt(rate("ours_lora_b32") / rate("peft_mixed"))],
              ["ours no adapters / transformers (batch 32)",
               report.fmt(rate("ours_base_b32") / rate("transformers"))],
              ["LoRA overhead (batch 32)", report.fmt(overhead, 3)],
              *[[f"decode windows / one step at a time ({label}, batch 32; same tokens on "
                 f"{report.fmt(100 * results[key]['rows_with_same_tokens'])} % of rows, common prefix "
                 f"{report.fmt(results[key]['mean_common_prefix'])} tokens; windows run twice: "
                 f"{report.fmt(100 * results[key]['control_rows_with_same_tokens'])} %, "
                 f"{report.fmt(results[key]['control_mean_common_prefix'])} tokens)",
                 report.fmt(results[key]["speedup"], 3)]
                for label, key in (("no adapters", "windows_base_b32"), ("32 adapters", "windows_lora_b32"))
                if isinstance(results.get(key), dict)],
              ["LoRA overhead (batch 128)", report.fmt(rate("ours_lora_b128") / rate("ours_base_b128"), 3)]]
    sections = [
        ("Throughput", f"{PROMPT_TOKENS}-token prompts, greedy, EOS ignored; weight-read floor "
         f"{floor_s * 1e3:.2f} ms a step ({weight_bytes / 1e9:.2f} GB of bf16 weights / 4.27 TB/s).\n\n"
         + report.markdown_table(["system", "tokens/s", "batch", "of the floor", "note"], rows)),
        ("Ratios (same run)", report.markdown_table(["ratio", "value"], ratios)),
    ]
    split_rows = [[label, r["prompt_steps"], report.fmt(r["prompt_steps_s"], 3), r["decode_steps"],
                   report.fmt(r["decode_steps_s"], 3), report.fmt(r["decode_step_ms"], 2),
                   report.fmt(r["seconds"][-1] - r["prompt_steps_s"] - r["decode_steps_s"], 3)]
                  for label, key in (("no adapters, batch 32", "ours_base_b32"),
                                     ("32 adapters, batch 32", "ours_lora_b32"),
                                     ("no adapters, batch 128", "ours_base_b128"),
                                     ("32 adapters, batch 128", "ours_lora_b128"))
                  if isinstance(r := results.get(key), dict) and "prompt_steps" in r]
    if split_rows:
        sections.append(("Where the time goes", "The last timed call of each case, its steps by kind (the "
                         "scheduler's measured step times; a decode window's steps share its time; the rest of "
                         "the call: the host's work outside the steps' waits, some of it while the GPU runs a "
                         "chained window):\n\n"
                         + report.markdown_table(["case", "steps with prompt tokens", "their s", "decode-only steps",
                                                  "their s", "ms per decode step", "rest of the call s"], split_rows)))
    for kind, title, intro, header in (
            ("overlap", "LoRA shrinks beside the base GEMMs", "32 adapters, the graphs captured again before each "
             "setting, in this order after the cases above (`--lora-overlap`, `LOQUETIER_LORA_OVERLAP`)",
             "LoRA overlap"),
            ("chain", "Chained decode windows", "Each window's successor queued on the device before the host "
             "applies its tokens (`EngineConfig.chain_windows`), off and on in turn, in this order after the "
             "cases above (`--chain-ab`)", "chained windows"),
            ("async", "Asynchronous steps", "Every case with steps scheduled and queued while the GPU runs the "
             "one before (`EngineConfig.async_steps`) off and on in turn, in this order after the cases above "
             "(`--async-ab`)", "asynchronous steps"),
            ("tuning", "SMLM launch parameters", "The adapter cases with `kernels.smlm.Tuning` overrides against "
             "its defaults, graphs captured again for each, in turn (`--tuning-ab`)", "SMLM tuning"),
            ("attention", "Paged decode attention launch parameters", "Batch 32 without adapters and the adapter "
             "cases with `kernels.paged_attention.AttnTuning` overrides against its defaults, graphs captured "
             "again for each, in turn (`--attn-ab`, `LOQUETIER_ATTN_TUNING`)", "attention tuning"),
            ("blas", "BLAS library of the base GEMMs", "Every case with the engine's BLAS library "
             "(`EngineConfig.blas`) and the one `--blas-ab` names, graphs captured again for each, in turn",
             "BLAS library"),
            ("carry", "Each layer's MLP output carried into the next norm", "Every case with the fused path "
             "carrying each layer's MLP output into the next norm's pass (`llama.CARRY_MLP_OUTPUT`, the default) "
             "and adding it at the layer's end, graphs captured again for each, in turn (`--carry-ab`)",
             "MLP output"),
            ("halves", "The two halves of the LoRA work in a decode step", "Timing only (the tokens are not "
             "the model's): the adapter cases with the decode-sized LoRA forwards launching both halves, the "
             "shrinks alone, the expands alone (over zeros) and neither, graphs captured again for each, in "
             "turn (`--lora-halves`)", "LoRA launches")):
        if results.get(kind):
            rows = [[r["setting"], r["case"].removeprefix("ours_"), report.fmt(r["tokens_per_s"]),
                     report.fmt(r["x_floor"], 3), report.fmt(r["decode_step_ms"], 2)] for r in results[kind]]
            sections.append((title, f"{intro}:\n\n" + report.markdown_table(
                [header, "case", "tokens/s", "of the floor", "ms per decode step"], rows)))
    if errors:
        sections.append(("Errors", "\n".join(f"- {k}: {v}" for k, v in errors.items())))
    compared = [r for kind in ("overlap", "chain", "async", "tuning", "attention", "blas", "carry", "halves")
                for r in results.get(kind, [])]
    for r in [*results.values(), *compared]:
        if isinstance(r, dict):
            r.pop("tokens", None)
            r.pop("prompts", None)
    text = report.write_report(args.out, "offline", "Offline generation throughput",
                               env=common.environment(args), sections=sections, targets=targets,
                               results={**results, "errors": errors})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
