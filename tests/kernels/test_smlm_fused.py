"""``smlm.shrink_expand`` (shrink and expand of a module, or of every part of a fused one, in one
launch) against the torch reference loop and against the two-launch Triton path, and the op layer's
switch between them.

Poisoned like ``test_smlm.py``: LoRA rows past a slot's rank are NaN, the columns of ``y`` no part owns
are NaN, and rows with no adapter (or whose adapter has rank 0 here) must keep their exact base values.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from loquetier.kernels import (  # noqa: E402
    ModuleLoRA,
    SMLMMeta,
    force_backend,
    fused_decode_enabled,
    lora_linear,
    ops,
    reference,
    set_fused_decode,
    smlm,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not smlm.INTERPRET:
    pytest.skip("smlm was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # max error relative to max |reference|
NAN = float("nan")
# per part, the rank of each of 7 slots (one capacity, 64): mixed 8/16/64, ragged across parts, and
# slots that a part does not target (rank 0)
PART_RANKS = ([8, 16, 64, 16, 0, 8, 64], [64, 8, 0, 16, 16, 64, 8], [16, 0, 8, 64, 8, 16, 16])
WIDTHS = (72, 24, 40)  # parts of different widths
IN_FEATURES = 100  # not a multiple of BLOCK_K


def _slots(layout: str, num_rows: int, rng: random.Random) -> list[int]:
    """Per-row slots of a decode-sized step (every segment 16 rows at most, except "long")."""
    if layout == "round_robin":  # one row per adapter, as the decode benchmark lays them out
        return [i % 7 for i in range(num_rows)]
    if layout == "identical":
        return [2] * min(num_rows, 16)
    if layout == "long":  # blocks longer than BLOCK_M: the kernel loops over 16-row tiles
        return [3] * 40 + [1] * 5 + [-1] * 3 + [5] * 20
    slots: list[int] = []
    choices = [*range(7), -1] if layout == "uneven_no_adapter" else list(range(7))
    while len(slots) < num_rows:  # runs of 1..16 rows, never two runs of one slot in a row
        slot = rng.choice([c for c in choices if not slots or c != slots[-1]])
        slots += [slot] * rng.randint(1, 16)
    if layout == "uneven_no_adapter":
        slots[5:8] = [-1] * 3
    return slots[:num_rows]


def _lora(dtype: torch.dtype, ranks: list[int], out_features: int, gen: torch.Generator,
          in_features: int = IN_FEATURES, num_train_slots: int = 0) -> ModuleLoRA:
    num_slots, max_rank = len(ranks), 64
    lora = ModuleLoRA.empty(num_slots, max_rank, in_features, out_features, num_train_slots=num_train_slots,
                            dtype=dtype, device=DEVICE)
    a = torch.randn(num_slots, max_rank, in_features, generator=gen) / in_features**0.5
    b = torch.randn(num_slots, max_rank, out_features, generator=gen) / 4
    for s, r in enumerate(ranks):  # poison everything a kernel must not read
        a[s, r:] = NAN
        b[s, r:] = NAN
    lora.a.copy_(a)
    lora.b.copy_(b)
    lora.ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
    lora.scales.copy_(torch.rand(num_slots, generator=gen) * 2 + 0.25)
    lora.host_ranks = list(ranks)
    return lora


def _parts(dtype: torch.dtype, num_parts: int, seed: int,
           in_features: int = IN_FEATURES, num_train_slots: int = 0) -> tuple[list[tuple[ModuleLoRA, int]], int]:
    """The parts at their offsets (a 3-column gap after each: columns no part owns), and y's width."""
    gen = torch.Generator().manual_seed(seed)
    parts, col = [], 2
    for p in range(num_parts):
        parts.append((_lora(dtype, list(PART_RANKS[p]), WIDTHS[p], gen, in_features, num_train_slots), col))
        col += WIDTHS[p] + 3
    return parts, col


def _base(num_rows: int, width: int, parts: list[tuple[ModuleLoRA, int]], dtype: torch.dtype,
          seed: int) -> torch.Tensor:
    y = torch.randn(num_rows, width, generator=torch.Generator().manual_seed(seed)).to(dtype)
    owned = torch.zeros(width, dtype=torch.bool)
    for lora, off in parts:
        owned[off : off + lora.out_features] = True
    y[:, ~owned] = NAN
    return y.to(DEVICE)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    out, ref = out.float().cpu(), ref.float().cpu()
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN pattern differs"
    finite = ~ref.isnan()
    scale = ref[finite].abs().max().clamp_min(1e-6)
    err = (out[finite] - ref[finite]).abs().max() / scale
    assert err <= tol, f"{what}: max error {err:.2e} x {scale:.2e} > {tol:.0e}"


def _two_launches(y: torch.Tensor, x: torch.Tensor, parts: list[tuple[ModuleLoRA, int]], meta: SMLMMeta) -> None:
    loras = [lo for lo, _ in parts]
    if len(parts) == 1:
        smlm.expand(y, smlm.shrink(x, loras[0], meta), loras[0], meta, parts[0][1])
    else:
        smlm.expand_parts(y, smlm.shrink_parts(x, loras, meta), parts, meta)


