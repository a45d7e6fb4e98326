"""The decode GEMM with the LoRA expand in its epilogue, against a plain torch loop."""

from __future__ import annotations

import random

import pytest
import torch

from loquetier.kernels import ModuleLoRA, SMLMMeta, gemm_lora
from loquetier.kernels.gemm_lora import Config, linear_lora, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _module(slots: int, rank: int, k: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> ModuleLoRA:
    lo = ModuleLoRA.empty(slots, rank, k, n, dtype=dtype, device=DEVICE)
    lo.a.copy_(torch.randn(lo.a.shape, generator=gen))
    lo.b.copy_(torch.randn(lo.b.shape, generator=gen) * 0.1)
    ranks = [random.Random(n + s).choice([0, rank // 2, rank]) for s in range(slots)]
    lo.ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
    lo.scales.copy_(torch.rand(slots, generator=gen) + 0.5)
    lo.host_ranks = ranks
    return lo


@pytest.mark.parametrize(("rows", "widths", "bias", "splits", "rank"), [
    (5, (64,), False, 0, 8), (16, (64, 32, 32), True, 2, 8), (33, (96, 96), False, 1, 8), (1, (32,), True, 3, 8),
    (9, (32, 32), False, 2, 64)])  # storage of rank 64: adapters of rank 32 and 64 take 2 and 4 chunks
def test_linear_lora_matches_the_torch_loop(rows: int, widths: tuple[int, ...], bias: bool, splits: int,
                                            rank: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    k, n, slots = 80, sum(widths), 5  # K not a multiple of the K tile: the masked loop
    x = torch.randn(rows, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    parts, offset = [], 0
    for width in widths:
        parts.append((_module(slots, rank, k, width, dtype, gen), offset))
        offset += width
    token_slots = [random.Random(rows * 7 + i).choice([-1, 0, 1, 2, 3, 4]) for i in range(rows)]
    meta = SMLMMeta.build(token_slots, 0, DEVICE)
    shape = (splits, rows, len(parts) * rank) if splits else (rows, len(parts) * rank)
    v = torch.randn(shape, generator=gen).to(DEVICE)
    cfg = Config(32, 32, 4, 1)
    got = linear_lora(x, w, b, parts, v, meta.token_slots, cfg)
    want = reference(x, w, b, parts, v, meta.token_slots)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    # without adapters: the base GEMM alone
    plain = linear_lora(x, w, b, parts, None, None, cfg)
    torch.testing.assert_close(plain.float(), reference(x, w, b, parts, None, None), rtol=tol,
                               atol=tol * want.abs().max().item())
    assert not torch.allclose(plain.float(), want, rtol=tol, atol=tol)  # the LoRA terms are there


def test_parts_must_sit_on_column_tiles() -> None:
    gen = torch.Generator().manual_seed(0)
    a = _module(3, 8, 32, 48, torch.float32, gen)
    b = _module(3, 8, 32, 32, torch.float32, gen)
    assert gemm_lora.parts_ok([(a, 0)], 16) and not gemm_lora.parts_ok([(a, 0), (b, 48)], 32)
    assert gemm_lora.parts_ok([(a, 0), (b, 48)], 16) and not gemm_lora.parts_ok([(a, 16)], 16)
    with pytest.raises(ValueError, match="at most 64"):
        linear_lora(torch.zeros(65, 32), torch.zeros(48, 32), None, [], None, None)


def test_inference_forwards_take_it_when_tuned_and_give_the_same_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    # kernels.ops: an inference-only forward of at most Tuning.gemm_lora_rows rows runs the shrink and
    # then linear_lora; the terms are those of the shrink beside the GEMM and the expand after it
    import dataclasses

    from loquetier.kernels import ops, smlm

    gen = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    k, widths, rank, slots = 64, (64, 32, 32), 16, 6
    parts, offset = [], 0
    for width in widths:
        parts.append((_module(slots, rank, k, width, dtype, gen), offset))
        offset += width
    w = (torch.randn(offset, k, generator=gen) * 0.1).to(DEVICE, dtype)
    bias = torch.randn(offset, generator=gen).to(DEVICE, dtype)
    rows = 12
    x = torch.randn(rows, k, generator=gen).to(DEVICE, dtype)
    meta = SMLMMeta.build([random.Random(i).choice([-1, 1, 2, 3, 5]) for i in range(rows)], 0, DEVICE)
    calls = []
    real = gemm_lora.linear_lora
    monkeypatch.setattr(gemm_lora, "linear_lora", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _, want = ops.lora_linear(x[:0], x, w, bias, parts, meta)
    assert not calls  # off by default
    monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.TUNING, gemm_lora_rows=rows))
    _, got = ops.lora_linear(x[:0], x, w, bias, parts, meta)
    assert calls == [1]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.TUNING, gemm_lora_rows=rows - 1))
    ops.lora_linear(x[:0], x, w, bias, parts, meta)
    assert calls == [1]  # more rows than tuned: the served path
