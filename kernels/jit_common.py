"""Triton device helpers shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b. UPCAST: fp32 operands (the interpreter's bf16 dot is wrong); IEEE: exact fp32."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def dot_or_mac(a, b, acc, GEMV: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b. GEMV (a has fewer than 16 rows: decode segments of a row or a few): fp32
    multiply-adds summed over the inner axis, instead of a tensor-core tile padded to 16 rows. The
    products are those of ``dot`` (bf16 x bf16 is exact in fp32); only the order of the sum differs."""
    if GEMV:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        acc = dot(a, b, acc, UPCAST, IEEE)
    return acc
