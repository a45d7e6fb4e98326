"""``benchmarks/bench_gemm_lora.py``: every path gives the served path's output (tiny shapes, CPU)."""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # the kernels' module reads the flag when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import bench_gemm_lora as bg  # noqa: E402


def test_fused_paths_give_the_served_output_and_the_page_sums_a_step(tmp_path) -> None:
    results = bg.run(argparse.Namespace(tiny=True, out=tmp_path, pool_rank=32, rows=None))
    assert set(results["rows"]) == {str(rows) for rows in bg.TINY["rows"]}
    for by_module in results["rows"].values():
        assert set(by_module) == set(bg.TINY["modules"])
        for row in by_module.values():
            for key, entry in row["configs"].items():
                assert "error" not in entry, (key, entry)
                assert max(entry["base_err"], entry["fused_err"]) < 1e-5, (key, entry)
            assert row["best_fused_us"][0] is not None
    text, targets = bg.page(results, "cmd")
    assert len(targets) == len(bg.TINY["rows"]) and "| fused, shrink done |" in text
    assert all(t["measured"] > 0 for t in targets)
