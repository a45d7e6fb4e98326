"""A decode step's LoRA terms as dense GEMMs over every adapter slot, against the SMLM path.

    python -m benchmarks.bench_lora_dense --out DIR        # one GPU, ~3 min; DIR/lora_dense.{json,md}
    TRITON_INTERPRET=1 python -m benchmarks.bench_lora_dense --tiny --out DIR   # CPU: the checks only

The linear layers of one decode step of a Llama-3-8B shape (32 layers; q|k|v, o, gate|up and down,
their base GEMMs included), 32 rank-16 adapters on all seven targets in a pool of 40 slots, rows
sorted by adapter as a decode graph lays them out. Each variant is captured in one CUDA graph and
replayed (``triton.testing.do_bench``, median, three times):

- ``base``: the base GEMMs alone;
- ``smlm``: ``kernels.ops.lora_linear`` as a decode graph step runs it (the SMLM shrinks on a side
  stream beside each base GEMM, the expands after it);
- ``dense, pool rank R``: each module's shrinks as one GEMM over every slot's A (``x @ A_all.T``,
  ``[rows, parts x slots x R]``), a mask that keeps each row's own adapter's columns (times its
  scale), and each part's expand as one cuBLAS GEMM over every slot's B added into the base output
  (``addmm_``); R is the slot storage's rank (``max_lora_rank``);
- ``dense, A in the base weight``: the same, with each module's base weight and its slots' A stacked
  in one matrix, so that the shrink comes out of the base GEMM (one GEMM fewer a module, no side
  stream).

The dense paths read every slot's A and B, used or not: their bytes grow with slots x R, not with
the adapters a step uses. Checked first: each variant's LoRA terms over the whole step against the
``smlm`` path's (max |delta| over the largest term).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

FULL = {"hidden": 4096, "q": 4096, "kv": 1024, "inter": 14336, "layers": 32, "rank": 16, "adapters": 32,
        "slots": 40, "batches": (32, 64, 128), "pool_ranks": (16, 64)}
TINY = {"hidden": 64, "q": 64, "kv": 32, "inter": 96, "layers": 2, "rank": 16, "adapters": 4, "slots": 6,
        "batches": (4, 8), "pool_ranks": (16, 32)}
MODULES = ("qkv", "o", "gate_up", "down")


def _shapes(d: dict[str, Any]) -> dict[str, tuple[int, list[tuple[str, int, int]]]]:
    """module -> (in features, [(target, column offset, out features)])."""
    h, q, kv, inter = d["hidden"], d["q"], d["kv"], d["inter"]
    return {"qkv": (h, [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)]), "o": (q, [("o", 0, h)]),
            "gate_up": (h, [("gate", 0, inter), ("up", inter, inter)]), "down": (inter, [("down", 0, h)])}


def _build(torch: Any, ModuleLoRA: Any, d: dict[str, Any], device: str, dtype: Any, gen: Any) -> list[dict[str, Any]]:
    """Per layer and module: the base weight stacked over its slots' A (for each pool rank), the
    SMLM storage at the smallest pool rank, and each pool rank's A and B views."""
    slots, rank, ranks = d["slots"], d["rank"], d["pool_ranks"]
    layers = []
    for _ in range(d["layers"]):
        layer: dict[str, Any] = {}
        for module, (fin, parts) in _shapes(d).items():
            n = sum(width for _, _, width in parts)
            loras = {}
            for target, _, width in parts:
                lo = ModuleLoRA.empty(slots, rank, fin, width, dtype=dtype, device=device)
                lo.a.normal_(0, fin ** -0.5, generator=gen)
                lo.b.normal_(0, 0.05, generator=gen)
                lo.ranks[1 : d["adapters"] + 1] = rank
                lo.scales[1 : d["adapters"] + 1] = 2.0
                lo.host_ranks = [0] + [rank] * d["adapters"] + [0] * (slots - d["adapters"] - 1)
                loras[target] = lo
            entry: dict[str, Any] = {"n": n, "smlm": [(loras[t], off) for t, off, _ in parts], "pools": {}}
            base = torch.empty(n, fin, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)
            for pool in ranks:
                stacked = torch.zeros(n + len(parts) * slots * pool, fin, dtype=dtype, device=device)
                stacked[:n] = base
                bs = []
                for p, (target, off, width) in enumerate(parts):
                    lo = loras[target]
                    a = stacked[n + p * slots * pool : n + (p + 1) * slots * pool].view(slots, pool, fin)
                    a[:, :rank] = lo.a  # the slots' A, rows past each adapter's rank zero
                    b = torch.zeros(slots, pool, width, dtype=dtype, device=device)
                    b[:, :rank] = lo.b
                    bs.append((b.view(slots * pool, width), off, width))
                entry["pools"][pool] = {"stacked": stacked, "a_all": stacked[n:], "bs": bs}
            del base
            # the base weight, as one view of the smallest pool's stacked matrix (no second copy)
            entry["base"] = entry["pools"][min(ranks)]["stacked"][:n]
            layer[module] = entry
        layers.append(layer)
    return layers


