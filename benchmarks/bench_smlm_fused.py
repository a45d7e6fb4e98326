"""One SMLM launch per target module for decode steps (``smlm.shrink_expand``) vs the two launches.

    python -m benchmarks.bench_smlm_fused --out DIR      # H200, ~2-4 min; DIR/smlm_fused.{json,md}
    TRITON_INTERPRET=1 python -m benchmarks.bench_smlm_fused --tiny --out DIR   # CPU smoke run

One 8B decode step's LoRA work (Llama-3-8B shapes, 32 layers; per layer q|k|v (4096 -> 4096+1024+1024)
and gate|up (4096 -> 2 x 14336) as fused parts, o (4096 -> 4096) and down (14336 -> 4096) alone; 32
rank-16 adapters on all seven targets in a 33-slot pool) is run both ways from the same inputs:

- check: every layer's outputs of the whole step, one-launch vs two-launch path, max |delta| (absolute
  and relative to max |LoRA term|), and layer 0 of each against the fp32 torch reference loop;
- time: the whole step (all 32 layers), and each module alone over the 32 layers, captured in one CUDA
  graph per variant and replayed (``triton.testing.do_bench``, median, each timed twice); eager
  (Python launch) time of the whole step as well.

Batches: 32 and 128 decode rows, one row per adapter round robin (each row its own segment), and 128
rows sorted by adapter (4-row segments: how ``DecodeGraphs`` lays a step out). Variants: the two
launches, the one launch with the default ``Tuning``, and a few one-launch tunings (column chunks per
block, chunk width, the down projection left on two launches). The weight-read floor of a step: every
used adapter's A and B once plus the rows in and out of each LoRA term, at 4.27 TB/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PEAK_BYTES_PER_S = 4.27e12
FULL = {"hidden": 4096, "q": 4096, "kv": 1024, "inter": 14336, "layers": 32, "rank": 16, "adapters": 32}
TINY = {"hidden": 64, "q": 64, "kv": 32, "inter": 96, "layers": 2, "rank": 16, "adapters": 4}
MODULES = ("qkv", "o", "gate_up", "down")
# name: Tuning overrides (None: the two launches)
VARIANTS: dict[str, dict[str, int] | None] = {
    "two launches": None,
    "one launch": {},
    "one launch, 1 program/SM": {"fused_programs_per_sm": 1},
    "one launch, 4 programs/SM": {"fused_programs_per_sm": 4},
    "one launch, chunks >= 256 cols": {"fused_min_cols": 256},
    "one launch, chunks >= 2048 cols": {"fused_min_cols": 2048},
    "one launch, BLOCK_N 128": {"fused_block_n": 128},
    "one launch, BLOCK_K 256": {"fused_block_k": 256},
    "one launch, BLOCK_K 256, 3 stages": {"fused_block_k": 256, "fused_stages": 3},
    "one launch, 8 warps": {"fused_warps": 8},
    "one launch but down": {"fused_max_in_features": 4096},
}


def _batches(dims: dict[str, int]) -> list[tuple[str, list[int]]]:
    n = dims["adapters"]
    small, big = (32, 128) if n == 32 else (4, 16)
    return [(f"decode {small} / {n} adapters, round robin", [1 + i % n for i in range(small)]),
            (f"decode {big} / {n} adapters, round robin", [1 + i % n for i in range(big)]),
            (f"decode {big} / {n} adapters, sorted", [1 + i * n // big for i in range(big)])]


def _layers(torch: Any, ModuleLoRA: Any, dims: dict[str, int], device: str, dtype: Any, gen: Any) -> list[dict]:
    h, q, kv, inter, rank = dims["hidden"], dims["q"], dims["kv"], dims["inter"], dims["rank"]
    shapes = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, inter), "up": (h, inter),
              "down": (inter, h)}
    slots = dims["adapters"] + 1
    layers = []
    for _ in range(dims["layers"]):
        mods = {}
        for name, (fin, fout) in shapes.items():
            lo = ModuleLoRA.empty(slots, rank, fin, fout, dtype=dtype, device=device)
            lo.a.copy_(torch.randn(lo.a.shape, generator=gen, device=device) * fin ** -0.5)
            lo.b.copy_(torch.randn(lo.b.shape, generator=gen, device=device) * 0.05)
            lo.ranks[1:] = rank
            lo.scales[1:] = 2.0
            lo.host_ranks = [0] + [rank] * (slots - 1)
            mods[name] = lo
        layers.append({"qkv": [(mods["q"], 0), (mods["k"], q), (mods["v"], q + kv)], "o": [(mods["o"], 0)],
                       "gate_up": [(mods["gate"], 0), (mods["up"], inter)], "down": [(mods["down"], 0)]})
    return layers


def _module(smlm: Any, fused: bool, x: Any, y: Any, parts: list, meta: Any) -> None:
    """One module's LoRA term into y, as ``kernels/ops.py`` launches it with the switch on or off."""
    loras = [lo for lo, _ in parts]
    if fused and smlm.fused_applies(loras, meta):
        smlm.shrink_expand(y, x, parts, meta)
    elif len(parts) > 1:
        smlm.expand_parts(y, smlm.shrink_parts(x, loras, meta), parts, meta)
    else:
        smlm.expand(y, smlm.shrink(x, loras[0], meta), loras[0], meta, parts[0][1])


