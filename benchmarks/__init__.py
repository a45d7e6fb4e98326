"""Benchmarks: LoRA overhead, inference vs transformers and PEFT, unified serving + fine-tuning, fine-tuning.

Layout:

- ``benchmarks/<run>.py``: the runs, each an entry point (``python -m benchmarks.bench_serving``,
  ``bench_decode``, ``bench_unified``, ``bench_finetune``, ``bench_kernels``, ``profile_step``,
  ``tune_smlm``, ``host_step``, ``sim_scheduler``); ``benchmarks/run_all.sh`` runs the GPU ones.
- ``benchmarks/harness/``: what the runs share (command line, random models, traces, replays,
  baselines, metrics, report pages, the scheduler's synthetic GPU).
- ``benchmarks/checks/``: GPU correctness checks against transformers and PEFT.

Run from the repository root. Only the engine side of loquetier is imported.
"""
