"""SMLM kernels on the H200: our Triton kernels vs the torch reference loop vs a PEFT-style loop.

    python benchmarks/bench_kernels.py --out DIR            # ~1-2 min; writes DIR/kernels.json
    python benchmarks/bench_kernels.py --out DIR --write-doc  # ... and docs/benchmarks/kernels.md
    python benchmarks/bench_kernels.py --from-json DIR/kernels.json --write-doc  # doc only, no GPU

Llama-3-8B projections, bf16, LoRA ranks cycling 8/16/64 over the slots (pool max_rank 64).
Forward = shrink + expand into the base output; backward = dX (accumulated into the base dX),
grad_A and grad_B for every training adapter. Each case is first checked against the fp32
reference on the GPU, then every variant is timed twice with ``triton.testing.do_bench`` (median,
L2 flushed between calls). Floor = max(bytes / 4.27 TB/s, FLOPs / 797 TFLOP/s) (the H200's
measured copy bandwidth and bf16 matmul rate).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEAK_BYTES_PER_S = 4.27e12
PEAK_FLOPS = 797e12
RANK_CYCLE = (8, 16, 64)
MAX_RANK = 64
PROJECTIONS = [("4096->4096 (q,o)", 4096, 4096), ("4096->1024 (k,v)", 4096, 1024),
               ("4096->14336 (gate,up)", 4096, 14336), ("14336->4096 (down)", 14336, 4096)]
FORWARD_BATCHES = [("decode 64 tok / 32 adapters", 64, 32), ("decode 256 tok / 32 adapters", 256, 32),
                   ("prefill 8192 tok / 8 adapters", 8192, 8)]
BACKWARD_BATCH = ("train 4096 tok / 4 adapters", 4096, 4)
# Backward variants, each checked against the reference and timed as one call in a CUDA graph (dv's
# memset and every launch): ``kernels.smlm.Tuning`` fields over the defaults ("default": two passes).
BACKWARD_VARIANTS: list[tuple[str, dict[str, int]]] = [
    ("default", {}),
    ("four launches", {"backward_passes": 4}),
    ("g chunks >= 1024 cols", {"backward_g_min_cols": 1024}),
    ("g chunks >= 512 cols", {"backward_g_min_cols": 512}),
    ("g 4 programs/SM", {"backward_programs_per_sm": 4}),
    ("64-row blocks", {"backward_block_rows": 64}),
    ("x block_n 64", {"backward_x_block_n": 64}),
    ("x block_n 256", {"backward_x_block_n": 256}),
    ("x block_m 32", {"backward_x_block_m": 32}),
    ("x 8 warps", {"backward_x_warps": 8}),
    ("x 3 stages", {"backward_x_stages": 3}),
]
TOL_BF16 = 3e-2  # max error relative to max |reference|, as in tests/kernels/test_smlm.py
DEVICE = "cuda"


@dataclass
class Result:
    kind: str  # "forward" | "backward"
    projection: str
    batch: str
    in_features: int
    out_features: int
    num_tokens: int
    num_adapters: int
    ranks: list[int]
    bytes: int
    flops: int
    floor_us: float
    max_rel_err: float
    correct: bool
    times_us: dict[str, list[float]] = field(default_factory=dict)  # variant -> two medians
    variant_errors: dict[str, float | str] = field(default_factory=dict)  # backward variant -> error vs ref

    def best(self, variant: str) -> float | None:
        t = self.times_us.get(variant)
        return min(t) if t else None

    def launches_us(self) -> dict[str, float]:
        """Backward's launches timed apart ("part ..." variants), each at its best."""
        return {k.removeprefix("part "): min(t) for k, t in self.times_us.items() if k.startswith("part ") and t}


@dataclass
class Env:
    """What every case needs: the imported modules (loaded lazily, so --from-json needs no GPU)."""

    torch: Any
    do_bench: Any
    kernels: Any  # the SMLM package: ModuleLoRA, SMLMMeta
    ref: Any  # kernels.reference
    smlm: Any  # kernels.smlm
    gen: Any  # a CUDA torch.Generator


