"""``benchmarks/tune_attention.py``'s ranking and pick, on results of the shape its GPU run writes."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the kernels' module reads the flag when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import tune_attention as ta  # noqa: E402
from loquetier.kernels.launch import tuning_from_spec  # noqa: E402
from loquetier.kernels.paged_attention import AttnTuning  # noqa: E402


def _results(times: dict[str, list[float]], wrong: str = "") -> dict:
    """Per case (two of them) each variant's µs; ``wrong`` gets a result the check refused."""
    batches = {}
    for i, label in enumerate(("batch 32", "batch 16, long")):
        variants = {name: {"us": us[i], "rel_err": 0.5 if name == wrong else 1e-3, "splits": 1 + i}
                    for name, us in times.items()}
        batches[label] = {"floor_us": 5.0 * (i + 1), "variants": variants}
    return {"date": "2026-12-04T00:00:00+00:00", "gpu": "test", "batches": batches}


def test_variants_spell_what_the_environment_reads() -> None:
    names = ta.variants()
    assert ta.DEFAULT in names and ta.PREVIOUS in names and len(names) == len(ta.TILES) * len(ta.RULES)
    for name, over in names.items():
        if name != ta.DEFAULT:
            assert tuning_from_spec(AttnTuning, name, "spec") == AttnTuning(**over)


def test_pick_ranks_by_mean_relative_time_and_skips_wrong_results() -> None:
    # "a" is 10 % faster on the short case and 2 % slower on the long one: 0.96 of the defaults
    times = {ta.DEFAULT: [10.0, 50.0], "a": [9.0, 51.0], "b": [9.9, 49.0], "c": [5.0, 20.0]}
    assert ta._total(_results(times), "a") == pytest.approx((0.9 + 51 / 50) / 2)
    assert ta.pick(_results(times, wrong="c")) == "a\n"  # "c" is fastest but its output was wrong
    assert ta.pick(_results(times)) == "c\n"
    close = {ta.DEFAULT: [10.0, 50.0], "b": [9.9, 49.0]}  # 0.985: under the 3 % a pick asks for
    assert ta.pick(_results(close)) == ""
    table = ta.table(_results(times, wrong="c"), top=1, extra=("b",))
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    assert rows == [ta.DEFAULT, "a", "b", "KV-read floor"]
    assert "WRONG" not in table  # the wrong variant is ranked last, not shown
