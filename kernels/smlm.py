"""SMLM launchers: the Triton twins of ``kernels/reference.py`` (same signatures, same semantics).

Each launcher asserts shapes and dtypes, picks block sizes from host-side sizes only (the metadata's
host ints, never a device read), and launches one kernel of ``kernels/smlm_jit.py`` over the
row-block schedule that ``SMLMMeta.build`` copied to the device. Nothing here syncs with the GPU,
so a forward can be captured in a CUDA graph.

Kernel count per call: ``shrink`` 1, ``expand`` 1, ``backward`` 4 (dv, dx, grad_a, grad_b), each
covering every adapter of the batch at once; ``shrink_parts`` / ``expand_parts`` 1 each for all the
parts of a fused module (q|k|v, gate|up), so a decoder layer's forward takes 8 SMLM launches, not 14.
``forward_split`` does shrink and expand of a module, or of all parts of a fused one, in 2 launches
and keeps no ``v`` (decode-sized inference-only forwards). ``shrink_expand`` does both in 1 launch and needs no
``v`` buffer: 4 launches a layer for decode-sized steps (``fused_applies`` says when; off by default).

Invariants of every launcher:
- rows outside every segment, and slots of rank 0, are never read into a result nor written;
- LoRA rows at or past a slot's rank are never read (masked loads), so they may hold anything;
- ``expand``, ``expand_parts`` and ``shrink_expand`` add into y in place and touch only the LoRA
  columns of segment rows; ``v`` (fp32) is rounded to the weights' dtype before the rank-sized matmul;
- the choice of kernel and of every block size depends only on host ints (``max_seg_len``,
  ``num_blocks``, shapes, ``TUNING``), so one step's launches are fixed once its metadata is built.

A forward shrink whose input width is split across programs (decode) needs the splits' partial sums
added. Decode-sized inference-only forwards (no ``v`` kept for backward, every segment at most
``TUNING.split_max_rows`` rows: ``split_applies``) take ``forward_split``: each split stores its
partial sums apart, in a buffer nobody zeroes, and expand adds them in a fixed order as it reads
them: two launches, no memset, no atomics, and the same bits on every run. Other forwards (prefill
chunks, steps with training rows: ``shrink`` / ``shrink_parts``) add the splits into a zeroed ``v``
with fp32 atomics, in whatever order the programs finish, so the same inputs can give ``v`` differing
in the last bits from one run to the next. ``LOQUETIER_SMLM_DETERMINISTIC=1`` (or
``set_deterministic``) makes those shrinks too store their splits apart, summed in a fixed order
(one memset and one reduction launch per shrink): with it every forward is the same bits run after
run. Backward keeps its atomics.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton

from .launch import launch
from .launch import tuning_from_spec as launch_tuning
from .meta import FWD_BLOCK_ROWS, GRAD_BLOCK_ROWS, SMLMMeta
from .smlm_jit import (
    backward_g_kernel,
    backward_x_kernel,
    expand_kernel,
    expand_parts_kernel,
    grad_kernel,
    shrink_expand_kernel,
    shrink_kernel,
    shrink_parts_kernel,
)
from .weights import ModuleLoRA

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DETERMINISTIC_ENV = "LOQUETIER_SMLM_DETERMINISTIC"


def _deterministic_from_env() -> bool:
    return os.environ.get(DETERMINISTIC_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


_deterministic = _deterministic_from_env()


def set_deterministic(on: bool | None) -> None:
    """Forward shrinks with their K splits summed in a fixed order (True) or added with atomics
    (False) from now on; None: back to ``LOQUETIER_SMLM_DETERMINISTIC`` (default off). A CUDA graph
    keeps the path that was on when it was captured."""
    global _deterministic
    _deterministic = _deterministic_from_env() if on is None else bool(on)


def deterministic_enabled() -> bool:
    return _deterministic
_RANK_STEP = 16  # expand's loop step over the rank: the smallest tl.dot K


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: few programs, but enough that split-K is exercised
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters of the SMLM kernels, forward and backward (``benchmarks/tune_smlm.py`` and
    ``bench_kernels.py`` time variants of them on a GPU). 0 means "by the tile rule" for the block sizes."""

    programs_per_sm: int = 4  # shrink splits K until about this many programs per SM run
    shrink_block_k: int = 0  # 0: 128 when BLOCK_M * BLOCK_R <= 64 * 64, else 64
    shrink_warps: int = 4  # row blocks of more than 16 rows (prefill chunks, training rows)
    decode_shrink_warps: int = 2  # decode-sized row blocks (16 rows at most)
    shrink_stages: int = 3
    # rank columns a shrink program computes (0: all, next_pow2(max_rank)); narrower: the pool's rank
    # in chunks over programs, chunks past an adapter's rank idle. On the H200, rank-16 adapters in
    # storage of rank 64 (the default max_lora_rank): a step's LoRA work 0.81x with 16 and 2 decode
    # warps, 0.91x with 16 and 4 (docs/benchmarks/tune_smlm.md)
    shrink_rank_tile: int = 16
    # the column tile of decode-sized expands (BLOCK_M 16; 0: 512, 128 in the interpreter); prefill-sized
    # ones take 128. On the H200 512 with expand_split_tile 8 gave +1.7 % tokens/s offline with 32
    # adapters at batch 32 against 256 with the plain loop (two rounds; in tune_smlm the two are within
    # the run-to-run spread: docs/benchmarks/offline.md, tune_smlm.md)
    expand_block_n: int = 0
    expand_warps: int = 4  # prefill-sized row blocks
    # decode-sized ones (BLOCK_M 16): 8 warps took a step's LoRA work to 0.95x of 4 in tune_smlm and
    # gave +1.2 % tokens/s offline with 32 adapters at batch 32 on the H200 (docs/benchmarks/offline.md)
    decode_expand_warps: int = 8
    expand_stages: int = 2
    expand_tiles: int = 1  # column tiles per expand program for decode-sized blocks (BLOCK_M 16);
    # more lost on the H200 (2/4/8: 1.08x/1.29x/1.56x, docs/benchmarks/tune_smlm.md)
    # forward_split's expand: its loop over the K splits' partial sums unrolled this many at a time,
    # their loads in flight together (0: not unrolled, each load issued after the add before it)
    expand_split_tile: int = 8
    # shrink_expand (one launch for decode-sized blocks); it applies when both limits hold
    fused_max_rows: int = 16  # the step's longest segment (``max_seg_len``) at most this
    fused_max_blocks: int = 128  # row blocks (``num_blocks``) at most this
    fused_max_in_features: int = 0  # modules with a wider input keep the two launches (0: no limit)
    fused_programs_per_sm: int = 2  # column chunks per block until about this many programs per SM
    fused_min_cols: int = 512  # ... but no chunk narrower than this (each chunk recomputes v over K)
    fused_block_k: int = 128
    fused_block_n: int = 0  # 0: 256 for rank tiles up to 32, else 128
    fused_warps: int = 4
    fused_stages: int = 2
    # expands of segments of at most this many rows (a power of two, up to 8; 0: none) take tiles of
    # their own height and fp32 multiply-adds instead of a tensor-core tile of 16 rows. On the H200
    # (tune_smlm, batch 32, one row an adapter) a layer's expands took 26.6 us against 35.0 us, gate|up's
    # 12.3 against 18.5, and lost at 8 rows a segment (42.5 against 22.7 us); the shrinks lost at any
    # height (33.8 against 28.1 us a layer). In the engine 2 gave the same tokens/s as 0 (offline A/B,
    # two rounds): off by default (docs/benchmarks/offline.md, tune_smlm.md)
    gemv_max_rows: int = 0
    shrink_gemv_max_rows: int = 0  # the same for shrinks
    # forward_split (inference-only forwards) applies up to this longest segment: at decode sizes it
    # costs what the atomic path does, at prefill sizes each expand column tile rereads every split's
    # partial sums (1.6x the atomic path at 1,024 rows, docs/benchmarks/tune_smlm.md)
    split_max_rows: int = 16
    # inference-only forwards of at most this many rows (up to ``gemm_lora.MAX_ROWS``; 0: none) run
    # the shrink, then a Triton base GEMM whose loop adds the LoRA terms (``kernels.gemm_lora``),
    # instead of the cuBLAS GEMM beside the shrink and the expand after it. On an H100 a decode step's
    # four linears took 7.23 ms that way against 7.09 ms at 32 rows, 7.81 against 7.17 at 64 (the
    # shrink on the critical path; docs/benchmarks/offline.md, gemm_lora.md): off
    gemm_lora_rows: int = 0
    # CUDA graphs (``loquetier.engine.graphs``): the row tile (and longest row block) of the launches
    # in graphs of prefill-sized buckets (past the batch: prompt chunks laid out as rows; 16, 32 or
    # 64). Decode buckets always take 16 (a row or two an adapter). 64 gave the same tokens/s as 16
    # offline with 32 adapters on an H100 (-0.1 % at batch 32, -0.5 % at batch 128, two rounds:
    # docs/benchmarks/offline.md)
    graph_prefill_rows: int = 16
    # 1: a graph's launches walk as many row blocks as a step of its bucket can lay out (its rows over
    # the row tile, plus one per adapter slot); 0: one per row, most of them empty at prefill sizes.
    # On an H100, 1 against 0: +1.4 % tokens/s offline with 32 adapters at batch 32, +4.9 % at batch
    # 128, the steps with prompt tokens 9 % shorter (docs/benchmarks/offline.md)
    graph_bounded_blocks: int = 1
    # backward: 2 passes (``backward_g_kernel``: dv and grad_b from one read of g; ``backward_x_kernel``:
    # dx and grad_a from one read of x) or the 4 launches (shrink, expand and two grad_kernel launches)
    backward_passes: int = 2
    backward_block_rows: int = 256  # rows of a block: 256 (grad_blocks) or 64 (blocks)
    backward_block_n: int = 64  # the g pass: columns a loop step
    backward_programs_per_sm: int = 2  # the g pass: column chunks per block until about this many programs per SM
    backward_g_min_cols: int = 256  # ... but no chunk narrower (each chunk adds its dv with atomics)
    backward_warps: int = 8  # the g pass
    backward_stages: int = 2  # the g pass
    backward_x_block_m: int = 64  # the x pass: rows a loop step
    backward_x_block_n: int = 128  # the x pass: columns a program
    backward_x_warps: int = 4
    backward_x_stages: int = 2


