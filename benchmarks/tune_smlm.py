"""Launch parameters of the forward SMLM kernels, timed the way a decode step runs them.

    python -m benchmarks.tune_smlm --out DIR                 # ~1 min on one GPU; DIR/tune_smlm.{json,md}

One step's LoRA work of a Llama-3-8B shape (32 layers; per layer q|k|v and gate|up as one parts
launch each, o and down alone; rank 16 on all seven targets; 33 slots per module, 32 adapters in
use) is captured in one CUDA graph per variant (a path and ``kernels.smlm.Tuning`` overrides, see
``VARIANTS``) and replayed; every variant is first checked against the first one's output. Reported:
ms per step (median of replays) and the weight-read floor (the used adapters' A and B once, plus the
rows in and out, at 4.27 TB/s); the step holds 8 SMLM launches a layer (a shrink and an expand for
q|k|v, o, gate|up and down), plus a memset of v per shrink on the atomic path. The batches: decode 32
rows (1 per adapter), 64 rows (2 per adapter), 256 rows (8 per adapter), a 1,024-token prefill over 8
adapters. For the decode default and one other split variant (``BREAKDOWN``), each module's
shrinks alone and its shrinks and expands are timed apart too (the decode batches), against their
weight-read floors.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
from typing import Any

PEAK_BYTES_PER_S = 4.27e12
DEVICE = "cuda"
HIDDEN, Q, KV, INTER, LAYERS, RANK, SLOTS = 4096, 4096, 1024, 14336, 32, 16, 33
BATCHES = [("decode 32 / 32 adapters", 32, 32), ("decode 64 / 32 adapters", 64, 32),
           ("decode 256 / 32 adapters", 256, 32), ("prefill 1024 / 8 adapters", 1024, 8)]
# name -> (Tuning overrides, path): "atomic" (shrink's K splits added with fp32 atomics into a zeroed
# v, then expand: the path of prefill chunks and training rows), "ordered" (the same with
# LOQUETIER_SMLM_DETERMINISTIC=1: splits stored apart, a torch.sum, then expand), "split" (what a
# decode-sized inference-only step runs, ``smlm.forward_split``: splits stored apart, added by expand)
VARIANTS: dict[str, tuple[dict[str, int], str]] = {
    "default (atomic)": ({}, "atomic"),
    "ordered sums": ({}, "ordered"),
    "split partials (decode default)": ({}, "split"),
    "split, shrink 4 warps": ({"decode_shrink_warps": 4}, "split"),
    "split, shrink rank tile 32, 4 warps": ({"shrink_rank_tile": 32, "decode_shrink_warps": 4}, "split"),
    "split, whole rank tile, 4 warps (before 2026-12-04)": ({"shrink_rank_tile": 0, "decode_shrink_warps": 4},
                                                            "split"),
    "split, expand N 128": ({"expand_block_n": 128}, "split"),
    "split, expand N 256": ({"expand_block_n": 256}, "split"),
    "split, expand 4 warps": ({"decode_expand_warps": 4}, "split"),
    "split, expand loop over splits not unrolled": ({"expand_split_tile": 0}, "split"),
    "split, expand unrolls 4 splits": ({"expand_split_tile": 4}, "split"),
    "split, GEMV tiles up to 1 row": ({"gemv_max_rows": 1}, "split"),
    "split, GEMV tiles up to 2 rows": ({"gemv_max_rows": 2}, "split"),
    "split, GEMV tiles up to 4 rows": ({"gemv_max_rows": 4}, "split"),
    "split, GEMV tiles up to 8 rows": ({"gemv_max_rows": 8}, "split"),
    "split, GEMV up to 8 rows, expand 4 warps": ({"gemv_max_rows": 8, "decode_expand_warps": 4}, "split"),
    "split, GEMV up to 8 rows, expand N 256": ({"gemv_max_rows": 8, "expand_block_n": 256}, "split"),
    "atomic, GEMV tiles up to 8 rows": ({"gemv_max_rows": 8}, "atomic"),
    "split, expand N 256, 4 warps, not unrolled (before 2026-12-04 10:40)": (
        {"expand_block_n": 256, "expand_split_tile": 0, "decode_expand_warps": 4}, "split"),
}
# the modules of a layer, their input, output and parts ((target, column offset)), for the breakdown
MODULES = {"q,k,v": ("h", "qkv", (("q", 0), ("k", Q), ("v", Q + KV))), "o": ("a", "o", (("o", 0),)),
           "gate,up": ("h", "gu", (("gate", 0), ("up", INTER))), "down": ("m", "down", (("down", 0),))}
DECODE_DEFAULT = "split partials (decode default)"
# timed per module too
BREAKDOWN = [DECODE_DEFAULT, "split, GEMV tiles up to 8 rows"]
BASELINE = "default (atomic)"


def _modules(torch: Any, ModuleLoRA: Any, gen: Any, pool_rank: int = RANK) -> list[dict[str, Any]]:
    """Per layer: the seven targets' slot storage (``pool_rank`` wide, as ``max_lora_rank`` makes it),
    rank 16 in slots 1..32 (slot 0 empty)."""
    shapes = {"q": (HIDDEN, Q), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (Q, HIDDEN),
              "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}
    layers = []
    for _ in range(LAYERS):
        mods = {}
        for name, (fin, fout) in shapes.items():
            lo = ModuleLoRA.empty(SLOTS, pool_rank, fin, fout, dtype=torch.bfloat16, device=DEVICE)
            lo.a.normal_(0, fin ** -0.5, generator=gen)
            lo.b.normal_(0, 0.02, generator=gen)
            lo.ranks[1:] = RANK
            lo.scales[1:] = 2.0
            lo.host_ranks = [0] + [RANK] * (SLOTS - 1)
            mods[name] = lo
        layers.append(mods)
    return layers


def _step(smlm: Any, layers: list[dict[str, Any]], xs: dict[str, Any], ys: dict[str, Any], meta: Any,
          path: str = "atomic") -> None:
    """The LoRA launches of one forward step, in the model's order (base GEMMs left out)."""
    if path == "split":
        for m in layers:
            smlm.forward_split(ys["qkv"], xs["h"], [(m["q"], 0), (m["k"], Q), (m["v"], Q + KV)], meta)
            smlm.forward_split(ys["o"], xs["a"], [(m["o"], 0)], meta)
            smlm.forward_split(ys["gu"], xs["h"], [(m["gate"], 0), (m["up"], INTER)], meta)
            smlm.forward_split(ys["down"], xs["m"], [(m["down"], 0)], meta)
        return
    smlm.set_deterministic(path == "ordered")
    for m in layers:
        smlm.expand_parts(ys["qkv"], smlm.shrink_parts(xs["h"], [m["q"], m["k"], m["v"]], meta),
                          [(m["q"], 0), (m["k"], Q), (m["v"], Q + KV)], meta)
        smlm.expand(ys["o"], smlm.shrink(xs["a"], m["o"], meta), m["o"], meta)
        smlm.expand_parts(ys["gu"], smlm.shrink_parts(xs["h"], [m["gate"], m["up"]], meta),
                          [(m["gate"], 0), (m["up"], INTER)], meta)
        smlm.expand(ys["down"], smlm.shrink(xs["m"], m["down"], meta), m["down"], meta)
    smlm.set_deterministic(None)


