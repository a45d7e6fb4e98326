"""Where the time of an engine step goes.

    python -m benchmarks.profile_step --model 8b --device cuda [--out DIR] [--cprofile] [--graphs]

Cases, with CUDA graphs off (the steps that cannot replay a graph): decode-only steps at batch 64
with no adapters and with 32 rank-16 adapters; 64 decode rows + a 512-token prompt chunk deep into
its context; 4 training jobs (1,024-token micro-batches) alone; the same beside 64 decode rows.
With ``--graphs``: graphs captured, decode windows and asynchronous steps off, so each step is one
a served engine runs alone, and one more case: a fresh 512-token prompt beside the 64 decode rows;
then the same graph steps back to back, one synchronization per run of steps, with asynchronous
steps (``engine/async_step.py``) on and off, alternately, twice: how much of the host's time the
GPU no longer waits for. Which prompt steps
replay a graph follows the attention tuning (``LOQUETIER_ATTN_TUNING=graph_tiles=0``: prompt rows
attended one by one, so only those averaging up to 256 keys).
For each case it prints the median wall time of a step and splits it:

- host time per phase (scheduler, batch build, forward, backward, job bookkeeping and optimizer,
  sampling), measured without syncs, so it is the time the host spends issuing the work;
- GPU kernel time of one step (torch.profiler), the number of kernels launched and the top CUDA
  and CPU ops;
- with ``--cprofile``, the Python functions by own time;
- with ``--syncs``, every operation of one more step that makes the host wait for the GPU
  (``torch.cuda.set_sync_debug_mode``: a read of a device value, a copy to or from pageable host
  memory), by the engine's line that called it.

A step whose host time is well above its GPU kernel time is host-bound: the GPU idles between launches.
Also times single launches (host only) of a Triton SMLM kernel and of a torch op.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import statistics
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.models import SPECS, prepare_base
from loquetier import Engine, SamplingParams
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.config import LoRAConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Phases:
    """Host time per phase: wraps functions by attribute, adds their wall time (no sync) to a bucket.
    Nested phases are subtracted from their parents (each bucket holds own time)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([0.0])
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                child = self._stack.pop()[0]
                self.totals[name] += dt - child
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][0] += dt

        self._undo.append((owner, attr, fn))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


def _instrument(engine: Engine) -> Phases:
    import loquetier.models.batch as batch_mod

    ph = Phases()
    ph.wrap(engine, "_step", "other (engine step)")
    ph.wrap(engine.scheduler, "schedule", "schedule")
    ph.wrap(engine.scheduler, "postprocess", "postprocess")
    ph.wrap(batch_mod.BatchBuilder, "build", "batch build")
    ph.wrap(engine.model, "forward", "forward")
    ph.wrap(torch.autograd, "backward", "backward")
    ph.wrap(engine.runner, "_sample", "sample")
    ph.wrap(engine.jobs, "after_step", "jobs + optimizer")
    return ph


def _fill(engine: Engine, batch: int, adapters: list[str | None], tag: str, prompt_len: int = 128) -> None:
    for i in range(batch):
        prompt = torch.randint(3, min(30000, engine.model.cfg.vocab_size), (prompt_len,)).tolist()
        engine.add_request(f"{tag}-{i}", prompt_token_ids=prompt, adapter_id=adapters[i % len(adapters)],
                           sampling=SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))


def _gpu_profile(engine: Engine) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    with profile(activities=acts) as prof:
        engine.step()
        _sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, -1.0
    for s, e in intervals:  # union of kernel intervals (us)
        if e > end:
            busy += e - max(s, end)
            end = e
    avg = prof.key_averages()
    top_cuda = sorted(avg, key=lambda a: -getattr(a, "self_device_time_total", 0.0))[:12]
    top_cpu = sorted(avg, key=lambda a: -a.self_cpu_time_total)[:15]
    return {
        "gpu_busy_ms": busy / 1e3,
        "kernels": len(kernels),
        "top_cuda": [(a.key[:60], a.count, round(getattr(a, "self_device_time_total", 0.0) / 1e3, 2))
                     for a in top_cuda],
        "top_cpu": [(a.key[:60], a.count, round(a.self_cpu_time_total / 1e3, 2)) for a in top_cpu],
    }


