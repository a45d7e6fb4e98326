"""The Triton kernels behind SMLM. Launch them only through ``kernels/smlm.py``.

Every kernel walks a row-block schedule (``SMLMMeta.blocks`` / ``grad_blocks``): program ``pid0``
owns the rows ``[row_start, row_end)`` of one segment, all using adapter ``slot``. A program whose
slot has rank 0 does nothing; ranks bound the loops and the masks, so an adapter of rank 8 moves
(and in ``expand`` multiplies) rank-8 tiles even when the pool's ``max_rank`` is 64.

Kernels: ``shrink_kernel`` / ``shrink_parts_kernel`` (v = x @ a.T, K split over programs with fp32
atomics when the blocks alone cannot fill the GPU), ``expand_kernel`` / ``expand_parts_kernel``
(y += scale * v @ b, one program per block and column tile), ``grad_kernel`` (grad_a / grad_b with
fp32 atomics), ``backward_g_kernel`` / ``backward_x_kernel`` (backward in two passes: dv and grad_b
from one read of g, dx and grad_a from one read of x) and ``shrink_expand_kernel`` (both halves of
the forward in one program for a block and a column chunk: v is recomputed by each chunk of a
block, never stored). The ``*_parts`` kernels
and ``shrink_expand_kernel`` serve up to three parts of a fused module, program axis 2 picking one.

``UPCAST`` (the interpreter) runs every ``tl.dot`` in fp32: the interpreter's bf16/fp16 dot is wrong.
On the GPU, ``tl.dot`` takes the weights' dtype and accumulates in fp32; fp32 weights use ``IEEE`` fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit_common import dot as _dot
from .jit_common import dot_or_mac as _dot_or_mac


@triton.jit
def _block(blocks_ptr, ranks_ptr, pid):
    """Block ``pid`` of a row-block schedule: its rows ``[row_start, row_end)``, its slot and that
    slot's rank."""
    row_start = tl.load(blocks_ptr + pid * 3)
    row_end = tl.load(blocks_ptr + pid * 3 + 1)
    slot = tl.load(blocks_ptr + pid * 3 + 2)
    return row_start, row_end, slot, tl.load(ranks_ptr + slot)


@triton.jit
def _shrink_tile(  # noqa: PLR0917
    x_ptr, stride_xm, stride_xk, w_ptr, stride_ws, stride_wr, stride_wk, v_ptr, stride_vm, stride_vk,
    ranks_ptr, scales_ptr, blocks_ptr, pid, pid_kr, K, split_k,
    HAS_SCALE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, R_CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """The body of both shrink kernels: block ``pid``, K split ``pid_kr // R_CHUNKS`` and rank chunk
    ``pid_kr % R_CHUNKS`` (columns ``[chunk * BLOCK_R, (chunk + 1) * BLOCK_R)`` of v), one module (or
    part). A chunk at or past the slot's rank does nothing, so a rank-16 adapter in a pool of rank 64
    costs one 16-wide chunk. ``stride_vk``: 0 when the splits add into one ``v`` (atomics), else each
    split stores its partial sums in a ``v`` of its own (``v + pid_k * stride_vk``), summed in a fixed
    order afterwards."""
    pid_k = pid_kr // R_CHUNKS
    r_lo = (pid_kr % R_CHUNKS) * BLOCK_R
    v_ptr = v_ptr + pid_k.to(tl.int64) * stride_vk
    row_start = tl.load(blocks_ptr + pid * 3)
    row_end = tl.load(blocks_ptr + pid * 3 + 1)
    slot = tl.load(blocks_ptr + pid * 3 + 2)
    r = tl.load(ranks_ptr + slot)
    row_end = tl.where(r > r_lo, row_end, row_start)  # rank 0 or a chunk past it: the row loop runs zero times
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    offs_r = r_lo + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + slot.to(tl.int64) * stride_ws
    w_rows = w_base + offs_r[:, None] * stride_wr  # [BLOCK_R, 1]
    r_mask = offs_r < r
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scales_ptr + slot)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < k_hi
            xt = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_rows + ks[None, :] * stride_wk, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _dot_or_mac(xt, tl.trans(wt), acc, BLOCK_M < 16, UPCAST, IEEE)
        acc = acc * scale
        v_tile = v_ptr + offs_m.to(tl.int64)[:, None] * stride_vm + offs_r[None, :]
        v_mask = m_mask[:, None] & r_mask[None, :]
        if ATOMIC:  # K is split across programs
            tl.atomic_add(v_tile, acc, mask=v_mask, sem="relaxed")
        else:
            tl.store(v_tile, acc, mask=v_mask)