def _module_launches(smlm: Any, layers: list[dict[str, Any]], xs: dict[str, Any], ys: dict[str, Any], meta: Any,
                     module: str, expand: bool) -> None:
    """One module's split-path launches in every layer: the shrinks, and the expands when ``expand``."""
    x_key, y_key, parts = MODULES[module]
    for m in layers:
        finish = smlm.split_shrink(xs[x_key], [(m[name], off) for name, off in parts], meta)
        if expand:
            finish(ys[y_key])


def _breakdown(smlm: Any, do_bench: Any, captured: Any, layers: list[dict[str, Any]],
               xs: dict[str, Any], ys: dict[str, Any], meta: Any, adapters: int) -> dict[str, Any]:
    """Per module: us a layer of its shrinks alone and of its shrinks and expands, each over the 32
    layers in one CUDA graph, and the module's weight-read floor (its adapters' A, then B, once)."""
    out: dict[str, Any] = {}
    for module, (_, _, parts) in MODULES.items():
        lo = layers[0][parts[0][0]]
        a_bytes = adapters * RANK * lo.in_features * 2 * len(parts)
        b_bytes = adapters * RANK * sum(layers[0][name].out_features for name, _ in parts) * 2
        row: dict[str, Any] = {"shrink_floor_us": a_bytes / PEAK_BYTES_PER_S * 1e6,
                               "expand_floor_us": b_bytes / PEAK_BYTES_PER_S * 1e6}
        for expand in (False, True):
            graph = captured(lambda e=expand, mod=module: _module_launches(smlm, layers, xs, ys, meta, mod, e))
            ms = statistics.median(do_bench(graph.replay, warmup=5, rep=40, return_mode="median") for _ in range(3))
            row["shrink_expand_us" if expand else "shrink_us"] = ms * 1e3 / LAYERS
        row["expand_us"] = row["shrink_expand_us"] - row["shrink_us"]
        out[module] = row
    return out