def _sync_sites(engine: Engine) -> dict[str, int]:
    """One step with torch's sync debug mode on: each synchronizing operation by the innermost line
    of Loquetier's own code (``loquetier/``, ``kernels/``) that led to it, with its count."""
    sites: dict[str, int] = defaultdict(int)
    root = Path(__file__).resolve().parents[1]

    def note(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchronizing" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1]
                if f.filename.startswith(str(root)) and "/benchmarks/" not in f.filename]
        where = f"{Path(ours[-1].filename).relative_to(root)}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
        sites[where] += 1

    _sync()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync()
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def _measure(engine: Engine, ph: Phases, name: str, steps: int, use_cprofile: bool,
             before_step: Callable[[int], None] | None = None, syncs: bool = False) -> dict[str, Any]:
    times = []
    ph.reset()
    for i in range(steps):
        if before_step is not None:
            before_step(i)
        _sync()
        t = time.perf_counter()
        engine.step()
        _sync()
        times.append(time.perf_counter() - t)
    n = max(1, ph.calls["other (engine step)"])  # before_step may run steps of its own
    phases = {k: round(v / n * 1e3, 2) for k, v in sorted(ph.totals.items(), key=lambda kv: -kv[1])}
    if before_step is not None:
        before_step(steps)
    out: dict[str, Any] = {"case": name, "median_ms": round(statistics.median(times) * 1e3, 2),
                           "host_ms_per_phase": phases}
    out.update(_gpu_profile(engine))
    if syncs and torch.cuda.is_available():
        if before_step is not None:
            before_step(steps + 2)
        out["syncs"] = _sync_sites(engine)
        print(f"== {name}: {sum(out['syncs'].values())} synchronizations in a step: {out['syncs']}", flush=True)
    if use_cprofile:
        if before_step is not None:
            before_step(steps + 1)
        prof = cProfile.Profile()
        prof.enable()
        engine.step()
        _sync()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out["cprofile"] = buf.getvalue()
    print(f"== {name}: median {out['median_ms']} ms/step, GPU busy {out['gpu_busy_ms']:.2f} ms, "
          f"{out['kernels']} kernels; host ms/phase {phases}", flush=True)
    return out


def _launch_costs(engine: Engine) -> dict[str, float]:
    """Host cost of one launch: a Triton SMLM shrink over 64 rows, a torch add, a cuBLAS GEMM."""
    from loquetier.kernels import SMLMMeta
    from loquetier.kernels.ops import backend_for

    dev = engine.model.device
    pool = engine.adapters.pool
    lora = pool.get(0, "q_proj")
    x = torch.randn(64, lora.in_features, device=dev, dtype=engine.model.cfg.dtype)
    meta = SMLMMeta.build([i % 32 + engine.config.num_train_slots for i in range(64)], 0, dev)
    res = {}
    for label, fn in (("smlm shrink (64 rows, 32 adapters)", lambda: backend_for(dev).shrink(x, lora, meta)),
                      ("torch add", lambda: x + x),
                      ("torch mm 64x4096x4096", lambda: x @ engine.model.layers[0].o_weight.T)):
        for _ in range(20):
            fn()
        _sync()
        n = 500
        t = time.perf_counter()
        for _ in range(n):
            fn()
        res[label] = (time.perf_counter() - t) / n * 1e6
        _sync()
        print(f"   launch cost, {label}: {res[label]:.1f} us (host, no sync)", flush=True)
    return res