@triton.jit
def _expand_tile(  # noqa: PLR0917
    y_ptr, stride_ym, stride_yn, v_ptr, stride_vm, stride_vs, num_splits, w_ptr, stride_ws, stride_wr, stride_wn,
    ranks_ptr, scales_ptr, blocks_ptr, pid, pid_n, N,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, TILES_N: tl.constexpr,
    SPLIT_TILE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """The body of both expand kernels: block ``pid``, column tiles ``pid_n * TILES_N`` and the
    ``TILES_N - 1`` after it, one module (or part). ``v`` is the sum of ``num_splits`` partial buffers
    ``stride_vs`` apart (a shrink's K splits, stored apart), added in a fixed order as the tile is
    read: 1 split for a plain ``v``. ``SPLIT_TILE`` 0: a loop over the splits, each load issued after
    the add before it; else the loop is unrolled ``SPLIT_TILE`` splits at a time, so their loads are
    in flight together. Either way the splits are added one after the other in split order: the
    same bits. Several column tiles a program pay the block's metadata loads once, but with fewer
    programs in flight (``Tuning.expand_tiles``, 1 by default: more tiles were slower on
    the H200)."""
    row_start = tl.load(blocks_ptr + pid * 3)
    row_end = tl.load(blocks_ptr + pid * 3 + 1)
    slot = tl.load(blocks_ptr + pid * 3 + 2)
    r = tl.load(ranks_ptr + slot)
    # rank 0, or column tiles past the output's width (a part narrower than the grid): nothing to do
    row_end = tl.where((r > 0) & (pid_n * TILES_N * BLOCK_N < N), row_end, row_start)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scales_ptr + slot)

    offs_r = tl.arange(0, BLOCK_R)
    w_slot = w_ptr + slot.to(tl.int64) * stride_ws
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        v_rows = v_ptr + offs_m.to(tl.int64)[:, None] * stride_vm
        for t in tl.static_range(TILES_N):
            offs_n = (pid_n * TILES_N + t) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            w_base = w_slot + offs_n[None, :] * stride_wn  # [1, BLOCK_N]
            y_tile = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
            y_mask = m_mask[:, None] & n_mask[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, r, BLOCK_R):  # rank-aware: rank 8 runs one 16-wide step, rank 64 four
                rs = r0 + offs_r
                rr_mask = rs < r
                v_mask = m_mask[:, None] & rr_mask[None, :]
                vt = tl.load(v_rows + rs[None, :], mask=v_mask, other=0.0)
                if SPLIT_TILE > 0:  # SPLIT_TILE loads unrolled at a time: all in flight before their adds
                    for s0 in range(1, num_splits, SPLIT_TILE):
                        for j in tl.static_range(SPLIT_TILE):
                            vt += tl.load(v_rows + (s0 + j) * stride_vs + rs[None, :],
                                          mask=v_mask & (s0 + j < num_splits), other=0.0)
                else:
                    for s in range(1, num_splits):  # a fixed order: the same bits on every run
                        vt += tl.load(v_rows + s * stride_vs + rs[None, :], mask=v_mask, other=0.0)
                wt = tl.load(w_base + rs[:, None] * stride_wr, mask=rr_mask[:, None] & n_mask[None, :], other=0.0)
                acc = _dot_or_mac(vt.to(wt.dtype), wt, acc, BLOCK_M < 16, UPCAST, IEEE)
            yt = tl.load(y_tile, mask=y_mask, other=0.0)
            tl.store(y_tile, (yt.to(tl.float32) + scale * acc).to(yt.dtype), mask=y_mask)


