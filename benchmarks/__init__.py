"""Benchmarks for issue 9: LoRA overhead, inference vs PEFT, unified serving + fine-tuning, fine-tuning.

Run each script as a module from the repository root, e.g. ``python -m benchmarks.bench_serving``;
``benchmarks/run_all.sh`` runs them all on the GPU. Only the engine side of loquetier is imported.
"""
