"""Decode steps through DecodeGraphs' static, padded layout (engine/graphs.py).

CUDA graphs cannot be captured on a CPU, so these tests run the same static buffers, padding
rows, scratch KV block and fixed-size SMLM schedule eagerly (``cuda_graphs="eager"``) and check
that the engine's output is the plain step's, token for token. With TRITON_INTERPRET=1 (CI) the
Triton SMLM and paged-decode kernels run over the padded layout exactly as a captured graph
would launch them; the GPU benchmark checks the captured graphs against eager steps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from loquetier import Engine, SamplingParams, TrainingParams
from loquetier.engine.graphs import DecodeGraphs, DecodeRow, HostStaging, bucket_sizes
from loquetier.kernels import force_backend, set_lora_overlap
from tests.engine.test_engine import make_engine, train_data
from tests.tiny import make_tiny_model

PROMPTS = ["the quick brown fox", "what is the capital", "a pirate says", "fine tuning and",
           "one two three", "hello there", "lorem ipsum dolor"]
ADAPTERS = ["a", None, "b", "a", None, "b", "b"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-graphs") / "llama")


@pytest.fixture(params=["reference", "triton"])
def backend(request: pytest.FixtureRequest):
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")
    force_backend(request.param)
    yield request.param
    force_backend(None)


def graph_engine(model_dir: Path, backend: str, **limits) -> Engine:
    engine = make_engine(model_dir, cuda_graphs="eager", **limits)
    if backend == "triton":
        engine.model.attn_impl = "triton"  # the paged-decode kernel, as on the GPU
        engine.runner.graphs = DecodeGraphs(engine.model, engine.kv, engine.config.scheduler.max_num_seqs,
                                            engine.max_model_len, engine.blocks.num_blocks, mode="eager",
                                            max_tokens=engine.config.scheduler.max_num_batched_tokens,
                                            max_segments=engine.config.max_adapter_slots)
    return engine


@pytest.fixture(params=["rows16", "rows64"])
def graph_tiling(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The SMLM launches of prefill-sized graph buckets: row tiles of 16 or 64 over the blocks a step
    can lay out (``Tuning.graph_prefill_rows``)."""
    from loquetier.kernels import smlm

    rows = {"rows16": 16, "rows64": 64}[request.param]
    monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.TUNING, graph_prefill_rows=rows))
    return str(request.param)


def test_bucket_sizes() -> None:
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(1) == [1]


def test_decode_through_the_static_layout_matches_plain_steps(model_dir: Path, backend: str) -> None:
    sampling = [SamplingParams(max_tokens=7, temperature=0.0, logprobs=True),
                SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, seed=3)]
    plain = make_engine(model_dir, cuda_graphs="off")
    graphs = graph_engine(model_dir, backend)
    assert plain.runner.graphs is None and graphs.runner.graphs is not None
    want = plain.generate(PROMPTS, adapter_ids=ADAPTERS, sampling=sampling * 3 + sampling[:1])
    got = graphs.generate(PROMPTS, adapter_ids=ADAPTERS, sampling=sampling * 3 + sampling[:1])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want, strict=True):
        if w.logprobs is not None:
            assert g.logprobs is not None
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=2e-4, rtol=0)
    assert graphs.runner.num_graph_steps >= 4  # 7 rows in a bucket of 8, then fewer as requests finish
    assert graphs.runner.num_graph_prefill_steps >= 1  # the prompts went through the graph layout too
    # base-model rows alone go through the variant without SMLM launches
    base = graphs.generate(PROMPTS[:3], sampling=SamplingParams(max_tokens=4, temperature=0.0))
    assert [o.token_ids for o in base] == [
        o.token_ids for o in plain.generate(PROMPTS[:3], sampling=SamplingParams(max_tokens=4, temperature=0.0))]


