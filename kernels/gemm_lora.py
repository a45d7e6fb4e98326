"""A decode-sized base GEMM whose loop goes on over the LoRA terms: ``y = x @ W.T (+ bias) + LoRA
terms`` in one launch, for steps of a few dozen rows.

Semantics (``reference``)::

    y = x @ weight.T + bias
    for p, (lora, offset) in enumerate(parts):
        for each row m with slot s = token_slots[m] >= 0 and rank r = lora.ranks[s] > 0:
            y[m, offset : offset + out_p] += lora.scales[s] * v[m, p*R : p*R + r] @ lora.b[s, :r]

``v`` is the shrink's output, ``[T, P * R]`` fp32 (``R`` the pool's ``max_rank``), or its K splits'
partial sums ``[S, T, P * R]`` (``smlm.shrink_splits``' buffer), added here in split order. Rows with
slot -1 and rank columns at or past a slot's rank are never read, so ``v`` may hold anything there.

Each program owns ``BLOCK_N`` output columns of every row (``BLOCK_M >= T`` rows in one tile): it
streams its ``BLOCK_N x K`` slice of the weight once, then goes on in tensor-core tiles over B of every
slot read as one ``[slots x R, N]`` matrix, each row's operand being its scaled v in its own slot's
columns and zero in the others (rank chunks of 16 up to the largest rank loaded; slots no row uses,
and rows of B past a slot's rank, masked off). The expand's own launch and its pass over ``y`` are
gone; the shrink must have finished before the launch (``Tuning.gemm_lora_rows``; measured in
``benchmarks/bench_gemm_lora.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .jit_common import dot as _dot
from .launch import INTERPRET, launch
from .weights import ModuleLoRA

MAX_PARTS = 3
MAX_ROWS = 64  # one row tile: the decode steps this kernel is for
RANK_TILE = 16  # the LoRA loop's rank chunk


@triton.jit
def _v_tile(v_rows, stride_vs, num_splits, live, scale, BLOCK_M: tl.constexpr, R: tl.constexpr):
    """Each row's shrink output (its K splits summed) times its slot's scale, [BLOCK_M, R] fp32."""
    v_tile = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for s in range(num_splits):
        v_tile += tl.load(v_rows + s * stride_vs, mask=live, other=0.0)
    return v_tile * scale[:, None]


@triton.jit
def gemm_lora_kernel(  # noqa: PLR0917
    x_ptr, stride_xm, w_ptr, stride_wn, bias_ptr, y_ptr, stride_ym, M, N, K,
    v_ptr, stride_vm, stride_vs, num_splits, slots_ptr, num_slots,
    b0, b1, b2, br0, br1, br2, r0, r1, r2, s0, s1, s2, n1_start, n2_start,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, NUM_PARTS: tl.constexpr, R: tl.constexpr,
    R_TILE: tl.constexpr, MAX_SLOTS: tl.constexpr, SLOTS_PER_STEP: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Columns ``[pid * BLOCK_N, (pid + 1) * BLOCK_N)`` of every row."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    if HAS_LORA:
        # the LoRA side's per-row state, before the GEMM's loop so that its loads' latency hides behind
        # it; the part whose columns hold this tile (a tile lies in one part; starts past the last are N)
        rr = tl.arange(0, R)
        slot = tl.load(slots_ptr + rm, mask=mask_m, other=-1)
        on = slot >= 0
        n0 = pid * BLOCK_N
        part = (n0 >= n1_start).to(tl.int32) + (n0 >= n2_start).to(tl.int32)
        col0 = tl.where(part == 2, n2_start, tl.where(part == 1, n1_start, 0))
        b_ptr, ranks_ptr, scales_ptr, stride_br = b0, r0, s0, br0
        if NUM_PARTS >= 2:
            if part == 1:
                b_ptr, ranks_ptr, scales_ptr, stride_br = b1, r1, s1, br1
        if NUM_PARTS == 3:
            if part == 2:
                b_ptr, ranks_ptr, scales_ptr, stride_br = b2, r2, s2, br2
        rank = tl.load(ranks_ptr + slot, mask=on, other=0)
        scale = tl.load(scales_ptr + slot, mask=on, other=0.0)
        live = on[:, None] & (rr[None, :] < rank[:, None])
        v_rows = v_ptr + rm[:, None] * stride_vm + part * R + rr[None, :]
        v_tile = _v_tile(v_rows, stride_vs, num_splits, live, scale, BLOCK_M, R)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            in_k = (k + rk) < K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=mask_n[None, :] & in_k[:, None], other=0.0)
        acc = _dot(a, b, acc, UPCAST, IEEE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_LORA:
        # The LoRA terms as more of the same GEMM: B of every slot is a [num_slots * R, N] matrix
        # (rows slot * R + r), and row m's operand is its v in its own slot's rank columns, zero in the
        # others. The rank goes in chunks of R_TILE (up to the largest rank loaded: a rank-16 adapter in
        # storage of rank 64 costs one chunk), SLOTS_PER_STEP slots a step; a slot no row of the tile
        # uses, and B's rows at or past a slot's rank, are masked off (never read).
        every_slot = tl.arange(0, MAX_SLOTS)
        chunks = tl.cdiv(tl.max(tl.load(ranks_ptr + every_slot, mask=every_slot < num_slots, other=0)), R_TILE)
        cols = tl.arange(0, SLOTS_PER_STEP * R_TILE)
        col_slot = cols // R_TILE
        col_r = cols % R_TILE
        v_chunks = tl.reshape(v_tile, (BLOCK_M, R // R_TILE, R_TILE))
        for c in range(0, chunks):
            pick = tl.arange(0, R // R_TILE) == c
            v_chunk = tl.sum(tl.where(pick[None, :, None], v_chunks, 0.0), axis=1)  # [BLOCK_M, R_TILE]
            v_wide = tl.reshape(tl.broadcast_to(v_chunk[:, None, :], (BLOCK_M, SLOTS_PER_STEP, R_TILE)),
                                (BLOCK_M, SLOTS_PER_STEP * R_TILE))
            b_rows = (col_slot * R + c * R_TILE + col_r).to(tl.int64)
            b_ptrs = b_ptr + b_rows[:, None] * stride_br + (rn - col0)[None, :]
            for j0 in range(0, num_slots, SLOTS_PER_STEP):
                cslot = j0 + col_slot
                mine = slot[:, None] == cslot[None, :]  # [BLOCK_M, SLOTS_PER_STEP * R_TILE]
                used = tl.max(mine.to(tl.int32), axis=0) > 0
                crank = tl.load(ranks_ptr + cslot, mask=used, other=0)
                keep = used & (c * R_TILE + col_r < crank)
                bt = tl.load(b_ptrs + j0 * R * stride_br, mask=keep[:, None] & mask_n[None, :], other=0.0)
                vt = tl.where(mine, v_wide, 0.0).to(bt.dtype)
                acc = _dot(vt, bt, acc, UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    slots_per_step: int = 0  # slots of the LoRA loop a step (0: as many as make 64 rank columns of a chunk)


def default_config(rows: int, n: int, k: int) -> Config:
    """A tile that gives the GPU at least ~two programs per SM on the 8B shapes: narrow column tiles
    for narrow outputs (a program streams ``block_n x K`` of the weight)."""
    del rows
    if INTERPRET:
        return Config(32, 32, 4, 1)
    if n <= 8192:
        return Config(32, 256 if k % 256 == 0 else 128, 4, 4)
    return Config(64, 128, 4, 4)


def _pow2_rows(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))


def parts_ok(parts: Sequence[tuple[ModuleLoRA, int]], block_n: int) -> bool:
    """Whether ``parts`` fit one launch: 1-3 parts of one slot count, rank capacity (a power of 2) and
    dtype, contiguous, laid out back to back from column 0, each boundary on a column tile."""
    if not 1 <= len(parts) <= MAX_PARTS or parts[0][0].max_rank & (parts[0][0].max_rank - 1):
        return False
    first = parts[0][0]
    end = 0
    for lora, offset in parts:
        if (offset != end or offset % block_n or lora.max_rank != first.max_rank or lora.b.dtype != first.b.dtype
                or lora.num_slots != first.num_slots or not lora.b.is_contiguous()):
            return False
        end = offset + lora.out_features
    return True


def linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: PLR0913, PLR0917
                parts: Sequence[tuple[ModuleLoRA, int]], v: torch.Tensor | None,
                token_slots: torch.Tensor | None, config: Config | None = None) -> torch.Tensor:
    """``y = x @ weight.T + bias`` plus the LoRA terms of ``parts`` (see the module doc); no LoRA when
    ``v`` is None. ``x``: [T, K] with T <= 64 and unit column stride; ``weight``: [N, K] contiguous."""
    t, k = x.shape
    n = weight.shape[0]
    if t > MAX_ROWS:
        raise ValueError(f"{t} rows: linear_lora serves decode steps of at most {MAX_ROWS}")
    assert x.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] == k
    cfg = config or default_config(t, n, k)
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    has_lora = v is not None and bool(parts)
    if has_lora:
        assert v is not None and token_slots is not None and parts_ok(parts, cfg.block_n)
        assert parts[-1][1] + parts[-1][0].out_features == n
        r = parts[0][0].max_rank
        splits = v if v.dim() == 3 else v.unsqueeze(0)
        assert splits.dtype == torch.float32 and splits.shape[1:] == (t, len(parts) * r) and splits.stride(2) == 1
        loras = [lo for lo, _ in parts]
        bs = [*[lo.b for lo in loras], *[loras[0].b] * (MAX_PARTS - len(loras))]
        rs = [*[lo.ranks for lo in loras], *[loras[0].ranks] * (MAX_PARTS - len(loras))]
        ss = [*[lo.scales for lo in loras], *[loras[0].scales] * (MAX_PARTS - len(loras))]
        starts = [off for _, off in parts[1:]] + [n] * (MAX_PARTS - len(parts))
        lora_args = (splits, splits.stride(1), splits.stride(0), splits.shape[0], token_slots, loras[0].num_slots,
                     *bs, *[b.stride(1) for b in bs], *rs, *ss, starts[0], starts[1])
        num_parts, max_slots = len(parts), loras[0].num_slots
    else:
        max_slots = 1
        r, num_parts = 16, 1
        lora_args = (x, 0, 0, 0, x, 0, x, x, x, 0, 0, 0, x, x, x, x, x, x, 0, 0)
    launch(gemm_lora_kernel, (triton.cdiv(n, cfg.block_n),),
           x, x.stride(0), weight, weight.stride(0), bias if bias is not None else x, y, y.stride(0), t, n, k,
           *lora_args,
           HAS_BIAS=bias is not None, HAS_LORA=has_lora, NUM_PARTS=num_parts, R=r, R_TILE=min(r, RANK_TILE),
           MAX_SLOTS=triton.next_power_of_2(max_slots),
           SLOTS_PER_STEP=cfg.slots_per_step or 64 // min(r, RANK_TILE),
           EVEN_K=k % cfg.block_k == 0, BLOCK_M=_pow2_rows(t), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
           UPCAST=INTERPRET, IEEE=weight.dtype == torch.float32,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              parts: Sequence[tuple[ModuleLoRA, int]], v: torch.Tensor | None,
              token_slots: torch.Tensor | None) -> torch.Tensor:
    """``linear_lora`` as a plain torch loop, in fp32."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y += bias.float()
    if v is None:
        return y
    vs = (v if v.dim() == 3 else v.unsqueeze(0)).sum(0)
    assert token_slots is not None
    for p, (lora, offset) in enumerate(parts):
        rmax = lora.max_rank
        for m, s in enumerate(token_slots.tolist()):
            rank = int(lora.ranks[s]) if s >= 0 else 0
            if rank:
                term = vs[m, p * rmax : p * rmax + rank] @ lora.b[s, :rank].float()
                y[m, offset : offset + lora.out_features] += float(lora.scales[s]) * term
    return y
