"""The decode linears with the LoRA terms in a Triton base GEMM's loop, against the served path.

    python -m benchmarks.bench_gemm_lora --out DIR      # one GPU, ~3 min; DIR/gemm_lora.{json,md}
    TRITON_INTERPRET=1 python -m benchmarks.bench_gemm_lora --tiny --out DIR   # CPU: the checks only

Each of a Llama-3-8B layer's four LoRA linears (q|k|v and gate|up as one launch each, o, down;
rank 16 on every target, 33 slots, 32 adapters in use, rows sorted by adapter as the scheduler lays
them out), over all 32 layers' own weights in one CUDA graph, at 32 and 64 decode rows. Per linear
(µs a layer, the median of three timings of the graph's replays):

- ``cuBLAS``: the base GEMM alone (``F.linear``), no adapters;
- ``served``: what a decode step runs now (``kernels.ops``: the shrink on a side stream beside the
  cuBLAS GEMM, then the expand);
- ``Triton base``: ``kernels.gemm_lora`` without adapters, each tile configuration;
- ``shrink + fused``: the shrink, then ``gemm_lora`` with the LoRA terms in its loop, one stream;
- ``fused, shrink done``: ``gemm_lora`` with the LoRA terms of a shrink output computed before the
  graph: the linear's time if the shrink ran entirely beside it;
- ``shrink``: the shrink alone.

Every output is checked against the served path's (relative error of the max). The page sums the
four linears over 32 layers into a decode step's linear time for each path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Any

PEAK_BYTES_PER_S = 4.27e12
LAYERS, RANK, SLOTS, ADAPTERS = 32, 16, 33, 32


def _modules(hidden: int, q: int, kv: int, inter: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (in features, the parts' widths)"""
    return {"q,k,v": (hidden, (q, kv, kv)), "o": (q, (hidden,)), "gate,up": (hidden, (inter, inter)),
            "down": (inter, (hidden,))}


FULL = {"modules": _modules(4096, 4096, 1024, 14336), "layers": LAYERS, "rows": (32, 64), "adapters": ADAPTERS,
        "slots": SLOTS,
        # (block_n, block_k, num_warps, num_stages, slots a step of the LoRA loop: 0 = 64 rank columns)
        "configs": [(32, 256, 4, 4, 0), (32, 128, 4, 5, 0), (64, 128, 4, 4, 0), (128, 128, 8, 3, 0),
                    (32, 256, 4, 4, 8)]}
TINY = {"modules": _modules(64, 64, 32, 96), "layers": 2, "rows": (5, 16), "adapters": 4, "slots": 6,
        "configs": [(16, 32, 4, 1, 0), (32, 64, 4, 1, 2)]}


def _timed(do_bench: Any, captured: Any, fn: Any) -> float:
    """ms a call of ``fn``: replays of its CUDA graph on a GPU, one plain call on the CPU."""
    if do_bench is None:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    graph = captured(fn)
    return statistics.median(do_bench(graph.replay, warmup=5, rep=40, return_mode="median") for _ in range(3))