def test_scratch_block_is_never_handed_out_and_padding_writes_only_there(model_dir: Path) -> None:
    force_backend("reference")
    try:
        engine = make_engine(model_dir, cuda_graphs="eager", num_kv_blocks=40)
        assert engine.kv.num_blocks == engine.blocks.num_blocks + 1 == 41
        scratch = engine.blocks.num_blocks
        live = engine.kv.k[0][:scratch].clone()
        graphs = engine.runner.graphs
        assert graphs is not None
        engine.generate(["x y z"], sampling=SamplingParams(max_tokens=3, temperature=0.0))
        assert graphs.bucket_for(1) == 1
        # a request of 3 rows padded to 4: padding K/V land in the scratch block only
        before = engine.kv.k[0][:scratch].clone()
        engine.generate(PROMPTS[:3], sampling=SamplingParams(max_tokens=3, temperature=0.0))
        assert not torch.equal(engine.kv.k[0][scratch], torch.zeros_like(engine.kv.k[0][scratch]))
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        del live, before
    finally:
        force_backend(None)


def test_mixed_steps_with_training_fall_back_to_the_plain_path(model_dir: Path) -> None:
    force_backend("reference")
    try:
        plain = make_engine(model_dir, cuda_graphs="off")
        graphs = make_engine(model_dir, cuda_graphs="eager")
        params = TrainingParams(optimizer="adamw", lr=5e-3, max_steps=3, micro_batch_tokens=20, seed=1)
        lora = dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
        outs = []
        for engine in (plain, graphs):
            engine.add_training_job("job", train_data(0), params, lora=lora)
            outs.append(engine.generate(PROMPTS[:4], adapter_ids=ADAPTERS[:4],
                                        sampling=SamplingParams(max_tokens=6, temperature=0.0)))
            engine.run_until_idle()
        assert [o.token_ids for o in outs[1]] == [o.token_ids for o in outs[0]]
        w_plain = plain.adapters.export("job") if hasattr(plain.adapters, "export") else None
        del w_plain
    finally:
        force_backend(None)


def test_rows_are_checked() -> None:
    with pytest.raises(ValueError, match="cuda_graphs"):
        from loquetier.engine.config import EngineConfig

        EngineConfig(cuda_graphs="sometimes")


