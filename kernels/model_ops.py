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


def graph_attention_tiles(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """For graph steps of prefill size: (rows of a ``paged_tiles`` tile, or 0: rows attended one by
    one; the mean keys a prompt row may read in such a step), from ``AttnTuning.graph_tiles`` and
    ``graph_tile_mean_context``; (0, 0) without Triton."""
    mod = paged_decode_ops()
    if mod is None or not mod.TUNING.graph_tiles:
        return 0, 0
    return mod.tile_rows(num_heads, num_kv_heads), mod.TUNING.graph_tile_mean_context


@cache
def paged_decode_ops() -> ModuleType | None:
    """``paged_attention.py`` (``paged_decode``, ``INTERPRET``), or None without Triton."""
    try:
        from . import paged_attention
    except ImportError:
        return None
    return paged_attention