TUNING_ENV = "LOQUETIER_SMLM_TUNING"


def tuning_from_env() -> Tuning:
    """``Tuning()`` with the fields ``LOQUETIER_SMLM_TUNING`` names overridden ("expand_tiles=4,
    shrink_warps=2": what ``benchmarks/tune_smlm.py`` found on a GPU, without a code change)."""
    return tuning_from_spec(os.environ.get(TUNING_ENV, ""))


def tuning_from_spec(spec: str) -> Tuning:
    """``Tuning()`` with the fields of "NAME=INT,NAME=INT" overridden."""
    return launch_tuning(Tuning, spec, TUNING_ENV)


TUNING = tuning_from_env()


def _block_m(max_rows: int, gemv_rows: int = 0) -> int:
    """The row tile of a shrink or expand launch for segments of at most ``max_rows`` rows: 16, 32 or
    64 (tensor-core tiles); segments of up to ``gemv_rows`` rows (``TUNING.gemv_max_rows`` for
    expands, ``TUNING.shrink_gemv_max_rows`` for shrinks) take a tile of their own height (1, 2, 4,
    8) and multiply-adds instead of a tile padded to 16 rows."""
    rows = triton.next_power_of_2(max(1, max_rows))
    if rows <= min(gemv_rows, 8):
        return rows
    return 16 if max_rows <= 16 else 32 if max_rows <= 32 else 64


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def _dot_kwargs(w: torch.Tensor) -> dict[str, object]:
    return {"UPCAST": INTERPRET, "IEEE": w.dtype == torch.float32}