def _floor_ms(rows: int, adapters: int) -> float:
    per_layer_weights = RANK * (HIDDEN * 5 + Q + INTER) + RANK * (Q + 2 * KV + HIDDEN + 2 * INTER + HIDDEN)
    rows_io = rows * (HIDDEN * 2 + Q + INTER) + rows * (Q + 2 * KV + HIDDEN + 2 * INTER + HIDDEN) * 2
    return 1e3 * 2 * LAYERS * (adapters * per_layer_weights + rows_io) / PEAK_BYTES_PER_S


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from triton.testing import do_bench

    from benchmarks.harness.common import captured
    from loquetier.kernels import ModuleLoRA, SMLMMeta, smlm

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    layers = _modules(torch, ModuleLoRA, gen, args.pool_rank)
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                               "gpu": torch.cuda.get_device_name(), "pool_rank": args.pool_rank, "batches": {}}
    for label, rows, adapters in BATCHES:
        slots = [1 + i * adapters // rows for i in range(rows)]  # rows sorted by adapter, equal runs
        meta = SMLMMeta.build(slots, 0, DEVICE)
        xs = {k: torch.randn(rows, n, device=DEVICE, dtype=torch.bfloat16, generator=gen)
              for k, n in (("h", HIDDEN), ("a", Q), ("m", INTER))}
        widths = {"qkv": Q + 2 * KV, "o": HIDDEN, "gu": 2 * INTER, "down": HIDDEN}
        y0 = {k: torch.randn(rows, n, device=DEVICE, dtype=torch.bfloat16, generator=gen) for k, n in widths.items()}
        expected = None
        row: dict[str, Any] = {"floor_ms": _floor_ms(rows, adapters), "variants": {}}
        for name, (overrides, path) in VARIANTS.items():
            smlm.TUNING = dataclasses.replace(smlm.Tuning(), **overrides)
            ys = {k: v.clone() for k, v in y0.items()}
            try:
                _step(smlm, layers, xs, ys, meta, path)  # compiles; the output for the check
                torch.cuda.synchronize()
                out = torch.cat([ys[k].float().flatten() for k in widths]) - torch.cat(
                    [y0[k].float().flatten() for k in widths])
                if expected is None:
                    expected = out
                err = float((out - expected).abs().max() / expected.abs().max())
                graph = captured(lambda: _step(smlm, layers, xs, ys, meta, path))  # noqa: B023 (run at once)
                ms = [do_bench(graph.replay, warmup=5, rep=40, return_mode="median") for _ in range(3)]
                row["variants"][name] = {"ms": statistics.median(ms), "rel_err": err}
                if name in BREAKDOWN and label.startswith("decode"):
                    row["variants"][name]["breakdown"] = _breakdown(smlm, do_bench, captured, layers, xs, ys, meta,
                                                                    adapters)
            except Exception as exc:  # noqa: BLE001 (a variant a GPU cannot run is a result)
                row["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(label, name, row["variants"][name], flush=True)
        smlm.TUNING = smlm.Tuning()
        results["batches"][label] = row
    return results


def pick(results: dict[str, Any]) -> str:
    """``LOQUETIER_SMLM_TUNING=...`` of the split variant with the least time over the decode batches,
    when it beats the decode default's by 3 % or more ("" otherwise)."""
    decode = [b for label, b in results["batches"].items() if label.startswith("decode")]

    def total(name: str) -> float:
        ms = [b["variants"].get(name, {}).get("ms") for b in decode]
        return float("inf") if any(m is None for m in ms) else sum(ms)

    split = [name for name, (_, path) in VARIANTS.items() if path == "split"]
    best = min(split, key=total)
    if total(best) > 0.97 * total(DECODE_DEFAULT) or not VARIANTS[best][0]:
        return ""
    spec = ",".join(f"{k}={v}" for k, v in VARIANTS[best][0].items())
    return f"{spec}\n"


def table(results: dict[str, Any]) -> str:
    """The run's variants, in the order they ran (a page rebuilt with ``--from-json`` shows the names
    the run had, whatever ``VARIANTS`` holds now)."""
    names = list(dict.fromkeys(name for b in results["batches"].values() for name in b["variants"]))
    head = "| variant | " + " | ".join(results["batches"]) + " |"
    lines = [head, "|---|" + "---|" * len(results["batches"])]
    floors = " | ".join(f"{b['floor_ms']:.2f} ms" for b in results["batches"].values())
    floors = f"| weight-read floor | {floors} |"
    for name in names:
        cells = []
        for b in results["batches"].values():
            v = b["variants"].get(name, {})
            if "ms" not in v:
                cells.append("error")
                continue
            base = b["variants"][BASELINE].get("ms")
            rel = f" ({v['ms'] / base:.2f}x)" if base and name != BASELINE else ""
            ok = "" if v["rel_err"] < 3e-2 else " WRONG"
            cells.append(f"{v['ms']:.3f} ms{rel}{ok}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(floors)
    for name in names:
        parts = [(label, b["variants"].get(name, {}).get("breakdown")) for label, b in results["batches"].items()]
        parts = [(label, bd) for label, bd in parts if bd]
        if not parts:
            continue
        lines += ["", f"Per module, `{name}`: us a layer (32 layers in one graph) of the shrinks alone and of the "
                  "expands (shrinks and expands, less the shrinks alone), against their weight-read floors:", "",
                  "| batch | module | shrink us (floor) | expand us (floor) |", "|---|---|---|---|"]
        for label, bd in parts:
            for module, r in bd.items():
                lines.append(f"| {label} | {module} | {r['shrink_us']:.1f} ({r['shrink_floor_us']:.1f}) | "
                             f"{r['expand_us']:.1f} ({r['expand_floor_us']:.1f}) |")
    return "\n".join(lines)


def page(results: dict[str, Any]) -> str:
    return (f"# SMLM launch parameters, one 8B decode step's LoRA work\n\n{results['date']}, {results['gpu']}, "
            "`python -m benchmarks.tune_smlm`. ms per step from one CUDA graph of all 32 layers' LoRA "
            "launches (q|k|v and gate|up as parts launches, o and down alone), rank 16 "
            f"(slot storage of rank {results.get('pool_rank', RANK)}), rows sorted by "
            "adapter; ratios against the atomic path with the defaults of `kernels.smlm.Tuning`. Paths: "
            "`atomic` (K splits added with fp32 atomics into a zeroed v; prefill chunks, training rows), `ordered` "
            "(`LOQUETIER_SMLM_DETERMINISTIC=1`: splits stored apart and summed by torch), `split` "
            "(`smlm.forward_split`, what decode-sized inference-only steps run: splits stored apart, added by "
            "expand).\n\n"
            + table(results) + "\n")


def main() -> None:
    from benchmarks.harness.common import tuner_outputs, tuner_parser

    ap = tuner_parser(__doc__, "LOQUETIER_SMLM_TUNING", "the split variant fastest over the decode batches")
    ap.add_argument("--pool-rank", type=int, default=RANK,
                    help="the slot storage's rank (max_lora_rank; the engine's default is 64), adapters of rank 16")
    args, _ = ap.parse_known_args()
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    tuner_outputs(args, "tune_smlm", results, pick(results), page(results))


if __name__ == "__main__":
    main()