def _floor_ms(dims: dict[str, int], rows: int, adapters: int, modules: tuple[str, ...] = MODULES) -> float:
    h, q, kv, inter, r = dims["hidden"], dims["q"], dims["kv"], dims["inter"], dims["rank"]
    io = {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * inter), "down": (inter, h)}
    parts = {"qkv": 3, "o": 1, "gate_up": 2, "down": 1}
    total = 0
    for m in modules:
        fin, fout = io[m]
        total += adapters * r * (parts[m] * fin + fout) + rows * (fin + 2 * fout)
    return 1e3 * 2 * dims["layers"] * total / PEAK_BYTES_PER_S


def _import_kernels() -> tuple[Any, Any, Any, Any]:
    """The SMLM package: ``loquetier.kernels`` when installed, else ``kernels/`` of this checkout."""
    try:
        from loquetier import kernels
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import kernels  # type: ignore[no-redef]
    from importlib import import_module

    ref, smlm = (import_module(f"{kernels.__name__}.{m}") for m in ("reference", "smlm"))
    return kernels.ModuleLoRA, kernels.SMLMMeta, ref, smlm


def run(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915
    import torch

    from benchmarks.harness.common import captured

    ModuleLoRA, SMLMMeta, reference, smlm = _import_kernels()  # noqa: N806
    dims = TINY if args.tiny else FULL
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    is_gpu = device == "cuda"
    dtype = torch.bfloat16 if is_gpu else torch.float32
    if not is_gpu and not smlm.INTERPRET:
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 and --tiny")
    gen = torch.Generator(device=device).manual_seed(0)
    layers = _layers(torch, ModuleLoRA, dims, device, dtype, gen)
    widths = {"qkv": dims["q"] + 2 * dims["kv"], "o": dims["hidden"], "gate_up": 2 * dims["inter"],
              "down": dims["hidden"]}
    inputs = {"qkv": dims["hidden"], "o": dims["q"], "gate_up": dims["hidden"], "down": dims["inter"]}
    variants = VARIANTS if is_gpu else {k: VARIANTS[k] for k in ("two launches", "one launch")}
    if args.variants:
        variants = {k: v for k, v in VARIANTS.items() if k in args.variants.split(",") or v is None}
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                               "gpu": torch.cuda.get_device_name() if is_gpu else "cpu (interpreter)",
                               "torch": torch.__version__, "dims": dims, "command": " ".join(sys.argv),
                               "batches": {}}
    if is_gpu:
        from triton.testing import do_bench

    def timed(fn: Any) -> list[float]:
        if not is_gpu:
            t0 = time.perf_counter()
            fn()
            return [1e3 * (time.perf_counter() - t0)]
        return [do_bench(fn, warmup=5, rep=40, return_mode="median") for _ in range(2)]

    def graphed(fn: Any) -> Any:
        if not is_gpu:
            return fn
        return captured(fn).replay

    for label, slots in _batches(dims):
        rows = len(slots)
        meta = SMLMMeta.build(slots, 0, device)
        xs = {m: torch.randn(rows, inputs[m], device=device, dtype=dtype, generator=gen) for m in MODULES}
        y0 = {m: torch.randn(rows, dims["layers"] * widths[m], device=device, dtype=dtype, generator=gen)
              for m in MODULES}  # each layer writes its own column band: every layer's output is checked

        def step(fused: bool, ys: dict[str, Any], modules: tuple[str, ...] = MODULES) -> None:
            for i, layer in enumerate(layers):  # noqa: B023 (run at once)
                for m in modules:
                    y = ys[m][:, i * widths[m] : (i + 1) * widths[m]]
                    _module(smlm, fused, xs[m], y, layer[m], meta)  # noqa: B023

        row: dict[str, Any] = {"rows": rows, "segments": meta.num_segments, "max_seg_len": meta.max_seg_len,
                               "floor_ms": _floor_ms(dims, rows, dims["adapters"]),
                               "module_floor_ms": {m: _floor_ms(dims, rows, dims["adapters"], (m,)) for m in MODULES},
                               "variants": {}}
        # the fp32 reference for layer 0 (its loop syncs per segment: one layer only)
        ref0 = {m: y0[m][:, : widths[m]].float().clone() for m in MODULES}
        for m in MODULES:
            reference.shrink_expand_ref(ref0[m], xs[m], layers[0][m], meta)
        two_out: dict[str, Any] | None = None
        for name, overrides in variants.items():
            fused = overrides is not None
            smlm.TUNING = dataclasses.replace(smlm.Tuning(), **(overrides or {}))
            res: dict[str, Any] = {}
            try:
                ys = {m: t.clone() for m, t in y0.items()}
                step(fused, ys)  # compiles; the output for the checks
                if is_gpu:
                    torch.cuda.synchronize()
                delta = {m: (ys[m].float() - y0[m].float()) for m in MODULES}
                lora_max = max(float(d.abs().max()) for d in delta.values())
                ref_err = max(float((ys[m][:, : widths[m]].float() - ref0[m]).abs().max()) for m in MODULES)
                res["max_abs_vs_reference_layer0"] = ref_err
                res["max_lora_term"] = lora_max
                if two_out is None:
                    two_out = delta
                else:
                    diff = max(float((delta[m] - two_out[m]).abs().max()) for m in MODULES)
                    res["max_abs_vs_two_launches"] = diff
                    res["rel_vs_two_launches"] = diff / max(lora_max, 1e-12)
                    res["applies"] = {m: bool(smlm.fused_applies([lo for lo, _ in layers[0][m]], meta))
                                      for m in MODULES}
                ys = {m: t.clone() for m, t in y0.items()}
                res["eager_ms"] = timed(lambda f=fused, y=ys: step(f, y))
                res["graph_ms"] = timed(graphed(lambda f=fused, y=ys: step(f, y)))
                res["module_graph_ms"] = {m: timed(graphed(lambda f=fused, y=ys, mm=m: step(f, y, (mm,))))
                                          for m in MODULES}
            except Exception as exc:  # noqa: BLE001 (a variant that fails is a result; the others still run)
                res["error"] = f"{type(exc).__name__}: {exc}"[:400]
            row["variants"][name] = res
            print(label, "|", name, "|", json.dumps(res), flush=True)
            if is_gpu:
                torch.cuda.empty_cache()
        smlm.TUNING = smlm.Tuning()
        results["batches"][label] = row
    return results


