"""The benchmark harness (issue 9) on CPU: workload statistics, metrics math, and a smoke run of each
bench script on the tiny model (a few requests, HF baselines and our engine)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness import metrics, workload
from benchmarks.harness.metrics import RequestRecord, percentile, summarize_serving

# ---- workload -----------------------------------------------------------------------------------------


def test_poisson_count_and_gaps() -> None:
    rng = np.random.default_rng(0)
    t = workload.arrival_times("poisson", 50.0, 200.0, rng)
    assert abs(len(t) - 10_000) < 4 * math.sqrt(10_000)
    assert np.all(np.diff(t) >= 0) and t[-1] < 200.0
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 50.0, rel=0.08)  # exponential: std == mean


def test_burst_keeps_mean_rate_and_concentrates_arrivals() -> None:
    rng = np.random.default_rng(1)
    t = workload.arrival_times("burst", 20.0, 400.0, rng, burst_factor=4.0, burst_s=2.0, period_s=10.0)
    assert len(t) / 400.0 == pytest.approx(20.0, rel=0.06)
    in_burst = ((t % 10.0) >= 8.0).mean()  # bursts sit at the end of each 10 s period
    # 2 s of 4x rate vs 8 s of 1x: 8 / (8 + 8) = half of the arrivals land in the bursts
    assert in_burst == pytest.approx(0.5, abs=0.04)


def test_step_pattern_steps_up_and_down() -> None:
    rng = np.random.default_rng(2)
    duration = 700.0
    t = workload.arrival_times("step", 10.0, duration, rng)
    piece = duration / len(workload.STEP_PROFILE)
    counts = np.histogram(t, bins=len(workload.STEP_PROFILE), range=(0, duration))[0] / piece
    mean_mult = sum(workload.STEP_PROFILE) / len(workload.STEP_PROFILE)
    expected = np.array(workload.STEP_PROFILE) * 10.0 / mean_mult
    assert np.allclose(counts, expected, rtol=0.15)
    assert counts.argmax() == len(workload.STEP_PROFILE) // 2
    assert len(t) / duration == pytest.approx(10.0, rel=0.05)


def test_offline_and_bad_pattern() -> None:
    rng = np.random.default_rng(0)
    assert np.all(workload.arrival_times("offline", 1.0, 1.0, rng, num_requests=7) == 0.0)
    with pytest.raises(ValueError):
        workload.arrival_times("nope", 1.0, 1.0, rng)


def test_sharegpt_lengths_mean_and_clipping() -> None:
    rng = np.random.default_rng(3)
    prompt, output = workload.sharegpt_lengths(4096)
    p, o = prompt.sample(50_000, rng), output.sample(50_000, rng)
    assert p.mean() == pytest.approx(200, rel=0.08)
    assert o.mean() == pytest.approx(200, rel=0.08)
    assert np.median(p) < p.mean()  # long right tail, like ShareGPT
    prompt, output = workload.sharegpt_lengths(256)
    p, o = prompt.sample(10_000, rng), output.sample(10_000, rng)
    assert p.max() <= 128 and (p + o).max() <= 256 and p.min() >= workload.MIN_PROMPT_TOKENS


def test_adapter_popularity() -> None:
    rng = np.random.default_rng(4)
    ids = [f"a{i}" for i in range(32)]
    uni = workload.adapter_choices(32_000, ids, "uniform", rng)
    counts = np.array([uni.count(a) for a in ids])
    assert counts.min() > 800 and counts.max() < 1200
    zipf = workload.adapter_choices(32_000, ids, "zipf", rng)
    zc = np.array([zipf.count(a) for a in ids])
    assert zc[0] > 4 * zc[-1] and zc[0] == zc.max()
    assert workload.adapter_choices(3, ids, "none", rng) == [None] * 3


def test_trace_is_reproducible_and_fits_context() -> None:
    kw = dict(
        pattern="poisson",
        rate=20.0,
        duration_s=5.0,
        vocab_size=1000,
        max_context=300,
        adapter_ids=["x", "y"],
        popularity="zipf",
        seed=9,
    )
    a, b = workload.make_trace(**kw), workload.make_trace(**kw)
    assert a.requests == b.requests and len(a) > 50
    assert all(r.num_prompt_tokens + r.max_tokens <= 300 for r in a.requests)
    assert all(3 <= t < 1000 for r in a.requests for t in r.prompt_token_ids)
    assert all(r.adapter_id is None for r in a.without_adapters().requests)
    assert a.renamed("p").requests[0].request_id == "p-" + a.requests[0].request_id


def test_finetune_data_packing_and_padding() -> None:
    examples = workload.synthetic_examples(300, 5000, 0, max_tokens=1024)
    lens = [workload.example_length(e) for e in examples]
    assert max(lens) <= 1024 and np.mean(lens) == pytest.approx(400, rel=0.15)
    batches = workload.pack_micro_batches(examples, 1024)
    assert [i for b in batches for i in b] == list(range(300))
    assert all(sum(lens[i] for i in b) <= 1024 for b in batches)
    assert np.mean([sum(lens[i] for i in b) for b in batches[:-1]]) > 700  # packing fills micro-batches
    real, padded = workload.padding_stats(examples, workload.padded_batches(examples, 4))
    assert real == sum(lens) and padded > real


# ---- metrics -------------------------------------------------------------------------------------------


def test_kv_memory_fits_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import torch

    from benchmarks.harness import common

    card = {"gib": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(total_memory=int(card["gib"] * (1 << 30))))
    card["gib"] = 139.8  # an H200: the profile's figure
    assert common.kv_memory_gb(40.0, "cuda") == 40.0
    card["gib"] = 79.2  # an H100 80GB: a fifth of the card
    assert common.kv_memory_gb(40.0, "cuda") == 16
    assert common.kv_memory_gb(8.0, "cuda:0") == 8.0  # a smaller profile stays as it is
    assert common.kv_memory_gb(40.0, "cpu") == 40.0


def test_percentile_matches_numpy_and_handles_inf() -> None:
    rng = np.random.default_rng(5)
    xs = rng.exponential(size=101).tolist()
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(percentile([], 50))
    assert percentile([1.0] * 98 + [math.inf] * 2, 99) == math.inf  # >1% never served: p99 is inf
    assert percentile([1.0] * 100 + [math.inf], 50) == 1.0


def _rec(
    i: int,
    arrival: float,
    first: float | None,
    tpot: float | None,
    *,
    n: int = 10,
    admitted: float | None = None,
    finished: bool = True,
) -> RequestRecord:
    return RequestRecord(
        f"r{i}",
        arrival,
        5,
        n,
        admitted_s=admitted,
        first_token_s=first,
        finish_s=(first or 0) + 1 if finished and first is not None else None,
        num_output_tokens=n if first is not None else 0,
        tpot_s=tpot,
    )


def test_slo_attainment_rules() -> None:
    recs = [
        _rec(0, 0.0, 0.5, 0.05),  # meets both
        _rec(1, 1.0, 2.5, 0.05),  # TTFT 1.5 s: misses SLO, within 6 s
        _rec(2, 2.0, 2.2, 0.07),  # TPOT 70 ms: misses SLO
        _rec(3, 3.0, None, None),  # never served: misses everything
        _rec(4, 4.0, 10.5, 0.01, admitted=9.9),  # admitted 5.9 s after arrival: counts for admit6
        _rec(5, 5.0, 11.2, 0.01, admitted=11.1),  # admitted 6.1 s after arrival: does not
        _rec(6, 6.0, 11.9, 0.01),  # no admission time: first token at 5.9 s counts
    ]
    s = summarize_serving(recs, 10.0)
    assert s.slo_attainment == pytest.approx(1 / 7)
    assert s.admit6_attainment == pytest.approx(5 / 7)
    assert s.num_requests == 7 and s.num_finished == 6
    assert s.output_tokens == 60 and s.output_tokens_per_s == pytest.approx(6.0)
    assert s.ttft_p99_s == math.inf and s.ttft_p50_s == pytest.approx(5.9)
    tight = summarize_serving(recs, 10.0, ttft_s=0.4, tpot_s=0.1)
    assert tight.slo_attainment == pytest.approx(1 / 7)  # only r2 (0.2 s, 70 ms)
    unfinished = _rec(7, 0.0, 0.1, None, finished=False)
    assert not unfinished.meets_slo()  # an unfinished request with no TPOT yet is a miss


def test_tpot_training_and_floor() -> None:
    assert metrics.tpot_from_times([1.0, 1.1, 1.3]) == pytest.approx(0.15)
    assert metrics.tpot_from_times([1.0]) is None
    t = metrics.summarize_training(900, 3.0, padded_tokens=1200, optimizer_steps=4)
    assert t.real_tokens_per_s == 300 and t.padding_fraction == pytest.approx(0.25)
    from benchmarks.harness.models import SPECS

    spec = SPECS["8b"]
    assert spec.num_params() == pytest.approx(8.03e9, rel=0.01)  # Llama-3-8B
    floor = metrics.decode_floor_s(spec.decode_weight_bytes())
    assert floor * 1e3 == pytest.approx(3.52, rel=0.02)  # ~15 GB read at 4.27 TB/s
    assert spec.lora_bytes(16) == pytest.approx(83.9e6, rel=0.01)  # rank 16, all seven targets, bf16
    assert metrics.kv_bytes_read([100, 50], 32, 8, 128) == 150 * 2 * 32 * 8 * 128 * 2
    assert math.isnan(metrics.ratio(1.0, 0.0))


# ---- smoke runs of the bench scripts (tiny model, CPU) -------------------------------------------------


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    from loquetier.kernels.ops import force_backend

    root = tmp_path_factory.mktemp("bench")
    yield root / "out", root / "cache"
    force_backend(None)  # the CPU bench runs pin the torch reference (not Triton's interpreter)


def _argv(dirs: tuple[Path, Path]) -> list[str]:
    return ["--model", "tiny", "--device", "cpu", "--quick", "--out", str(dirs[0]), "--cache", str(dirs[1])]


def _targets(out: Path, name: str) -> list[dict[str, object]]:
    data = json.loads((out / f"{name}.json").read_text())
    assert not data["results"].get("errors"), data["results"].get("errors")
    assert (out / f"{name}.md").is_file()
    return data["targets"]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_bench_serving_smoke(bench_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_serving

    assert bench_serving.main(_argv(bench_dirs)) == 0
    assert "Targets" in capsys.readouterr().out
    targets = _targets(bench_dirs[0], "serving")
    assert all(t["measured"] is not None for t in targets)  # every system produced a number
    data = json.loads((bench_dirs[0] / "serving.json").read_text())
    for s in data["results"]["serving"].values():
        assert s["num_finished"] == s["num_requests"] > 0


@pytest.mark.slow
def test_bench_unified_smoke(bench_dirs: tuple[Path, Path]) -> None:
    from benchmarks import bench_unified

    assert bench_unified.main(_argv(bench_dirs)) == 0
    targets = _targets(bench_dirs[0], "unified")
    assert targets[1]["measured"] is not None  # training share of the unified run
    data = json.loads((bench_dirs[0] / "unified.json").read_text())
    assert data["results"]["training"]["loquetier unified"]["real_tokens"] > 0


@pytest.mark.slow
def test_bench_finetune_smoke(bench_dirs: tuple[Path, Path]) -> None:
    from benchmarks import bench_finetune

    assert bench_finetune.main(_argv(bench_dirs)) == 0
    data = json.loads((bench_dirs[0] / "finetune.json").read_text())
    ours = data["results"]["training"]["loquetier, concurrent, packed"]
    peft = data["results"]["training"]["PEFT sequential, padded"]
    assert ours["padded_tokens"] == ours["real_tokens"] > 0  # packed: no padding
    assert peft["padded_tokens"] > peft["real_tokens"] > 0


# ---- knob variants ------------------------------------------------------------------------------------


def test_knob_variants_take_scheduler_fields_and_the_arrival_mode() -> None:
    from benchmarks import bench_slo_knobs, sim_scheduler

    name, knobs = bench_slo_knobs.parse_variant("old:arrival=add_request,ttft_headroom=0.6")
    assert name == "old" and knobs == {"arrival": "add_request", "ttft_headroom": 0.6}
    for bad in ("x:arrival=later", "x:not_a_field=1", "x:ttft_headroom=2.0"):
        with pytest.raises((SystemExit, ValueError)):
            bench_slo_knobs.parse_variant(bad)
    config, *_ = sim_scheduler._config(sim_scheduler.parse_args(
        ["--profile", "h200-8b", "--set", "ttft_headroom=0.6", "--set", "tpot_burst=2"]))
    assert config.ttft_headroom == 0.6 and config.tpot_burst == 2 and config.prefill_coalesce_ms == 100.0
    with pytest.raises(SystemExit):
        sim_scheduler._config(sim_scheduler.parse_args(["--set", "nope=1"]))
