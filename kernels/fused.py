"""Fused elementwise kernels for the inference rows (no autograd): one launch where torch needs 5-10.

A decode step of a 32-layer model runs ~30 small elementwise kernels per layer (RMSNorm as
cast/pow/mean/add/rsqrt/mul/cast/mul, RoPE as neg/cat/mul/mul/add for q and again for k, the
residual adds, SiLU then mul). At batch 64 each costs a few microseconds of GPU time and a
launch, which together are about half of the step. These kernels do the same arithmetic in one
pass each, rounding to the model dtype exactly where the torch expressions round, so they agree
with them to the last bit or two of the accumulated reductions:

    rms_norm(x, w, eps)            = w * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)
    add_rms_norm(h, d, w, eps)     = (h + d, rms_norm(h + d, w, eps))
    rope_qk(qkv, cos, sin, ...)    = apply_rope(q), apply_rope(k) of the fused qkv projection
    silu_mul(gu, inter)            = silu(gu[:, :inter]) * gu[:, inter:]

Training rows keep the torch expressions (autograd); model code picks these through
``loquetier.models.llama`` only when :func:`enabled` says so.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import launch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_forced: bool | None = None


def force(on: bool | None) -> None:
    """Force the fused kernels on or off (tests), or None for the automatic choice (CUDA only)."""
    global _forced
    _forced = on


def enabled(device: torch.device) -> bool:
    """Forced (tests, benchmarks), else on for CUDA unless LOQUETIER_FUSED_ELEMENTWISE=0. On the H200
    they cut a batch-64 decode step of the 8B shape from 9.0 to 5.9 ms (CUDA graph) and from 49 to
    36 ms (eager); docs/benchmarks/README.md."""
    if _forced is not None:
        return _forced and (device.type == "cuda" or INTERPRET)
    return device.type == "cuda" and os.environ.get("LOQUETIER_FUSED_ELEMENTWISE", "1") != "0"


@triton.jit
def _rms_norm_kernel(  # noqa: PLR0917
    x_ptr, stride_x, d_ptr, stride_d, h_ptr, stride_h, w_ptr, out_ptr, stride_o,
    n_cols, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual add, rounded to the model dtype as torch's `h + d` is
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=mask)


def _norm(
    x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2 and x.stride(1) == 1 and w.shape == (x.shape[1],) and w.dtype == x.dtype
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = out if delta is None else torch.empty_like(out)
    if delta is not None:
        assert delta.shape == x.shape and delta.stride(1) == 1 and delta.dtype == x.dtype
    if x.shape[0]:
        d = x if delta is None else delta
        launch(_rms_norm_kernel, (x.shape[0],),
            x, x.stride(0), d, d.stride(0), h, h.stride(0), w, out, out.stride(0),
            x.shape[1], eps,
            HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(x.shape[1]),
            num_warps=8 if x.shape[1] >= 4096 else 4,
        )  # fmt: skip
    return h, out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [n, H] (rows contiguous), w [H] in x's dtype -> [n, H]."""
    return _norm(x, None, w, eps)[1]


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta)) in one pass."""
    return _norm(h, delta, w, eps)


@triton.jit
def _rope_kernel(  # noqa: PLR0917
    qkv_ptr, stride_qkv, cos_ptr, sin_ptr, stride_cs, q_ptr, k_ptr,
    num_heads, num_kv_heads,
    kc_ptr, vc_ptr, stride_slot, slots_ptr, first_row,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, CACHE: tl.constexpr,
):
    """One (row, head) of q or k: out = x * cos + rotate_half(x) * sin, each product rounded to the
    dtype before the sum (as the torch expression is). With ``CACHE``, rows from ``first_row`` on
    also store their rotated k head, and (heads past q and k) their v head, in the paged cache at
    ``slots[row - first_row]``."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HALF
    src = qkv_ptr + row * stride_qkv + head * HEAD_DIM
    x1 = tl.load(src + offs, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
    if head < num_heads + num_kv_heads:
        dt = x1.dtype
        c1 = tl.load(cos_ptr + row * stride_cs + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + row * stride_cs + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + row * stride_cs + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + row * stride_cs + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
        if head < num_heads:
            dst = q_ptr + (row * num_heads + head) * HEAD_DIM
        else:
            dst = k_ptr + (row * num_kv_heads + head - num_heads) * HEAD_DIM
        tl.store(dst + offs, o1, mask=mask)
        tl.store(dst + HALF + offs, o2, mask=mask)
        if CACHE:
            if (head >= num_heads) & (row >= first_row):
                slot = tl.load(slots_ptr + row - first_row)
                kc = kc_ptr + slot * stride_slot + (head - num_heads) * HEAD_DIM
                tl.store(kc + offs, o1.to(kc_ptr.dtype.element_ty), mask=mask)
                tl.store(kc + HALF + offs, o2.to(kc_ptr.dtype.element_ty), mask=mask)
    elif CACHE:  # a v head: copied as it is
        if row >= first_row:
            slot = tl.load(slots_ptr + row - first_row)
            vc = vc_ptr + slot * stride_slot + (head - num_heads - num_kv_heads) * HEAD_DIM
            tl.store(vc + offs, x1.to(vc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc + HALF + offs, x2.to(vc_ptr.dtype.element_ty), mask=mask)


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,  # noqa: PLR0917
            head_dim: int, cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [n, (Hq + 2 Hkv) * D] (q, k, v columns) -> rotated q [n, Hq, D] and k [n, Hkv, D];
    cos/sin [n, D] in qkv's dtype. ``cache`` = (k_cache, v_cache, slot_mapping, first_row): rows
    from ``first_row`` on also write their rotated k and their v into the paged cache
    ([num_blocks, block_size, Hkv, D] each) at ``slot_mapping[row - first_row]``, as
    ``attention.write_kv`` does, in the same launch."""
    n = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos.shape == sin.shape == (n, head_dim) and head_dim % 2 == 0
    assert cos.stride() == sin.stride() and cos.stride(1) == 1 and cos.dtype == qkv.dtype
    q = torch.empty(n, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(n, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    heads = num_heads + num_kv_heads
    kc, vc, slots, first = q, q, q, 0  # unused without a cache
    if cache is not None:
        kc, vc, slots, first = cache
        assert kc.shape == vc.shape and kc.shape[2:] == (num_kv_heads, head_dim) and kc.is_contiguous()
        assert vc.is_contiguous() and slots.dim() == 1 and slots.shape[0] == n - first and 0 <= first <= n
        heads += num_kv_heads
    if n:
        half = head_dim // 2
        launch(_rope_kernel, (n, heads),
            qkv, qkv.stride(0), cos, sin, cos.stride(0), q, k, num_heads, num_kv_heads,
            kc, vc, num_kv_heads * head_dim, slots, first,
            HEAD_DIM=head_dim, HALF=half, BLOCK_H=triton.next_power_of_2(half), CACHE=cache is not None,
            num_warps=1,
        )  # fmt: skip
    return q, k


@triton.jit
def _silu_mul_kernel(gu_ptr, stride_gu, out_ptr, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul(gu: torch.Tensor, inter: int) -> torch.Tensor:
    """gu [n, 2 * inter] (gate then up) -> silu(gate) * up [n, inter]."""
    assert gu.dim() == 2 and gu.shape[1] == 2 * inter and gu.stride(1) == 1
    out = torch.empty(gu.shape[0], inter, dtype=gu.dtype, device=gu.device)
    if gu.shape[0]:
        block = 1024 if not INTERPRET else triton.next_power_of_2(inter)
        launch(_silu_mul_kernel, (gu.shape[0], triton.cdiv(inter, block)),
            gu, gu.stride(0), out, out.stride(0), inter, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out