def _pipelined_ab(engine: Engine, adapters: list[str | None], steps: int,
                  settle: Callable[[], None]) -> list[dict[str, Any]]:
    """ms per graph step when ``steps`` steps run back to back (one sync at the end), asynchronous
    steps on and off, alternating, two rounds: 64 decode rows with 32 adapters and a prompt waiting
    (no decode window forms), and the same rows with a fresh 512-token prompt added before each step."""
    results = []
    for case, per_step in (("decode b64, 32 adapters, a prompt waiting", False),
                           ("64 decode + a fresh 512-token prompt each step", True)):
        times: dict[bool, list[float]] = {True: [], False: []}
        launched = engine.steps.num_launched
        for on in (True, False, True, False):
            engine.steps.enabled = on
            _fill(engine, 64, adapters, f"pipe-{case[:6]}-{on}-{len(times[on])}")
            settle()
            if not per_step:  # the batch is full: one more request waits, so no window forms
                engine.scheduler.queue.max_num_seqs = 64
                _fill(engine, 1, adapters, f"wait-{on}-{len(times[on])}")
            _sync()
            t = time.perf_counter()
            for i in range(steps):
                if per_step:
                    _fill(engine, 1, adapters, f"pipe-fresh-{on}-{len(times[on])}-{i}", prompt_len=512)
                engine.step()
            _sync()
            times[on].append(round((time.perf_counter() - t) / steps * 1e3, 2))
            engine.scheduler.queue.max_num_seqs = engine.config.scheduler.max_num_seqs
            _drain(engine)
        engine.steps.enabled = False
        launched = engine.steps.num_launched - launched
        results.append({"case": case, "on_ms": times[True], "off_ms": times[False], "async_steps": launched})
        print(f"== pipelined {case}: on {times[True]} ms/step, off {times[False]} ms/step, "
              f"{launched} asynchronous steps", flush=True)
    return results


