"""kernels/fused.py against the torch expressions they replace, then the model with them on.

Run through the Triton interpreter (CI sets TRITON_INTERPRET=1); skipped without it on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loquetier.models.rope import apply_rope

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from loquetier.kernels import fused  # noqa: E402
from loquetier.models.llama import rms_norm as torch_rms_norm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tol(dtype: torch.dtype) -> dict[str, float]:
    """fp32: reduction order only; bf16/fp16: two roundings to the dtype may differ by an ulp each."""
    return {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-2, "rtol": 2 * 2**-7},
            torch.float16: {"atol": 2e-3, "rtol": 2 * 2**-10}}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(1, 64), (7, 96), (33, 200)])
def test_rms_norm_and_fused_residual(dtype: torch.dtype, rows: int, cols: int) -> None:
    g = torch.Generator().manual_seed(rows * cols)
    x = (torch.randn(rows, cols, generator=g) * 3).to(DEV, dtype)
    d = torch.randn(rows, cols, generator=g).to(DEV, dtype)
    w = (torch.rand(cols, generator=g) + 0.5).to(DEV, dtype)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), torch_rms_norm(x, w, 1e-5), **tol(dtype))
    h, normed = fused.add_rms_norm(x, d, w, 1e-6)
    # the residual add rounds once to the dtype, as torch's does (within one ulp: the interpreter's
    # bf16/fp16 casts may round differently from the GPU's round-to-nearest-even)
    ulp = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(h, x + d, atol=1e-6, rtol=ulp)
    torch.testing.assert_close(normed, torch_rms_norm(x + d, w, 1e-6), **tol(dtype))
    strided = torch.randn(rows, 2 * cols, generator=g).to(DEV, dtype)[:, :cols]  # rows not adjacent
    torch.testing.assert_close(fused.rms_norm(strided, w, 1e-5), torch_rms_norm(strided, w, 1e-5), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (6, 3, 12), (2, 2, 64)])
def test_rope_qk(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    n = 9
    g = torch.Generator().manual_seed(heads * head_dim)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEV, dtype)
    angles = torch.rand(n, head_dim // 2, generator=g) * 6
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(DEV, dtype), emb.sin().to(DEV, dtype)
    q, k = fused.rope_qk(qkv, cos, sin, heads, kv_heads, head_dim)
    q_ref = apply_rope(qkv[:, : heads * head_dim].reshape(n, heads, head_dim), cos, sin)
    k_ref = apply_rope(qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].reshape(n, kv_heads, head_dim),
                       cos, sin)
    torch.testing.assert_close(q, q_ref, **tol(dtype))
    torch.testing.assert_close(k, k_ref, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "first"), [(4, 2, 16, 0), (6, 3, 12, 3), (2, 2, 64, 9)])
def test_rope_qk_writes_the_kv_cache_as_write_kv_does(dtype: torch.dtype, heads: int, kv_heads: int,
                                                      head_dim: int, first: int) -> None:
    """With a cache, the rows from ``first`` on also land (rotated k, v as it is) at their slots of the
    paged cache, exactly where and what ``write_kv`` writes; earlier rows (evaluation rows) and every
    other slot are left alone; q and k are what they are without a cache."""
    from loquetier.models.attention import write_kv

    n, blocks, block_size = 9, 5, 4
    g = torch.Generator().manual_seed(heads * head_dim + first)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEV, dtype)
    angles = torch.rand(n, head_dim // 2, generator=g) * 6
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(DEV, dtype), emb.sin().to(DEV, dtype)
    slots = torch.randperm(blocks * block_size, generator=g)[: n - first].to(DEV)
    start = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(DEV, dtype)
    k_cache, v_cache = start.clone(), start.clone() * 2
    q, k = fused.rope_qk(qkv, cos, sin, heads, kv_heads, head_dim, cache=(k_cache, v_cache, slots, first))
    q0, k0 = fused.rope_qk(qkv, cos, sin, heads, kv_heads, head_dim)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    k_want, v_want = start.clone(), start.clone() * 2
    v = qkv[:, (heads + kv_heads) * head_dim :].reshape(n, kv_heads, head_dim)
    write_kv(k_want, v_want, k0[first:], v[first:], slots)
    assert torch.equal(k_cache, k_want)
    assert torch.equal(v_cache, v_want)
    assert torch.equal(k_cache, start) == (first == n)  # written unless every row is an evaluation row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 32), (5, 96), (17, 300)])
def test_silu_mul(dtype: torch.dtype, rows: int, inter: int) -> None:
    g = torch.Generator().manual_seed(rows + inter)
    gu = (torch.randn(rows, 2 * inter, generator=g) * 4).to(DEV, dtype)
    torch.testing.assert_close(fused.silu_mul(gu, inter), F.silu(gu[:, :inter]) * gu[:, inter:], **tol(dtype))


def test_empty_inputs() -> None:
    x = torch.empty(0, 64, device=DEV)
    w = torch.ones(64, device=DEV)
    assert fused.rms_norm(x, w, 1e-5).shape == (0, 64)
    assert fused.silu_mul(torch.empty(0, 64, device=DEV), 32).shape == (0, 32)


def test_model_with_fused_inference_rows_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole engine (serving, then a training job and an evaluation) with the fused kernels on the
    inference and evaluation rows: same greedy tokens and the same evaluation loss as with the torch
    expressions."""
    from loquetier.kernels import force_backend
    from tests.engine.test_engine import PROMPTS, job_params, make_engine, train_data
    from tests.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "llama", arch="qwen2")
    calls = {"rope": 0}
    rope = fused.rope_qk

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["rope"] += 1
        return rope(*args, **kwargs)

    monkeypatch.setattr(fused, "rope_qk", counted)
    force_backend("reference" if DEV == "cpu" else None)  # the torch SMLM reference does not capture
    outs, losses = [], []
    try:
        for on in (False, True):
            fused.force(on)
            engine = make_engine(model_dir, device=DEV)
            # generated before the job is added: beside training rows, a step's mix follows measured
            # step times, and on a GPU two mixes round differently in fp32 (greedy tokens near a tie
            # then part; seen on the H200 when this test ran alone)
            outs.append([o.token_ids for o in engine.generate(PROMPTS, adapter_ids=["a", None, "b", "a"])])
            job = engine.add_training_job("j", train_data(0), job_params(3),
                                          lora=dict(rank=4, alpha=8, target_modules=["q_proj", "down_proj"]))
            engine.run_until_idle()
            losses.append(engine.evaluate("b", train_data(1)))  # evaluation rows take the fused path
            del job
    finally:
        fused.force(None)
        force_backend(None)
    assert calls["rope"] > 0  # the second run went through the fused kernels
    assert outs[1] == outs[0]
    assert losses[1]["loss"] == pytest.approx(losses[0]["loss"], rel=1e-5)
    assert losses[1]["token_accuracy"] == losses[0]["token_accuracy"]