def test_graph_rows_reject_a_short_block_table(model_dir: Path) -> None:
    force_backend("reference")
    try:
        engine = make_engine(model_dir, cuda_graphs="eager")
        graphs = engine.runner.graphs
        assert graphs is not None
        with pytest.raises(ValueError, match="cannot hold position"):
            graphs.run([DecodeRow("s", 5, position=20, block_table=[0, 1], slot=-1)])  # 2 blocks of 8 < 21
        with pytest.raises(ValueError, match="rows: graphs hold"):
            graphs.run([])
    finally:
        force_backend(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize("overlap", [False, True])
def test_captured_graphs_match_plain_steps_on_cuda(model_dir: Path, overlap: bool) -> None:
    """On a GPU: the captured graphs (fp32, so token equality is meaningful) against plain steps,
    with adapters, across buckets, after an adapter reload between replays; with the graphs' LoRA
    shrinks on a side stream beside the base GEMMs and without (``set_lora_overlap``)."""
    force_backend(None)
    plain = make_engine(model_dir, device="cuda", cuda_graphs="off")
    graphs = make_engine(model_dir, device="cuda", cuda_graphs="on")
    set_lora_overlap(overlap)
    try:
        assert graphs.capture_graphs() > 0
    finally:
        set_lora_overlap(None)
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    want = plain.generate(PROMPTS, adapter_ids=ADAPTERS, sampling=sampling)
    got = graphs.generate(PROMPTS, adapter_ids=ADAPTERS, sampling=sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert graphs.runner.graphs is not None and graphs.runner.graphs.num_replays > 0
    for engine in (plain, graphs):  # a reload writes new weights into the same slot storage
        engine.load_adapter("a", _reloaded(engine))
    want = plain.generate(PROMPTS, adapter_ids=ADAPTERS, sampling=sampling)
    got = graphs.generate(PROMPTS, adapter_ids=ADAPTERS, sampling=sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def _reloaded(engine: Engine):  # type: ignore[no-untyped-def]
    from tests.engine.test_engine import random_adapter

    return random_adapter(engine, 99, 8, ("q_proj", "o_proj", "down_proj"))


def test_prefill_chunks_through_the_graph_layout_match_plain_steps(  # noqa: PLR0917
        model_dir: Path, backend: str, graph_tiling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt tokens laid out as graph rows (each attends over its own context through the paged
    kernels: row by row, or in tiles in buckets past the batch): prompts of several chunks,
    prefix-cache hits, adapters and the base model mixed, against plain steps token for token,
    whatever the SMLM row tile of prefill-sized buckets; a step whose prompt rows would read too
    many keys stays eager."""
    if backend == "reference" and graph_tiling != "rows16":
        pytest.skip("the torch reference walks host segments, not the row blocks")
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (3, 70, 130, 20, 64)]
    prompts.append(prompts[2][:100] + [5, 6, 7])  # shares 96 tokens (12 blocks) with prompt 2
    adapters = ["a", "b", None, "b", "a", None]
    sampling = SamplingParams(max_tokens=6, temperature=0.0)
    plain = make_engine(model_dir, cuda_graphs="off")
    graphs = graph_engine(model_dir, backend)
    want = plain.generate(prompts, adapter_ids=adapters, sampling=sampling)
    got = graphs.generate(prompts, adapter_ids=adapters, sampling=sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert graphs.runner.num_graph_prefill_steps >= 2  # 64-token chunks of the longer prompts
    g = graphs.runner.graphs
    assert g is not None
    if backend == "triton":  # buckets past max_batch attend in tiles (the Triton kernel's path)
        assert g.tile_rows > 0 and g.num_tiled_layouts >= 1
    # one long prompt: 230 rows reading ~115 keys each on average is still a graph step; with the
    # budget lowered to 16 keys per row it runs eagerly, with the same tokens
    long = [torch.randint(3, 250, (230,), generator=gen).tolist()]
    want = plain.generate(long, sampling=sampling)
    import loquetier.engine.graphs as graphs_mod

    before = graphs.runner.num_graph_prefill_steps
    monkeypatch.setattr(graphs_mod, "GRAPH_MAX_MEAN_CONTEXT", 16)
    monkeypatch.setattr(g, "_tile_mean_context", 16 if g.tile_rows else 0)
    got = graphs.generate(long, sampling=sampling)
    monkeypatch.undo()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert graphs.runner.num_graph_prefill_steps == before


def test_graph_launches_walk_only_the_row_blocks_a_step_can_lay_out(model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket of n rows in at most s adapter segments lays out at most n / tile + s row blocks: the
    SMLM grids of its graph are that long, not one program row per row, and a layout with more
    segments than the graphs were sized for is refused, not run with blocks left out."""
    from loquetier.kernels import smlm

    force_backend("reference")
    try:
        engine = make_engine(model_dir, cuda_graphs="eager")
        graphs = DecodeGraphs(engine.model, engine.kv, 8, engine.max_model_len, engine.blocks.num_blocks,
                              mode="eager", max_tokens=256, max_segments=3)
        assert graphs.tiling(8) == (16, 4) and graphs.tiling(4) == (16, 4) and graphs.tiling(2) == (16, 2)
        assert graphs.tiling(256) == (16, 16 + 3)
        monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.TUNING, graph_prefill_rows=64))
        assert graphs.tiling(256) == (64, 4 + 3) and graphs.tiling(8) == (16, 4)  # decode buckets keep 16
        monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.TUNING, graph_bounded_blocks=0))
        assert graphs.tiling(256) == (64, 256)
        monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.TUNING, graph_bounded_blocks=1,
                                                                graph_prefill_rows=48))
        with pytest.raises(ValueError, match="16, 32 or 64"):
            graphs.tiling(256)
        monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.TUNING, graph_prefill_rows=16))
        table = list(range(4))
        rows = [DecodeRow(f"s{i}", 5, position=3, block_table=table, slot=i) for i in range(8)]
        with pytest.raises(ValueError, match="8 adapter segments lay out 8 row blocks"):
            graphs.run(rows)  # 8 slots in use, sized for 3: more blocks than the launches walk
        graphs.run(rows[:3] + [DecodeRow("base", 5, position=3, block_table=table, slot=-1)])
    finally:
        force_backend(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize("rows", [16, 64])
def test_captured_prefill_graphs_match_plain_steps_on_cuda(model_dir: Path, rows: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, fp32: prompts laid out as rows of captured graphs, their SMLM launches tiling rows by
    16 or 64, against plain steps token for token (captured with every bucket's own attention
    tiles); then a 440-token prompt, whose later 64-token chunks read ~300-400 keys a row: they
    replay graphs too, attended in tiles."""
    from loquetier.kernels import smlm

    force_backend(None)
    monkeypatch.setattr(smlm, "TUNING", dataclasses.replace(smlm.TUNING, graph_prefill_rows=rows))
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (3, 70, 130, 20, 64, 90)]
    adapters = ["a", "b", None, "b", "a", "a"]
    sampling = SamplingParams(max_tokens=6, temperature=0.0)
    plain = make_engine(model_dir, device="cuda", cuda_graphs="off")
    graphs = make_engine(model_dir, device="cuda", cuda_graphs="on")
    assert graphs.capture_graphs() > 0
    want = plain.generate(prompts, adapter_ids=adapters, sampling=sampling)
    got = graphs.generate(prompts, adapter_ids=adapters, sampling=sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert graphs.runner.num_graph_prefill_steps >= 2
    g = graphs.runner.graphs
    assert g is not None and g.tile_rows > 0
    long = [torch.randint(3, 250, (440,), generator=gen).tolist()]
    tiled, steps = g.num_tiled_layouts, graphs.runner.num_graph_prefill_steps
    want = plain.generate(long, adapter_ids=["b"], sampling=sampling)
    got = graphs.generate(long, adapter_ids=["b"], sampling=sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # 7 chunks, all graph steps; those from position 256 on (mean context over 256 keys) in tiles
    assert graphs.runner.num_graph_prefill_steps - steps == 7 and g.num_tiled_layouts - tiled == 3


def test_token_buckets_past_the_batch() -> None:
    sizes = bucket_sizes(64, 4096)
    assert sizes[:11] == bucket_sizes(64) and sizes[-1] == 4096
    past = sizes[10:]
    assert all(1.3 <= b / a <= 2.0 for a, b in zip(past[:-1], past[1:], strict=False))  # ~1.5x steps
    assert all(b % 64 == 0 for b in past[1:-1]) and len(sizes) == len(set(sizes))


def test_a_failing_prefill_graph_falls_back_to_decode_graphs(model_dir: Path) -> None:
    """If a prefill bucket cannot be captured, prefill steps run eagerly from then on while decode
    steps keep their graphs, and the scheduler stops pricing prefill steps as graph steps."""
    force_backend("reference")
    try:
        engine = make_engine(model_dir, cuda_graphs="eager")
        graphs = engine.runner.graphs
        assert graphs is not None and graphs.max_tokens > graphs.max_batch
        # as if prefill graphs had been captured (the scheduler prices steps with prompt rows as graph steps)
        engine.scheduler.graphs = dataclasses.replace(engine.scheduler.graphs, decode=True, max_rows=graphs.max_tokens)
        real_run = graphs.run

        def failing(rows, lookahead=0, **kwargs):  # type: ignore[no-untyped-def]
            if any(not hasattr(r, "token_id") for r in rows):
                raise RuntimeError("capture failed (simulated)")
            return real_run(rows, lookahead, **kwargs)

        graphs.run = failing  # type: ignore[method-assign]
        greedy = SamplingParams(max_tokens=5, temperature=0.0)
        want = make_engine(model_dir, cuda_graphs="off").generate(PROMPTS, adapter_ids=ADAPTERS, sampling=greedy)
        with pytest.warns(UserWarning, match="prefill steps disabled") as caught:
            got = engine.generate(PROMPTS, adapter_ids=ADAPTERS, sampling=greedy)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert not [w for w in caught if "decode window" in str(w.message)]  # windows still run
        assert engine.runner.graphs is graphs and graphs.max_tokens == graphs.max_batch
        assert engine.runner.num_graph_steps > 0  # decode steps still replayed
        assert engine.scheduler.graphs.max_rows == 0 and engine.scheduler.graphs.decode
        assert engine.scheduler.num_graph_fallbacks == 1  # an event the scheduler recorded, not a config edit
    finally:
        force_backend(None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="pinned staging needs CUDA"))])
def test_staging_lands_every_input_in_its_buffer_with_its_dtype(device: str) -> None:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    stage = HostStaging(200, dev)
    ids, ctx = torch.zeros(16, dtype=torch.int64, device=dev), torch.zeros(16, dtype=torch.int32, device=dev)
    tables = torch.zeros(16, 10, dtype=torch.int32, device=dev)
    for _ in range(3):  # the buffer is reused step after step
        want_ids = torch.randint(0, 1 << 40, (12,), generator=g)
        want_ctx = torch.randint(1, 1 << 20, (12,), generator=g)
        want_tables = torch.randint(0, 1 << 16, (12, 7), generator=g, dtype=torch.int32)
        stage.begin()
        stage.put(want_ids, ids[:12])
        stage.put(want_ctx, ctx[:12])
        stage.put(want_tables, tables[:12, :7])  # a strided view: columns past 7 stay as they are
        stage.flush()
        assert torch.equal(ids[:12].cpu(), want_ids) and ctx.dtype == torch.int32
        assert torch.equal(ctx[:12].cpu(), want_ctx.to(torch.int32))
        assert torch.equal(tables[:12, :7].cpu(), want_tables) and not tables[:, 7:].any()
    stage.begin()
    with pytest.raises(ValueError, match="values for a target"):
        stage.put(torch.zeros(5, dtype=torch.int64), ids[:4])
    with pytest.raises(ValueError, match="staged"):
        stage.put(torch.zeros(201, dtype=torch.int64), torch.zeros(201, dtype=torch.int64, device=dev))


def test_deep_prompt_rows_take_a_tiled_bucket_with_the_row_by_row_logits(model_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of two decode rows and a short prompt chunk deep in its context fits a decode-sized
    bucket, but its prompt rows would read ~300 keys each there: it is laid out in the smallest bucket
    past the batch, whose attention runs in tiles, with the logits of the row-by-row layout. Shallow
    steps keep their decode-sized bucket."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton attention kernels run on CPU only under TRITON_INTERPRET=1")
    from loquetier.engine.graphs import PrefillRows
    from loquetier.kernels import paged_attention as pa

    force_backend("reference")
    try:
        engine = make_engine(model_dir, cuda_graphs="off", num_kv_blocks=160, max_model_len=400)
        engine.model.attn_impl = "triton"
        gen = torch.Generator().manual_seed(11)
        for cache in (*engine.kv.k, *engine.kv.v):  # every key and value random (the context is read)
            cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.dtype))
        table = list(range(1, 41))  # 320 positions of 8
        rows = [DecodeRow("d1", 7, 20, list(range(41, 44)), slot=-1),
                DecodeRow("d2", 9, 33, list(range(44, 49)), slot=-1),
                PrefillRows("p", [5, 6, 7, 8, 9, 10], 300, table, slot=-1, needs_logits=True)]
        logits = {}
        for tiles in (1, 0):
            monkeypatch.setattr(pa, "TUNING", dataclasses.replace(pa.TUNING, graph_tiles=tiles))
            g = DecodeGraphs(engine.model, engine.kv, 8, engine.max_model_len, engine.blocks.num_blocks,
                             mode="eager", max_tokens=64, max_segments=6)
            assert (g.tile_rows > 0) == bool(tiles) and g.max_mean_context == (2048 if tiles else 256)
            out, ids = g.run(rows)
            logits[tiles] = out.clone()
            assert ids == ["d1", "d2", "p"]
            assert g._current[0] == (g.buckets[g.buckets.index(8) + 1] if tiles else 8)  # past the batch
            assert g.num_tiled_layouts == int(bool(tiles))
            shallow = [rows[0], PrefillRows("q", [3, 4], 4, [49], slot=-1, needs_logits=True)]
            g.run(shallow)
            assert g._current[0] == 4 and g.num_tiled_layouts == int(bool(tiles))
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    finally:
        force_backend(None)
