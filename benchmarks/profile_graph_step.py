"""Where the time of a graph-replayed decode step goes: host phases, GPU kernels, synchronizations.

    python -m benchmarks.profile_graph_step --model 8b --device cuda [--out DIR]

The engine is built as bench_offline builds it (README limits, 32 rank-16 adapters, graphs captured,
warmed up). For batches of 32, 64 and 128 decode rows, with no adapters and with 32 adapters (round
robin), it prints the median wall time of a step (synchronized), the host time per phase (no syncs:
the time the host spends issuing the step), the GPU kernels of one step by total time (kernels inside
the replayed graph included), and the number of host-device synchronizations a step makes.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.models import SPECS, prepare_base, write_adapters
from benchmarks.profile_step import Phases, _drain, _fill, _gpu_profile, _sync
from loquetier import Engine


def _instrument(engine: Engine) -> Phases:
    ph = Phases()
    ph.wrap(engine, "_step", "other (engine step)")
    ph.wrap(engine.scheduler, "schedule", "schedule")
    ph.wrap(engine.scheduler, "postprocess", "postprocess")
    ph.wrap(engine.requests, "events", "request events")
    graphs = engine.runner.graphs
    if graphs is not None:
        ph.wrap(graphs, "_fill", "graph input layout")
        ph.wrap(graphs, "run", "graph run (rest)")
    ph.wrap(engine.runner, "_sample", "sample")
    return ph


def _count_syncs(engine: Engine) -> int:
    if engine.device.type != "cuda":
        return -1
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
            _sync()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _case(engine: Engine, batch: int, adapters: list[str | None], tag: str, steps: int) -> dict[str, Any]:
    _fill(engine, batch, adapters, tag, prompt_len=200)
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    ph = _instrument(engine)
    times = []
    graph0 = engine.runner.num_graph_steps
    for _ in range(steps):
        _sync()
        t = time.perf_counter()
        engine.step()
        _sync()
        times.append(time.perf_counter() - t)
    n = max(1, ph.calls["other (engine step)"])
    phases = {k: round(v / n * 1e3, 3) for k, v in sorted(ph.totals.items(), key=lambda kv: -kv[1])}
    ph.restore()
    out: dict[str, Any] = {"case": tag, "batch": batch, "graph_steps": engine.runner.num_graph_steps - graph0,
                           "steps": steps, "median_ms": round(sorted(times)[len(times) // 2] * 1e3, 3),
                           "min_ms": round(min(times) * 1e3, 3), "host_ms_per_phase": phases,
                           "host_ms_total": round(sum(phases.values()), 3)}
    out["syncs_per_step"] = _count_syncs(engine)
    out.update(_gpu_profile(engine))
    print(f"== {tag}: median {out['median_ms']} ms, GPU busy {out['gpu_busy_ms']:.2f} ms, "
          f"{out['kernels']} kernels, {out['syncs_per_step']} syncs; host {phases}", flush=True)
    for key, count, ms in out["top_cuda"]:
        print(f"     {ms:8.3f} ms {count:6d}x  {key}", flush=True)
    _drain(engine)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/loquetier-bench"))
    args = ap.parse_args()
    spec = SPECS[args.model]
    model, path = prepare_base(spec, args.cache, args.device, "bfloat16")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    else:
        from loquetier.kernels.ops import force_backend

        force_backend("reference")
    ids = [f"r16-{i:02d}" for i in range(32)]
    write_adapters(spec, args.cache / "adapters-r16", ids, [16] * 32)
    kv_gb = 24.0 if args.device.startswith("cuda") else 0.25
    engine = Engine.from_pretrained(path, device=args.device, dtype="bfloat16", max_num_seqs=128,
                                    max_adapter_slots=40, kv_memory_gb=kv_gb, max_model_len=1024)
    for adapter_id in ids:
        engine.load_adapter(adapter_id, args.cache / "adapters-r16" / adapter_id)
    print("captured", engine.capture_graphs(), "warm-up", engine.warmup(), flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               "cases": []}
    for batch in (int(b) for b in args.batches.split(",")):
        for label, adapters in (("base", [None]), ("lora32", list(ids))):
            results["cases"].append(_case(engine, batch, adapters, f"{label}-b{batch}", args.steps))
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                Path(args.out, "profile_graph_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
