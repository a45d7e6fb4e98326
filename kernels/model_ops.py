"""The op layer of the model's kernels besides SMLM (``ops.py``): the fused elementwise ops and
the paged-decode attention kernel. Model code reaches kernel implementations only through these
two modules (``tests/architecture/test_borders.py``).

Each kernel module is imported on first use, so a test can set ``TRITON_INTERPRET`` before the
kernel is defined, and found missing (None) without Triton.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch


@cache
def _fused() -> ModuleType | None:
    try:
        from . import fused
    except ImportError:  # no Triton
        return None
    return fused


def fused_ops(device: torch.device) -> ModuleType | None:
    """``fused.py`` (``rms_norm``, ``add_rms_norm``, ``silu_mul``, ``rope_qk``) when it serves this
    device's inference rows (see its ``enabled``), else None: the torch expressions."""
    mod = _fused()
    return mod if mod is not None and mod.enabled(device) else None


@cache
def paged_decode_ops() -> ModuleType | None:
    """``paged_attention.py`` (``paged_decode``, ``INTERPRET``), or None without Triton."""
    try:
        from . import paged_attention
    except ImportError:
        return None
    return paged_attention