# the default launch sizes, and small column chunks and tiles, so a block's columns are split over
# several programs and each program walks several tiles
TUNINGS = {"default": smlm.Tuning(), "chunked": smlm.Tuning(fused_min_cols=0, fused_block_n=16,
                                                          fused_programs_per_sm=16, fused_block_k=32)}


@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_parts", [1, 2, 3])
@pytest.mark.parametrize("layout", ["round_robin", "uneven_no_adapter", "identical", "long"])
def test_shrink_expand_matches_reference_and_two_launches(
        monkeypatch: pytest.MonkeyPatch, tuning: str, dtype: torch.dtype, num_parts: int, layout: str) -> None:
    if layout == "long" and (tuning != "default" or num_parts == 2):
        pytest.skip("one long-block case per part count is enough for the interpreter")
    monkeypatch.setattr(smlm, "TUNING", TUNINGS[tuning])
    rng = random.Random(f"{layout}{num_parts}{dtype}")
    slots = _slots(layout, 24, rng)
    meta = SMLMMeta.build(slots, 0, DEVICE)
    parts, width = _parts(dtype, num_parts, seed=rng.randint(0, 999))
    loras = [lo for lo, _ in parts]
    assert smlm.fused_fit(loras)
    assert smlm.fused_applies(loras, meta) == (layout != "long")
    x = torch.randn(len(slots), IN_FEATURES, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    y0 = _base(len(slots), width, parts, dtype, seed=4)

    y = y0.clone()
    smlm.shrink_expand(y, x, parts, meta)
    y_ref = y0.clone()
    reference.shrink_expand_ref(y_ref, x, parts, meta)
    _assert_close(y, y_ref, TOL[dtype], "shrink_expand vs reference")
    y_two = y0.clone()
    _two_launches(y_two, x, parts, meta)
    # the same sums as the two launches (v rounded to the weights' dtype in both): fp32 agrees to
    # rounding, bf16 to a rounding of y
    _assert_close(y, y_two, 2e-6 if dtype == torch.float32 else 1e-2, "shrink_expand vs two launches")

    untouched = torch.ones(len(slots), dtype=torch.bool)
    for start, n, slot in meta.host_segments:
        if any(lo.host_ranks[slot] for lo in loras):  # type: ignore[index]
            untouched[start : start + n] = False
    assert untouched.any() or layout != "uneven_no_adapter"
    assert torch.equal(y.cpu()[untouched].nan_to_num(7.0), y0.cpu()[untouched].nan_to_num(7.0)), \
        "rows without an adapter changed"


def test_shrink_expand_column_major_output() -> None:
    slots = [0, 0, 1, -1, 2, 3, 3, 3]
    meta = SMLMMeta.build(slots, 0, DEVICE)
    parts, width = _parts(torch.float32, 2, seed=9)
    x = torch.randn(len(slots), IN_FEATURES, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y0 = _base(len(slots), width, parts, torch.float32, seed=2)
    y = y0.t().contiguous().t()  # the kernel must honour both strides
    smlm.shrink_expand(y, x, parts, meta)
    y_ref = y0.clone()
    reference.shrink_expand_ref(y_ref, x, parts, meta)
    _assert_close(y, y_ref, TOL[torch.float32], "column-major y")


def test_no_segments_is_a_no_op() -> None:
    meta = SMLMMeta.build([-1, -1, -1], 0, DEVICE)
    parts, width = _parts(torch.float32, 3, seed=5)
    x = torch.randn(3, IN_FEATURES, device=DEVICE)
    y0 = _base(3, width, parts, torch.float32, seed=6)
    y = y0.clone()
    smlm.shrink_expand(y, x, parts, meta)
    assert torch.equal(y.nan_to_num(7.0), y0.nan_to_num(7.0))


def test_fused_applies_from_host_sizes_only() -> None:
    gen = torch.Generator().manual_seed(0)
    lora = _lora(torch.float32, [8, 16, 64, 16, 0, 8, 64], 32, gen)
    decode = SMLMMeta.build([0, 1, 2, 3, 0, 1], 0, DEVICE)
    assert smlm.fused_applies([lora], decode)
    assert not smlm.fused_applies([lora], SMLMMeta.build([0] * 17, 0, DEVICE))  # a segment of 17 rows
    assert not smlm.fused_applies([lora], SMLMMeta.build([-1, -1], 0, DEVICE))  # nothing to do
    many = [i % 7 for i in range(smlm.TUNING.fused_max_blocks + 1)]
    assert not smlm.fused_applies([lora], SMLMMeta.build(many, 0, DEVICE))  # too many blocks
    wide = ModuleLoRA.empty(2, 128, IN_FEATURES, 32, device=DEVICE)  # rank capacity above 64
    assert not smlm.fused_fit([wide]) and not smlm.fused_applies([wide], decode)
    other = ModuleLoRA.empty(7, 32, IN_FEATURES, 32, device=DEVICE)  # parts of two rank capacities
    assert smlm.fused_fit([lora, lora, lora]) and not smlm.fused_fit([lora, other])
    assert not smlm.fused_fit([lora] * 4)


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    names: list[str] = []
    launch = smlm.launch

    def recording(kernel, grid, *args, **meta):  # noqa: ANN001, ANN002, ANN003, ANN202
        names.append(kernel.fn.__name__)
        return launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(smlm, "launch", recording)
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_linear_switch(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The op layer with the switch on and off: one launch for all three parts of q|k|v (on), two
    (off), the same outputs; rows kept for backward always take the two launches (v is saved)."""
    names = _count_launches(monkeypatch)
    parts, width = _parts(dtype, 3, seed=21)
    slots = [0, 1, 2, 3, 4, 5, 6, -1, 0, 1]
    gen = torch.Generator().manual_seed(22)
    weight = (torch.randn(width, IN_FEATURES, generator=gen) / 10).to(dtype).to(DEVICE)
    bias = torch.randn(width, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(len(slots), IN_FEATURES, generator=gen).to(dtype).to(DEVICE)
    for lora, _ in parts:  # lora_linear reads whole slot pools: no NaN poison here
        lora.a.nan_to_num_(0.0)
        lora.b.nan_to_num_(0.0)
    meta = SMLMMeta.build(slots, 0, DEVICE)
    outs = {}
    force_backend("triton")
    try:
        for on in (True, False):
            set_fused_decode(on)
            names.clear()
            outs[on] = lora_linear(x[:0], x, weight, bias, parts, meta)[1]
            assert names == (["shrink_expand_kernel"] if on else ["shrink_parts_kernel", "expand_parts_kernel"])
        set_fused_decode(True)
        names.clear()  # training rows: v is kept for backward, so the two launches
        train_meta = SMLMMeta.build([0, 1, *slots[2:]], 2, DEVICE)
        lora_linear(x[:2].clone().requires_grad_(), x[2:], weight, bias, parts, train_meta)
        assert names == ["shrink_parts_kernel", "expand_parts_kernel"]
    finally:
        force_backend(None)
        set_fused_decode(None)
    force_backend("reference")
    try:
        y_ref = lora_linear(x[:0], x, weight, bias, parts, meta)[1]
    finally:
        force_backend(None)
    _assert_close(outs[True], y_ref, TOL[dtype], "fused vs reference backend")
    _assert_close(outs[True], outs[False], 2e-6 if dtype == torch.float32 else 1e-2, "fused vs two launches")


@pytest.mark.parametrize(("value", "on"), [("0", False), ("1", True), ("off", False), ("on", True), ("", False)])
def test_switch_reads_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setenv(ops.FUSED_DECODE_ENV, value)
    try:
        set_fused_decode(None)
        assert fused_decode_enabled() is on
        set_fused_decode(not on)
        assert fused_decode_enabled() is not on
    finally:
        monkeypatch.delenv(ops.FUSED_DECODE_ENV)
        set_fused_decode(None)
    assert not fused_decode_enabled()  # off unless asked for, until a GPU run says it is faster


def test_tuning_fields_are_host_sizes() -> None:
    # benchmarks/tune_smlm.py replaces these by name
    names = {f.name for f in dataclasses.fields(smlm.Tuning)}
    assert {"fused_max_rows", "fused_max_blocks", "fused_programs_per_sm", "fused_min_cols",
            "fused_block_k", "fused_block_n", "fused_warps", "fused_stages"} <= names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_parts", [1, 2, 3])
@pytest.mark.parametrize(("layout", "in_features"),  # 700: the shrink splits K; 100: it does not
                         [("round_robin", 700), ("uneven_no_adapter", 700), ("long", 700),
                          ("round_robin", IN_FEATURES)])
def test_forward_split_matches_reference_in_two_launches_the_same_bits_each_run(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, num_parts: int, layout: str, in_features: int) -> None:
    """The forward of inference-only steps (``smlm.forward_split``): K splits stored apart in a buffer
    nobody zeroes (poisoned with NaN here: an element read but never written shows), added by expand
    in a fixed order. Matches the reference and the atomic two launches, leaves rows without an
    adapter and columns no part owns alone, takes two launches, and gives the same bits every call."""
    monkeypatch.setattr(smlm, "TUNING", smlm.Tuning(programs_per_sm=64))  # the interpreter's 4 "SMs": split
    rng = random.Random(f"split{layout}{num_parts}{dtype}{in_features}")
    slots = _slots(layout, 24, rng)
    meta = SMLMMeta.build(slots, 0, DEVICE)
    parts, width = _parts(dtype, num_parts, seed=rng.randint(0, 999), in_features=in_features)
    loras = [lo for lo, _ in parts]
    x = torch.randn(len(slots), in_features, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    y0 = _base(len(slots), width, parts, dtype, seed=4)
    split_k = smlm._shrink_sizes(meta.max_seg_len, 64, in_features, meta.num_blocks * num_parts, DEVICE)[3]
    assert (split_k > 1) == (in_features == 700)
    buffers: list[torch.Tensor] = []

    def poisoned(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        buffers.append(torch.full(shape, NAN, dtype=torch.float32, device=device))
        return buffers[-1]

    monkeypatch.setattr(smlm, "_split_buffer", poisoned)
    launched = _count_launches(monkeypatch)
    runs = []
    for _ in range(2):
        y = y0.clone()
        smlm.forward_split(y, x, parts, meta)
        runs.append(y)
    assert len(launched) == 4 and not any("atomic" in n for n in launched)  # two a call
    assert buffers[0].shape[0] == split_k
    assert torch.equal(runs[0].nan_to_num(7.0), runs[1].nan_to_num(7.0)), "two runs differ"
    y_ref = y0.clone()
    reference.shrink_expand_ref(y_ref, x, parts, meta)
    _assert_close(runs[0], y_ref, TOL[dtype], "forward_split vs reference")
    y_two = y0.clone()
    _two_launches(y_two, x, parts, meta)
    _assert_close(runs[0], y_two, 2e-6 if dtype == torch.float32 else 1e-2, "forward_split vs atomic launches")
    untouched = torch.ones(len(slots), dtype=torch.bool)
    for start, n, slot in meta.host_segments:
        if any(lo.host_ranks[slot] for lo in loras):  # type: ignore[index]
            untouched[start : start + n] = False
    assert torch.equal(runs[0].cpu()[untouched].nan_to_num(7.0), y0.cpu()[untouched].nan_to_num(7.0))


@pytest.mark.parametrize(("num_parts", "rank_tile"), [(1, 16), (3, 32)])
def test_shrink_rank_chunks_give_the_sums_of_one_tile(monkeypatch: pytest.MonkeyPatch, num_parts: int,
                                                      rank_tile: int) -> None:
    """``Tuning.shrink_rank_tile``: the pool's rank (64) split into chunks over programs, a chunk past
    an adapter's rank (8, 16, 0) idle. Every path that shrinks (forward_split into a NaN-poisoned
    buffer, shrink / shrink_parts with split-K atomics, backward's dv) gives what one 64-wide tile
    gives, and the chunks are really on the grid."""
    dtype = torch.float32  # exact enough to compare the two tilings tightly
    rng = random.Random(f"chunks{num_parts}{rank_tile}")
    slots = _slots("round_robin", 24, rng)
    meta = SMLMMeta.build(slots, 0, DEVICE)
    parts, width = _parts(dtype, num_parts, seed=rng.randint(0, 999), in_features=700, num_train_slots=7)
    loras = [lo for lo, _ in parts]
    x = torch.randn(len(slots), 700, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    y0 = _base(len(slots), width, parts, dtype, seed=4)
    g = torch.randn(len(slots), width, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    train_meta = SMLMMeta.build(slots, len(slots), DEVICE)
    monkeypatch.setattr(smlm, "_split_buffer",
                        lambda shape, device: torch.full(shape, NAN, dtype=torch.float32, device=device))

    def run(tile: int) -> list[torch.Tensor]:
        monkeypatch.setattr(smlm, "TUNING", smlm.Tuning(programs_per_sm=64, shrink_rank_tile=tile,
                                                                   backward_passes=4))
        y_split, y_two = y0.clone(), y0.clone()
        smlm.forward_split(y_split, x, parts, meta)
        _two_launches(y_two, x, parts, meta)
        v = smlm.shrink(x, loras[0], train_meta)
        dx = smlm.backward(g, x, v, loras[0], train_meta, parts[0][1])
        return [y_split, y_two, v, dx]

    grids: list[tuple[int, ...]] = []
    launch = smlm.launch

    def recording(kernel, grid, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if kernel.fn.__name__.startswith("shrink"):
            grids.append((grid[1], kw["R_CHUNKS"], kw["BLOCK_R"]))
        return launch(kernel, grid, *args, **kw)

    monkeypatch.setattr(smlm, "launch", recording)
    chunked = run(rank_tile)
    assert grids and all(chunks == 64 // rank_tile and block_r == rank_tile and axis % chunks == 0
                         for axis, chunks, block_r in grids), grids
    whole = run(0)
    for what, a, b in zip(("forward_split", "two launches", "shrink", "backward dx"), chunked, whole, strict=True):
        _assert_close(a, b, 1e-5, f"{what}: rank chunks of {rank_tile} vs one tile")
    y_ref = y0.clone()
    reference.shrink_expand_ref(y_ref, x, parts, meta)
    _assert_close(chunked[0], y_ref, TOL[dtype], "forward_split (rank chunks) vs reference")


@pytest.mark.parametrize(("dtype", "num_parts", "run_rows", "block_m"), [
    (torch.float32, 1, (1,), 1),  # one row per adapter: a decode step of distinct adapters
    (torch.bfloat16, 3, (1, 2), 2),
    (torch.float32, 3, (1, 3, 2), 4),  # a segment of 3 rows in a tile of 4
    (torch.bfloat16, 1, (5, 8, 1), 8),
])
def test_gemv_tiles_give_what_the_tensor_core_tiles_give(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                         num_parts: int, run_rows: tuple[int, ...],
                                                         block_m: int) -> None:
    """``Tuning.gemv_max_rows`` and ``shrink_gemv_max_rows``: decode segments of a few rows take
    expand and shrink tiles of their own height and fp32 multiply-adds. The split path (K splits
    stored apart, a NaN-poisoned buffer) and the two launches (split-K atomics) give what the 16-row
    tensor-core tiles give, and the reference's values; rows without an adapter keep their bits."""
    rng = random.Random(f"gemv{num_parts}{run_rows}")
    slots: list[int] = []
    for i in range(9):  # runs of the given lengths over the 7 slots, a row without adapter now and then
        slots += [i % 7] * run_rows[i % len(run_rows)] + ([-1] if i % 5 == 4 else [])
    meta = SMLMMeta.build(slots, 0, DEVICE)
    parts, width = _parts(dtype, num_parts, seed=rng.randint(0, 999), in_features=160)
    x = torch.randn(len(slots), 160, generator=torch.Generator().manual_seed(11)).to(dtype).to(DEVICE)
    y0 = _base(len(slots), width, parts, dtype, seed=12)
    monkeypatch.setattr(smlm, "_split_buffer",
                        lambda shape, device: torch.full(shape, NAN, dtype=torch.float32, device=device))
    tiles: set[int] = set()
    launch = smlm.launch

    def recording(kernel, grid, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        tiles.add(kw["BLOCK_M"])
        return launch(kernel, grid, *args, **kw)

    monkeypatch.setattr(smlm, "launch", recording)

    def run(gemv_max_rows: int) -> list[torch.Tensor]:
        monkeypatch.setattr(smlm, "TUNING", smlm.Tuning(programs_per_sm=16, gemv_max_rows=gemv_max_rows,
                                                        shrink_gemv_max_rows=gemv_max_rows))
        tiles.clear()
        y_split, y_two = y0.clone(), y0.clone()
        smlm.forward_split(y_split, x, parts, meta)
        _two_launches(y_two, x, parts, meta)
        return [y_split, y_two]

    gemv = run(8)
    assert tiles == {block_m}, tiles
    tensor_core = run(0)
    assert tiles == {16}, tiles
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    y_ref = y0.clone()
    reference.shrink_expand_ref(y_ref, x, parts, meta)
    for what, a, b in zip(("forward_split", "two launches"), gemv, tensor_core, strict=True):
        _assert_close(a, b, tol, f"{what}: tiles of {block_m} rows vs 16")
        _assert_close(a, y_ref, TOL[dtype], f"{what}: tiles of {block_m} rows vs reference")
    bare = torch.tensor([s < 0 for s in slots])
    assert torch.equal(gemv[0][bare.to(DEVICE)].cpu().nan_to_num(7.0), y0[bare.to(DEVICE)].cpu().nan_to_num(7.0))


# Training rows of one step: segments longer than 64 and 256 rows (split into several blocks of
# either schedule), a row with no adapter, a slot of rank 0 here, ranks 8/16/64; inference rows after.
BACKWARD_TRAIN = [0] * 70 + [-1] * 3 + [2] * 260 + [4] * 5 + [5] * 9 + [1] * 40
BACKWARD_REST = [3] * 4 + [6] * 2


@pytest.mark.parametrize(("dtype", "overrides", "chunked"), [
    (torch.float32, {"backward_g_min_cols": 1024}, False),  # one g chunk: dv stored, no atomics
    (torch.float32, {"backward_block_rows": 64, "backward_block_n": 16, "backward_programs_per_sm": 64,
                     "backward_g_min_cols": 40, "backward_x_block_m": 16, "backward_x_block_n": 32}, True),
    (torch.bfloat16, {"backward_block_n": 32, "backward_programs_per_sm": 64, "backward_g_min_cols": 32,
                      "backward_x_block_m": 128}, True),
])
def test_backward_passes_give_what_the_four_launches_and_the_reference_give(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, overrides: dict[str, int], chunked: bool) -> None:
    """``Tuning.backward_passes`` 2 (dv and grad_b from one pass over g, dx and grad_a from one pass
    over x) against the four launches and the torch reference: dx accumulated into a base dx and
    into a fresh fp32 one, gradients accumulated onto what they held. Column chunks that end past the
    width and blocks cut from long segments are covered; LoRA rows past a rank are NaN."""
    gen = torch.Generator().manual_seed(len(overrides) * 7 + 1)
    out_features, in_features, offset = 200, 300, 2
    lora = _lora(dtype, list(PART_RANKS[0]), out_features, gen, in_features, num_train_slots=7)
    slots = BACKWARD_TRAIN + BACKWARD_REST
    n_train = len(BACKWARD_TRAIN)
    meta = SMLMMeta.build(slots, n_train, DEVICE)
    x = torch.randn(n_train, in_features, generator=gen).to(dtype).to(DEVICE)
    g = torch.randn(n_train, offset + out_features + 3, generator=gen).to(dtype).to(DEVICE)
    v = reference.shrink_ref(x, lora, SMLMMeta.build(BACKWARD_TRAIN, n_train, DEVICE))
    dx0 = torch.randn(n_train, in_features, generator=gen).to(dtype).to(DEVICE)
    assert lora.grad_a is not None and lora.grad_b is not None
    lora.grad_a.copy_(torch.randn(lora.grad_a.shape, generator=gen))
    lora.grad_b.copy_(torch.randn(lora.grad_b.shape, generator=gen))
    grads0 = (lora.grad_a.clone(), lora.grad_b.clone())

    kernels: dict[str, list[tuple[tuple[int, ...], dict[str, object]]]] = {}
    launch = smlm.launch

    def recording(kernel, grid, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        kernels.setdefault(kernel.fn.__name__, []).append((grid, kw))
        return launch(kernel, grid, *args, **kw)

    monkeypatch.setattr(smlm, "launch", recording)

    def run(passes: int) -> list[torch.Tensor]:
        monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.Tuning(), backward_passes=passes, **overrides))
        lora.grad_a.copy_(grads0[0])
        lora.grad_b.copy_(grads0[1])
        dx_into = smlm.backward(g, x, v, lora, meta, offset, dx0.clone())
        dx_fresh = smlm.backward(g, x, v, lora, meta, offset)  # the gradients accumulate twice
        return [dx_into, dx_fresh, lora.grad_a.clone(), lora.grad_b.clone()]

    two = run(2)
    assert set(kernels) == {"backward_g_kernel", "backward_x_kernel"}, sorted(kernels)
    (g_grid, g_kw), (x_grid, _) = kernels["backward_g_kernel"][0], kernels["backward_x_kernel"][0]
    assert (g_grid[1] > 1) == chunked and g_kw["ATOMIC_DV"] == chunked
    assert x_grid[1] > 1  # the x pass in column chunks, the last one partial (300 columns)
    kernels.clear()
    four = run(4)
    assert "backward_g_kernel" not in kernels and "grad_kernel" in kernels
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    for what, a, b in zip(("dx into a base", "fresh dx", "grad_a", "grad_b"), two, four, strict=True):
        _assert_close(a, b, tol, f"{what}: two passes vs four launches")

    lora.grad_a.copy_(grads0[0])
    lora.grad_b.copy_(grads0[1])
    ref_into = reference.backward_ref(g, x, v, lora, meta, offset, dx0.clone())
    ref_fresh = reference.backward_ref(g, x, v, lora, meta, offset)
    ref = [ref_into, ref_fresh, lora.grad_a.clone(), lora.grad_b.clone()]
    for what, a, b in zip(("dx into a base", "fresh dx", "grad_a", "grad_b"), two, ref, strict=True):
        _assert_close(a, b, TOL[dtype], f"{what}: two passes vs reference")
    assert two[0].dtype == dtype and two[1].dtype == torch.float32
    changed = (two[2] != grads0[0]).any(dim=(1, 2)).cpu().tolist()
    assert changed == [r > 0 and s in BACKWARD_TRAIN for s, r in enumerate(PART_RANKS[0])], changed


def test_inference_forward_takes_the_split_path_and_training_keeps_v() -> None:
    """``lora_linear`` without training rows runs ``forward_split`` at decode sizes; with training rows
    it keeps ``v`` (shrink + expand) and its inference rows get the same values; a prefill-sized
    segment takes shrink + expand too."""
    dtype, in_features = torch.float32, 700
    slots = [i % 7 for i in range(10)]
    parts, width = _parts(dtype, 3, seed=9, in_features=in_features, num_train_slots=3)
    for lora, _ in parts:  # lora_linear reads the whole pool
        lora.a.nan_to_num_(0.0)
        lora.b.nan_to_num_(0.0)
    weight = torch.randn(width, in_features, generator=torch.Generator().manual_seed(1)).to(DEVICE) / 30
    x = torch.randn(len(slots), in_features, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    calls: list[str] = []
    split, shrink_parts = smlm.split_shrink, smlm.shrink_parts
    force_backend("triton")
    try:
        smlm.split_shrink = lambda *a: (calls.append("split"), split(*a))[1]  # type: ignore[assignment]
        smlm.shrink_parts = lambda *a: (calls.append("keep_v"), shrink_parts(*a))[1]  # type: ignore[assignment]
        _, y_rest = lora_linear(x[:0], x, weight, None, parts, SMLMMeta.build(slots, 0, DEVICE))
        train = [s % 3 for s in slots[:2]] + slots[2:]
        x_train = x[:2].clone().requires_grad_()
        _, y_rest2 = lora_linear(x_train, x[2:], weight, None, parts, SMLMMeta.build(train, 2, DEVICE))
        long = [3] * (smlm.TUNING.split_max_rows + 1)  # a prefill chunk: past the split path's rows
        rows = torch.randn(len(long), in_features, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        lora_linear(rows[:0], rows, weight, None, parts, SMLMMeta.build(long, 0, DEVICE))
    finally:
        smlm.split_shrink, smlm.shrink_parts = split, shrink_parts  # type: ignore[assignment]
        force_backend(None)
    assert calls == ["split", "keep_v", "keep_v"]
    _assert_close(y_rest2, y_rest[2:], 2e-6, "inference rows beside training rows vs alone")


def _decode_case(name: str, num_parts: int, in_features: int, seed: int,
                 ) -> tuple[SMLMMeta, list[tuple[ModuleLoRA, int]], torch.Tensor, torch.Tensor]:
    """A bf16 decode-sized step (24 rows, uneven runs, rows without an adapter): its meta, the parts,
    x and the base y (``seed`` and ``seed + 1``)."""
    rng = random.Random(name)
    slots = _slots("uneven_no_adapter", 24, rng)
    meta = SMLMMeta.build(slots, 0, DEVICE)
    parts, width = _parts(torch.bfloat16, num_parts, seed=rng.randint(0, 999), in_features=in_features)
    x = torch.randn(len(slots), in_features, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return meta, parts, x.to(DEVICE), _base(len(slots), width, parts, torch.bfloat16, seed=seed + 1)


@pytest.mark.parametrize("num_parts", [1, 3])
def test_split_shrink_reads_x_now_and_its_expand_adds_later(num_parts: int) -> None:
    """``smlm.split_shrink`` is ``forward_split`` in two halves: the shrink reads ``x`` when it is
    launched (x overwritten with NaN afterwards changes nothing), the expand it returns adds into the
    ``y`` it is given later, and the two halves give the bits ``forward_split`` gives."""
    meta, parts, x, y0 = _decode_case(f"halves{num_parts}", num_parts, in_features=700, seed=5)
    whole = y0.clone()
    smlm.forward_split(whole, x, parts, meta)
    halves = y0.clone()
    x_later = x.clone()
    finish = smlm.split_shrink(x_later, parts, meta)
    x_later.fill_(NAN)
    finish(halves)
    assert torch.equal(halves.nan_to_num(7.0), whole.nan_to_num(7.0))
    assert not torch.equal(whole.nan_to_num(7.0), y0.nan_to_num(7.0))  # the LoRA terms are there


def test_lora_overlap_switch_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LOQUETIER_LORA_OVERLAP`` takes 1 or 0 (on or off) and says so otherwise; ``overlap_scope``
    nests and unwinds on errors."""
    monkeypatch.setenv(ops.OVERLAP_ENV, "sideways")
    with pytest.raises(ValueError, match="LOQUETIER_LORA_OVERLAP must be 1 or 0 \\(on or off\\), got 'sideways'"):
        ops.set_lora_overlap(None)
    try:
        monkeypatch.setenv(ops.OVERLAP_ENV, " Off ")
        ops.set_lora_overlap(None)
        assert ops.lora_overlap() is False
        ops.set_lora_overlap(True)
        assert ops.lora_overlap() is True
        monkeypatch.delenv(ops.OVERLAP_ENV)
        ops.set_lora_overlap(False)
        ops.set_lora_overlap(None)
        assert ops.lora_overlap() is True  # the default
    finally:
        monkeypatch.delenv(ops.OVERLAP_ENV, raising=False)
        ops.set_lora_overlap(None)
    with pytest.raises(RuntimeError), ops.overlap_scope(), ops.overlap_scope():
        assert ops._overlap_depth == 2
        raise RuntimeError
    assert ops._overlap_depth == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams and graphs need CUDA")
@pytest.mark.parametrize(("layout", "num_parts"), [("round_robin", 3), ("round_robin", 1), ("long", 2)])
def test_lora_on_a_side_stream_gives_the_same_bits_eager_and_in_a_graph(layout: str, num_parts: int) -> None:
    """On a GPU: ``lora_linear`` with its shrinks on a side stream beside the base GEMM (eagerly in
    ``overlap_scope``, and captured in a CUDA graph, replayed on new inputs) gives exactly the bits of
    one stream, on the split path (round robin) and on the shrink + expand path (long segments; their
    K splits summed in a fixed order here, so that two runs can be compared bit for bit)."""
    dtype, in_features = torch.bfloat16, 4096
    rng = random.Random(f"overlap{layout}{num_parts}")
    slots = _slots(layout, 64, rng)
    meta = SMLMMeta.build(slots, 0, DEVICE)
    parts, width = _parts(dtype, num_parts, seed=rng.randint(0, 999), in_features=in_features)
    for lora, _ in parts:  # lora_linear reads the whole pool
        lora.a.nan_to_num_(0.0)
        lora.b.nan_to_num_(0.0)
    gen = torch.Generator().manual_seed(8)
    weight = (torch.randn(width, in_features, generator=gen) / 60).to(dtype).to(DEVICE)
    x = torch.randn(len(slots), in_features, generator=gen).to(dtype).to(DEVICE)

    def plain(inputs: torch.Tensor) -> torch.Tensor:
        return lora_linear(inputs[:0], inputs, weight, None, parts, meta)[1]

    ops.set_deterministic(True)
    ops.set_lora_overlap(True)
    try:
        want = plain(x)
        with ops.overlap_scope():
            eager = plain(x)
            static = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                plain(static)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = plain(static)
        assert torch.equal(eager, want)
        other = torch.randn(len(slots), in_features, generator=gen).to(dtype).to(DEVICE)
        for inputs in (x, other):
            static.copy_(inputs)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, plain(inputs)), "the graph's bits differ"
    finally:
        ops.set_lora_overlap(None)
        ops.set_deterministic(None)


@pytest.mark.parametrize("num_parts", [1, 3])
@pytest.mark.parametrize("tiles", [2, 3])
def test_expand_programs_over_several_column_tiles_give_the_same_bits(monkeypatch: pytest.MonkeyPatch,
                                                                     num_parts: int, tiles: int) -> None:
    """``Tuning.expand_tiles``: an expand program of a decode-sized block covers several column tiles
    (3 does not divide the widths: the last program's tiles run past the output); the sums are the
    ones of one tile a program, bit for bit, and prefill-sized blocks keep one tile."""
    meta, parts, x, y0 = _decode_case(f"tiles{num_parts}{tiles}", num_parts, in_features=300, seed=9)
    outs = []
    for n in (1, tiles):
        monkeypatch.setattr(smlm, "TUNING", smlm.Tuning(expand_tiles=n, expand_block_n=16))
        y = y0.clone()
        smlm.forward_split(y, x, parts, meta)
        outs.append(y)
    assert smlm._tiles_n(16) == tiles and smlm._tiles_n(32) == 1
    assert torch.equal(outs[1].nan_to_num(7.0), outs[0].nan_to_num(7.0))
    y_ref = y0.clone()
    reference.shrink_expand_ref(y_ref, x, parts, meta)
    _assert_close(outs[1], y_ref, TOL[torch.bfloat16], "several tiles vs reference")


@pytest.mark.parametrize(("num_parts", "tile"), [(1, 4), (3, 32)])
def test_expand_split_loop_unrolled_gives_the_same_bits(
        monkeypatch: pytest.MonkeyPatch, num_parts: int, tile: int) -> None:
    """``Tuning.expand_split_tile`` (forward_split's expand unrolls its loop over the shrink's K splits
    ``tile`` at a time: 4 leaves a partial last group of the 6 splits here, 32 one group, the rest
    masked) changes when loads are issued, not what is added in which order: the same bits as the
    plain loop, from a NaN-poisoned split buffer, and the reference's values."""
    meta, parts, x, y0 = _decode_case(f"split_tile{num_parts}{tile}", num_parts, in_features=1500, seed=11)
    monkeypatch.setattr(smlm, "_split_buffer",
                        lambda shape, device: torch.full(shape, NAN, dtype=torch.float32, device=device))
    outs = []
    for split_tile in (0, tile, tile):
        monkeypatch.setattr(smlm, "TUNING", smlm.Tuning(programs_per_sm=64, expand_split_tile=split_tile))
        y = y0.clone()
        smlm.forward_split(y, x, parts, meta)
        outs.append(y)
    split_k = smlm._shrink_sizes(meta.max_seg_len, 64, 1500, meta.num_blocks * num_parts, DEVICE)[3]
    assert split_k > 4 and split_k % 4, split_k  # several groups of 4, the last one partial
    for out in outs[1:]:
        assert torch.equal(out.nan_to_num(7.0), outs[0].nan_to_num(7.0))
    assert not torch.equal(outs[0].nan_to_num(7.0), y0.nan_to_num(7.0))  # the LoRA terms are there
    y_ref = y0.clone()
    reference.shrink_expand_ref(y_ref, x, parts, meta)
    _assert_close(outs[1], y_ref, TOL[torch.bfloat16], "unrolled split loop vs reference")


def test_smlm_tuning_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(smlm.TUNING_ENV, " expand_tiles=4, shrink_warps=2 ")
    assert smlm.tuning_from_env() == smlm.Tuning(expand_tiles=4, shrink_warps=2)
    monkeypatch.setenv(smlm.TUNING_ENV, "")
    assert smlm.tuning_from_env() == smlm.Tuning()
    for bad in ("expand_tiles", "expand_tiles=four", "tiles=4"):
        monkeypatch.setenv(smlm.TUNING_ENV, bad)
        with pytest.raises(ValueError, match="LOQUETIER_SMLM_TUNING: expected NAME=INT"):
            smlm.tuning_from_env()


@pytest.mark.parametrize(("which", "kernels"), [("both", {"shrink_parts_kernel", "expand_parts_kernel"}),
                                                ("shrinks only", {"shrink_parts_kernel"}),
                                                ("expands only", {"expand_parts_kernel"}),
                                                ("neither", set())])
def test_the_lora_halves_probe_launches_what_it_names(monkeypatch: pytest.MonkeyPatch, which: str,
                                                       kernels: set[str]) -> None:
    """``bench_offline --lora-halves``: each setting launches the halves it names of a decode-sized
    LoRA forward (the expands alone add terms of zeros: y unchanged, no NaN), and putting it back
    restores the real path."""
    from benchmarks.bench_offline import set_lora_halves

    meta, parts, x, y0 = _decode_case(f"probe{which}", 3, in_features=300, seed=3)
    want = y0.clone()
    smlm.forward_split(want, x, parts, meta)
    seen: list[str] = []
    real = smlm.launch

    def counted(kernel, grid, *args, **meta_args):  # type: ignore[no-untyped-def]
        seen.append(kernel.fn.__name__)
        real(kernel, grid, *args, **meta_args)

    monkeypatch.setattr(smlm, "launch", counted)
    split = smlm.split_shrink
    restore = set_lora_halves(which)
    try:
        y = y0.clone()
        smlm.split_shrink(x, parts, meta)(y)
    finally:
        restore()
    assert set(seen) == kernels
    assert smlm.split_shrink is split and smlm.launch is counted
    assert torch.equal(y.isnan(), y0.isnan())
    assert torch.equal(y.nan_to_num(), (want if which == "both" else y0).nan_to_num())
    with pytest.raises(ValueError, match="unknown"):
        set_lora_halves("half")