def run(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915
    import torch
    import torch.nn.functional as F  # noqa: N812

    from benchmarks.harness.common import captured
    from loquetier.kernels import ModuleLoRA, SMLMMeta, ops, smlm
    from loquetier.kernels.gemm_lora import Config, linear_lora, parts_ok

    d = TINY if args.tiny else FULL
    gpu = torch.cuda.is_available() and not args.tiny
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    if gpu:
        from triton.testing import do_bench
    else:
        do_bench = None
    gen = torch.Generator(device=dev).manual_seed(0)
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                               "gpu": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                               "pool_rank": args.pool_rank, "rows": {}}
    backend = ops.backend_for(torch.device(dev))
    n_layers, n_adapters, n_slots = d["layers"], d["adapters"], d["slots"]
    for name, (k, widths) in d["modules"].items():
        n = sum(widths)
        weights = [torch.randn(n, k, device=dev, dtype=dtype, generator=gen) * k ** -0.5 for _ in range(n_layers)]
        layers = []
        for _ in range(n_layers):
            parts, offset = [], 0
            for width in widths:
                lo = ModuleLoRA.empty(n_slots, args.pool_rank, k, width, dtype=dtype, device=dev)
                lo.a.normal_(0, k ** -0.5, generator=gen)
                lo.b.normal_(0, 0.02, generator=gen)
                lo.ranks[1:] = RANK
                lo.scales[1:] = 2.0
                lo.host_ranks = [0] + [RANK] * (n_slots - 1)
                parts.append((lo, offset))
                offset += width
            layers.append(parts)
        for rows in args.rows or d["rows"]:
            slots = [1 + i * n_adapters // rows for i in range(rows)]
            meta = SMLMMeta.build(slots, 0, dev)
            x = torch.randn(rows, k, device=dev, dtype=dtype, generator=gen)
            floor_us = (n * k * 2 + n_adapters * RANK * (k + n) * 2) / PEAK_BYTES_PER_S * 1e6
            row: dict[str, Any] = {"floor_us": floor_us, "base_floor_us": n * k * 2 / PEAK_BYTES_PER_S * 1e6}

            def served(w: Any, parts: Any) -> Any:
                with ops.overlap_scope():
                    return ops._forward(x, w, None, parts, meta, backend, False)[0]  # noqa: B023

            want = served(weights[0], layers[0])
            base = F.linear(x, weights[0])
            scale = float(want.float().abs().max())
            row["cublas_us"] = _timed(do_bench, captured, lambda: [F.linear(x, w) for w in weights]) * 1e3 / n_layers  # noqa: B023
            row["served_us"] = _timed(do_bench, captured, lambda: [  # noqa: B023
                served(w, p) for w, p in zip(weights, layers, strict=True)]) * 1e3 / n_layers  # noqa: B023
            row["shrink_us"] = _timed(do_bench, captured,
                                      lambda: [smlm.shrink_splits(x, p, meta) for p in layers]) * 1e3 / n_layers  # noqa: B023
            done = [smlm.shrink_splits(x, p, meta) for p in layers]
            row["configs"] = {}
            for bn, bk, warps, stages, per_step in d["configs"]:
                cfg = Config(bn, bk, warps, stages, per_step)
                key = f"N{bn} K{bk} w{warps} s{stages}" + (f" {per_step} slots/step" if per_step else "")
                entry: dict[str, Any] = {}
                try:
                    if not parts_ok(layers[0], bn):
                        entry["error"] = "parts not on column tiles"
                        raise LookupError
                    got_base = linear_lora(x, weights[0], None, layers[0], None, None, cfg)
                    got = linear_lora(x, weights[0], None, layers[0], smlm.shrink_splits(x, layers[0], meta),
                                      meta.token_slots, cfg)
                    entry["base_err"] = float((got_base.float() - base.float()).abs().max()) / scale
                    entry["fused_err"] = float((got.float() - want.float()).abs().max()) / scale
                    entry["base_us"] = _timed(do_bench, captured, lambda c=cfg: [  # noqa: B023
                        linear_lora(x, w, None, p, None, None, c) for w, p in zip(weights, layers, strict=True)]
                    ) * 1e3 / n_layers
                    entry["fused_us"] = _timed(do_bench, captured, lambda c=cfg: [  # noqa: B023
                        linear_lora(x, w, None, p, smlm.shrink_splits(x, p, meta), meta.token_slots, c)  # noqa: B023
                        for w, p in zip(weights, layers, strict=True)]) * 1e3 / n_layers
                    entry["fused_done_us"] = _timed(do_bench, captured, lambda c=cfg: [  # noqa: B023
                        linear_lora(x, w, None, p, d, meta.token_slots, c)  # noqa: B023
                        for w, p, d in zip(weights, layers, done, strict=True)]) * 1e3 / n_layers
                except LookupError:
                    pass
                except Exception as exc:  # noqa: BLE001 (a configuration a GPU cannot run is a result)
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
                row["configs"][key] = entry
                print(name, rows, key, entry, flush=True)
            ok = {key: e for key, e in row["configs"].items() if "fused_us" in e and e["fused_err"] < 0.02}
            for metric in ("base_us", "fused_us", "fused_done_us"):
                best = min(ok, key=lambda key, m=metric: ok[key][m]) if ok else None
                row[f"best_{metric}"] = (best, ok[best][metric]) if best else (None, None)
            print(name, rows, {key: v for key, v in row.items() if key != "configs"}, flush=True)
            results["rows"].setdefault(str(rows), {})[name] = row
        weights.clear()
        layers.clear()
        if gpu:
            torch.cuda.empty_cache()
    return results


def _step_sums(by_module: dict[str, Any]) -> dict[str, float]:
    """ms a decode step (32 layers) of the four linears, per path."""
    def total(get: Any) -> float:
        values = [get(row) for row in by_module.values()]
        return float("nan") if any(v is None for v in values) else sum(values) * LAYERS / 1e3
    return {"cuBLAS": total(lambda r: r["cublas_us"]), "served": total(lambda r: r["served_us"]),
            "Triton base": total(lambda r: r["best_base_us"][1]),
            "shrink + fused": total(lambda r: r["best_fused_us"][1]),
            "fused, shrink done": total(lambda r: r["best_fused_done_us"][1]),
            "shrink": total(lambda r: r["shrink_us"]), "weight-read floor": total(lambda r: r["floor_us"])}


def page(results: dict[str, Any], command: str) -> tuple[str, list[dict[str, Any]]]:
    lines = ["# Decode linears with the LoRA terms in the GEMM's loop", "",
             f"- date: {results['date']}", f"- device: {results['gpu']}, torch {results['torch']}",
             f"- command: `{command}`", "",
             f"Slot storage of rank {results.get('pool_rank', RANK)}, adapters of rank {RANK}. "
             "µs a layer (32 layers' own weights in one CUDA graph, median of three timings); the floor reads "
             "the base weight and the 32 adapters' A and B once at 4.27 TB/s. Configurations: N columns a "
             "program, K a step, warps, stages.", ""]
    targets = []
    for rows, by_module in results["rows"].items():
        lines += [f"## {rows} decode rows, 32 adapters", "",
                  "| linear | cuBLAS | served | Triton base (best) | shrink + fused (best) | fused, shrink done "
                  "(best) | shrink | floor |", "|---|---|---|---|---|---|---|---|"]
        for name, r in by_module.items():
            def cell(pair: Any) -> str:
                return "n/a" if pair[0] is None else f"{pair[1]:.1f} ({pair[0]})"
            lines.append(f"| {name} | {r['cublas_us']:.1f} | {r['served_us']:.1f} | {cell(r['best_base_us'])} | "
                         f"{cell(r['best_fused_us'])} | {cell(r['best_fused_done_us'])} | "
                         f"{r['shrink_us']:.1f} | {r['floor_us']:.1f} |")
        sums = _step_sums(by_module)
        lines += ["", "A decode step's four linears, 32 layers (ms):", "", "| path | ms |", "|---|---|"]
        lines += [f"| {path} | {ms:.3f} |" for path, ms in sums.items()]
        lines.append("")
        ratio = sums["shrink + fused"] / sums["served"]  # the path the engine can take (Tuning.gemm_lora_rows)
        targets.append({"name": f"shrink + fused / served, {rows} rows", "goal": "< 1.0x", "measured": ratio,
                        "ok": ratio < 1.0})
        lines += ["Every configuration (µs a layer; relative error of the max against the served path):", "",
                  "| linear | configuration | Triton base | shrink + fused | fused, shrink done | error |",
                  "|---|---|---|---|---|---|"]
        for name, r in by_module.items():
            for key, e in r["configs"].items():
                if "fused_us" in e:
                    lines.append(f"| {name} | {key} | {e['base_us']:.1f} | {e['fused_us']:.1f} | "
                                 f"{e['fused_done_us']:.1f} | {e['fused_err']:.1e} |")
                else:
                    lines.append(f"| {name} | {key} | {e.get('error', 'n/a')[:80]} | | | |")
        lines.append("")
    lines += ["## Targets", "", "| target | goal | measured | status |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['goal']} | {t['measured']:.3f} | {'met' if t['ok'] else 'missed'} |"
              for t in targets]
    return "\n".join(lines) + "\n", targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--from-json", type=Path, help="write the page from an earlier run's JSON (no GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the checks, no meaningful timing")
    ap.add_argument("--pool-rank", type=int, default=RANK,
                    help="the slot storage's rank (max_lora_rank; the engine's default is 64), adapters of rank 16")
    ap.add_argument("--rows", type=int, nargs="*", help="decode rows (default 32 and 64)")
    args = ap.parse_args()
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    text, targets = page(results, "python -m benchmarks.bench_gemm_lora --out $OUT")
    results["targets"] = targets
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm_lora.json").write_text(json.dumps(results, indent=1))
    (args.out / "gemm_lora.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
