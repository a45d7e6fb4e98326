"""Chunked fused lm_head + cross-entropy, summed per loss group.

Semantics::

    logits = h @ weight.T                                   # never materialised whole: chunks of rows
    nll[i] = logsumexp(logits[i]) - logits[i, labels[i]]    # fp32; rows with label -100 contribute 0
    loss_sum[g] = sum(nll[i] for i if groups[i] == g)
    token_count[g] = #{i: groups[i] == g, labels[i] != -100}
    correct[g] = #{i: groups[i] == g, labels[i] != -100, argmax(logits[i]) == labels[i]}

Only one [chunk_rows, vocab] fp32 block exists at a time, in forward and in backward (which
recomputes the logits of each chunk from the saved ``h`` and the per-row logsumexp). The lm_head
weight is frozen: no gradient for it. The engine combines groups as
``sum_g loss_sum[g] / denom[g]`` (see ``weighted_loss``) with denominators it owns, since a job's
micro-batch may be spread across steps.
"""

from __future__ import annotations

from typing import Any

import torch

from .batch import IGNORE_INDEX

DEFAULT_CHUNK_BYTES = 256 * 2**20


def _chunk_rows(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _ce_forward(  # noqa: PLR0917
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    chunk: int,
) -> tuple[torch.Tensor, ...]:
    n = h.shape[0]
    lse = torch.zeros(n, dtype=torch.float32, device=h.device)  # [N]
    nll = torch.zeros(n, dtype=torch.float32, device=h.device)  # [N]
    hit = torch.zeros(n, dtype=torch.bool, device=h.device)  # [N]
    valid = labels != IGNORE_INDEX  # [N]
    safe = labels.clamp_min(0)
    for s in range(0, n, chunk):
        logits = (h[s : s + chunk] @ weight.T).float()  # [c, V]
        lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, safe[s : s + chunk, None])[:, 0]
        nll[s : s + chunk] = lse[s : s + chunk] - target
        hit[s : s + chunk] = logits.argmax(-1) == safe[s : s + chunk]
    zeros = torch.zeros(num_groups, dtype=torch.float32, device=h.device)
    loss_sum = zeros.index_add(0, groups, torch.where(valid, nll, 0.0))  # [G]
    count = torch.zeros(num_groups, dtype=torch.int64, device=h.device).index_add(0, groups, valid.long())
    correct = torch.zeros_like(count).index_add(0, groups, (valid & hit).long())
    return loss_sum, count, correct, safe, valid, lse


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: PLR0917
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        num_groups: int,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss_sum, count, correct, safe, valid, lse = _ce_forward(h, weight, labels, groups, num_groups, chunk)
        ctx.save_for_backward(h, weight, safe, valid, groups, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(count, correct)
        return loss_sum, count, correct

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor, _gc: Any, _gk: Any) -> tuple[Any, ...]:
        h, weight, safe, valid, groups, lse = ctx.saved_tensors
        row_scale = torch.where(valid, g_loss[groups], 0.0)  # [N] fp32
        dh = torch.empty_like(h)
        for s in range(0, h.shape[0], ctx.chunk):
            logits = (h[s : s + ctx.chunk] @ weight.T).float()  # [c, V]
            d = torch.exp(logits - lse[s : s + ctx.chunk, None])  # softmax
            d.scatter_add_(1, safe[s : s + ctx.chunk, None], -torch.ones_like(d[:, :1]))
            d *= row_scale[s : s + ctx.chunk, None]
            dh[s : s + ctx.chunk] = (d.to(weight.dtype) @ weight).to(h.dtype)  # [c, H]
        return dh, None, None, None, None, None


def chunked_cross_entropy(  # noqa: PLR0917
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [N, H] (final-normed hidden), weight [V, H], labels/groups [N] int64 ->
    (loss_sum [G] fp32, token_count [G] int64, correct [G] int64). Differentiable in ``h`` only."""
    chunk = _chunk_rows(weight.shape[0], chunk_bytes)
    if h.requires_grad and torch.is_grad_enabled():
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = _ChunkedCE.apply(
            h, weight, labels, groups, num_groups, chunk
        )
        return out
    with torch.no_grad():
        loss_sum, count, correct, *_ = _ce_forward(h, weight, labels, groups, num_groups, chunk)
        return loss_sum, count, correct


def weighted_loss(loss_sum: torch.Tensor, denominators: torch.Tensor) -> torch.Tensor:
    """sum_g loss_sum[g] / denominators[g] (0 for a zero denominator): the scalar to backprop."""
    denom = denominators.to(torch.float32)
    if loss_sum.is_cuda and not denom.is_cuda:  # a pageable copy would wait for the forward to finish
        denom = denom.pin_memory().to(loss_sum.device, non_blocking=True)
    denom = denom.to(loss_sum.device)
    return torch.where(denom > 0, loss_sum / denom.clamp_min(1e-12), 0.0).sum()
