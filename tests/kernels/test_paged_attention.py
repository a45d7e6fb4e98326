"""Triton paged-decode kernel against the torch reference (``paged_attention(impl="reference")``).

On a machine without CUDA the kernel runs in the Triton interpreter; the flag must be set before
``loquetier.kernels.paged_attention`` defines its kernels, hence before the imports below.

Every cache is poisoned: all blocks start NaN (unused blocks, slots past a sequence's context, and
the padding of block tables, which points at block 0), so a kernel that reads one leaks NaN.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from hf_checkpoints import reference_smlm  # noqa: E402, F401
from tiny import make_tiny_model  # noqa: E402

from loquetier.engine.kv_cache import BlockManager  # noqa: E402
from loquetier.kernels import paged_attention as pa  # noqa: E402
from loquetier.models import BatchBuilder, LlamaModel  # noqa: E402
from loquetier.models.attention import paged_attention, write_kv  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not pa.INTERPRET:
    pytest.skip("paged_attention was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

# Max error allowed, relative to the largest magnitude of the reference output. bf16/fp16: the
# probabilities are rounded to the cache dtype before the P @ V dot, as on the GPU.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
BS = 16


def _case(  # noqa: PLR0913
    ctx_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    prefill: list[tuple[int, int]] = (),  # type: ignore[assignment]
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """A NaN-poisoned cache with scattered blocks, random K/V for every visible slot, and q.
    prefill: (q_len, context_len) chunks placed before the decode rows (one per ctx_lens entry)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    groups = [*prefill, *((1, c) for c in ctx_lens)]
    need = [(c + BS - 1) // BS for _, c in groups]
    num_blocks = sum(need) + 3  # spare blocks stay NaN
    perm = list(range(num_blocks))
    rng.shuffle(perm)
    kc = torch.full((num_blocks, BS, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    b, used = BatchBuilder(BS), 0
    slots: list[int] = []
    for i, ((q_len, ctx), nb) in enumerate(zip(groups, need, strict=True)):
        table = perm[used : used + nb]
        used += nb
        slots += [table[p // BS] * BS + p % BS for p in range(ctx)]
        if i < len(prefill):
            b.add_prefill(i, [0] * q_len, ctx - q_len, table)
        else:
            b.add_decode(i, 0, ctx - 1, table)
    n = len(slots)
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    write_kv(kc, vc, k, v, torch.tensor(slots))
    batch = b.build(DEVICE)
    q = torch.randn(batch.num_prefill + batch.num_decode, num_heads, head_dim, generator=gen).to(dtype)
    return q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), batch.paged


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert not got.isnan().any(), "poisoned KV leaked into the output"
    err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err <= TOL[dtype], f"max relative error {err:.2e} > {TOL[dtype]:.0e}"


# (num_heads, num_kv_heads, head_dim): GQA 1 and 4, non-power-of-two head counts and head dim
SHAPES = [(4, 4, 32), (8, 2, 32), (12, 3, 16), (6, 2, 40)]
CONTEXTS = {
    "one": [1, 1, 1],
    "block-1": [BS - 1, BS - 1],
    "blocks": [BS, 3 * BS + 5, 2 * BS],
    "ragged": [1, BS - 1, BS + 1, 140, 7],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_matches_reference(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    ctx = CONTEXTS["ragged"] if dtype != torch.float32 else [c for v in CONTEXTS.values() for c in v]
    q, kc, vc, meta = _case(ctx, *shape, dtype)
    ref = paged_attention(q, kc, vc, meta, 0.3, impl="reference")
    _check(paged_attention(q, kc, vc, meta, 0.3, impl="triton"), ref, dtype)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("window", [None, 9, 40])
def test_split_context_and_window(num_splits: int, window: int | None) -> None:
    """Flash-decoding partitions (some empty for short sequences) and sliding windows."""
    q, kc, vc, meta = _case([1, BS - 1, 70, 161], 8, 2, 32, torch.float32, seed=1)
    ref = paged_attention(q, kc, vc, meta, 0.2, window=window, impl="reference")
    got = pa.paged_decode(q, kc, vc, meta.block_tables, meta.context_lens, 0.2, meta.max_context_len,
                          window, num_splits)  # fmt: skip
    _check(got, ref, torch.float32)
    _check(paged_attention(q, kc, vc, meta, 0.2, window=window, impl="triton"), ref, torch.float32)


def test_mixed_prefill_and_decode_rows() -> None:
    """Prefill chunks take the reference path, decode rows the kernel, in one call."""
    q, kc, vc, meta = _case([5, 33], 4, 2, 16, torch.float32, prefill=[(3, 10), (6, 6)], seed=2)
    ref = paged_attention(q, kc, vc, meta, 0.25, window=8, impl="reference")
    _check(paged_attention(q, kc, vc, meta, 0.25, window=8, impl="triton"), ref, torch.float32)


def test_model_decode_logits_triton_vs_reference(tmp_path, reference_smlm) -> None:  # noqa: F811
    """Whole model: prefill, then decode steps of three ragged sequences, logits of both paths."""
    path = make_tiny_model(tmp_path, with_tokenizer=False, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel.from_pretrained(path, device=DEVICE)
    bm, gen = BlockManager(32, BS), torch.Generator().manual_seed(3)
    kv = {impl: model.make_kv_cache(32, BS) for impl in ("reference", "triton")}
    tokens = {s: torch.randint(0, 128, (n,), generator=gen).tolist() for s, n in (("a", 5), ("b", 17), ("c", 31))}
    b = BatchBuilder(BS)
    for s, toks in tokens.items():
        bm.allocate(s, toks)
        b.add_prefill(s, toks, 0, bm.block_table(s))
    for step in range(3):
        if step:
            b = BatchBuilder(BS)
            for s, toks in tokens.items():
                toks.append(7 + step)
                bm.append(s, [toks[-1]])
                b.add_decode(s, toks[-1], len(toks) - 1, bm.block_table(s))
        batch, logits = b.build(DEVICE), {}
        with torch.no_grad():
            for impl in ("reference", "triton"):
                model.attn_impl = impl
                logits[impl] = model.forward(batch, kv[impl]).logits
        torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-4, atol=1e-4)
        for s, toks in tokens.items():
            bm.mark_computed(s, len(toks))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="FlashAttention needs CUDA")
@pytest.mark.parametrize("window", [None, 24])
def test_prefill_chunks_through_packed_keys_and_flash(window: int | None) -> None:
    """bf16 on a GPU: prompt chunks (first, middle and late, over scattered pages) gather their keys
    and attend through FlashAttention, decode rows through the kernel; one call against the fp32
    reference. The poisoned slots would show if the gather read past a chunk's context."""
    q, kc, vc, meta = _case([5, 33], 8, 2, 64, torch.bfloat16, prefill=[(3, 10), (16, 16), (40, 300)], seed=4)
    assert meta.prefill_key_slots is not None
    ref = paged_attention(q.float(), kc.float(), vc.float(), meta, 0.125, window=window, impl="reference")
    got = paged_attention(q, kc, vc, meta, 0.125, window=window, impl="auto")
    _check(got, ref.to(torch.bfloat16), torch.bfloat16)


def test_launch_parameters_from_the_environment_and_the_partition_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LOQUETIER_ATTN_TUNING`` names ``AttnTuning`` fields; ``waves`` and ``min_split_tokens`` set how
    many context partitions a call takes, and a call with another rule still matches the reference."""
    monkeypatch.setenv(pa.TUNING_ENV, " block_n=32, warps=4 ")
    assert pa.tuning_from_env() == pa.AttnTuning(block_n=32, warps=4)
    for bad in ("block_n", "blocks=64", "warps=two"):
        monkeypatch.setenv(pa.TUNING_ENV, bad)
        with pytest.raises(ValueError, match=pa.TUNING_ENV):
            pa.tuning_from_env()
    cpu = torch.device("cpu")  # 4 "SMs" for the rule off a GPU
    assert pa.num_splits_for(2, 2, 161, cpu, pa.AttnTuning()) == 1  # no partition shorter than 256 keys
    many = pa.AttnTuning(waves=8, min_split_tokens=16)
    assert pa.num_splits_for(2, 2, 161, cpu, many) == 8  # 8 waves of 4 "SMs" over 4 programs
    assert pa.num_splits_for(2, 2, 40, cpu, many) == 3  # ... but no partition under 16 keys
    q, kc, vc, meta = _case([1, 70, 161], 8, 2, 32, torch.float32, seed=3)
    ref = paged_attention(q, kc, vc, meta, 0.2, impl="reference")
    got = pa.paged_decode(q, kc, vc, meta.block_tables, meta.context_lens, 0.2, meta.max_context_len, tuning=many)
    _check(got, ref, torch.float32)


def _rows_layout(meta: object, tile: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's groups (prompt chunks, then decode rows) laid out one token per row, as captured graph
    steps lay them out: each row with its own context length and a copy of its sequence's block table;
    and its tiles (every chunk cut into tiles of ``tile`` rows, a decode row one tile), shuffled, with
    unused entries among them."""
    tables, ctx, tiles, row = [], [], [], 0
    for q_len, c, table in zip(meta.host_q_lens, meta.host_context_lens, meta.host_block_tables, strict=True):
        for i in range(q_len):
            ctx.append(c - q_len + i + 1)
            tables.append(list(table))
        tiles += [(row + t, min(tile, q_len - t)) for t in range(0, q_len, tile)]
        row += q_len
    width = max(map(len, tables))
    tiles += [(0, 0)] * 3
    random.Random(seed).shuffle(tiles)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return (bt.to(DEVICE), torch.tensor(ctx, dtype=torch.int32, device=DEVICE),
            torch.tensor(tiles, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 4, 32), (8, 2, 32), (12, 3, 16), (16, 1, 16)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("window", [None, 7, 40])
def test_tiles_match_reference(dtype: torch.dtype, shape: tuple[int, int, int], window: int | None) -> None:
    """Prompt chunks (first, middle and deep, shorter and longer than a tile, over scattered pages)
    and decode rows, one token per row, attended in tiles: every row equals the reference's, with
    the causal mask (and the window) taken per row inside a tile; poisoned slots past each row's
    context stay unread."""
    prefill = [(3, 10), (1, 1), (16, 16), (40, 300), (21, 37)]
    q, kc, vc, meta = _case([5, 33, 1], *shape, dtype, prefill=prefill, seed=5)
    ref = paged_attention(q.float(), kc.float(), vc.float(), meta, 0.3, window=window, impl="reference")
    tile = pa.tile_rows(shape[0], shape[1])
    assert tile * triton_next_pow2(shape[0] // shape[1]) == pa.TUNING.tile_m
    bt, ctx, tiles = _rows_layout(meta, tile, seed=6)
    got = pa.paged_tiles(q, kc, vc, bt, ctx, tiles, 0.3, window)
    _check(got, ref.to(dtype), dtype)


def test_tiles_of_any_size_agree_and_write_only_their_rows() -> None:
    """Tiles shorter than ``tile_rows`` (a smaller ``tile_m``) give the same output; rows outside every
    tile are not written (a caller covers the rows it reads), nor rows past the last, which a
    tile may reach (a graph's tile list sized for a larger bucket)."""
    q, kc, vc, meta = _case([9], 8, 2, 32, torch.float32, prefill=[(30, 45)], seed=7)
    ref = paged_attention(q, kc, vc, meta, 0.2, impl="reference")
    small = pa.AttnTuning(tile_m=16)  # 4 rows a tile for a group of 4
    assert pa.tile_rows(8, 2, small) == 4
    bt, ctx, tiles = _rows_layout(meta, 4, seed=8)
    _check(pa.paged_tiles(q, kc, vc, bt, ctx, tiles, 0.2, tuning=small), ref, torch.float32)
    held = tiles[tiles[:, 0] != 0]  # drop the tile of rows 0..3 (and the unused entries)
    past = torch.tensor([[len(ctx) + 5, 4]], dtype=torch.int32, device=DEVICE)  # wholly past the rows
    got = pa.paged_tiles(q, kc, vc, bt, ctx, torch.cat([held, past]).contiguous(), 0.2, tuning=small)
    torch.testing.assert_close(got[4:], ref[4:], rtol=2e-5, atol=2e-5)
    # a tile reaching past the last row (the decode row's): its rows inside are attended, none past
    # them written; a tile never crosses from one sequence's rows into another's (rows 0-29 | 30)
    last = torch.tensor([[0, 4], [4, 4], [8, 4], [12, 4], [16, 4], [20, 4], [24, 4], [28, 2], [30, 4]],
                        dtype=torch.int32, device=DEVICE)
    got = pa.paged_tiles(q[:32], kc, vc, bt[:32], ctx[:32], last, 0.2, tuning=small)
    torch.testing.assert_close(got, ref[:32], rtol=2e-5, atol=2e-5)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