def _import_kernels():  # the package is `loquetier.kernels` when installed, `kernels/` otherwise
    try:
        from loquetier import kernels
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import kernels  # type: ignore[no-redef]
    from importlib import import_module
    return kernels, import_module(kernels.__name__ + ".reference"), import_module(kernels.__name__ + ".smlm")


def _pool(env: Env, num_slots: int, in_f: int, out_f: int, *, num_train: int):
    torch, gen = env.torch, env.gen
    lora = env.kernels.ModuleLoRA.empty(num_slots, MAX_RANK, in_f, out_f, num_train_slots=num_train,
                              dtype=torch.bfloat16, device=DEVICE)
    ranks = [RANK_CYCLE[s % len(RANK_CYCLE)] for s in range(num_slots)]
    a = torch.randn(lora.a.shape, device=DEVICE, generator=gen) / in_f**0.5
    b = torch.randn(lora.b.shape, device=DEVICE, generator=gen) / 8
    for s, r in enumerate(ranks):
        a[s, r:] = 0
        b[s, r:] = 0
    lora.a.copy_(a)
    lora.b.copy_(b)
    lora.ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
    lora.scales.copy_(torch.rand(num_slots, device=DEVICE, generator=gen) + 0.5)
    lora.host_ranks = ranks
    return lora, ranks


