"""Plain-torch SMLM: the specification, the CPU fallback and the test oracle.

Every function here has the same signature as its Triton twin in ``kernels/smlm.py``.
Computation is a loop over segments in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import SMLMMeta
from .weights import ModuleLoRA


def shrink_ref(x: torch.Tensor, lora: ModuleLoRA, meta: SMLMMeta) -> torch.Tensor:
    """Semantics:
        v = zeros(T, R, fp32)
        for (start, n, s) in segments: r = ranks[s]; v[start:start+n, :r] = x[start:start+n] @ a[s, :r].T
    x: [T, in]; returns v: [T, max_rank] fp32 (columns >= the row's rank and rows without adapter are 0).
    """
    v = torch.zeros(x.shape[0], lora.max_rank, dtype=torch.float32, device=x.device)
    ranks = lora.ranks.tolist()
    for start, n, slot in meta.host_segments:
        r = ranks[slot]
        if r:
            v[start : start + n, :r] = x[start : start + n].float() @ lora.a[slot, :r].float().T
    return v


def expand_ref(
    y: torch.Tensor, v: torch.Tensor, lora: ModuleLoRA, meta: SMLMMeta, out_offset: int = 0
) -> None:
    """Semantics (in place):
        for (start, n, s) in segments: r = ranks[s]
            y[start:start+n, out_offset:out_offset+out] += scales[s] * v[start:start+n, :r] @ b[s, :r]
    y: [T, out_total] (any float dtype), v: [T, max_rank] fp32.
    """
    out = lora.out_features
    ranks = lora.ranks.tolist()
    scales = lora.scales.tolist()
    for start, n, slot in meta.host_segments:
        r = ranks[slot]
        if r:
            delta = scales[slot] * (v[start : start + n, :r] @ lora.b[slot, :r].float())
            rows = y[start : start + n, out_offset : out_offset + out]
            rows.copy_((rows.float() + delta).to(y.dtype))


def backward_ref(  # noqa: PLR0917
    g: torch.Tensor,
    x: torch.Tensor,
    v: torch.Tensor,
    lora: ModuleLoRA,
    meta: SMLMMeta,
    out_offset: int = 0,
    dx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics, over the training segments only (rows [0, num_train_tokens)):
        dx = zeros(n_train, in)
        for (start, n, s) in segments[:num_train_segments]: r = ranks[s]; c = scales[s]
            gs = g[start:start+n, out_offset:out_offset+out]          # [n, out]
            dv = c * gs @ b[s, :r].T                                   # [n, r]
            dx[start:start+n] += dv @ a[s, :r]
            grad_a[s, :r] += dv.T @ x[start:start+n]                   # accumulated, fp32
            grad_b[s, :r] += c * v[start:start+n, :r].T @ gs           # accumulated, fp32
    g: [n_train, out_total] grad of the layer output, x: [n_train, in] layer input,
    v: [n_train, max_rank] fp32 shrink output. Returns dx: [n_train, in] fp32; when ``dx`` is given
    (any float dtype) the LoRA term is added into it in place and it is returned instead.
    """
    if dx is not None:
        dx.copy_(dx.float() + backward_ref(g, x, v, lora, meta, out_offset))
        return dx
    n_train = meta.num_train_tokens
    dx = torch.zeros(n_train, lora.in_features, dtype=torch.float32, device=g.device)
    if lora.grad_a is None or lora.grad_b is None:
        if meta.num_train_segments:
            raise ValueError("training rows present but this module has no gradient storage")
        return dx
    out = lora.out_features
    ranks = lora.ranks.tolist()
    scales = lora.scales.tolist()
    for start, n, slot in meta.host_segments[: meta.num_train_segments]:
        r = ranks[slot]
        if not r:
            continue
        if slot >= lora.num_train_slots:
            raise ValueError(f"slot {slot} holds training rows but is not a training slot")
        gs = g[start : start + n, out_offset : out_offset + out].float()
        dv = scales[slot] * (gs @ lora.b[slot, :r].float().T)
        dx[start : start + n] += dv @ lora.a[slot, :r].float()
        lora.grad_a[slot, :r] += dv.T @ x[start : start + n].float()
        lora.grad_b[slot, :r] += scales[slot] * (v[start : start + n, :r].T @ gs)
    return dx


def shrink_expand_ref(
    y: torch.Tensor, x: torch.Tensor, parts: Sequence[tuple[ModuleLoRA, int]], meta: SMLMMeta
) -> None:
    """Semantics (in place), one module or every part of a fused one:
        for lora, offset in parts: expand_ref(y, shrink_ref(x, lora, meta), lora, meta, offset)
    x: [T, in]; y: [T, out_total] (any float dtype).
    """
    for lora, offset in parts:
        expand_ref(y, shrink_ref(x, lora, meta), lora, meta, offset)
