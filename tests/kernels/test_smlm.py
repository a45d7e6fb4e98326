"""SMLM Triton kernels against the torch reference and against autograd.

On a machine without CUDA the kernels run in the Triton interpreter; the flag must be set before
``loquetier.kernels.smlm`` defines its kernels, hence before the imports below.

Every case poisons what must not be read or written: LoRA rows beyond a slot's rank, slots of rank
0, ``v`` entries no segment owns and the columns of ``y`` outside the LoRA's slice are NaN; rows
with no adapter must keep their exact base values, and gradient rows beyond the rank stay NaN.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from loquetier.kernels import (  # noqa: E402
    ModuleLoRA,
    SMLMMeta,
    force_backend,
    lora_linear,
    reference,
    set_fused_decode,
    smlm,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not smlm.INTERPRET:
    pytest.skip("smlm was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

# Max error allowed, relative to the largest magnitude of the reference tensor. bf16/fp16 round
# `v`/`dv` to the weights' dtype before the rank-sized matmul, as the GPU path does.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
NAN = float("nan")

RANK_MIXES = {
    "equal": [16, 16, 16, 16, 16, 16],
    "mixed": [4, 8, 16, 64, 8, 4],
    "rank1": [1, 1, 1, 1, 1, 1],
    "odd": [3, 5, 7, 13, 0, 9],  # slot 4: the adapter does not target this module
}


def _segments_for(popularity: str, num_tokens: int, num_slots: int, rng: random.Random) -> list[int]:
    """Per-row slots: requests of random length whose adapter is drawn by popularity."""
    if popularity == "distinct":
        return [i % num_slots for i in range(num_tokens)]
    if popularity == "identical":
        return [2 % num_slots] * num_tokens
    if popularity == "huge":
        tail = [1, 1, 2, 3, 3, 3]
        return [0] * (num_tokens - len(tail)) + tail
    weights = [1.0] * num_slots if popularity != "zipf" else [1.0 / (i + 1) ** 1.5 for i in range(num_slots)]
    choices = list(range(num_slots)) + ([-1] if popularity == "no_adapter" else [])
    weights += [2.0] if popularity == "no_adapter" else []
    slots: list[int] = []
    while len(slots) < num_tokens:
        slots += rng.choices(choices, weights)[:1] * rng.randint(1, 12)
    return slots[:num_tokens]


@dataclass
class Case:
    lora: ModuleLoRA
    meta: SMLMMeta
    x: torch.Tensor  # [T, in]
    ranks: list[int]


def _make_case(dtype: torch.dtype, ranks: list[int], slots: list[int], num_train: int, *,
               in_features: int = 100, out_features: int = 72, num_train_slots: int = 3,
               seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    num_slots, max_rank = len(ranks), max(*ranks, 1)
    lora = ModuleLoRA.empty(num_slots, max_rank, in_features, out_features,
                            num_train_slots=num_train_slots, dtype=dtype, device=DEVICE)
    a = torch.randn(num_slots, max_rank, in_features, generator=gen) / in_features**0.5
    b = torch.randn(num_slots, max_rank, out_features, generator=gen) / max_rank**0.5
    for s, r in enumerate(ranks):  # poison everything a kernel must not read
        a[s, r:] = NAN
        b[s, r:] = NAN
    lora.a.copy_(a)
    lora.b.copy_(b)
    lora.ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
    lora.scales.copy_(torch.rand(num_slots, generator=gen) * 2 + 0.25)
    lora.host_ranks = list(ranks)
    assert lora.grad_a is not None and lora.grad_b is not None
    lora.grad_a.copy_(torch.randn(lora.grad_a.shape, generator=gen))  # accumulation, not overwrite
    lora.grad_b.copy_(torch.randn(lora.grad_b.shape, generator=gen))
    for s, r in enumerate(ranks[:num_train_slots]):
        lora.grad_a[s, r:] = NAN
        lora.grad_b[s, r:] = NAN
    x = torch.randn(len(slots), in_features, generator=gen).to(dtype).to(DEVICE)
    meta = SMLMMeta.build(slots, num_train, device=DEVICE)
    return Case(lora, meta, x, ranks)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    out, ref = out.float().cpu(), ref.float().cpu()
    assert out.shape == ref.shape, what
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN pattern differs"
    finite = ~ref.isnan()
    if not finite.any():
        return
    scale = ref[finite].abs().max().clamp_min(1e-6)
    err = (out[finite] - ref[finite]).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.2e} x {scale:.2e} > {TOL[dtype]:.0e}"


def _owned(case: Case) -> torch.Tensor:
    """[T, max_rank] bool: the entries of v that some segment owns."""
    mask = torch.zeros(case.x.shape[0], case.lora.max_rank, dtype=torch.bool)
    for start, n, slot in case.meta.host_segments:
        mask[start : start + n, : case.ranks[slot]] = True
    return mask


def _autograd_oracle(case: Case, g: torch.Tensor, out_offset: int, out_total: int):
    """dx, grad_a, grad_b of the LoRA term over the training rows, by autograd in fp32."""
    lora, meta = case.lora, case.meta
    n_train = meta.num_train_tokens
    x = case.x[:n_train].float().cpu().requires_grad_()
    a = torch.nan_to_num(lora.a.float().cpu()).requires_grad_()
    b = torch.nan_to_num(lora.b.float().cpu()).requires_grad_()
    y = torch.zeros(n_train, out_total)
    rows = []
    for start, n, slot in meta.host_segments[: meta.num_train_segments]:
        r = case.ranks[slot]
        scale = float(lora.scales[slot])
        rows.append((start, n, scale * (x[start : start + n] @ a[slot, :r].T) @ b[slot, :r]))
    for start, n, delta in rows:
        y = y.index_add(0, torch.arange(start, start + n),
                        torch.nn.functional.pad(delta, (out_offset, out_total - out_offset - delta.shape[1])))
    y.backward(g.float().cpu())
    return x.grad, a.grad, b.grad


def _run_case(case: Case, dtype: torch.dtype, *, out_offset: int = 5, extra_cols: int = 11,
              transposed_y: bool = False) -> None:
    lora, meta, x = case.lora, case.meta, case.x
    num_tokens, out = x.shape[0], lora.out_features
    out_total = out_offset + out + extra_cols
    owned = _owned(case)

    # shrink: v matches the reference exactly where owned and is exactly 0 elsewhere
    v = smlm.shrink(x, lora, meta)
    v_ref = reference.shrink_ref(x, lora, meta)
    _assert_close(v, v_ref, dtype, "shrink")
    assert torch.all(v.cpu()[~owned] == 0), "shrink wrote outside the owned entries"

    # expand into a poisoned fused output; v is poisoned where nobody owns it
    v_in = v_ref.clone()
    v_in[~owned.to(v_in.device)] = NAN
    base = torch.randn(num_tokens, out_total).to(dtype).to(DEVICE)
    base[:, :out_offset] = NAN
    base[:, out_offset + out :] = NAN
    if transposed_y:  # a column-major buffer: the kernel must honour both strides
        y = base.t().contiguous().t()
    else:
        y = base.clone()
    y_ref = base.clone()
    smlm.expand(y, v_in, lora, meta, out_offset)
    reference.expand_ref(y_ref, v_ref, lora, meta, out_offset)
    _assert_close(y, y_ref, dtype, "expand")
    untouched = torch.ones(num_tokens, dtype=torch.bool)
    for start, n, slot in meta.host_segments:
        if case.ranks[slot]:
            untouched[start : start + n] = False
    assert torch.equal(y.cpu()[untouched].nan_to_num(7.0), base.cpu()[untouched].nan_to_num(7.0)), \
        "rows without an adapter changed"

    # backward over the training rows, accumulating into a base dx and into the gradients
    n_train = meta.num_train_tokens
    g = torch.randn(n_train, out_total).to(dtype).to(DEVICE)
    dx_base = torch.randn(n_train, lora.in_features).to(dtype).to(DEVICE)
    assert lora.grad_a is not None and lora.grad_b is not None
    grad_a0, grad_b0 = lora.grad_a.clone(), lora.grad_b.clone()
    dx = smlm.backward(g, x[:n_train], v_in[:n_train], lora, meta, out_offset, dx_base.clone())
    grad_a, grad_b = lora.grad_a.clone(), lora.grad_b.clone()
    lora.grad_a.copy_(grad_a0)
    lora.grad_b.copy_(grad_b0)
    dx_ref = reference.backward_ref(g, x[:n_train], v_ref[:n_train], lora, meta, out_offset, dx_base.clone())
    _assert_close(dx, dx_ref, dtype, "backward dx (accumulated)")
    _assert_close(grad_a, lora.grad_a, dtype, "grad_a vs reference")
    _assert_close(grad_b, lora.grad_b, dtype, "grad_b vs reference")

    # ... and against autograd (fp32), with the fresh-buffer form of dx
    if not meta.num_train_segments:
        assert torch.equal(dx.cpu(), dx_base.cpu()), "dx changed without training segments"
        return
    dx_fresh = smlm.backward(g, x[:n_train], v_in[:n_train], lora, meta, out_offset)
    ad_dx, ad_a, ad_b = _autograd_oracle(case, g, out_offset, out_total)
    _assert_close(dx_fresh, ad_dx, dtype, "dx vs autograd")
    nt = lora.num_train_slots
    ad_a = ad_a[:nt].masked_fill(grad_a0.isnan().cpu(), NAN)
    ad_b = ad_b[:nt].masked_fill(grad_b0.isnan().cpu(), NAN)
    _assert_close(grad_a - grad_a0, ad_a, dtype, "grad_a vs autograd")
    _assert_close(grad_b - grad_b0, ad_b, dtype, "grad_b vs autograd")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POPULARITIES = ["distinct", "uniform", "zipf", "identical", "huge", "no_adapter"]


def _train_slots(slots: list[int], num_train: int, num_train_slots: int) -> list[int]:
    return [s % num_train_slots if i < num_train and s >= 0 else s for i, s in enumerate(slots)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_popularity(dtype: torch.dtype, popularity: str) -> None:
    rng = random.Random(f"{dtype}{popularity}")
    mix = list(RANK_MIXES)[(DTYPES.index(dtype) + POPULARITIES.index(popularity)) % len(RANK_MIXES)]
    num_tokens, num_train = (30, 12) if popularity == "distinct" else (96, 40)  # interpreter: per block
    slots = _train_slots(_segments_for(popularity, num_tokens, 6, rng), num_train, 3)
    case = _make_case(dtype, RANK_MIXES[mix], slots, num_train, seed=rng.randint(0, 999))
    _run_case(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", list(RANK_MIXES))
def test_rank_mix(dtype: torch.dtype, mix: str) -> None:
    rng = random.Random(f"{dtype}{mix}")
    num_tokens, num_train = 80, 30
    slots = _train_slots(_segments_for("zipf", num_tokens, 6, rng), num_train, 3)
    case = _make_case(dtype, RANK_MIXES[mix], slots, num_train, in_features=67, out_features=130,
                      seed=rng.randint(0, 999))
    _run_case(case, dtype, out_offset=0, extra_cols=0)


@pytest.mark.parametrize(
    ("slots", "num_train"),
    [([0], 1), ([3], 0), ([-1], 0), ([-1, -1, -1], 1), ([1, 1, 2, 2, -1, 0], 0)],
    ids=["one-train-token", "one-token", "one-base-token", "no-segments", "empty-train-slice"],
)
def test_edges(slots: list[int], num_train: int) -> None:
    case = _make_case(torch.float32, RANK_MIXES["mixed"], slots, num_train, in_features=33, out_features=19)
    _run_case(case, torch.float32)


def test_long_segments_split_k_and_strided_output() -> None:
    """Segments longer than a row block, a slot reused by two training segments (atomics), a wide K
    that splits across programs, and a column-major output buffer."""
    slots = [0] * 150 + [1] * 3 + [0] * 20 + [2] * 70 + [-1] * 4 + [4] * 2
    case = _make_case(torch.bfloat16, RANK_MIXES["mixed"], slots, 173, in_features=600, out_features=45)
    _run_case(case, torch.bfloat16, transposed_y=True)


def test_lora_linear_triton_matches_reference() -> None:
    """The op layer end to end: fused q/k/v (three LoRA parts at offsets), train + rest rows."""
    dtype, in_features, outs = torch.bfloat16, 96, [64, 32, 32]
    num_train, num_rest = 24, 40
    rng = random.Random(7)
    slots = _train_slots(_segments_for("uniform", num_train + num_rest, 6, rng), num_train, 3)
    parts = [_make_case(dtype, RANK_MIXES["mixed"], slots, num_train, in_features=in_features,
                        out_features=o, seed=i) for i, o in enumerate(outs)]
    for case in parts:  # lora_linear reads the whole pool, so clear the poison
        case.lora.a.nan_to_num_(0.0)
        case.lora.b.nan_to_num_(0.0)
        assert case.lora.grad_a is not None and case.lora.grad_b is not None
        case.lora.grad_a.zero_()
        case.lora.grad_b.zero_()
    meta = parts[0].meta
    offsets = [0, outs[0], outs[0] + outs[1]]
    loras = [(case.lora, off) for case, off in zip(parts, offsets, strict=True)]
    weight = (torch.randn(sum(outs), in_features) / in_features**0.5).to(dtype).to(DEVICE)
    bias = torch.randn(sum(outs)).to(dtype).to(DEVICE)
    x = parts[0].x
    g = torch.randn(num_train, sum(outs)).to(dtype).to(DEVICE)

    results = {}
    for backend in ("triton", "reference"):
        force_backend(backend)
        try:
            x_train = x[:num_train].clone().requires_grad_()
            y_train, y_rest = lora_linear(x_train, x[num_train:], weight, bias, loras, meta)
            y_train.backward(g)
            grads = []
            for c in parts:
                assert c.lora.grad_a is not None and c.lora.grad_b is not None
                grads.append((c.lora.grad_a.clone(), c.lora.grad_b.clone()))
                c.lora.grad_a.zero_()
                c.lora.grad_b.zero_()
            results[backend] = (y_train.detach(), y_rest, x_train.grad, grads)
        finally:
            force_backend(None)
    (yt, yr, dx, grads), (yt_ref, yr_ref, dx_ref, grads_ref) = results["triton"], results["reference"]
    _assert_close(yt, yt_ref, dtype, "y_train")
    _assert_close(yr, yr_ref, dtype, "y_rest")
    assert dx is not None and dx_ref is not None
    _assert_close(dx, dx_ref, dtype, "x_train.grad")
    for (ga, gb), (ga_ref, gb_ref) in zip(grads, grads_ref, strict=True):
        _assert_close(ga, ga_ref, dtype, "grad_a")
        _assert_close(gb, gb_ref, dtype, "grad_b")


def test_non_training_slot_in_training_rows_is_rejected() -> None:
    case = _make_case(torch.float32, RANK_MIXES["equal"], [4, 4, 0], 2, in_features=20, out_features=20)
    g = torch.randn(2, 20, device=DEVICE)
    v = torch.zeros(2, case.lora.max_rank, device=DEVICE)
    with pytest.raises(ValueError, match="not a training slot"):
        smlm.backward(g, case.x[:2], v, case.lora, case.meta)


PART_RANKS = ([4, 8, 16, 16, 0, 9], [16, 3, 0, 5, 8, 2], [1, 16, 7, 0, 16, 4])  # one capacity (16), ragged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("popularity", ["zipf", "no_adapter", "huge"])
@pytest.mark.parametrize("num_parts", [2, 3])
def test_parts_in_one_launch_match_one_launch_per_part(dtype: torch.dtype, popularity: str, num_parts: int) -> None:
    """A fused module (q|k|v, gate|up) in one shrink and one expand launch: the same v columns and the
    same output slices as the per-part kernels' reference, with ragged ranks per part (a slot may not
    target a part), parts of different widths, and the output columns no part owns left untouched."""
    rng = random.Random(7)
    slots = _segments_for(popularity, 150, 6, rng)
    widths = (72, 24, 40)[:num_parts]
    cases = [_make_case(dtype, list(PART_RANKS[p]), slots, 0, out_features=widths[p], seed=p + 11)
             for p in range(num_parts)]
    loras, meta, x = [c.lora for c in cases], cases[0].meta, cases[0].x
    assert smlm.parts_fit(loras)
    v = smlm.shrink_parts(x, loras, meta)
    v_ref = torch.cat([reference.shrink_ref(x, lo, meta) for lo in loras], dim=1)
    _assert_close(v, v_ref, dtype, "shrink_parts")
    offsets, col = [], 0
    for w in widths:
        offsets.append(col)
        col += w + 3  # a gap between parts: columns no part owns
    gen = torch.Generator().manual_seed(5)
    y0 = torch.randn(x.shape[0], col + 5, generator=gen).to(dtype)
    owned = torch.zeros(col + 5, dtype=torch.bool)
    for off, w in zip(offsets, widths, strict=True):
        owned[off : off + w] = True
    y0[:, ~owned] = NAN  # untouched columns stay NaN
    y = y0.clone().to(DEVICE)
    smlm.expand_parts(y, v_ref.to(DEVICE), list(zip(loras, offsets, strict=True)), meta)
    y_ref = y0.clone().to(DEVICE)
    r = loras[0].max_rank
    for p, (lo, off) in enumerate(zip(loras, offsets, strict=True)):
        reference.expand_ref(y_ref, v_ref[:, p * r : (p + 1) * r].to(DEVICE), lo, meta, off)
    _assert_close(y, y_ref, dtype, "expand_parts")


def test_parts_that_do_not_fit_one_launch_are_refused() -> None:
    a = _make_case(torch.float32, [4, 8, 2], [0, 1], 0, in_features=32).lora
    b = _make_case(torch.float32, [4, 16, 2], [0, 1], 0, in_features=32).lora  # another rank capacity
    c = _make_case(torch.float32, [4, 8, 2], [0, 1], 0, in_features=48).lora  # another input width
    assert smlm.parts_fit([a, a]) and not smlm.parts_fit([a, b]) and not smlm.parts_fit([a, c])
    assert not smlm.parts_fit([a]) and not smlm.parts_fit([a] * 4)


@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 17, 64, 65])
def test_every_meta_section_starts_on_a_16_byte_boundary(num_rows: int) -> None:
    # Triton specializes pointers on 16-byte alignment: a block table at an odd offset of the packed
    # buffer would compile kernel variants of its own in the middle of serving.
    rng = random.Random(num_rows)
    for num_train in {0, num_rows // 2}:
        slots = [rng.choice([-1, 0, 1, 2]) for _ in range(num_rows)]
        slots[:num_train] = [0] * num_train
        meta = SMLMMeta.build(slots, num_train, DEVICE)
        for t in (meta.token_slots, meta.seg_starts, meta.seg_lens, meta.seg_slots, meta.blocks, meta.grad_blocks):
            assert t.data_ptr() % 16 == 0
        segments = meta.host_segments
        assert meta.token_slots.tolist() == slots
        assert meta.seg_starts.tolist() == [s for s, _, _ in segments]
        assert meta.seg_lens.tolist() == [n for _, n, _ in segments]
        assert meta.seg_slots.tolist() == [s for _, _, s in segments]
        assert [tuple(b) for b in meta.blocks.tolist()] == smlm_blocks(segments, 64)
        assert [tuple(b) for b in meta.grad_blocks.tolist()] == smlm_blocks(segments[: meta.num_train_segments], 256)


def smlm_blocks(segments: tuple[tuple[int, int, int], ...], rows: int) -> list[tuple[int, int, int]]:
    return [(r, min(r + rows, s + n), slot) for s, n, slot in segments for r in range(s, s + n, rows)]


def test_warm_lora_launches_build_every_forward_variant(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from tiny import make_tiny_model

    from loquetier.lora.pool import LoRASlotPool
    from loquetier.models import LlamaModel

    # wide enough that one block splits K (a 64-wide input never does); an MLP as wide as the model
    # keeps the interpreter's gate|up and down launches small
    path = make_tiny_model(tmp_path / "tiny", with_tokenizer=False, num_layers=1, hidden_size=512,
                           intermediate_size=512)
    model = LlamaModel.from_pretrained(path, device=DEVICE, attn_impl="reference")
    pool = LoRASlotPool(model.dims, num_slots=2, max_rank=8, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    weights = {}
    for name in targets:
        out_f, in_f = pool.get(0, name).out_features, pool.get(0, name).in_features
        weights[(0, name)] = (torch.randn(8, in_f, generator=gen), torch.randn(out_f, 8, generator=gen))
    pool.write_slot(1, weights, scale=2.0)
    model.attach_lora_pool(pool)
    seen: set[tuple[str, int, bool | None]] = set()
    launch = smlm.launch

    def recording(kernel, grid, *args, **meta):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.add((kernel.fn.__name__, meta["BLOCK_M"], meta.get("ATOMIC")))
        return launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(smlm, "launch", recording)
    # a low block limit for the one launch keeps the interpreter's layouts small (1, 3, 17 blocks): 3 blocks split K
    monkeypatch.setattr(smlm, "TUNING", smlm.Tuning(fused_max_blocks=2))
    force_backend("triton")
    try:
        num_linears = 4 * len(smlm.variant_metas(1, DEVICE))
        set_fused_decode(False)  # the two launches everywhere: every variant of theirs
        assert model.warm_lora_launches(1) == num_linears
        set_fused_decode(True)  # one layout (one short block) now takes the one launch
        fused_off = set(seen)
        seen.clear()
        assert model.warm_lora_launches(1) == num_linears
    finally:
        force_backend(None)
        set_fused_decode(None)
    every = {(bm, atomic) for bm in (16, 32, 64) for atomic in (True, False)}
    for name in ("shrink_kernel", "shrink_parts_kernel"):
        assert {(bm, a) for n, bm, a in fused_off if n == name} == every, name
    for name in ("expand_kernel", "expand_parts_kernel"):
        assert {bm for n, bm, _ in fused_off if n == name} == {16, 32, 64}, name
    assert not any(n == "shrink_expand_kernel" for n, _, _ in fused_off)
    # with it on: the one launch for one short block, the two launches past its block limit
    assert {bm for n, bm, _ in seen if n == "shrink_expand_kernel"} == {16}
    for name in ("shrink_kernel", "shrink_parts_kernel"):
        assert {(bm, a) for n, bm, a in seen if n == name} == every, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ordered_split_sums_match_the_atomic_path(dtype: torch.dtype) -> None:
    """``set_deterministic(True)``: a decode shrink whose K is split stores each split's partial sums
    apart and sums them in a fixed order. Same values as the reference and as the atomic path (to
    rounding), the same NaN-free pattern, and the same bits on every call; one module and parts."""
    slots = [i % 6 for i in range(6)] + [-1, 3]  # decode: one row per segment, a row with no adapter
    cases = [_make_case(dtype, list(PART_RANKS[p]), slots, 0, in_features=600, out_features=24, seed=p + 3)
             for p in range(3)]
    loras, meta, x = [c.lora for c in cases], cases[0].meta, cases[0].x
    split_k = smlm._shrink_sizes(meta.max_seg_len, loras[0].max_rank, 600, meta.num_blocks, x.device)[3]
    assert split_k > 1  # the case exercises the split
    try:
        smlm.set_deterministic(False)
        atomic = smlm.shrink(x, loras[0], meta)
        atomic_parts = smlm.shrink_parts(x, loras, meta)
        smlm.set_deterministic(True)
        assert smlm.deterministic_enabled()
        ordered = [smlm.shrink(x, loras[0], meta) for _ in range(2)]
        ordered_parts = [smlm.shrink_parts(x, loras, meta) for _ in range(2)]
    finally:
        smlm.set_deterministic(None)
    assert torch.equal(ordered[0], ordered[1]) and torch.equal(ordered_parts[0], ordered_parts[1])
    _assert_close(ordered[0], reference.shrink_ref(x, loras[0], meta), dtype, "ordered shrink")
    _assert_close(ordered[0], atomic, dtype, "ordered vs atomic shrink")
    v_ref = torch.cat([reference.shrink_ref(x, lo, meta) for lo in loras], dim=1)
    _assert_close(ordered_parts[0], v_ref, dtype, "ordered shrink_parts")
    _assert_close(ordered_parts[0], atomic_parts, dtype, "ordered vs atomic shrink_parts")


@pytest.mark.parametrize(("value", "on"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_deterministic_switch_reads_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setenv(smlm.DETERMINISTIC_ENV, value)
    try:
        smlm.set_deterministic(None)
        assert smlm.deterministic_enabled() is on
    finally:
        monkeypatch.delenv(smlm.DETERMINISTIC_ENV)
        smlm.set_deterministic(None)
    assert not smlm.deterministic_enabled()