def _drain(engine: Engine) -> None:
    for rid in list(engine.requests._requests):
        engine.abort(rid)
    for _ in range(3):
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--syncs", action="store_true", help="list one more step's synchronizing operations per case")
    ap.add_argument("--out", default=None)
    ap.add_argument("--graphs", action="store_true",
                    help="captured graphs on, decode windows off: the steps a served engine runs one at a "
                         "time (decode rows, fresh prompt chunks beside them, training beside them); the "
                         "gap between a step's wall time and its GPU busy time is what the host adds")
    args = ap.parse_args()
    spec = SPECS[args.model]
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model, path = prepare_base(spec, Path("/tmp/loquetier-bench"), args.device, dtype)
    del model
    engine = Engine.from_pretrained(path, device=args.device, dtype=dtype, kv_memory_gb=8.0 if args.device == "cuda"
                                    else 0.2, max_num_seqs=128, max_num_batched_tokens=4096 + 128,
                                    max_prefill_chunk=512, max_adapter_slots=36, num_train_slots=4,
                                    max_lora_rank=16, max_model_len=2048,
                                    cuda_graphs=("on" if args.device == "cuda" else "eager") if args.graphs
                                    else "off",
                                    decode_window=1 if args.graphs else 4, async_steps=False,
                                    default_tpot_ms=100_000.0, default_ttft_ms=100_000.0,
                                    adapter_cache_bytes=16 << 30)  # 32 adapters of the 8B shape: 5.4 GB
    t0 = time.perf_counter()
    engine.warmup()
    print(f"[profile] warm-up {time.perf_counter() - t0:.1f}s", flush=True)
    for i in range(32):
        a = LoRAAdapter.new(LoRAConfig(rank=16, alpha=32, target_modules=TARGETS), engine.model.dims, seed=i)
        for _, b in a.weights.values():
            b.normal_(0, 0.01)
        engine.load_adapter(f"a{i}", a)
    adapters: list[str | None] = [f"a{i}" for i in range(32)]
    if args.graphs:
        print(f"[profile] {engine.capture_graphs()} graphs captured", flush=True)
    ph = _instrument(engine)
    report: list[dict[str, Any]] = []
    launch = _launch_costs(engine)

    def settle() -> None:
        while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
            engine.step()
        for _ in range(3):
            engine.step()

    for name, ids in (("decode b64, no adapters", [None]), ("decode b64, 32 adapters", adapters)):
        _fill(engine, 64, ids, name)
        settle()
        report.append(_measure(engine, ph, name, args.steps, args.cprofile, syncs=args.syncs))
        if ids is adapters and args.graphs:
            def fresh_prompt(i: int) -> None:  # a fresh 512-token prompt: one chunk
                _fill(engine, 1, adapters, f"fresh-{i}", prompt_len=512)

            report.append(_measure(engine, ph, "64 decode + a fresh 512-token prompt",
                                   args.steps, args.cprofile, fresh_prompt, syncs=args.syncs))
        if ids is adapters:
            def deep_prompt(i: int) -> None:  # a 1,536-token prompt: its last chunk reads ~1,300 keys/row
                _fill(engine, 1, adapters, f"deep-{i}", prompt_len=1536)
                engine.step()
                engine.step()  # two chunks of 512 as their own steps; the timed step holds the third

            report.append(_measure(engine, ph, "64 decode + 512-token prompt chunk at context 1,536",
                                   args.steps, args.cprofile, deep_prompt, syncs=args.syncs))
        _drain(engine)

    from benchmarks.harness.replay import add_training_jobs

    gen = torch.Generator().manual_seed(3)
    vocab = min(30000, engine.model.cfg.vocab_size)
    examples = [{"prompt_token_ids": torch.randint(3, vocab, (96,), generator=gen).tolist(),
                 "completion_token_ids": torch.randint(3, vocab, (160,), generator=gen).tolist()}
                for _ in range(256)]
    job_ids = add_training_jobs(engine, [(f"t{i}", examples) for i in range(4)], micro_batch_tokens=1024,
                                max_steps=1000)
    for _ in range(2):
        engine.step()
    report.append(_measure(engine, ph, "training: 4 jobs x 1,024 tokens", args.steps, args.cprofile, syncs=args.syncs))
    _fill(engine, 64, adapters, "beside")
    settle()
    report.append(_measure(engine, ph, "training 4 x 1,024 + 64 decode rows", args.steps, args.cprofile,
                           syncs=args.syncs))
    for j in job_ids:
        engine.cancel_job(j)
    _drain(engine)
    ph.restore()
    pipelined = _pipelined_ab(engine, adapters, args.steps * 3, settle) if args.graphs else []
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    title = f"# profile_step {args.model} on {where}" + (", captured graphs, no decode windows" if args.graphs else "")
    lines = [title,
             "", "| case | step (median) | GPU busy | kernels | host ms by phase |", "|---|---|---|---|---|"]
    for r in report:
        phases = ", ".join(f"{k} {v}" for k, v in r["host_ms_per_phase"].items())
        lines.append(f"| {r['case']} | {r['median_ms']} ms | {r['gpu_busy_ms']:.2f} ms | {r['kernels']} | {phases} |")
    lines += ["", "launch costs (host, us): " + ", ".join(f"{k} {v:.1f}" for k, v in launch.items()), ""]
    if pipelined:
        lines += ["## Steps back to back, asynchronous steps on and off", "",
                  "ms per step over runs of steps with one synchronization each (two rounds, alternating):", "",
                  "| case | on | off | off / on |", "|---|---|---|---|"]
        for r in pipelined:
            on, off = r["on_ms"], r["off_ms"]
            lines.append(f"| {r['case']} | {' / '.join(map(str, on))} ms | {' / '.join(map(str, off))} ms | "
                         f"{min(off) / min(on):.3f} |")
        lines.append("")
    for r in report:
        lines += [f"## {r['case']}", "top CUDA (name, count, ms):"]
        lines += [f"  {t}" for t in r["top_cuda"]]
        lines += ["top CPU self (name, count, ms):"] + [f"  {t}" for t in r["top_cpu"]]
        if "syncs" in r:
            lines += [f"synchronizations in one step ({sum(r['syncs'].values())}):"]
            lines += [f"  {n} x {site}" for site, n in r["syncs"].items()]
        if "cprofile" in r:
            lines += ["```", r["cprofile"], "```"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "profile_step_graphs" if args.graphs else "profile_step"
        Path(args.out, f"{name}.md").write_text(text)
        Path(args.out, f"{name}.json").write_text(json.dumps({"launch_us": launch, "cases": report,
                                                               "pipelined": pipelined}, indent=1))


if __name__ == "__main__":
    main()