def _check(lora: ModuleLoRA, x: torch.Tensor, k: int) -> None:
    assert x.dim() == 2 and x.shape[1] == k, f"expected [T, {k}], got {tuple(x.shape)}"
    assert lora.a.stride(2) == 1 and lora.b.stride(2) == 1, "LoRA weights must be contiguous per row"
    assert lora.ranks.dtype == torch.int32 and lora.scales.dtype == torch.float32
    assert lora.max_rank <= 128, "ranks above 128 need a wider accumulator tile"


def _check_parts(y: torch.Tensor, x: torch.Tensor, parts: Sequence[tuple[ModuleLoRA, int]]) -> None:
    """The inputs of a shrink and expand in one call: every part fits x and its columns of y."""
    _check_shrink_inputs(x, [lo for lo, _ in parts])
    for lora, offset in parts:
        assert 0 <= offset and offset + lora.out_features <= y.shape[1]
    assert y.dim() == 2 and y.shape[0] == x.shape[0]


def _check_shrink_inputs(x: torch.Tensor, loras: Sequence[ModuleLoRA]) -> None:
    """The shrink's half of ``_check_parts``: every module (or part) fits x."""
    first = loras[0]
    for lora in loras:
        _check(lora, x, first.in_features)
    assert x.dtype == first.a.dtype, f"x is {x.dtype}, lora.a is {first.a.dtype}"


def _shrink_warps(block_m: int) -> int:
    return TUNING.decode_shrink_warps if block_m <= 16 else TUNING.shrink_warps


def _expand_warps(block_m: int) -> int:
    return TUNING.decode_expand_warps if block_m <= 16 else TUNING.expand_warps


def _shrink_sizes(max_rows: int, max_rank: int, k: int, programs: int,
                  device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_K, split_k, rank chunks) of a shrink launch over ``programs`` row
    blocks; its grid's axis 1 is split_k * rank chunks."""
    block_m, block_r = _block_m(max_rows, TUNING.shrink_gemv_max_rows), _block_r(max_rank)
    if TUNING.shrink_rank_tile:
        block_r = min(block_r, _block_r(TUNING.shrink_rank_tile))
    chunks = triton.cdiv(_block_r(max_rank), block_r)
    block_k = TUNING.shrink_block_k or (128 if block_m * block_r <= 64 * 64 else 64)
    # Split K across programs when the blocks alone cannot fill the GPU (decode): each slot's
    # A tile is still read once per block, just by several programs.
    target = TUNING.programs_per_sm * _num_sms(device)
    split_k = max(1, min(triton.cdiv(target, programs), triton.cdiv(k, 2 * block_k)))
    return block_m, block_r, block_k, split_k, chunks


def variant_metas(slot: int, device: torch.device) -> list[SMLMMeta]:
    """Segment layouts (all rows on ``slot``) that between them reach every compiled variant of the
    forward launches: each ``BLOCK_M`` (longest segment up to 16, 32, more rows), each with and
    without split-K atomics (one block; more blocks than ``4 * SMs``), and with the one-launch decode
    path on, both sides of its block limit (one block: ``shrink_expand``; one block past the limit:
    the two launches with ``BLOCK_M`` 16). Launching each once before serving leaves no variant to
    build during a served step."""
    past_fused = TUNING.fused_max_blocks + 1
    many = max(TUNING.programs_per_sm * _num_sms(device) + 1, past_fused)
    metas = []
    gemv_rows = max(TUNING.gemv_max_rows, TUNING.shrink_gemv_max_rows)
    gemv = [rows for rows in (1, 2, 4, 8) if _block_m(rows, gemv_rows) == rows]  # each GEMV row tile
    for longest in sorted({1, *gemv, (gemv[-1] + 1) if gemv else 1, 17, 33}):
        for blocks in sorted({1, past_fused, many}):
            slots = [slot] * longest + [-1, slot] * (blocks - 1)
            metas.append(SMLMMeta.build(slots, 0, device))
    return metas


def _tiles_n(block_m: int) -> int:
    """Column tiles an expand program covers: ``TUNING.expand_tiles`` for decode-sized row blocks (a
    row or two each: latency-bound programs), one for prefill-sized ones."""
    return max(1, TUNING.expand_tiles) if block_m <= 16 else 1


def _block_n(block_m: int) -> int:
    """The column tile of an expand launch: ``TUNING.expand_block_n`` for decode-sized row blocks
    (BLOCK_M 16), 128 for prefill-sized ones (a tile of 64 x 512 fp32 sums spills: 2.6x on the H200)."""
    if block_m >= 32:
        return 128
    return TUNING.expand_block_n or (128 if INTERPRET else 512)


def _split_tile(splits: torch.Tensor | None) -> int:
    """The expand's ``SPLIT_TILE``: ``TUNING.expand_split_tile`` when it reads a shrink's K splits,
    0 for a plain ``v`` (one variant each, whatever the step's split count)."""
    return TUNING.expand_split_tile if splits is not None else 0