def _mask(torch: Any, slots_of_rows: list[int], d: dict[str, Any], parts: int, pool: int, device: str,
          dtype: Any) -> Any:
    """[rows, parts x slots x pool]: each row's own adapter's rank columns hold its scale, the rest 0."""
    mask = torch.zeros(len(slots_of_rows), parts, d["slots"], pool)
    for row, slot in enumerate(slots_of_rows):
        mask[row, :, slot, : d["rank"]] = 2.0
    return mask.reshape(len(slots_of_rows), -1).to(device=device, dtype=dtype)


def run(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915
    import torch

    from benchmarks.harness.common import captured
    from loquetier.kernels import ModuleLoRA, SMLMMeta, ops

    d = TINY if args.tiny else FULL
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    is_gpu = device == "cuda"
    dtype = torch.bfloat16 if is_gpu else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    layers = _build(torch, ModuleLoRA, d, device, dtype, gen)
    shapes = _shapes(d)
    if is_gpu:
        from triton.testing import do_bench

        ops.set_lora_overlap(True)
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                               "gpu": torch.cuda.get_device_name() if is_gpu else "cpu (interpreter)",
                               "torch": torch.__version__,
                               "command": " ".join(["python -m benchmarks.bench_lora_dense", *sys.argv[1:]]),
                               "dims": {k: v for k, v in d.items() if k not in ("batches", "pool_ranks")},
                               "batches": {}}
    for rows in d["batches"]:
        slots_of_rows = [1 + i * d["adapters"] // rows for i in range(rows)]
        meta = SMLMMeta.build(slots_of_rows, 0, device)
        xs = {m: torch.randn(rows, shapes[m][0], device=device, dtype=dtype, generator=gen) for m in MODULES}
        empty = {m: xs[m][:0] for m in MODULES}
        masks = {(m, pool): _mask(torch, slots_of_rows, d, len(shapes[m][1]), pool, device, dtype)
                 for m in MODULES for pool in d["pool_ranks"]}
        outs = {m: torch.empty(rows, layers[0][m]["n"], device=device, dtype=dtype) for m in MODULES}
        stacked_outs = {(m, pool): torch.empty(rows, layers[0][m]["pools"][pool]["stacked"].shape[0], device=device,
                                               dtype=dtype) for m in MODULES for pool in d["pool_ranks"]}
        vs = {(m, pool): torch.empty(rows, layers[0][m]["pools"][pool]["a_all"].shape[0], device=device, dtype=dtype)
              for m in MODULES for pool in d["pool_ranks"]}

        def base(keep: list[Any] | None = None) -> None:
            for layer in layers:  # noqa: B023 (run at once)
                for m in MODULES:
                    torch.mm(xs[m], layer[m]["base"].t(), out=outs[m])  # noqa: B023
                    if keep is not None:
                        keep.append(outs[m].clone())  # noqa: B023

        def smlm(keep: list[Any] | None = None) -> None:
            with ops.overlap_scope():
                for layer in layers:  # noqa: B023
                    for m in MODULES:
                        _, y = ops.lora_linear(empty[m], xs[m], layer[m]["base"], None,  # noqa: B023
                                               layer[m]["smlm"], meta)  # noqa: B023
                        if keep is not None:
                            keep.append(y.clone())

        def dense(pool: int, in_base: bool, keep: list[Any] | None = None) -> None:
            for layer in layers:  # noqa: B023
                for m in MODULES:
                    entry = layer[m]["pools"][pool]
                    if in_base:  # one GEMM: the base output, then every slot's shrink
                        y_all = stacked_outs[(m, pool)]  # noqa: B023
                        torch.mm(xs[m], entry["stacked"].t(), out=y_all)  # noqa: B023
                        y, v = y_all[:, : layer[m]["n"]], y_all[:, layer[m]["n"] :]
                    else:
                        y, v = outs[m], vs[(m, pool)]  # noqa: B023
                        torch.mm(xs[m], layer[m]["base"].t(), out=y)  # noqa: B023
                        torch.mm(xs[m], entry["a_all"].t(), out=v)  # noqa: B023
                    v.mul_(masks[(m, pool)])  # noqa: B023
                    width = d["slots"] * pool
                    for p, (b, off, n) in enumerate(entry["bs"]):
                        y[:, off : off + n].addmm_(v[:, p * width : (p + 1) * width], b)
                    if keep is not None:
                        keep.append(y.clone())

        variants: dict[str, Any] = {"base": base, "smlm": smlm}
        for pool in d["pool_ranks"]:
            variants[f"dense, pool rank {pool}"] = lambda keep=None, pool=pool: dense(pool, False, keep)  # noqa: B023
            variants[f"dense, A in the base weight, pool rank {pool}"] = (
                lambda keep=None, pool=pool: dense(pool, True, keep))  # noqa: B023
        row: dict[str, Any] = {"rows": rows, "segments": meta.num_segments, "variants": {}}
        base_out: list[Any] = []
        base(base_out)
        reference: list[Any] | None = None
        for name, fn in variants.items():
            res: dict[str, Any] = {}
            try:
                got: list[Any] = []
                fn(got)
                if name != "base":
                    terms = [(g.float() - b.float()) for g, b in zip(got, base_out, strict=True)]
                    if reference is None:
                        reference = terms
                    largest = max(float(t.abs().max()) for t in reference)
                    res["rel_vs_smlm"] = max(float((t - r).abs().max()) for t, r in zip(terms, reference, strict=True)
                                             ) / max(largest, 1e-12)
                if is_gpu:
                    graph = captured(fn)
                    res["ms"] = statistics.median(do_bench(graph.replay, warmup=5, rep=40, return_mode="median")
                                                  for _ in range(3))
                    del graph
                else:
                    t0 = time.perf_counter()
                    fn()
                    res["ms"] = 1e3 * (time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 (a variant a GPU cannot run is a result)
                res["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["variants"][name] = res
            print(rows, name, res, flush=True)
        results["batches"][str(rows)] = row
    return results


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Informational: the best dense path's LoRA cost against the SMLM path's, per batch."""
    out = []
    for rows, row in results["batches"].items():
        v = row["variants"]
        if "ms" not in v.get("base", {}) or "ms" not in v.get("smlm", {}):
            continue
        dense = {k: x["ms"] for k, x in v.items() if k.startswith("dense") and "ms" in x}
        if not dense:
            continue
        best = min(dense, key=lambda k: dense[k])
        ratio = (dense[best] - v["base"]["ms"]) / max(v["smlm"]["ms"] - v["base"]["ms"], 1e-9)
        out.append({"name": f"LoRA ms of the best dense path ({best}) / the SMLM path's, batch {rows}",
                    "goal": "<= 1.0 (info)", "measured": round(ratio, 3), "ok": ratio <= 1.0})
    return out


def page(results: dict[str, Any]) -> str:
    lines = ["# LoRA terms as dense GEMMs over every slot", "",
             f"- date: {results['date']}", f"- device: {results['gpu']}", f"- command: `{results['command']}`",
             f"- torch {results['torch']}; shapes {results['dims']}", "",
             "One decode step's linear layers (base GEMMs included) in one CUDA graph; ms a step, the LoRA "
             "cost over `base`, and each path's LoRA terms against the SMLM path's (max |delta| / largest term).", ""]
    for rows, row in results["batches"].items():
        v = row["variants"]
        base_ms = v.get("base", {}).get("ms")
        smlm_ms = v.get("smlm", {}).get("ms")
        lines += [f"## {rows} rows ({row['segments']} adapters' segments)", "",
                  "| path | ms a step | LoRA ms | LoRA vs smlm | rel. delta vs smlm |", "|---|---|---|---|---|"]
        for name, res in v.items():
            if "error" in res:
                lines.append(f"| {name} | error: {res['error'][:120]} | | | |")
                continue
            lora = res["ms"] - base_ms if base_ms is not None and name != "base" else None
            vs = lora / (smlm_ms - base_ms) if lora is not None and smlm_ms is not None and smlm_ms > base_ms else None
            lines.append(f"| {name} | {res['ms']:.3f} | {'' if lora is None else f'{lora:.3f}'} | "
                         f"{'' if vs is None else f'{vs:.2f}x'} | {res.get('rel_vs_smlm', 0.0):.1e} |")
        lines.append("")
    lines += ["## Targets", "", "| target | goal | measured | ok |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['goal']} | {t['measured']} | {t['ok']} |" for t in results.get("targets", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the checks, no meaningful timing")
    args = ap.parse_args()
    results = run(args)
    results["targets"] = targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_dense.json").write_text(json.dumps(results, indent=1))
    text = page(results)
    (args.out / "lora_dense.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
