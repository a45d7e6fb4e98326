"""Paged decode attention in Triton: one query token per sequence over its paged KV cache.

The torch reference is ``loquetier.models.attention.paged_attention(..., impl="reference")`` on
decode rows (q_len 1); the model reaches this kernel only through that function.

Program ``(seq, kv_head, split)`` owns one sequence, one KV head and all query heads of its GQA
group (padded to a ``tl.dot`` tile of 16 rows), and one contiguous partition of the sequence's
visible keys. Keys are read token-wise through the block table, so any page size works; each K/V
element of the visible context is read once per call. With ``num_splits > 1`` (flash-decoding, for
few sequences) every partition writes its normalised partial output and log-sum-exp, and a second
kernel combines them. Softmax is online in fp32 (base 2, the scale folded into the scores).

Nothing here reads the GPU from the host: sizes come from the caller's host ints, so a decode step
can be captured in a CUDA graph.

``paged_tiles`` attends rows laid out one token per row (as captured graph steps lay out prompt
chunks) in tiles of consecutive rows of one sequence: program ``(tile, kv_head)`` holds the tile's
rows times the GQA group's query heads in one ``tl.dot`` tile (about ``AttnTuning.tile_m`` rows), so
each key a tile reads serves all its rows, causally masked by each row's own context length. A
prompt chunk of ``L`` rows reads its context about ``L / tile_rows`` times, against ``L`` times row
by row. The tile list is a device tensor and its unused entries exit at once, so a graph captures
a fixed grid.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from .jit_common import dot as _dot
from .launch import launch, tuning_from_spec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32


@dataclasses.dataclass(frozen=True)
class AttnTuning:
    """Launch parameters of the paged decode kernel (``benchmarks/tune_attention.py`` times variants
    of them on a GPU)."""

    # keys per loop step and warps: 64 keys on 2 warps took 0.88x the time of 32 on 4 over batches of
    # 32-128 rows of 129-328 keys in one 8B step's graph (docs/benchmarks/tune_attention.md)
    block_n: int = 64
    warps: int = 2
    stages: int = 3
    waves: int = 2  # context partitions until about this many programs per SM ...
    min_split_tokens: int = 256  # ... but none shorter than this (each costs the combine a read)
    # paged_tiles: rows x GQA group's heads per program (rounded to the group), warps, keys per loop step
    tile_m: int = 64
    tile_warps: int = 4
    tile_block_n: int = 64
    # graph steps of prefill size: 1 attends their rows in tiles (paged_tiles), 0 row by row as
    # decode rows; with tiles, a step whose prompt rows read up to this many keys each on average
    # replays a graph (row by row: GRAPH_MAX_MEAN_CONTEXT, 256)
    graph_tiles: int = 1
    graph_tile_mean_context: int = 2048


TUNING_ENV = "LOQUETIER_ATTN_TUNING"


def tuning_from_env() -> AttnTuning:
    """``AttnTuning()`` with the fields ``LOQUETIER_ATTN_TUNING`` names overridden ("block_n=64,warps=8")."""
    return tuning_from_spec(AttnTuning, os.environ.get(TUNING_ENV, ""), TUNING_ENV)


TUNING = tuning_from_env()


@triton.jit
def _load_kv(k_ptr, v_ptr, table, toks, t_mask, offs_d, d_mask, head_off, stride_cb, stride_ct,  # noqa: PLR0917
             BLOCK_SIZE: tl.constexpr):
    """K and V [BLOCK_N, BLOCK_D] of the keys at positions ``toks`` (``t_mask``: those to read) through
    the block table ``table``; zeros elsewhere."""
    blk = tl.load(table + toks // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    kv_off = blk * stride_cb + (toks % BLOCK_SIZE) * stride_ct + head_off  # [BLOCK_N]
    kv_mask = t_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One key block of the online softmax: scores ``s`` [M, BLOCK_N] (scaled for base 2, -inf where a
    key is hidden) and values ``v``; returns the running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
    return m_new, l_i, acc


# The block-table width, the window, the split count and the first row's offset vary from step to step:
# specialized (on 1 and on multiples of 16) each would compile variants of its own while a step is
# served. The tables come in whole with an offset, not sliced: a slice's address is 16-byte aligned
# or not by the number of prefill rows before it, and that alignment would be specialized on too.
@triton.jit(do_not_specialize=["stride_bt", "seq_offset", "window", "num_splits"])
def paged_decode_kernel(  # noqa: PLR0917
    q_ptr, stride_qn, stride_qh,  # [S, Hq, D] one query row per sequence
    k_ptr, v_ptr, stride_cb, stride_ct, stride_ch,  # [num_blocks, block_size, Hkv, D] (k and v alike)
    bt_ptr, stride_bt,  # [seq_offset + S, max_blocks] int32 block tables
    ctx_ptr,  # [seq_offset + S] int32 context lengths (keys [0, ctx) incl. this step's)
    seq_offset,  # row s of q reads row seq_offset + s of the tables
    o_ptr, stride_os, stride_op, stride_oh,  # [S, Hq, D] out, or [S, splits, Hq, D] fp32 partials
    lse_ptr, stride_ls, stride_lp,  # [S, splits, Hq] fp32 base-2 log-sum-exp (IS_SPLIT only)
    qk_scale, window, num_splits,  # scale * log2(e); window <= 0: none
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_SPLIT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """out[s, h*G + g] = softmax_t(q[s, h*G + g] . k[t, h] * scale) @ v[:, h] over this program's
    partition of the visible keys t in [max(0, ctx - window), ctx)."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq_offset + seq)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, BLOCK_N), num_splits) * BLOCK_N
    start = lo + part * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # [BLOCK_G] query heads of this group
    q_rows = q_ptr + seq.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_rows, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    table = bt_ptr + (seq_offset + seq).to(tl.int64) * stride_bt
    head_off = kvh.to(tl.int64) * stride_ch

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):  # every tile holds >= 1 visible key: m_i stays finite
        toks = t0 + offs_n
        t_mask = toks < end
        k, v = _load_kv(k_ptr, v_ptr, table, toks, t_mask, offs_d, d_mask, head_off, stride_cb, stride_ct,
                        BLOCK_SIZE)  # [BLOCK_N, BLOCK_D] each
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST, IEEE)

    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # an empty partition (l = 0) writes zeros
    o_rows = o_ptr + seq.to(tl.int64) * stride_os + part * stride_op + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    if IS_SPLIT:
        lse = m_i + tl.log2(tl.maximum(l_i, 1e-30))  # -inf for an empty partition
        tl.store(lse_ptr + seq.to(tl.int64) * stride_ls + part * stride_lp + heads, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def paged_decode_combine_kernel(  # noqa: PLR0917
    part_ptr, stride_ps, stride_pp, stride_ph,  # [S, splits, Hq, D] fp32 normalised partials
    lse_ptr, stride_ls, stride_lp,  # [S, splits, Hq] fp32 base-2 log-sum-exp
    o_ptr, stride_os, stride_oh,  # [S, Hq, D] out
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[s, h] = sum_p w_p * part[s, p, h] / sum_p w_p with w_p = 2 ** (lse[s, p, h] - max_p lse)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = offs_p < num_splits
    lse = tl.load(lse_ptr + seq * stride_ls + offs_p * stride_lp + head, mask=p_mask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # partition 0 is never empty: the max is finite
    rows = part_ptr + seq * stride_ps + offs_p[:, None] * stride_pp + head * stride_ph + offs_d[None, :]
    parts = tl.load(rows, mask=p_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["stride_bt", "window", "num_rows"])
def paged_tiles_kernel(  # noqa: PLR0917
    q_ptr, stride_qn, stride_qh,  # [N, Hq, D] one query token per row
    k_ptr, v_ptr, stride_cb, stride_ct, stride_ch,  # [num_blocks, block_size, Hkv, D] (k and v alike)
    bt_ptr, stride_bt,  # [N, max_blocks] int32: a tile reads the table of its first row
    ctx_ptr,  # [N] int32 context length of each row (keys [0, ctx) incl. its own)
    tiles_ptr,  # [T, 2] int32 (first row, rows); rows 0: an unused entry
    num_rows,  # N: a tile's rows past it are not read or written
    o_ptr, stride_on, stride_oh,  # [N, Hq, D] out
    qk_scale, window,  # scale * log2(e); window <= 0: none
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """For each row r of the tile and query head h of KV head kvh's group: out[r, h] =
    softmax_t(q[r, h] . k[t, kvh] * scale) @ v[:, kvh] over keys t in [max(0, ctx[r] - window), ctx[r])."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 2)
    n = tl.minimum(tl.load(tiles_ptr + tile * 2 + 1), num_rows - row0)
    row0 = tl.where(n > 0, row0, 0)  # an unused entry (or one past the rows) reads row 0 and writes none
    BLOCK_M: tl.constexpr = BLOCK_T * GROUP_P
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    j = offs_m // GROUP_P  # the row of the tile ...
    g = offs_m % GROUP_P  # ... and the query head of the group, of each dot row
    m_valid = (j < n) & (g < GROUP)
    d_mask = offs_d < HEAD_DIM
    rows = (row0 + tl.maximum(tl.minimum(j, n - 1), 0)).to(tl.int64)
    ctx = tl.load(ctx_ptr + rows)  # [BLOCK_M]
    hi = tl.where(n > 0, tl.max(ctx, axis=0), 0)  # an unused entry walks no key
    lo = tl.where(window > 0, tl.maximum(tl.min(ctx, axis=0) - window, 0), 0)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + rows[:, None] * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    table = bt_ptr + row0.to(tl.int64) * stride_bt
    head_off = kvh.to(tl.int64) * stride_ch

    # -1e30, not -inf: a row may see no key of a loop step (causal or window), and exp2 of
    # (-inf) - (-inf) would be NaN; its p is 0 there and its alpha 1
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        toks = t0 + offs_n
        t_mask = toks < hi
        k, v = _load_kv(k_ptr, v_ptr, table, toks, t_mask, offs_d, d_mask, head_off, stride_cb, stride_ct,
                        BLOCK_SIZE)  # [BLOCK_N, BLOCK_D] each
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
        visible = toks[None, :] < ctx[:, None]
        visible = visible & ((window <= 0) | (toks[None, :] >= ctx[:, None] - window))
        s = tl.where(visible, s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST, IEEE)

    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    o_rows = o_ptr + rows[:, None] * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: few programs, so small batches exercise the split path
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def num_splits_for(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device,
                   tuning: AttnTuning | None = None) -> int:
    """Context partitions per (sequence, KV head): enough programs for ``tuning.waves`` per SM, each
    partition at least ``tuning.min_split_tokens`` keys long."""
    tuning = tuning or TUNING
    programs = num_seqs * num_kv_heads
    want = triton.cdiv(tuning.waves * _num_sms(device), max(programs, 1))
    return max(1, min(want, triton.cdiv(max_context_len, max(tuning.min_split_tokens, 1)), _MAX_SPLITS))


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, query heads, head dim, KV heads) of q [N, Hq, D] over caches [blocks, block_size, Hkv,
    D] of one dtype and layout, D contiguous."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and q.stride(2) == 1
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0
    assert k_cache.dtype == v_cache.dtype == q.dtype, "q and the cache must share a dtype"
    return num_rows, num_heads, head_dim, num_kv_heads


def paged_decode(  # noqa: PLR0917
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int,
    window: int | None = None,
    num_splits: int | None = None,
    seq_offset: int = 0,
    tuning: AttnTuning | None = None,
) -> torch.Tensor:
    """Decode attention: one query row per sequence over its paged K/V.

    Semantics::

        for s in range(S):
            ctx = context_lens[s]; lo = max(0, ctx - window) if window else 0
            keys = [k_cache[block_tables[s, t // bs], t % bs] for t in range(lo, ctx)]  # [n, Hkv, D]
            vals = [v_cache[block_tables[s, t // bs], t % bs] for t in range(lo, ctx)]
            for h in range(Hq):
                g = h // (Hq // Hkv)
                out[s, h] = softmax(q[s, h] @ keys[:, g].T * scale) @ vals[:, g]  # fp32, then q's dtype

    q [S, Hq, D] (rows of the sequences in order; D contiguous); k_cache/v_cache [num_blocks,
    block_size, Hkv, D] of one dtype, same strides; block_tables [S, >= ceil(max_ctx / bs)] int32;
    context_lens [S] int32, each in [1, max_context_len] (host int: no device read). Blocks and
    slots past a sequence's context are never read. Returns [S, Hq, D] in q's dtype.
    ``num_splits``: context partitions (None: ``num_splits_for``). ``seq_offset``: query row ``s``
    reads row ``seq_offset + s`` of ``block_tables`` and ``context_lens`` (the decode rows after the
    prefill chunks of a step, without slicing the tables). ``tuning``: launch parameters (None:
    ``TUNING``, from ``LOQUETIER_ATTN_TUNING``).
    """
    num_seqs, num_heads, head_dim, num_kv_heads = _check_cache(q, k_cache, v_cache)
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    assert block_tables.shape[0] == seq_offset + num_seqs == context_lens.shape[0] and block_tables.stride(1) == 1
    assert block_tables.shape[1] * k_cache.shape[1] >= max_context_len >= 1
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)  # [S, Hq, D]
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    tuning = tuning or TUNING
    splits = num_splits or num_splits_for(num_seqs, num_kv_heads, max_context_len, q.device, tuning)
    splits = max(1, min(splits, triton.cdiv(max_context_len, 16)))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 128 if INTERPRET else tuning.block_n
    if splits > 1:
        parts = torch.empty(num_seqs, splits, num_heads, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_seqs, splits, num_heads, dtype=torch.float32, device=q.device)
        dst, o_strides, l_strides = parts, parts.stride()[:3], lse.stride()[:2]
    else:
        lse = out  # unused
        dst, o_strides, l_strides = out, (out.stride(0), 0, out.stride(1)), (0, 0)
    launch(paged_decode_kernel, (num_seqs, num_kv_heads, splits),
        q, q.stride(0), q.stride(1),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables, block_tables.stride(0),
        context_lens,
        seq_offset,
        dst, *o_strides,
        lse, *l_strides,
        scale * _LOG2E, window or 0, splits,
        HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        IS_SPLIT=splits > 1, UPCAST=INTERPRET, IEEE=q.dtype == torch.float32,
        num_warps=tuning.warps, num_stages=tuning.stages,
    )  # fmt: skip
    if splits > 1:
        launch(paged_decode_combine_kernel, (num_seqs, num_heads),
            parts, *parts.stride()[:3],
            lse, *lse.stride()[:2],
            out, out.stride(0), out.stride(1),
            splits,
            HEAD_DIM=head_dim, BLOCK_P=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    return out


def tile_rows(num_heads: int, num_kv_heads: int, tuning: AttnTuning | None = None) -> int:
    """Rows of one ``paged_tiles`` tile: ``tuning.tile_m`` dot rows over the GQA group's query heads
    (padded to a power of two), at least 1."""
    tuning = tuning or TUNING
    group_p = triton.next_power_of_2(num_heads // num_kv_heads)
    return max(1, tuning.tile_m // group_p)


def paged_tiles(  # noqa: PLR0917
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
    window: int | None = None,
    tuning: AttnTuning | None = None,
) -> torch.Tensor:
    """Attention of rows of one query token each over their paged K/V, in tiles.

    Semantics: ``paged_decode`` over every row that a tile holds (row ``r`` reads ``context_lens[r]``
    keys through ``block_tables[r]``), where ``tiles`` [T, 2] int32 lists (first row, rows) with
    at most ``tile_rows(Hq, Hkv, tuning)`` rows each, every row of a tile of one sequence (the tile
    reads the block table of its first row), and rows 0 for an unused entry. Rows that no tile
    holds are left unwritten, and so are a tile's rows past N. Returns [N, Hq, D] in q's dtype.
    """
    num_rows, num_heads, head_dim, num_kv_heads = _check_cache(q, k_cache, v_cache)
    assert block_tables.dtype == context_lens.dtype == tiles.dtype == torch.int32
    assert block_tables.shape[0] == num_rows == context_lens.shape[0] and block_tables.stride(1) == 1
    assert tiles.dim() == 2 and tiles.shape[1] == 2 and tiles.is_contiguous()
    out = torch.empty_like(q)
    if num_rows == 0 or tiles.shape[0] == 0:
        return out
    tuning = tuning or TUNING
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    block_t = tile_rows(num_heads, num_kv_heads, tuning)
    launch(paged_tiles_kernel, (tiles.shape[0], num_kv_heads),
        q, q.stride(0), q.stride(1),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables, block_tables.stride(0),
        context_lens,
        tiles,
        num_rows,
        out, out.stride(0), out.stride(1),
        scale * _LOG2E, window or 0,
        HEAD_DIM=head_dim, GROUP=group, GROUP_P=group_p, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=128 if INTERPRET else tuning.tile_block_n,
        UPCAST=INTERPRET, IEEE=q.dtype == torch.float32,
        num_warps=tuning.tile_warps, num_stages=tuning.stages,
    )  # fmt: skip
    return out
