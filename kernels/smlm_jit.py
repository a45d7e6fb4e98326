"""The Triton kernels behind SMLM. Launch them only through ``kernels/smlm.py``.

Every kernel walks a row-block schedule (``SMLMMeta.blocks`` / ``train_blocks``): program ``pid0``
owns the rows ``[row_start, row_end)`` of one segment, all using adapter ``slot``. A program whose
slot has rank 0 does nothing; ranks bound the loops and the masks, so an adapter of rank 8 moves
(and in ``expand`` multiplies) rank-8 tiles even when the pool's ``max_rank`` is 64.

``UPCAST`` (the interpreter) runs every ``tl.dot`` in fp32: the interpreter's bf16/fp16 dot is wrong.
On the GPU, ``tl.dot`` takes the weights' dtype and accumulates in fp32; fp32 weights use ``IEEE`` fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def shrink_kernel(  # noqa: PLR0917
    x_ptr, stride_xm, stride_xk,  # [T, K] rows of the layer input (or of the output grad)
    w_ptr, stride_ws, stride_wr, stride_wk,  # [S, R, K] a (or b in backward), model dtype
    v_ptr, stride_vs, stride_vm,  # [split_k, T, R_OUT] fp32 partial sums, one slab per K split
    ranks_ptr, scales_ptr, blocks_ptr,
    K, R_OUT, split_k,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """v[pid_k, rows, :R_OUT] = (scale[slot] *) x[rows, ksplit] @ w[slot, :r, ksplit].T, zeros past r.

    Plain stores of every column of the block's rows (no zero-initialised buffer, no atomics); the
    reader sums the ``split_k`` slabs. A rank-0 slot writes zeros."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    row_start = tl.load(blocks_ptr + pid * 3)
    row_end = tl.load(blocks_ptr + pid * 3 + 1)
    slot = tl.load(blocks_ptr + pid * 3 + 2)
    r = tl.load(ranks_ptr + slot)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_hi = tl.where(r > 0, k_hi, k_lo)  # rank 0: no loads, the block's rows get zeros

    offs_r = tl.arange(0, BLOCK_R)
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
            acc = _dot(xt, tl.trans(wt), acc, UPCAST, IEEE)
        acc = acc * scale
        v_tile = v_ptr + pid_k * stride_vs + offs_m.to(tl.int64)[:, None] * stride_vm + offs_r[None, :]
        tl.store(v_tile, acc, mask=m_mask[:, None] & (offs_r < R_OUT)[None, :])