def _ms(v: dict[str, Any], key: str, module: str | None = None) -> float | None:
    t = v.get(key)
    if module is not None:
        t = (t or {}).get(module)
    return min(t) if t else None


def table(results: dict[str, Any]) -> str:
    lines = []
    for label, b in results["batches"].items():
        lines += [f"### {label} ({b['rows']} rows, {b['segments']} segments; floor {b['floor_ms']:.3f} ms)", "",
                  "| variant | step, graph ms (x floor) | step, eager ms | " + " | ".join(
                      f"{m} us/launch" for m in MODULES) + " | max abs vs two launches (rel) | "
                  "max abs vs fp32 ref |",
                  "|---|---|---|" + "---|" * len(MODULES) + "---|---|"]
        base = _ms(b["variants"].get("two launches", {}), "graph_ms")
        for name, v in b["variants"].items():
            if "error" in v:
                lines.append(f"| {name} | error: {v['error'][:100]} |")
                continue
            g = _ms(v, "graph_ms")
            speed = f", {base / g:.2f}x" if base and g and name != "two launches" else ""
            cells = [f"{g:.3f} ({g / b['floor_ms']:.1f}x{speed})" if g else "-",
                     f"{_ms(v, 'eager_ms'):.3f}" if _ms(v, "eager_ms") else "-"]
            layers = results["dims"]["layers"]
            for m in MODULES:
                t = _ms(v, "module_graph_ms", m)
                cells.append(f"{1e3 * t / layers:.1f}" if t else "-")
            if "max_abs_vs_two_launches" in v:
                cells.append(f"{v['max_abs_vs_two_launches']:.2e} ({v['rel_vs_two_launches']:.1e})")
            else:
                cells.append("-")
            cells.append(f"{v.get('max_abs_vs_reference_layer0', float('nan')):.2e}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch: the one launch (default tuning, and the best variant) against the two launches, graph
    step time (one launch goes on by default only where it is not slower)."""
    out = []
    for label, b in results["batches"].items():
        base = _ms(b["variants"].get("two launches", {}), "graph_ms")
        if not base:
            continue
        ones = {n: _ms(v, "graph_ms") for n, v in b["variants"].items() if n != "two launches" and "error" not in v}
        ones = {n: t for n, t in ones.items() if t}
        cases = [("one launch", ones.get("one launch"))]
        if ones:
            best = min(ones, key=ones.__getitem__)
            cases.append((f"best one-launch variant ({best})", ones[best]))
        for name, t in cases:
            if t:
                out.append({"name": f"{label}: {name} / two launches, graph step", "goal": "<= 1.0x",
                            "measured": t / base, "ok": t / base <= 1.0})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "docs/benchmarks")))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, 2 layers (CPU: with TRITON_INTERPRET=1)")
    ap.add_argument("--variants", help="comma-separated variant names to run (the two launches always run)")
    ap.add_argument("--from-json", type=Path, help="write the page from an earlier run's JSON (no GPU)")
    ap.add_argument("--model", help=argparse.SUPPRESS)  # run_all.sh passes these to every script
    ap.add_argument("--device", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    results["targets"] = targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smlm_fused.json").write_text(json.dumps(results, indent=1))
    text = (f"# One SMLM launch per module for decode steps\n\n{results['date']}, {results['gpu']}, "
            f"`{results['command']}`. Llama-3-8B LoRA shapes, {results['dims']['adapters']} rank-"
            f"{results['dims']['rank']} adapters on all seven targets, {results['dims']['layers']} layers; "
            "ms per step replayed from one CUDA graph (median of do_bench, best of two); us per launch = "
            "the module alone over every layer / layers. Deltas are over every layer's LoRA term.\n\n"
            + table(results) + "\n## Targets\n\n| target | goal | measured | status |\n|---|---|---|---|\n"
            + "".join(f"| {t['name']} | {t['goal']} | {t['measured']:.3f} | {'MET' if t['ok'] else 'missed'} |\n"
                      for t in results["targets"]))
    (args.out / "smlm_fused.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
