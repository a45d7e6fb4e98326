"""The base GEMMs of one 8B decode step against their weight-read floor, per BLAS library.

    python -m benchmarks.bench_gemm --out DIR

The four linear layers of every decoder layer (q|k|v, o, gate|up, down: 32 layers, each with its
own weights, so that nothing is served from L2) and the LM head, at the row counts of decode
steps and of a prefill chunk (2,048 rows), each replayed from one CUDA graph (as the engine's
steps are). The floor of a GEMM is the larger of its weight reads at 4.27 TB/s and its FLOPs at
797 TFLOP/s (the H200's dense bf16 rate). ``torch.backends.cuda.
preferred_blas_library`` picks cuBLAS or cuBLASLt for each column of the table. Writes
``gemm.md`` and ``gemm.json`` under DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness.common import captured

HBM = 4.27e12
FLOPS = 797e12
HIDDEN, INTER, Q, KV, VOCAB, LAYERS = 4096, 14336, 4096, 1024, 128256, 32
SHAPES = {"q|k|v": (Q + 2 * KV, HIDDEN), "o": (HIDDEN, Q), "gate|up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}


def _graph_ms(fn, replays: int = 20) -> float:  # type: ignore[no-untyped-def]
    """Median ms of one replay of a CUDA graph of ``fn`` (warmed up on a side stream first)."""
    graph = captured(fn)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="32,64,128,2048")
    ap.add_argument("--libraries", default="cublas,cublaslt")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = {name: [torch.randn(n, k, device=dev, dtype=dt, generator=gen) * 0.02 for _ in range(LAYERS)]
               for name, (n, k) in SHAPES.items()}
    head = torch.randn(VOCAB, HIDDEN, device=dev, dtype=dt, generator=gen) * 0.02
    results: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": []}
    cases: list[dict[str, object]] = []

    def floor_ms(n: int, k: int, rows: int, times: int = 1) -> float:
        return times * max(n * k * 2 / HBM, 2 * rows * n * k / FLOPS) * 1e3

    floor_step = (sum(n * k for n, k in SHAPES.values()) * LAYERS + VOCAB * HIDDEN) * 2 / HBM * 1e3
    for rows in [int(r) for r in args.rows.split(",")]:
        step_floor = sum(floor_ms(n, k, rows, LAYERS) for n, k in SHAPES.values()) + floor_ms(VOCAB, HIDDEN, rows)
        xs = {name: torch.randn(rows, k, device=dev, dtype=dt, generator=gen) for name, (_, k) in SHAPES.items()}
        xh = torch.randn(rows, HIDDEN, device=dev, dtype=dt, generator=gen)
        for lib in args.libraries.split(","):
            torch.backends.cuda.preferred_blas_library(lib)
            case: dict[str, object] = {"rows": rows, "library": lib}
            for name, (n, k) in SHAPES.items():
                ms = _graph_ms(lambda name=name: [F.linear(xs[name], w) for w in weights[name]])
                case[name] = {"us_per_layer": ms * 1e3 / LAYERS, "x_floor": ms / floor_ms(n, k, rows, LAYERS)}
            ms = _graph_ms(lambda: F.linear(xh, head))
            case["lm head"] = {"us_per_layer": ms * 1e3, "x_floor": ms / floor_ms(VOCAB, HIDDEN, rows)}

            def step() -> None:
                for i in range(LAYERS):
                    for name in SHAPES:
                        F.linear(xs[name], weights[name][i])
                F.linear(xh, head)

            ms = _graph_ms(step)
            case["step_ms"], case["step_x_floor"], case["step_floor_ms"] = ms, ms / step_floor, step_floor
            cases.append(case)
            print(json.dumps(case), flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    results["cases"], results["floor_step_ms"] = cases, floor_step
    lines = ["# Base GEMMs of one 8B decode step, per BLAS library\n",
             f"{results['date']}, {results['gpu']}, torch {results['torch']}, `python -m benchmarks.bench_gemm`. "
             f"us per layer (x its floor: weight reads at 4.27 TB/s or FLOPs at 797 TFLOP/s, the larger), each "
             f"module's 32 layers in one CUDA graph; the step: all four modules of 32 layers and the LM head in "
             f"one graph (weight-read floor {floor_step:.2f} ms; at 2,048 rows the FLOPs bound it).\n",
             "| rows | library | " + " | ".join(SHAPES) + " | lm head | step ms (x floor) |",
             "|---|---|" + "---|" * (len(SHAPES) + 2)]
    for c in cases:
        cells = [f"{c[n]['us_per_layer']:.1f} ({c[n]['x_floor']:.2f}x)" for n in [*SHAPES, "lm head"]]  # type: ignore[index]
        lines.append(f"| {c['rows']} | {c['library']} | " + " | ".join(cells)
                     + f" | {c['step_ms']:.2f} ({c['step_x_floor']:.2f}x) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gemm.json").write_text(json.dumps(results, indent=1))
        Path(args.out, "gemm.md").write_text(text)


if __name__ == "__main__":
    main()