@triton.jit
def expand_kernel(  # noqa: PLR0917
    y_ptr, stride_ym, stride_yn,  # [T, N] a column slice of the base output (any strides), in place
    v_ptr, stride_vs, stride_vm,  # [SPLIT, T, R] fp32 partial sums (shrink's slabs), summed here
    w_ptr, stride_ws, stride_wr, stride_wn,  # [S, R, N] b (or a in backward), model dtype
    ranks_ptr, scales_ptr, blocks_ptr,
    N, SPLIT,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """y[rows, cols] += (scale[slot] *) v[rows, :r] @ w[slot, :r, cols] for one block, one column tile."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    row_start = tl.load(blocks_ptr + pid * 3)
    row_end = tl.load(blocks_ptr + pid * 3 + 1)
    slot = tl.load(blocks_ptr + pid * 3 + 2)
    r = tl.load(ranks_ptr + slot)
    row_end = tl.where(r > 0, row_end, row_start)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scales_ptr + slot)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    w_base = w_ptr + slot.to(tl.int64) * stride_ws + offs_n[None, :] * stride_wn  # [1, BLOCK_N]
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        v_rows = v_ptr + offs_m.to(tl.int64)[:, None] * stride_vm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, r, BLOCK_R):  # rank-aware: rank 8 runs one 16-wide step, rank 64 four
            rs = r0 + offs_r
            rr_mask = rs < r
            vt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for sp in range(0, SPLIT):
                vt += tl.load(v_rows + sp * stride_vs + rs[None, :], mask=m_mask[:, None] & rr_mask[None, :],
                              other=0.0)
            wt = tl.load(w_base + rs[:, None] * stride_wr, mask=rr_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(vt.to(wt.dtype), wt, acc, UPCAST, IEEE)
        y_tile = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_mask = m_mask[:, None] & n_mask[None, :]
        yt = tl.load(y_tile, mask=y_mask, other=0.0)
        tl.store(y_tile, (yt.to(tl.float32) + scale * acc).to(yt.dtype), mask=y_mask)


@triton.jit
def grad_kernel(  # noqa: PLR0917
    grad_ptr, stride_gs, stride_gr,  # [S_train, R, N] fp32, accumulated with atomics
    l_ptr, stride_ls, stride_lm,  # [SPLIT, T_train, R] fp32 partial sums (dv for grad_a, v for grad_b)
    x_ptr, stride_xm, stride_xn,  # [T_train, N] model dtype (x for grad_a, the grad slice for grad_b)
    ranks_ptr, scales_ptr, blocks_ptr,
    N, SPLIT,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """grad[slot, :r, cols] += (scale[slot] *) l[rows, :r].T @ x[rows, cols] for one block, one tile."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    row_start = tl.load(blocks_ptr + pid * 3)
    row_end = tl.load(blocks_ptr + pid * 3 + 1)
    slot = tl.load(blocks_ptr + pid * 3 + 2)
    r = tl.load(ranks_ptr + slot)
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
            lt = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
            for sp in range(0, SPLIT):
                lt += tl.load(l_ptr + sp * stride_ls + rows[None, :] * stride_lm + offs_r[:, None],
                              mask=r_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_M]
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
            acc = _dot(lt.to(xt.dtype), xt, acc, UPCAST, IEEE)
        if HAS_SCALE:
            acc = acc * tl.load(scales_ptr + slot)
        g_tile = grad_ptr + slot.to(tl.int64) * stride_gs + offs_r[:, None] * stride_gr + offs_n[None, :]
        tl.atomic_add(g_tile, acc, mask=r_mask[:, None] & n_mask[None, :], sem="relaxed")


@triton.jit
def shrink_expand_kernel(  # noqa: PLR0917
    x_ptr, stride_xm, stride_xk,  # [T, K] layer input
    a_ptr, stride_as, stride_ar, stride_ak,  # [S, R, K] lora a, model dtype
    b_ptr, stride_bs, stride_br, stride_bn,  # [S, R, N] lora b, model dtype
    y_ptr, stride_ym, stride_yn,  # [T, N] a column slice of the base output (any strides), in place
    v_ptr, stride_vm,  # [T, R_OUT] fp32, written by the pid_n == 0 programs when WRITE_V
    ranks_ptr, scales_ptr, blocks_ptr,
    K, N, R_OUT, n_split,
    WRITE_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Shrink and expand in one launch (decode: short segments). For one block and column group:
    v = x[rows] @ a[slot, :r].T (kept in registers, full K), then for every column tile
    ``pid_n, pid_n + n_split, ...``: y[rows, cols] += scale[slot] * v @ b[slot, :r, cols].
    Each column group re-reads the slot's a tile (L2 hits after the first); ranks mask the loads,
    so a rank-8 adapter moves rank-8 tiles. BLOCK_R must cover every slot's rank (the pool's max)."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    row_start = tl.load(blocks_ptr + pid * 3)
    row_end = tl.load(blocks_ptr + pid * 3 + 1)
    slot = tl.load(blocks_ptr + pid * 3 + 2)
    r = tl.load(ranks_ptr + slot)
    scale = tl.load(scales_ptr + slot)
    k_hi = tl.where(r > 0, K, 0)  # rank 0: no loads, y untouched (v rows get zeros)
    n_hi = tl.where(r > 0, N, 0)

    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    r_mask = offs_r < r
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar  # [BLOCK_R, 1]
    b_rows = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br  # [BLOCK_R, 1]
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        rows = offs_m.to(tl.int64)
        x_rows = x_ptr + rows[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, k_hi, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K
            xt = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_rows + ks[None, :] * stride_ak, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _dot(xt, tl.trans(at), acc, UPCAST, IEEE)
        if WRITE_V:
            v_mask = m_mask[:, None] & (offs_r < R_OUT)[None, :] & (pid_n == 0)
            tl.store(v_ptr + rows[:, None] * stride_vm + offs_r[None, :], acc, mask=v_mask)
        vt = acc.to(b_ptr.dtype.element_ty)
        for n0 in range(pid_n * BLOCK_N, n_hi, n_split * BLOCK_N):
            cols = n0 + offs_n
            n_mask = cols < N
            bt = tl.load(b_rows + cols[None, :] * stride_bn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            out = _dot(vt, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
            y_tile = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
            y_mask = m_mask[:, None] & n_mask[None, :]
            yt = tl.load(y_tile, mask=y_mask, other=0.0)
            tl.store(y_tile, (yt.to(tl.float32) + scale * out).to(yt.dtype), mask=y_mask)