def _partials(v: torch.Tensor, split_k: int, ordered: bool) -> torch.Tensor | None:
    """A zeroed [split_k, *v.shape] buffer for split partial sums when they are to be summed in a
    fixed order (``ordered`` and K split), else None (the splits add into ``v`` with atomics)."""
    if not ordered or split_k <= 1:
        return None
    return torch.zeros((split_k, *v.shape), dtype=v.dtype, device=v.device)


def _sum_partials(v: torch.Tensor, parts: torch.Tensor | None) -> None:
    if parts is not None:
        torch.sum(parts, dim=0, out=v)


def _shrink_into(v: torch.Tensor, x: torch.Tensor, w: torch.Tensor, lora: ModuleLoRA, *,  # noqa: PLR0913
                 blocks: torch.Tensor, num_blocks: int, max_rows: int, with_scale: bool,
                 ordered: bool = False) -> None:
    """v[rows, :r] = (scale *) x[rows] @ w[slot, :r].T over ``blocks`` (v zero-initialised);
    ``ordered``: K splits summed in a fixed order instead of with atomics (``v`` contiguous)."""
    k = x.shape[1]
    block_m, block_r, block_k, split_k, chunks = _shrink_sizes(max_rows, lora.max_rank, k, num_blocks, x.device)
    parts = _partials(v, split_k, ordered)
    out = v if parts is None else parts[0]
    launch(shrink_kernel, (num_blocks, split_k * chunks),
        x, x.stride(0), x.stride(1),
        w, w.stride(0), w.stride(1), w.stride(2),
        out, out.stride(0), 0 if parts is None else parts.stride(0),
        lora.ranks, lora.scales, blocks,
        k, split_k,
        HAS_SCALE=with_scale, ATOMIC=split_k > 1 and parts is None,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, R_CHUNKS=chunks,
        num_warps=_shrink_warps(block_m), num_stages=TUNING.shrink_stages, **_dot_kwargs(w),
    )  # fmt: skip
    _sum_partials(v, parts)


def _expand_into(y: torch.Tensor, v: torch.Tensor, w: torch.Tensor, lora: ModuleLoRA, *,  # noqa: PLR0913
                 blocks: torch.Tensor, num_blocks: int, max_rows: int, with_scale: bool,
                 splits: torch.Tensor | None = None) -> None:
    """y[rows] += (scale *) v[rows, :r] @ w[slot, :r] over ``blocks``, in place; with ``splits``
    ([num_splits, T, R] partial sums, ``v`` its first), v is their sum, added in split order."""
    n = y.shape[1]
    block_m = _block_m(max_rows, TUNING.gemv_max_rows)
    block_n, tiles = _block_n(block_m), _tiles_n(block_m)
    grid = (num_blocks, triton.cdiv(n, block_n * tiles))
    launch(expand_kernel, grid,
        y, y.stride(0), y.stride(1),
        v, v.stride(0), 0 if splits is None else splits.stride(0), 1 if splits is None else splits.shape[0],
        w, w.stride(0), w.stride(1), w.stride(2),
        lora.ranks, lora.scales, blocks,
        n,
        HAS_SCALE=with_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_RANK_STEP, TILES_N=tiles, SPLIT_TILE=_split_tile(splits),
        num_warps=_expand_warps(block_m), num_stages=TUNING.expand_stages, **_dot_kwargs(w),
    )


def _grad_into(grad: torch.Tensor, left: torch.Tensor, x: torch.Tensor, lora: ModuleLoRA, *,
               meta: SMLMMeta, with_scale: bool) -> None:
    """grad[slot, :r] += (scale *) left[rows, :r].T @ x[rows] over the training blocks (atomics)."""
    n = x.shape[1]
    assert grad.stride(2) == 1 and grad.dtype == torch.float32
    block_n = 128
    grid = (meta.num_grad_blocks, triton.cdiv(n, block_n))
    launch(grad_kernel, grid,
        grad, grad.stride(0), grad.stride(1),
        left, left.stride(0),
        x, x.stride(0), x.stride(1),
        lora.ranks, lora.scales, meta.grad_blocks,
        n,
        HAS_SCALE=with_scale,
        BLOCK_M=64, BLOCK_N=block_n, BLOCK_R=_block_r(lora.max_rank),
        num_warps=4, num_stages=3, **_dot_kwargs(x),
    )


def shrink(x: torch.Tensor, lora: ModuleLoRA, meta: SMLMMeta) -> torch.Tensor:
    """Semantics: see ``reference.shrink_ref``. x: [T, in]; returns v: [T, max_rank] fp32."""
    _check(lora, x, lora.in_features)
    assert x.dtype == lora.a.dtype, f"x is {x.dtype}, lora.a is {lora.a.dtype}"
    v = torch.zeros(x.shape[0], lora.max_rank, dtype=torch.float32, device=x.device)
    if meta.num_blocks:
        _shrink_into(v, x, lora.a, lora, blocks=meta.blocks, num_blocks=meta.num_blocks,
                     max_rows=meta.max_seg_len, with_scale=False, ordered=_deterministic)
    return v


def expand(y: torch.Tensor, v: torch.Tensor, lora: ModuleLoRA, meta: SMLMMeta, out_offset: int = 0) -> None:
    """Semantics: see ``reference.expand_ref``. y: [T, out_total] (any strides), v: [T, max_rank] fp32."""
    out = lora.out_features
    assert y.dim() == 2 and 0 <= out_offset and out_offset + out <= y.shape[1]
    assert v.dtype == torch.float32 and v.shape == (y.shape[0], lora.max_rank) and v.stride(1) == 1
    if meta.num_blocks:
        _expand_into(y.narrow(1, out_offset, out), v, lora.b, lora, blocks=meta.blocks,
                     num_blocks=meta.num_blocks, max_rows=meta.max_seg_len, with_scale=True)


