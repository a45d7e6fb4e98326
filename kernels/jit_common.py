"""Triton device helpers shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch), Hopper and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # a Triton without it: launch.pdl_meta never asks for PDL
    HAS_GDC = False
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With ``PDL`` (the kernel was launched with ``launch_pdl``, ``launch.pdl_meta``): wait until the
    kernels before this one on its stream have finished and their writes are visible, then let the
    next kernel launch. Every program calls it before it reads what an earlier kernel wrote or writes
    what one reads, and unconditionally (a program that exits without waiting would let the next
    kernel run ahead of this one's predecessor). Before it, a program may read only what was written
    two kernels back or earlier (weights, the step's metadata). Without ``PDL``: nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


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