# split_k varies with the step's block count, and the stride between split buffers with its row count:
# specialized, their values 1 and multiples of 16 would each compile a variant of their own, in the
# middle of a served step.
@triton.jit(do_not_specialize=["split_k", "stride_vk"])
def shrink_kernel(  # noqa: PLR0917
    x_ptr, stride_xm, stride_xk,  # [T, K] rows of the layer input (or of the output grad)
    w_ptr, stride_ws, stride_wr, stride_wk,  # [S, R, K] a (or b in backward), model dtype
    v_ptr, stride_vm, stride_vk,  # [T, R] fp32, zero-initialised ([split_k, T, R] with stride_vk > 0)
    ranks_ptr, scales_ptr, blocks_ptr,
    K, split_k,
    HAS_SCALE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, R_CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """v[rows, :r] (+)= (scale[slot] *) x[rows] @ w[slot, :r].T for one block, one K split (and
    rank chunk: program axis 1 is split * R_CHUNKS + chunk)."""
    _shrink_tile(x_ptr, stride_xm, stride_xk, w_ptr, stride_ws, stride_wr, stride_wk, v_ptr, stride_vm, stride_vk,
                 ranks_ptr, scales_ptr, blocks_ptr, tl.program_id(0), tl.program_id(1), K, split_k,
                 HAS_SCALE, ATOMIC, BLOCK_M, BLOCK_R, BLOCK_K, R_CHUNKS, UPCAST, IEEE)


@triton.jit(do_not_specialize=["num_splits", "stride_vs"])  # as shrink's split_k and stride_vk
def expand_kernel(  # noqa: PLR0917
    y_ptr, stride_ym, stride_yn,  # [T, N] a column slice of the base output (any strides), in place
    v_ptr, stride_vm, stride_vs, num_splits,  # [T, R] fp32, or [num_splits, T, R] partial sums to add
    w_ptr, stride_ws, stride_wr, stride_wn,  # [S, R, N] b (or a in backward), model dtype
    ranks_ptr, scales_ptr, blocks_ptr,
    N,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, TILES_N: tl.constexpr,
    SPLIT_TILE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """y[rows, cols] += (scale[slot] *) v[rows, :r] @ w[slot, :r, cols] for one block, TILES_N column tiles."""
    _expand_tile(y_ptr, stride_ym, stride_yn, v_ptr, stride_vm, stride_vs, num_splits,
                 w_ptr, stride_ws, stride_wr, stride_wn,
                 ranks_ptr, scales_ptr, blocks_ptr, tl.program_id(0), tl.program_id(1), N,
                 HAS_SCALE, BLOCK_M, BLOCK_N, BLOCK_R, TILES_N, SPLIT_TILE, UPCAST, IEEE)


@triton.jit
def grad_kernel(  # noqa: PLR0917
    grad_ptr, stride_gs, stride_gr,  # [S_train, R, N] fp32, accumulated with atomics
    l_ptr, stride_lm,  # [T_train, R] fp32 (dv for grad_a, v for grad_b)
    x_ptr, stride_xm, stride_xn,  # [T_train, N] model dtype (x for grad_a, the grad slice for grad_b)
    ranks_ptr, scales_ptr, blocks_ptr,
    N,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """grad[slot, :r, cols] += (scale[slot] *) l[rows, :r].T @ x[rows, cols] for one block, one tile."""
    pid_n = tl.program_id(1)
    row_start, row_end, slot, r = _block(blocks_ptr, ranks_ptr, tl.program_id(0))
    if r > 0:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < r
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < row_end
            rows = offs_m.to(tl.int64)
            lt = tl.load(l_ptr + rows[None, :] * stride_lm + offs_r[:, None],
                         mask=r_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_M]
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
            acc = _dot(lt.to(xt.dtype), xt, acc, UPCAST, IEEE)
        if HAS_SCALE:
            acc = acc * tl.load(scales_ptr + slot)
        g_tile = grad_ptr + slot.to(tl.int64) * stride_gs + offs_r[:, None] * stride_gr + offs_n[None, :]
        tl.atomic_add(g_tile, acc, mask=r_mask[:, None] & n_mask[None, :], sem="relaxed")


# Backward in two passes (``smlm.backward``'s default): one over g, one over x and dx, each reading its
# big operands once. The g pass's program holds a whole block of training rows in one tile (BLOCK_M >=
# its rows) and walks a column chunk of ``cols_per_program`` columns BLOCK_N at a time: dv is summed
# over the chunk in registers, grad_b over the block. The x pass's program takes one column tile of a
# block, BLOCK_M rows at a time (nothing it computes is summed over columns).
@triton.jit
def backward_g_kernel(  # noqa: PLR0917
    dv_ptr, stride_dvm,  # [T_train, R] fp32, zeroed: dv = scale * g @ b.T (atomics over column chunks)
    gb_ptr, stride_gbs, stride_gbr,  # [S_train, R, N] fp32 grad_b, accumulated with atomics
    v_ptr, stride_vm,  # [T_train, R] fp32, the forward shrink's training rows
    g_ptr, stride_gm, stride_gn,  # [T_train, N] model dtype, this module's columns of the output grad
    b_ptr, stride_bs, stride_br, stride_bn,  # [S, R, N] b, model dtype
    ranks_ptr, scales_ptr, blocks_ptr,
    N, cols_per_program,
    ATOMIC_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """For one block and column chunk, reading each g tile once:
    dv[rows, :r] (+)= scale * g[rows, cols] @ b[slot, :r, cols].T (summed over the chunk in registers;
    ``ATOMIC_DV``: chunks add into dv, else the one chunk stores it) and
    grad_b[slot, :r, cols] += scale * v[rows, :r].T @ g[rows, cols] (each tile complete over the block)."""
    pid_n = tl.program_id(1)
    row_start, row_end, slot, r = _block(blocks_ptr, ranks_ptr, tl.program_id(0))
    if r > 0:
        scale = tl.load(scales_ptr + slot)
        offs_m = row_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        rows = offs_m.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < r
        vt = tl.load(v_ptr + rows[None, :] * stride_vm + offs_r[:, None],
                     mask=r_mask[:, None] & m_mask[None, :], other=0.0).to(g_ptr.dtype.element_ty)  # [BLOCK_R, BLOCK_M]
        b_rows = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br  # [BLOCK_R, 1]
        gb_rows = gb_ptr + slot.to(tl.int64) * stride_gbs + offs_r[:, None] * stride_gbr
        g_rows = g_ptr + rows[:, None] * stride_gm  # [BLOCK_M, 1]
        dv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n_lo = pid_n * cols_per_program
        n_hi = tl.minimum(n_lo + cols_per_program, N)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            gt = tl.load(g_rows + offs_n[None, :] * stride_gn, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            bt = tl.load(b_rows + offs_n[None, :] * stride_bn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            dv = _dot(gt, tl.trans(bt), dv, UPCAST, IEEE)
            gb = _dot(vt, gt, tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
            tl.atomic_add(gb_rows + offs_n[None, :], gb * scale, mask=r_mask[:, None] & n_mask[None, :],
                          sem="relaxed")
        dv_tile = dv_ptr + rows[:, None] * stride_dvm + offs_r[None, :]
        if ATOMIC_DV:
            tl.atomic_add(dv_tile, dv * scale, mask=m_mask[:, None] & r_mask[None, :], sem="relaxed")
        else:
            tl.store(dv_tile, dv * scale, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def backward_x_kernel(  # noqa: PLR0917
    dx_ptr, stride_dxm, stride_dxn,  # [T_train, K] any float dtype, in place
    ga_ptr, stride_gas, stride_gar,  # [S_train, R, K] fp32 grad_a, accumulated with atomics
    dv_ptr, stride_dvm,  # [T_train, R] fp32, what backward_g_kernel left
    x_ptr, stride_xm, stride_xn,  # [T_train, K] model dtype, the layer input's training rows
    a_ptr, stride_as, stride_ar, stride_ak,  # [S, R, K] a, model dtype
    ranks_ptr, blocks_ptr,
    K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """For one block and one column tile, BLOCK_M rows at a time: dx[rows, cols] += dv[rows, :r] @
    a[slot, :r, cols] (dv rounded to a's dtype, as the expand does) and grad_a[slot, :r, cols] +=
    dv[rows, :r].T @ x[rows, cols], summed over the block before its one atomic add."""
    pid_n = tl.program_id(1)
    row_start, row_end, slot, r = _block(blocks_ptr, ranks_ptr, tl.program_id(0))
    if r > 0:
        offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_mask = offs_k < K
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < r
        at = tl.load(a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                     mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        ga = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < row_end
            rows = offs_m.to(tl.int64)
            tile_mask = m_mask[:, None] & k_mask[None, :]
            dvt = tl.load(dv_ptr + rows[:, None] * stride_dvm + offs_r[None, :],
                          mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(at.dtype)  # [BLOCK_M, BLOCK_R]
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xn, mask=tile_mask, other=0.0)
            ga = _dot(tl.trans(dvt), xt, ga, UPCAST, IEEE)
            dx_tile = dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxn
            dxt = tl.load(dx_tile, mask=tile_mask, other=0.0)
            acc = _dot(dvt, at, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
            tl.store(dx_tile, (dxt.to(tl.float32) + acc).to(dxt.dtype), mask=tile_mask)
        tl.atomic_add(ga_ptr + slot.to(tl.int64) * stride_gas + offs_r[:, None] * stride_gar + offs_k[None, :], ga,
                      mask=r_mask[:, None] & k_mask[None, :], sem="relaxed")


# The fused modules (q|k|v, gate|up) in one launch each: program axis 2 picks the part. Up to three
# parts; a missing part repeats part 0's pointers and gets no programs (the grid's third axis).
@triton.jit(do_not_specialize=["split_k", "stride_vk"])
def shrink_parts_kernel(  # noqa: PLR0917
    x_ptr, stride_xm, stride_xk,  # [T, K] rows of the layer input
    w0_ptr, w1_ptr, w2_ptr, stride_ws, stride_wr, stride_wk,  # [S, R, K] each part's a (one shape)
    v_ptr, stride_vm, stride_vk, part_cols,  # [T, P * R] fp32, zeroed; part p in columns [p * part_cols, ...)
    r0_ptr, r1_ptr, r2_ptr, blocks_ptr,
    K, split_k,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, R_CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """v[rows, p*R : p*R + r_p] (+)= x[rows] @ w_p[slot, :r_p].T for one block, one K split (and rank
    chunk, as in ``shrink_kernel``), part p."""
    part = tl.program_id(2)
    w_ptr = w0_ptr
    ranks_ptr = r0_ptr
    if part == 1:
        w_ptr = w1_ptr
        ranks_ptr = r1_ptr
    if part == 2:
        w_ptr = w2_ptr
        ranks_ptr = r2_ptr
    _shrink_tile(x_ptr, stride_xm, stride_xk, w_ptr, stride_ws, stride_wr, stride_wk, v_ptr + part * part_cols,
                 stride_vm, stride_vk, ranks_ptr, ranks_ptr, blocks_ptr, tl.program_id(0), tl.program_id(1), K, split_k,
                 False, ATOMIC, BLOCK_M, BLOCK_R, BLOCK_K, R_CHUNKS, UPCAST, IEEE)


@triton.jit(do_not_specialize=["num_splits", "stride_vs"])
def expand_parts_kernel(  # noqa: PLR0917
    y_ptr, stride_ym, stride_yn,  # [T, N_total] the base output (any strides), in place
    v_ptr, stride_vm, stride_vs, num_splits, part_cols,  # [T, P * R] fp32 (or num_splits of them to add),
    # part p in columns [p * part_cols, ...)
    w0_ptr, w1_ptr, w2_ptr,  # [S, R, N_p] each part's b
    ws0, ws1, ws2, wr0, wr1, wr2, stride_wn,  # per part: slot and rank strides; column stride (shared)
    n0, n1, n2, off0, off1, off2,  # per part: output width and first column in y
    r0_ptr, r1_ptr, r2_ptr, s0_ptr, s1_ptr, s2_ptr, blocks_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, TILES_N: tl.constexpr,
    SPLIT_TILE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """y[rows, off_p + cols] += scale_p[slot] * v[rows, p*R : p*R + r_p] @ w_p[slot, :r_p, cols]."""
    part = tl.program_id(2)
    w_ptr = w0_ptr
    stride_ws = ws0
    stride_wr = wr0
    N = n0
    col0 = off0
    ranks_ptr = r0_ptr
    scales_ptr = s0_ptr
    if part == 1:
        w_ptr = w1_ptr
        stride_ws = ws1
        stride_wr = wr1
        N = n1
        col0 = off1
        ranks_ptr = r1_ptr
        scales_ptr = s1_ptr
    if part == 2:
        w_ptr = w2_ptr
        stride_ws = ws2
        stride_wr = wr2
        N = n2
        col0 = off2
        ranks_ptr = r2_ptr
        scales_ptr = s2_ptr
    _expand_tile(y_ptr + col0 * stride_yn, stride_ym, stride_yn, v_ptr + part * part_cols, stride_vm,
                 stride_vs, num_splits, w_ptr, stride_ws, stride_wr, stride_wn, ranks_ptr, scales_ptr, blocks_ptr,
                 tl.program_id(0), tl.program_id(1), N, True, BLOCK_M, BLOCK_N, BLOCK_R, TILES_N, SPLIT_TILE,
                 UPCAST, IEEE)


# Shrink and expand in one launch, for decode-sized blocks (``smlm.shrink_expand``). Program
# (pid0, pid1, pid2) = (row block, column chunk, part): it recomputes its block's v over the whole K
# (every column chunk of a block does; rank <= 64, so the A tile rereads hit L2), rounds v to the
# weights' dtype as expand does, and adds scale * v @ b[slot, :r, chunk] into y. No v buffer, no
# memset, one launch for every part of a fused module.
@triton.jit
def _shrink_expand_tile(  # noqa: PLR0917
    x_ptr, stride_xm, stride_xk, a_ptr, stride_as, stride_ar, stride_ak,
    y_ptr, stride_ym, stride_yn, b_ptr, stride_bs, stride_br, stride_bn,
    ranks_ptr, scales_ptr, blocks_ptr, pid, pid_n, K, N, cols_per_program,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """y[rows, chunk] += scale[slot] * (x[rows] @ a[slot, :r].T) @ b[slot, :r, chunk] for one block."""
    row_start = tl.load(blocks_ptr + pid * 3)
    row_end = tl.load(blocks_ptr + pid * 3 + 1)
    slot = tl.load(blocks_ptr + pid * 3 + 2)
    r = tl.load(ranks_ptr + slot)
    n_lo = pid_n * cols_per_program
    n_hi = tl.minimum(n_lo + cols_per_program, N)
    # rank 0, or a column chunk past this part's width: the row loop runs zero times
    row_end = tl.where((r > 0) & (n_lo < N), row_end, row_start)
    scale = tl.load(scales_ptr + slot)

    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_N)
    r_mask = offs_r < r
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar  # [BLOCK_R, 1]
    b_rows = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br  # [BLOCK_R, 1]
    for m0 in range(row_start, row_end, BLOCK_M):  # one pass for decode blocks (rows <= BLOCK_M)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
        v = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K
            xt = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_rows + ks[None, :] * stride_ak, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            v = _dot(xt, tl.trans(at), v, UPCAST, IEEE)
        vt = v.to(b_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_R], columns >= r are 0
        y_rows = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym  # [BLOCK_M, 1]
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + offs_c
            n_mask = offs_n < n_hi
            bt = tl.load(b_rows + offs_n[None, :] * stride_bn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(vt, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
            y_tile = y_rows + offs_n[None, :] * stride_yn
            y_mask = m_mask[:, None] & n_mask[None, :]
            yt = tl.load(y_tile, mask=y_mask, other=0.0)
            tl.store(y_tile, (yt.to(tl.float32) + scale * acc).to(yt.dtype), mask=y_mask)


@triton.jit
def shrink_expand_kernel(  # noqa: PLR0917
    x_ptr, stride_xm, stride_xk,  # [T, K] rows of the layer input, shared by every part
    a0_ptr, a1_ptr, a2_ptr, stride_as, stride_ar, stride_ak,  # [S, R, K] each part's a (one shape)
    y_ptr, stride_ym, stride_yn,  # [T, N_total] the base output (any strides), in place
    b0_ptr, b1_ptr, b2_ptr,  # [S, R, N_p] each part's b
    bs0, bs1, bs2, br0, br1, br2, stride_bn,  # per part: slot and rank strides; column stride (shared)
    n0, n1, n2, off0, off1, off2, c0, c1, c2,  # per part: width, first column in y, columns per program
    r0_ptr, r1_ptr, r2_ptr, s0_ptr, s1_ptr, s2_ptr, blocks_ptr,
    K,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """y[rows, off_p + chunk] += scale_p[slot] * (x[rows] @ a_p[slot, :r_p].T) @ b_p[slot, :r_p, chunk]."""
    part = tl.program_id(2)
    a_ptr = a0_ptr
    b_ptr = b0_ptr
    stride_bs = bs0
    stride_br = br0
    N = n0
    col0 = off0
    cols = c0
    ranks_ptr = r0_ptr
    scales_ptr = s0_ptr
    if part == 1:
        a_ptr = a1_ptr
        b_ptr = b1_ptr
        stride_bs = bs1
        stride_br = br1
        N = n1
        col0 = off1
        cols = c1
        ranks_ptr = r1_ptr
        scales_ptr = s1_ptr
    if part == 2:
        a_ptr = a2_ptr
        b_ptr = b2_ptr
        stride_bs = bs2
        stride_br = br2
        N = n2
        col0 = off2
        cols = c2
        ranks_ptr = r2_ptr
        scales_ptr = s2_ptr
    _shrink_expand_tile(x_ptr, stride_xm, stride_xk, a_ptr, stride_as, stride_ar, stride_ak,
                        y_ptr + col0 * stride_yn, stride_ym, stride_yn, b_ptr, stride_bs, stride_br, stride_bn,
                        ranks_ptr, scales_ptr, blocks_ptr, tl.program_id(0), tl.program_id(1), K, N, cols,
                        BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N, UPCAST, IEEE)