MAX_PARTS = 3  # q | k | v


def parts_fit(loras: Sequence[ModuleLoRA]) -> bool:
    """Whether ``loras`` (the parts of one fused module) can share one ``shrink_parts`` launch: 2 or 3
    parts, one dtype, one rank capacity, and A tensors of one shape and layout."""
    first = loras[0]
    return 2 <= len(loras) <= MAX_PARTS and all(
        lo.a.shape == first.a.shape and lo.a.stride() == first.a.stride() and lo.a.dtype == first.a.dtype
        and lo.b.dtype == first.a.dtype and lo.b.shape[:2] == first.b.shape[:2] for lo in loras)


def _padded(items: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [*items, *[items[0]] * (MAX_PARTS - len(items))]


def shrink_parts(x: torch.Tensor, loras: Sequence[ModuleLoRA], meta: SMLMMeta) -> torch.Tensor:
    """``shrink`` of every part of a fused module in one launch. Semantics::

        v = cat([shrink(x, lora, meta) for lora in loras], dim=1)   # [T, P * max_rank] fp32

    (``parts_fit(loras)`` must hold.)"""
    assert parts_fit(loras)
    first, num = loras[0], len(loras)
    _check_shrink_inputs(x, loras)
    r = first.max_rank
    v = torch.zeros(x.shape[0], num * r, dtype=torch.float32, device=x.device)
    if not meta.num_blocks:
        return v
    k = x.shape[1]
    block_m, block_r, block_k, split_k, chunks = _shrink_sizes(meta.max_seg_len, r, k, meta.num_blocks * num,
                                                               x.device)
    a0, a1, a2 = _padded([lo.a for lo in loras])
    r0, r1, r2 = _padded([lo.ranks for lo in loras])
    parts = _partials(v, split_k, _deterministic)
    out = v if parts is None else parts[0]
    launch(shrink_parts_kernel, (meta.num_blocks, split_k * chunks, num),
        x, x.stride(0), x.stride(1),
        a0, a1, a2, a0.stride(0), a0.stride(1), a0.stride(2),
        out, out.stride(0), 0 if parts is None else parts.stride(0), r,
        r0, r1, r2, meta.blocks,
        k, split_k,
        ATOMIC=split_k > 1 and parts is None,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, R_CHUNKS=chunks,
        num_warps=_shrink_warps(block_m), num_stages=TUNING.shrink_stages, **_dot_kwargs(a0),
    )  # fmt: skip
    _sum_partials(v, parts)
    return v


def expand_parts(y: torch.Tensor, v: torch.Tensor, parts: Sequence[tuple[ModuleLoRA, int]], meta: SMLMMeta,
                 splits: torch.Tensor | None = None) -> None:
    """``expand`` of every part of a fused module in one launch, in place. Semantics::

        for p, (lora, offset) in enumerate(parts):
            expand(y, v[:, p * R : (p + 1) * R], lora, meta, offset)   # R = max_rank

    ``v``: [T, P * R] fp32 (``shrink_parts``'s output); ``parts_fit`` must hold for the parts. With
    ``splits`` ([num_splits, T, P * R] partial sums, ``v`` its first), v is their sum, in split order."""
    loras = [lo for lo, _ in parts]
    assert parts_fit(loras)
    num, r = len(parts), loras[0].max_rank
    assert y.dim() == 2 and v.dtype == torch.float32 and v.shape == (y.shape[0], num * r) and v.stride(1) == 1
    for lora, offset in parts:
        assert 0 <= offset and offset + lora.out_features <= y.shape[1] and lora.b.stride(2) == 1
    if not meta.num_blocks:
        return
    block_m = _block_m(meta.max_seg_len, TUNING.gemv_max_rows)
    block_n, tiles = _block_n(block_m), _tiles_n(block_m)
    grid = (meta.num_blocks, triton.cdiv(max(lo.out_features for lo in loras), block_n * tiles), num)
    b0, b1, b2 = _padded([lo.b for lo in loras])
    n0, n1, n2 = [*[lo.out_features for lo in loras], *[0] * (MAX_PARTS - num)]
    o0, o1, o2 = [*[off for _, off in parts], *[0] * (MAX_PARTS - num)]
    r0, r1, r2 = _padded([lo.ranks for lo in loras])
    s0, s1, s2 = _padded([lo.scales for lo in loras])
    launch(expand_parts_kernel, grid,
        y, y.stride(0), y.stride(1),
        v, v.stride(0), 0 if splits is None else splits.stride(0), 1 if splits is None else splits.shape[0], r,
        b0, b1, b2,
        b0.stride(0), b1.stride(0), b2.stride(0), b0.stride(1), b1.stride(1), b2.stride(1), b0.stride(2),
        n0, n1, n2, o0, o1, o2,
        r0, r1, r2, s0, s1, s2, meta.blocks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_RANK_STEP, TILES_N=tiles, SPLIT_TILE=_split_tile(splits),
        num_warps=_expand_warps(block_m), num_stages=TUNING.expand_stages, **_dot_kwargs(b0),
    )  # fmt: skip



def split_applies(meta: SMLMMeta) -> bool:
    """Whether ``forward_split`` is the inference-only forward for this step: decode-sized segments
    (the longest at most ``TUNING.split_max_rows`` rows). Host ints only."""
    return 0 < meta.max_seg_len <= TUNING.split_max_rows


def _split_buffer(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """The K splits' partial sums of ``forward_split``: not zeroed (every element read is written)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def forward_split(y: torch.Tensor, x: torch.Tensor, parts: Sequence[tuple[ModuleLoRA, int]], meta: SMLMMeta) -> None:
    """Shrink and expand of one module, or of every part of a fused one, when no ``v`` is kept
    (inference rows only), in place. Semantics (``reference.shrink_expand_ref``)::

        for lora, offset in parts:
            expand(y, shrink(x, lora, meta), lora, meta, offset)

    Two launches and nothing else: the shrink stores each K split's partial sums apart, in a buffer
    nobody zeroes (every split writes every element that expand reads: the rows of its blocks, the
    columns below each slot's rank), and expand adds the splits in a fixed order as it reads them.
    No memset, no atomics, and the same bits on every run. Parts that ``parts_fit`` rejects take
    two launches each."""
    split_shrink(x, parts, meta)(y)


def split_shrink(x: torch.Tensor, parts: Sequence[tuple[ModuleLoRA, int]],
                 meta: SMLMMeta) -> Callable[[torch.Tensor], None]:
    """``forward_split`` in its two halves: launches the shrink now (it reads only ``x``) and returns
    the expand, ``finish(y)``, which adds the LoRA terms into ``y`` later (on another stream, after
    the base GEMM that makes ``y``: ``ops`` overlaps the two in CUDA graphs). The same bits as
    ``forward_split``; ``finish`` must run once, before the next ``split_shrink`` on the same stream
    reuses nothing of this one's (each call has its own buffer)."""
    loras = [lo for lo, _ in parts]
    _check_shrink_inputs(x, loras)
    if not meta.num_blocks:
        return _nothing
    if len(parts) > 1 and not parts_fit(loras):
        finishes = [split_shrink(x, [part], meta) for part in parts]

        def finish_each(y: torch.Tensor) -> None:
            for f in finishes:
                f(y)
        return finish_each
    splits = shrink_splits(x, parts, meta)
    v = splits[0]
    if len(parts) == 1:
        lora, offset = parts[0]

        def finish_one(y: torch.Tensor) -> None:
            _check_parts(y, x, parts)
            _expand_into(y.narrow(1, offset, lora.out_features), v, lora.b, lora, blocks=meta.blocks,
                         num_blocks=meta.num_blocks, max_rows=meta.max_seg_len, with_scale=True, splits=splits)
        return finish_one

    def finish_parts(y: torch.Tensor) -> None:
        _check_parts(y, x, parts)
        expand_parts(y, v, parts, meta, splits=splits)
    return finish_parts


def shrink_splits(x: torch.Tensor, parts: Sequence[tuple[ModuleLoRA, int]], meta: SMLMMeta) -> torch.Tensor:
    """The shrink half of ``split_shrink`` (one module, or parts that ``parts_fit``, over a step with
    blocks): launches it and returns its K splits' partial sums, ``[S, T, P * R]`` fp32, written
    wherever an expand reads (the rows of the blocks, each slot's rank columns) and nowhere else."""
    loras = [lo for lo, _ in parts]
    first = loras[0]
    num, r, k = len(parts), first.max_rank, x.shape[1]
    block_m, block_r, block_k, split_k, chunks = _shrink_sizes(meta.max_seg_len, r, k, meta.num_blocks * num,
                                                               x.device)
    splits = _split_buffer((split_k, x.shape[0], num * r), x.device)
    v = splits[0]
    if num == 1:
        lora = first
        launch(shrink_kernel, (meta.num_blocks, split_k * chunks),
            x, x.stride(0), x.stride(1),
            lora.a, lora.a.stride(0), lora.a.stride(1), lora.a.stride(2),
            v, v.stride(0), splits.stride(0),
            lora.ranks, lora.scales, meta.blocks,
            k, split_k,
            HAS_SCALE=False, ATOMIC=False,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, R_CHUNKS=chunks,
            num_warps=_shrink_warps(block_m), num_stages=TUNING.shrink_stages, **_dot_kwargs(lora.a),
        )  # fmt: skip
        return splits
    a0, a1, a2 = _padded([lo.a for lo in loras])
    r0, r1, r2 = _padded([lo.ranks for lo in loras])
    launch(shrink_parts_kernel, (meta.num_blocks, split_k * chunks, num),
        x, x.stride(0), x.stride(1),
        a0, a1, a2, a0.stride(0), a0.stride(1), a0.stride(2),
        v, v.stride(0), splits.stride(0), r,
        r0, r1, r2, meta.blocks,
        k, split_k,
        ATOMIC=False,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, R_CHUNKS=chunks,
        num_warps=_shrink_warps(block_m), num_stages=TUNING.shrink_stages, **_dot_kwargs(a0),
    )  # fmt: skip
    return splits


def _nothing(y: torch.Tensor) -> None:
    return None


FUSED_MAX_RANK = 64  # shrink_expand keeps a [BLOCK_M, next_pow2(rank)] fp32 v tile in registers


def fused_fit(loras: Sequence[ModuleLoRA]) -> bool:
    """Whether ``loras`` (one module, or the parts of a fused one, as for ``parts_fit``) can share
    one ``shrink_expand`` launch: rank capacity at most ``FUSED_MAX_RANK``, one dtype."""
    first = loras[0]
    one = len(loras) == 1 and first.b.dtype == first.a.dtype and first.b.shape[:2] == first.a.shape[:2]
    return (one or parts_fit(loras)) and first.max_rank <= FUSED_MAX_RANK


def fused_applies(loras: Sequence[ModuleLoRA], meta: SMLMMeta) -> bool:
    """Whether ``shrink_expand`` is the launch for this step and module: decode-sized blocks (the
    longest segment at most ``TUNING.fused_max_rows`` rows, at most ``TUNING.fused_max_blocks``
    blocks), an input no wider than ``TUNING.fused_max_in_features`` (when set) and ``fused_fit``.
    Host ints only: deciding never reads the device."""
    max_in = TUNING.fused_max_in_features
    return (0 < meta.max_seg_len <= TUNING.fused_max_rows and 0 < meta.num_blocks <= TUNING.fused_max_blocks
            and (not max_in or loras[0].in_features <= max_in) and fused_fit(loras))


def _fused_sizes(num_programs: int, widths: Sequence[int], max_rank: int,
                 device: torch.device) -> tuple[int, int, list[int]]:
    """(BLOCK_N, column chunks per block, columns per chunk of each part) of a shrink_expand launch
    over ``num_programs`` (blocks x parts) programs before the column split."""
    block_n = TUNING.fused_block_n or (256 if _block_r(max_rank) <= 32 else 128)
    if INTERPRET:
        block_n = min(block_n, 64)
    target = TUNING.fused_programs_per_sm * _num_sms(device)
    widest = max(widths)
    chunks = max(1, min(triton.cdiv(target, num_programs), triton.cdiv(widest, max(block_n, TUNING.fused_min_cols))))
    cols = [triton.cdiv(triton.cdiv(n, block_n), chunks) * block_n for n in widths]
    return block_n, chunks, cols


def shrink_expand(y: torch.Tensor, x: torch.Tensor, parts: Sequence[tuple[ModuleLoRA, int]], meta: SMLMMeta) -> None:
    """Shrink and expand of one module, or of every part of a fused one, in one launch, in place.
    Semantics (``reference.shrink_expand_ref``)::

        for lora, offset in parts:
            expand(y, shrink(x, lora, meta), lora, meta, offset)

    x: [T, in] model dtype; y: [T, out_total] (any strides). ``fused_fit`` must hold for the parts.
    Each program recomputes v for its block over the whole K, so it pays off only for few rows per
    block (``fused_applies`` says when); v is rounded to the weights' dtype before the rank-sized
    matmul, as ``expand`` does, and nothing is written but y's LoRA columns of segment rows."""
    loras = [lo for lo, _ in parts]
    assert fused_fit(loras)
    first, num = loras[0], len(parts)
    _check_parts(y, x, parts)
    if not meta.num_blocks:
        return
    widths = [lo.out_features for lo in loras]
    block_n, chunks, cols = _fused_sizes(meta.num_blocks * num, widths, first.max_rank, x.device)
    a0, a1, a2 = _padded([lo.a for lo in loras])
    b0, b1, b2 = _padded([lo.b for lo in loras])
    n0, n1, n2 = [*widths, *[0] * (MAX_PARTS - num)]
    o0, o1, o2 = [*[off for _, off in parts], *[0] * (MAX_PARTS - num)]
    c0, c1, c2 = [*cols, *[0] * (MAX_PARTS - num)]
    r0, r1, r2 = _padded([lo.ranks for lo in loras])
    s0, s1, s2 = _padded([lo.scales for lo in loras])
    launch(shrink_expand_kernel, (meta.num_blocks, chunks, num),
        x, x.stride(0), x.stride(1),
        a0, a1, a2, a0.stride(0), a0.stride(1), a0.stride(2),
        y, y.stride(0), y.stride(1),
        b0, b1, b2,
        b0.stride(0), b1.stride(0), b2.stride(0), b0.stride(1), b1.stride(1), b2.stride(1), b0.stride(2),
        n0, n1, n2, o0, o1, o2, c0, c1, c2,
        r0, r1, r2, s0, s1, s2, meta.blocks,
        x.shape[1],
        BLOCK_M=_block_m(meta.max_seg_len), BLOCK_R=_block_r(first.max_rank),
        BLOCK_K=TUNING.fused_block_k, BLOCK_N=block_n,
        num_warps=TUNING.fused_warps, num_stages=TUNING.fused_stages, **_dot_kwargs(a0),
    )  # fmt: skip


def _check_train_slots(lora: ModuleLoRA, meta: SMLMMeta) -> None:
    """Host-only check that every training segment of a targeted adapter is a training slot."""
    ranks = lora.host_ranks
    for _, _, slot in meta.host_segments[: meta.num_train_segments]:
        if slot >= lora.num_train_slots and (ranks is None or ranks[slot] > 0):
            raise ValueError(f"slot {slot} holds training rows but is not a training slot")


def backward(  # noqa: PLR0917
    g: torch.Tensor, x: torch.Tensor, v: torch.Tensor, lora: ModuleLoRA, meta: SMLMMeta,
    out_offset: int = 0, dx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: see ``reference.backward_ref``; dx, when given ([n_train, in], any float dtype),
    is accumulated into in place and returned instead of a fresh fp32 buffer.
    g: [n_train, out_total], x: [n_train, in], v: [n_train, max_rank] fp32 (shrink's training rows).
    """
    n_train = meta.num_train_tokens
    if dx is None:
        dx = torch.zeros(n_train, lora.in_features, dtype=torch.float32, device=g.device)
    assert dx.shape == (n_train, lora.in_features)
    if not meta.num_train_segments:
        return dx
    if lora.grad_a is None or lora.grad_b is None:
        raise ValueError("training rows present but this module has no gradient storage")
    _check(lora, x, lora.in_features)
    assert g.shape[0] == n_train and v.shape == (n_train, lora.max_rank) and v.dtype == torch.float32
    assert x.dtype == g.dtype == lora.a.dtype
    _check_train_slots(lora, meta)
    gs = g.narrow(1, out_offset, lora.out_features)  # [n_train, out]
    dv = torch.zeros(n_train, lora.max_rank, dtype=torch.float32, device=g.device)
    if TUNING.backward_passes == 2:
        _backward_passes(dx, dv, gs, x, v, lora, meta)
        return dx
    max_rows = min(meta.max_seg_len, 64)
    train = {"blocks": meta.blocks, "num_blocks": meta.num_train_blocks, "max_rows": max_rows}
    _shrink_into(dv, gs, lora.b, lora, **train, with_scale=True)  # dv = c * g @ b.T
    _expand_into(dx, dv, lora.a, lora, **train, with_scale=False)  # dx += dv @ a
    _grad_into(lora.grad_a, dv, x, lora, meta=meta, with_scale=False)  # grad_a += dv.T @ x
    _grad_into(lora.grad_b, v, gs, lora, meta=meta, with_scale=True)  # grad_b += c * v.T @ g
    return dx


def _backward_blocks(meta: SMLMMeta) -> tuple[torch.Tensor, int, int]:
    """(blocks, how many, BLOCK_M) of the two backward passes: every block of the training rows in
    one tile of BLOCK_M rows (``TUNING.backward_block_rows``: the 256-row ``grad_blocks`` or the
    64-row ``blocks``), BLOCK_M no wider than the longest segment needs."""
    if TUNING.backward_block_rows == 64:
        blocks, num_blocks, rows = meta.blocks, meta.num_train_blocks, FWD_BLOCK_ROWS
    elif TUNING.backward_block_rows == GRAD_BLOCK_ROWS:
        blocks, num_blocks, rows = meta.grad_blocks, meta.num_grad_blocks, GRAD_BLOCK_ROWS
    else:
        raise ValueError(f"backward_block_rows is {TUNING.backward_block_rows}: {FWD_BLOCK_ROWS} or {GRAD_BLOCK_ROWS}")
    return blocks, num_blocks, max(16, min(rows, triton.next_power_of_2(meta.max_seg_len)))


def _backward_cols(n: int, num_blocks: int, min_cols: int, block_n: int, device: torch.device) -> int:
    """Columns a backward program covers: the width split into chunks until about
    ``TUNING.backward_programs_per_sm`` programs run per SM, none narrower than ``min_cols``, a
    whole number of ``block_n`` loop steps each."""
    target = TUNING.backward_programs_per_sm * _num_sms(device)
    chunks = max(1, min(triton.cdiv(target, num_blocks), triton.cdiv(n, max(min_cols, block_n))))
    return triton.cdiv(triton.cdiv(n, chunks), block_n) * block_n


def _backward_passes(dx: torch.Tensor, dv: torch.Tensor, gs: torch.Tensor, x: torch.Tensor,  # noqa: PLR0917
                     v: torch.Tensor, lora: ModuleLoRA, meta: SMLMMeta) -> None:
    """``backward`` in two launches: dv and grad_b from one pass over g, then dx and grad_a from one
    pass over x and dx (``backward_g_kernel``, ``backward_x_kernel``)."""
    backward_g_pass(dv, gs, v, lora, meta)
    backward_x_pass(dx, dv, x, lora, meta)


def backward_g_pass(dv: torch.Tensor, gs: torch.Tensor, v: torch.Tensor, lora: ModuleLoRA, meta: SMLMMeta) -> None:
    """dv (zeroed, fp32) = scale * gs @ b.T and grad_b += scale * v.T @ gs over the training blocks."""
    assert lora.grad_b is not None and lora.grad_b.stride(2) == 1
    blocks, num_blocks, block_m = _backward_blocks(meta)
    block_n, block_r = TUNING.backward_block_n, _block_r(lora.max_rank)
    n = gs.shape[1]
    g_cols = _backward_cols(n, num_blocks, TUNING.backward_g_min_cols, block_n, gs.device)
    chunks = triton.cdiv(n, g_cols)
    launch(backward_g_kernel, (num_blocks, chunks),
        dv, dv.stride(0),
        lora.grad_b, lora.grad_b.stride(0), lora.grad_b.stride(1),
        v, v.stride(0),
        gs, gs.stride(0), gs.stride(1),
        lora.b, lora.b.stride(0), lora.b.stride(1), lora.b.stride(2),
        lora.ranks, lora.scales, blocks,
        n, g_cols,
        ATOMIC_DV=chunks > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=TUNING.backward_warps, num_stages=TUNING.backward_stages, **_dot_kwargs(gs),
    )  # fmt: skip


def backward_x_pass(dx: torch.Tensor, dv: torch.Tensor, x: torch.Tensor, lora: ModuleLoRA, meta: SMLMMeta) -> None:
    """dx += dv @ a and grad_a += dv.T @ x over the training blocks (dv: what ``backward_g_pass`` left)."""
    assert lora.grad_a is not None and lora.grad_a.stride(2) == 1
    blocks, num_blocks, block_m = _backward_blocks(meta)
    k, block_r = x.shape[1], _block_r(lora.max_rank)
    launch(backward_x_kernel, (num_blocks, triton.cdiv(k, TUNING.backward_x_block_n)),
        dx, dx.stride(0), dx.stride(1),
        lora.grad_a, lora.grad_a.stride(0), lora.grad_a.stride(1),
        dv, dv.stride(0),
        x, x.stride(0), x.stride(1),
        lora.a, lora.a.stride(0), lora.a.stride(1), lora.a.stride(2),
        lora.ranks, blocks,
        k,
        BLOCK_M=min(block_m, TUNING.backward_x_block_m), BLOCK_N=TUNING.backward_x_block_n, BLOCK_R=block_r,
        num_warps=TUNING.backward_x_warps, num_stages=TUNING.backward_x_stages, **_dot_kwargs(x),
    )  # fmt: skip
