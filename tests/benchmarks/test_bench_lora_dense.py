"""``benchmarks/bench_lora_dense.py``: its dense paths give the SMLM path's LoRA terms (tiny shapes, CPU)."""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # the kernels' module reads the flag when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import bench_lora_dense as bd  # noqa: E402


def test_dense_paths_give_the_smlm_terms_and_the_page_names_them(tmp_path) -> None:
    results = bd.run(argparse.Namespace(tiny=True, out=tmp_path))
    assert set(results["batches"]) == {str(rows) for rows in bd.TINY["batches"]}
    for row in results["batches"].values():
        variants = row["variants"]
        assert not [name for name, res in variants.items() if "error" in res]
        dense = [name for name in variants if name.startswith("dense")]
        assert len(dense) == 2 * len(bd.TINY["pool_ranks"])
        for name in dense:
            assert variants[name]["rel_vs_smlm"] < 1e-5, name
    results["targets"] = bd.targets(results)
    assert len(results["targets"]) == len(bd.TINY["batches"])
    text = bd.page(results)
    assert "dense, A in the base weight, pool rank 16" in text and "| smlm |" in text


def test_the_mask_keeps_each_rows_own_adapter_columns() -> None:
    # row 1 (slot 2) keeps columns [2 x 16, 2 x 16 + rank) only; a row given another slot keeps others
    d = bd.TINY
    right = bd._mask(torch, [1, 2], d, 1, 16, "cpu", torch.float32)
    wrong = bd._mask(torch, [1, 1], d, 1, 16, "cpu", torch.float32)
    assert right[1].nonzero().flatten().tolist() == list(range(2 * 16, 2 * 16 + d["rank"]))
    assert not torch.equal(right, wrong)