def _rel_err(torch, out, ref) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def _time(torch, do_bench, fn: Callable[[], object]) -> list[float]:
    return [1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median") for _ in range(2)]


GRAPH_COPIES = 8  # calls per captured graph, each on its own adapter pool (as layers are)


def _graph_time(torch, do_bench, fns: list[Callable[[], object]]) -> list[float]:
    """Our path replayed from one CUDA graph of ``fns`` (the same call on distinct pools, so that no
    call reads another's adapters from L2), per call: no Python launch cost (the kernels never sync)
    and a share of one graph launch, as in a decode step's graph."""
    from benchmarks.harness.common import captured

    def all_calls() -> None:
        for fn in fns:
            fn()

    return [t / len(fns) for t in _time(torch, do_bench, captured(all_calls, warmups=2).replay)]


def _launch_pair_us(torch, do_bench) -> float:
    """Two dependent launches of an empty Triton kernel in a graph, per pair (graph of GRAPH_COPIES
    pairs): the least time a shrink + expand can take in a decode step's graph, whatever they read."""
    import triton
    import triton.language as tl

    @triton.jit
    def noop(x_ptr):
        tl.store(x_ptr + tl.program_id(0), 0.0, mask=tl.program_id(0) < 0)

    x = torch.empty(1, device=DEVICE)
    calls = [lambda: noop[(1,)](x) for _ in range(2 * GRAPH_COPIES)]
    return 2 * min(_graph_time(torch, do_bench, calls))


def _segments_by_adapter(num_tokens: int, num_adapters: int) -> list[int]:
    """Rows sorted by adapter, as the scheduler packs them: equal runs per adapter."""
    per = num_tokens // num_adapters
    return [s for s in range(num_adapters) for _ in range(per)]


def _floor(num_bytes: int, flops: int) -> float:
    return 1e6 * max(num_bytes / PEAK_BYTES_PER_S, flops / PEAK_FLOPS)


def bench_forward(env: Env, proj, batch, *, ranks_override: int | None = None) -> Result:
    torch, do_bench, ref, smlm, gen = env.torch, env.do_bench, env.ref, env.smlm, env.gen
    (pname, in_f, out_f), (bname, num_tokens, num_adapters) = proj, batch
    pools = [_pool(env, max(num_adapters, 32), in_f, out_f, num_train=0) for _ in range(GRAPH_COPIES)]
    if ranks_override is not None:
        for lo, _ in pools:
            lo.ranks.fill_(ranks_override)
            lo.host_ranks = [ranks_override] * lo.num_slots
        pools = [(lo, lo.host_ranks) for lo, _ in pools]
    lora, ranks = pools[0]
    slots = _segments_by_adapter(num_tokens, num_adapters)
    meta = env.kernels.SMLMMeta.build(slots, 0, device=DEVICE)
    x = torch.randn(num_tokens, in_f, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    y = torch.randn(num_tokens, out_f, device=DEVICE, dtype=torch.bfloat16, generator=gen)

    used = [ranks[s] for s in range(num_adapters)]
    per = num_tokens // num_adapters
    num_bytes = 2 * (num_tokens * in_f + 2 * num_tokens * out_f + sum(used) * (in_f + out_f))
    flops = sum(2 * per * r * (in_f + out_f) for r in used)

    y_ours, y_ref = y.float(), y.float()  # fp32 outputs: the check sees the kernels, not y's rounding
    smlm.expand(y_ours, smlm.shrink(x, lora, meta), lora, meta)
    ref.expand_ref(y_ref, ref.shrink_ref(x, lora, meta), lora, meta)
    err = _rel_err(torch, y_ours - y.float(), y_ref - y.float())
    split = smlm.split_applies(meta)  # what an inference-only decode step runs (shrink, expand adds splits)
    if split:
        y_split = y.float()
        smlm.forward_split(y_split, x, [(lora, 0)], meta)
        err = max(err, _rel_err(torch, y_split - y.float(), y_ref - y.float()))

    groups = []  # PEFT's mixed-batch forward: per adapter, gather rows, two GEMMs, scatter-add
    for s in range(num_adapters):
        idx = torch.tensor([i for i, t in enumerate(slots) if t == s], device=DEVICE)
        groups.append((idx, lora.a[s, : ranks[s]], lora.b[s, : ranks[s]], float(lora.scales[s])))

    def ours(lo: Any = lora) -> None:
        smlm.expand(y, smlm.shrink(x, lo, meta), lo, meta)

    def ours_split(lo: Any = lora) -> None:
        smlm.forward_split(y, x, [(lo, 0)], meta)

    def reference() -> None:
        ref.expand_ref(y, ref.shrink_ref(x, lora, meta), lora, meta)

    def peft_loop() -> None:
        for idx, a_s, b_s, scale in groups:
            y[idx] += (x[idx] @ a_s.T @ b_s) * scale

    res = Result("forward", pname, bname + (f", all rank {ranks_override}" if ranks_override else ""),
                 in_f, out_f, num_tokens, num_adapters, sorted(set(used)), num_bytes, flops,
                 _floor(num_bytes, flops), err, err <= TOL_BF16)
    res.times_us["ours"] = _time(torch, do_bench, ours)
    try:
        res.times_us["ours_graph"] = _graph_time(torch, do_bench, [partial(ours, lo) for lo, _ in pools])
        if split:
            res.times_us["ours_split_graph"] = _graph_time(torch, do_bench,
                                                           [partial(ours_split, lo) for lo, _ in pools])
    except Exception as exc:  # a capture failure must not hide the other numbers
        print(f"  graph capture failed: {exc!r}", file=sys.stderr)
    res.times_us["reference"] = _time(torch, do_bench, reference)
    res.times_us["peft_loop"] = _time(torch, do_bench, peft_loop)
    return res


def bench_backward(env: Env, proj, batch) -> Result:
    torch, do_bench, ref, smlm, gen = env.torch, env.do_bench, env.ref, env.smlm, env.gen
    (pname, in_f, out_f), (bname, num_tokens, num_adapters) = proj, batch
    lora, ranks = _pool(env, num_adapters, in_f, out_f, num_train=num_adapters)
    slots = _segments_by_adapter(num_tokens, num_adapters)
    meta = env.kernels.SMLMMeta.build(slots, num_tokens, device=DEVICE)
    x = torch.randn(num_tokens, in_f, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    g = torch.randn(num_tokens, out_f, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    dx = torch.randn(num_tokens, in_f, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    v = ref.shrink_ref(x, lora, meta)

    used = ranks[:num_adapters]
    per = num_tokens // num_adapters
    # read g, x, A, B, v; dx read+write (accumulated into the base dX); grads read+write in fp32
    num_bytes = (2 * num_tokens * (out_f + in_f + 2 * in_f) + 4 * num_tokens * MAX_RANK
                 + sum(used) * (in_f + out_f) * (2 + 8))
    flops = sum(4 * per * r * (in_f + out_f) for r in used)  # dV, dX, grad_A, grad_B

    assert lora.grad_a is not None and lora.grad_b is not None
    dx_ours = smlm.backward(g, x, v, lora, meta)
    ga, gb = lora.grad_a.clone(), lora.grad_b.clone()
    lora.grad_a.zero_()
    lora.grad_b.zero_()
    dx_ref = ref.backward_ref(g, x, v, lora, meta)
    ref_grads = (lora.grad_a.clone(), lora.grad_b.clone())
    err = max(_rel_err(torch, dx_ours, dx_ref), _rel_err(torch, ga, lora.grad_a),
              _rel_err(torch, gb, lora.grad_b))

    vb = v.to(torch.bfloat16)
    groups = []
    for s in range(num_adapters):
        idx = torch.tensor([i for i, t in enumerate(slots) if t == s], device=DEVICE)
        groups.append((s, idx, ranks[s], float(lora.scales[s])))

    def ours() -> None:
        smlm.backward(g, x, v, lora, meta, 0, dx)

    def reference() -> None:
        ref.backward_ref(g, x, v, lora, meta, 0, dx)

    def peft_loop() -> None:  # what autograd through a per-adapter PEFT loop computes
        for s, idx, r, scale in groups:
            gs, a_s, b_s = g[idx], lora.a[s, :r], lora.b[s, :r]
            dv = (gs @ b_s.T) * scale
            dx[idx] += dv @ a_s
            lora.grad_a[s, :r] += (dv.T @ x[idx]).float()
            lora.grad_b[s, :r] += ((vb[idx, :r].T @ gs) * scale).float()

    res = Result("backward", pname, bname, in_f, out_f, num_tokens, num_adapters, sorted(set(used)),
                 num_bytes, flops, _floor(num_bytes, flops), err, err <= TOL_BF16)
    res.times_us["ours"] = _time(torch, do_bench, ours)
    # the four launches of ``smlm.backward`` apart (dv is what the first leaves for the next two)
    gs, dv = g, torch.zeros(num_tokens, lora.max_rank, dtype=torch.float32, device=DEVICE)
    train = {"blocks": meta.blocks, "num_blocks": meta.num_train_blocks, "max_rows": min(meta.max_seg_len, 64)}
    for name, fn in (
            ("part dv = g @ B^T", lambda: smlm._shrink_into(dv, gs, lora.b, lora, **train, with_scale=True)),
            ("part dx += dv @ A", lambda: smlm._expand_into(dx, dv, lora.a, lora, **train, with_scale=False)),
            ("part grad_A += dv^T @ x", lambda: smlm._grad_into(lora.grad_a, dv, x, lora, meta=meta, with_scale=False)),
            ("part grad_B += v^T @ g", lambda: smlm._grad_into(lora.grad_b, v, gs, lora, meta=meta, with_scale=True))):
        res.times_us[name] = _time(torch, do_bench, fn)
    _backward_variants(env, res, (g, x, v, lora, meta, dx), (dx_ref, *ref_grads))
    res.times_us["reference"] = _time(torch, do_bench, reference)
    res.times_us["peft_loop"] = _time(torch, do_bench, peft_loop)
    return res


def _backward_variants(env: Env, res: Result, args: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    """Each of ``BACKWARD_VARIANTS``: its error against the reference (``expected``: dx, grad_a, grad_b
    from zeroed gradients) and its time as one call replayed from a CUDA graph ("graph LABEL")."""
    import dataclasses

    torch, smlm = env.torch, env.smlm
    g, x, v, lora, meta, dx = args
    saved = smlm.TUNING
    # the default's two passes apart, in graphs
    dv = torch.zeros(x.shape[0], lora.max_rank, dtype=torch.float32, device=DEVICE)
    res.times_us["pass g"] = _graph_time(torch, env.do_bench, [lambda: smlm.backward_g_pass(dv, g, v, lora, meta)])
    res.times_us["pass x"] = _graph_time(torch, env.do_bench, [lambda: smlm.backward_x_pass(dx, dv, x, lora, meta)])
    try:
        for label, overrides in BACKWARD_VARIANTS:
            smlm.TUNING = dataclasses.replace(smlm.Tuning(), **overrides)
            try:
                lora.grad_a.zero_()
                lora.grad_b.zero_()
                out = smlm.backward(g, x, v, lora, meta)
                res.variant_errors[label] = max(_rel_err(torch, out, expected[0]),
                                                _rel_err(torch, lora.grad_a, expected[1]),
                                                _rel_err(torch, lora.grad_b, expected[2]))
                res.times_us[f"graph {label}"] = _graph_time(
                    torch, env.do_bench, [lambda: smlm.backward(g, x, v, lora, meta, 0, dx)])
            except Exception as exc:  # noqa: BLE001 - a variant that does not build is a row, not the end
                res.variant_errors[label] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
            torch.cuda.synchronize()
    finally:
        smlm.TUNING = saved


def _fmt(t: float | None, floor: float) -> str:
    return "-" if t is None else f"{t:8.1f} ({t / floor:4.1f}x)"


def table(results: list[Result]) -> str:
    head = (f"| {'kind':8} | {'projection':21} | {'batch':36} | {'floor us':>8} | {'ours us (x floor)':>17} "
            f"| {'graph us (x floor)':>18} | {'decode graph us (x floor)':>25} "
            f"| {'reference us':>12} | {'PEFT loop us':>12} | vs PEFT | err |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in results:
        ours, peft = r.best("ours"), r.best("peft_loop")
        ref_t = r.best("reference")
        speedup = f"{peft / ours:6.1f}x" if ours and peft else "-"
        lines.append(
            f"| {r.kind:8} | {r.projection:21} | {r.batch:36} | {r.floor_us:8.1f} "
            f"| {_fmt(ours, r.floor_us):>17} | {_fmt(r.best('ours_graph'), r.floor_us):>18} "
            f"| {_fmt(r.best('ours_split_graph'), r.floor_us):>25} "
            f"| {ref_t or 0:12.1f} | {peft or 0:12.1f} "
            f"| {speedup:>7} | {'ok' if r.correct else 'FAIL'} {r.max_rel_err:.0e} |")
    return "\n".join(lines)


def engine_graph_us(r: Result) -> float | None:
    """A forward case's time in a decode step's graph: the split path where a decode step takes it."""
    return r.best("ours_split_graph") or r.best("ours_graph")


def backward_us(r: Result) -> tuple[float | None, str]:
    """A backward case's time and what it is: the default path as one call in a CUDA graph where it
    was timed so (dv's memset and its launches, no host launch time); else the GPU time of the four
    launches, each timed apart (the eager call adds the host's launch time, which moves with the
    machine's CPU from run to run); else the eager call."""
    if isinstance(r.variant_errors.get("default"), float) and r.best("graph default"):
        return r.best("graph default"), "the default path in a graph"
    launches = r.launches_us()
    if len(launches) == 4:
        return sum(launches.values()), "its four launches"
    return r.best("ours"), "eager"


def targets(results: list[Result]) -> list[Any]:
    """Issue 17's kernel targets: every decode forward case <= 3x its floor in a graph, every backward
    case <= 3x."""
    from benchmarks.harness.report import Target

    out = []
    for r in results:
        if r.kind == "forward" and r.batch.startswith("decode"):
            t = engine_graph_us(r)
            out.append(Target(f"forward {r.projection}, {r.batch}, in a graph / floor", "<= 3x",
                              t / r.floor_us if t else float("nan"), 3.0, higher_is_better=False))
        elif r.kind == "backward":
            t, what = backward_us(r)
            out.append(Target(f"backward {r.projection}, {r.batch}, {what} / floor", "<= 3x",
                              t / r.floor_us if t else float("nan"), 3.0, higher_is_better=False))
    return out


def verdict(results: list[Result], launch_pair_us: float | None = None) -> list[str]:
    out = []
    if launch_pair_us:
        out.append(f"Two empty kernel launches in a graph: {launch_pair_us:.1f} us a pair, "
                   f"{launch_pair_us / 2:.1f} us each (the least any shrink + expand takes in a decode step)")
    fwd = [r for r in results if r.kind == "forward"]
    bwd = [r for r in results if r.kind == "backward"]
    def ratio(r: Result) -> float:
        return (r.best("ours") or float("inf")) / r.floor_us
    fwd_ok = [r for r in fwd if ratio(r) <= 2]
    misses = ", ".join(f"{r.projection} {r.batch} {ratio(r):.1f}x" for r in fwd if ratio(r) > 2)
    out.append(f"Forward within 2x of floor (eager): {len(fwd_ok)}/{len(fwd)}; misses: {misses or 'none'}")
    graph_ok = [r for r in fwd if (engine_graph_us(r) or float("inf")) <= 2 * r.floor_us]
    out.append(f"Forward within 2x of floor (CUDA graph, the path a decode step takes): {len(graph_ok)}/{len(fwd)}")
    def bwd_ratio(r: Result) -> float:
        return (backward_us(r)[0] or float("inf")) / r.floor_us
    out.append(f"Backward within 3x of floor ({backward_us(bwd[0])[1] if bwd else 'eager'}): "
               f"{sum(bwd_ratio(r) <= 3 for r in bwd)}/{len(bwd)}; "
               + ", ".join(f"{r.projection} {bwd_ratio(r):.1f}x" for r in bwd))
    for r in bwd:
        four, two = r.best("graph four launches"), r.best("graph default")
        if four and two:
            apart = ""
            if (pg := r.best("pass g")) and (px := r.best("pass x")):
                apart = f" (the g pass {pg:.1f} us, the x pass {px:.1f} us, each in a graph of its own)"
            out.append(f"Backward {r.projection} in a graph: two passes {two:.1f} us ({two / r.floor_us:.2f}x){apart}, "
                       f"four launches {four:.1f} us ({four / r.floor_us:.2f}x): the two passes take "
                       f"{two / four:.2f}x the time")
    for r in bwd:
        if launches := r.launches_us():
            out.append(f"Backward {r.projection}, the four launches each timed apart, eager (us): "
                       + ", ".join(f"{k} {t:.1f}" for k, t in launches.items()))
    at32 = [r for r in fwd if r.num_adapters == 32]
    speed = [(r.best("peft_loop") or 0) / (r.best("ours") or float("inf")) for r in at32]
    if speed:
        out.append(f"At 32 adapters vs the per-adapter loop: {min(speed):.1f}x to {max(speed):.1f}x faster "
                   f"(target >= 5x: {'met' if min(speed) >= 5 else 'missed'})")
    failed = ", ".join(f"{r.kind} {r.projection} {r.batch}" for r in results if not r.correct)
    out.append(f"Correctness vs the fp32 reference on the GPU: {'FAILED: ' + failed if failed else 'all ok'}")
    return out


DOC_NOTES = """
## How the kernels work, and what limits them
- Shrink, expand and the two gradient kernels walk a row-block schedule built on the host with the
  step's metadata (`SMLMMeta.blocks`: <= 64 rows of one segment per block; `grad_blocks`: <= 256).
  Each program reads its adapter's A/B tile once per block, never once per row, and ranks bound the
  loads (shrink, grads) and the loop itself (expand), so a rank-8 adapter moves rank-8 tiles.
- Decode: the floor is reading each adapter's A and B once (a few MB); the block count alone
  (one per adapter) cannot fill 132 SMs, so shrink splits K across programs and adds with fp32
  atomics. Eager timing also pays 3 launches (a memset of `v`, shrink, expand) of a few us each; the
  CUDA-graph column removes the Python launch cost, which is how the engine should run decode.
- Prefill: bound by reading x and reading + writing y; shrink's rank tile is `next_pow2(max_rank)`
  wide, so its tensor-core work is that of rank 64 even for rank-8 adapters (compute stays far under
  the memory time at these shapes).
- Backward: two passes (`Tuning.backward_passes`, 2). The g pass holds a block of up to 256
  training rows in one tile and walks a chunk of g's columns (at least 256, more programs while
  fewer than two a SM), 64 at a time: from each g tile it computes dV's share (summed over the chunk
  in registers, chunks added with fp32 atomics) and grad_B's tile (complete over the block, one atomic
  add). The x pass takes one 128-column tile of a block, 64 rows at a time: dX += dV @ A in place and
  grad_A's tile summed over the block. g and x are each read once; the four launches
  (`backward_passes=4`: dV = scale * g @ B^T, dX += dV @ A, grad_A += dV^T @ x, grad_B += scale *
  V^T @ g, timed apart above) read g twice and dV three times. grad_A/grad_B and dV
  accumulate with fp32 atomics, so gradients are not bit-reproducible run to run.
- Decode in a graph: a shrink and an expand are two dependent launches, at least 2.2 us together
  (measured above), against floors of 1.4-8.8 us; the k,v and rank-8 cases cannot reach 3x their
  floor with two launches of their own.
- Block sizes are fixed heuristics (`kernels.smlm.Tuning`, `LOQUETIER_SMLM_TUNING`;
  `benchmarks/tune_smlm.py` times variants): BLOCK_M 16/32/64 from the longest segment (GEMV tiles
  of 1-8 rows for the shortest: `gemv_max_rows`, `shrink_gemv_max_rows`, off), the shrink's
  rank in chunks of 16 on the grid (a chunk past an adapter's rank idle), expand BLOCK_N 512 (decode,
  the loop over the K splits unrolled by 8) / 128, BLOCK_K 128 with 3 stages, 4 warps (2 for
  decode-sized shrinks, 8 for decode-sized expands).
"""


def backward_variants_table(results: list[Result]) -> list[str]:
    """The backward variants side by side: us in a graph (x floor) and the error against the reference."""
    bwd = [r for r in results if r.kind == "backward" and r.variant_errors]
    if not bwd:
        return []
    lines = ["## Backward variants", "",
             "Each case's backward as one call replayed from a CUDA graph (dv's memset and every launch), "
             "with `kernels.smlm.Tuning` fields over the defaults; error: max |ours - reference| / max |reference| "
             "over dx, grad_A and grad_B.", "",
             "| variant | " + " | ".join(r.projection for r in bwd) + " |",
             "|---|" + "---|" * len(bwd)]
    for label, overrides in BACKWARD_VARIANTS:
        cells = []
        for r in bwd:
            err, t = r.variant_errors.get(label), r.best(f"graph {label}")
            if isinstance(err, str) or t is None:
                cells.append(str(err or "-"))
            else:
                cells.append(f"{t:.1f} ({t / r.floor_us:.2f}x), err {err:.0e}")
        spec = ", ".join(f"{k}={val}" for k, val in overrides.items()) or "defaults"
        lines.append(f"| {label} (`{spec}`) | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_doc(meta: dict[str, object], results: list[Result], path: Path) -> None:
    from benchmarks.harness.report import targets_table

    lines = [
        "# SMLM kernel benchmark",
        "",
        f"- Date: {meta['date']}; GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}",
        f"- Command: `{meta['command']}`",
        "- bf16, Llama-3-8B projection shapes, LoRA ranks cycling 8/16/64 (pool max_rank 64), rows grouped",
        "  by adapter. Times are `triton.testing.do_bench` medians (L2 flushed), best of two runs, in us.",
        "- Floor = max(bytes / 4.27 TB/s, FLOPs / 797 TFLOP/s). Forward bytes: x, y read + write, A and B",
        "  of each adapter once. Backward bytes: g, x, dX read + write, A, B, grads read + write (fp32).",
        "- Variants: ours (Triton, eager), ours replayed in a CUDA graph, the torch reference loop",
        "  (`kernels/reference.py`, fp32, syncs for `.tolist()`), and a PEFT-style per-adapter loop",
        "  (`y[idx] += x[idx] @ A.T @ B * s`, bf16), all in the same process.",
        "",
        "## Where we stand",
        "",
        *[f"- {line}" for line in verdict(results, meta.get("launch_pair_us"))],
        "",
        "## Targets",
        "",
        targets_table(targets(results)),
        "",
        "## Results",
        "",
        table(results),
        "",
        *backward_variants_table(results),
        DOC_NOTES.strip(),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def run(args: argparse.Namespace) -> tuple[dict[str, object], list[Result]]:
    import torch
    import triton
    from triton.testing import do_bench

    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (use --from-json to only write the doc)")
    kernels, ref, smlm = _import_kernels()
    env = Env(torch, do_bench, kernels, ref, smlm, torch.Generator(device=DEVICE).manual_seed(0))
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
    }
    meta["launch_pair_us"] = _launch_pair_us(torch, do_bench)
    results: list[Result] = []
    cases: list[tuple[str, Callable[[], Result]]] = []
    for proj in PROJECTIONS:
        for batch in FORWARD_BATCHES:
            cases.append((f"forward {proj[0]} {batch[0]}",
                          lambda p=proj, b=batch: bench_forward(env, p, b)))
    cases.append(("forward rank-8 only",
                  lambda: bench_forward(env, PROJECTIONS[0], FORWARD_BATCHES[0], ranks_override=8)))
    for proj in PROJECTIONS:
        cases.append((f"backward {proj[0]}",
                      lambda p=proj: bench_backward(env, p, BACKWARD_BATCH)))
    if args.quick:
        cases = cases[:2] + cases[-1:]
    for name, case in cases:
        res = case()
        print(f"{name}: floor {res.floor_us:.1f} us, ours {res.best('ours'):.1f} us, "
              f"err {res.max_rel_err:.1e} {'ok' if res.correct else 'FAIL'}", flush=True)
        results.append(res)
        torch.cuda.empty_cache()
    return meta, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for kernels.json (default $OUT)")
    parser.add_argument("--write-doc", action="store_true", help="write docs/benchmarks/kernels.md")
    parser.add_argument("--from-json", help="skip the GPU run; read results from this kernels.json")
    parser.add_argument("--quick", action="store_true", help="three cases only (smoke test)")
    args = parser.parse_args()
    if args.from_json:
        blob = json.loads(Path(args.from_json).read_text())
        meta, results = blob["meta"], [Result(**r) for r in blob["results"]]
    else:
        meta, results = run(args)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            blob = {"meta": meta, "results": [asdict(r) for r in results],
                    "targets": [{"name": t.name, "goal": t.goal, "measured": t.measured, "ok": t.ok}
                                for t in targets(results)]}
            (out / "kernels.json").write_text(json.dumps(blob, indent=1))
            print(f"wrote {out / 'kernels.json'}")
    if args.write_doc:
        doc = ROOT / "docs" / "benchmarks" / "kernels.md"
        write_doc(meta, results, doc)
        print(f"wrote {doc}")
        if args.out and not args.from_json:  # the device tool brings back only $OUT
            write_doc(meta, results, Path(args.out) / "kernels.md")
    print()
    print("\n".join(verdict(results, meta.get("launch_pair_us"))))
    print(table(results))


if __name__ == "__main__":
    main()
