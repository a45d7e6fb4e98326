"""Where the host time of an eager (not graph-replayed) engine step goes: cProfile of a few steps.

    python -m benchmarks.profile_step --model small --device cuda [--out DIR]

Cases: decode-only steps at batch 64 with no adapters and with 32 rank-16 adapters, and mixed steps
(64 decode rows + a 512-token prefill chunk) with 32 adapters, all with CUDA graphs off. Prints the
median wall time of each case and the top functions by own time; the profiles go to DIR when given.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import torch

from benchmarks.models import SPECS, prepare_base
from loquetier import Engine, SamplingParams
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.config import LoRAConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _fill(engine: Engine, batch: int, adapters: list[str | None], tag: str, prompt_len: int = 128) -> None:
    for i in range(batch):
        prompt = torch.randint(3, min(30000, engine.model.cfg.vocab_size), (prompt_len,)).tolist()
        engine.add_request(f"{tag}-{i}", prompt_token_ids=prompt, adapter_id=adapters[i % len(adapters)],
                           sampling=SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))


def _profile(engine: Engine, steps: int, before_step=None) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    times = []
    prof = cProfile.Profile()
    for i in range(steps):
        if before_step is not None:
            before_step(i)
        _sync()
        t = time.perf_counter()
        prof.enable()
        engine.step()
        _sync()
        prof.disable()
        times.append(time.perf_counter() - t)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    return statistics.median(times) * 1e3, buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    spec = SPECS[args.model]
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model, path = prepare_base(spec, Path("/tmp/loquetier-bench"), args.device, dtype)
    del model
    engine = Engine.from_pretrained(path, device=args.device, dtype=dtype, kv_memory_gb=4.0 if args.device == "cuda"
                                    else 0.2, max_num_seqs=128, max_num_batched_tokens=4096, max_prefill_chunk=512,
                                    max_adapter_slots=32, num_train_slots=0, max_lora_rank=16, max_model_len=2048,
                                    cuda_graphs="off", default_tpot_ms=10_000.0,
                                    adapter_cache_bytes=16 << 30)  # 32 adapters of the 8B shape: 5.4 GB
    for i in range(32):
        a = LoRAAdapter.new(LoRAConfig(rank=16, alpha=32, target_modules=TARGETS), engine.model.dims, seed=i)
        for _, b in a.weights.values():
            b.normal_(0, 0.01)
        engine.load_adapter(f"a{i}", a)
    report = []
    cases: list[tuple[str, list[str | None]]] = [("decode b64, no adapters", [None]),
                                                  ("decode b64, 32 adapters", [f"a{i}" for i in range(32)])]
    for name, adapters in cases:
        _fill(engine, 64, adapters, name)
        while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
            engine.step()
        for _ in range(3):
            engine.step()
        ms, text = _profile(engine, args.steps)
        report.append(f"== {name}: median {ms:.2f} ms/step\n{text}")
        print(report[-1].splitlines()[0], flush=True)
        if name.endswith("32 adapters"):
            adapters_ = adapters

            def add_prefill(i: int) -> None:
                _fill(engine, 1, adapters_, f"mixed-{i}", prompt_len=512)

            ms, text = _profile(engine, args.steps, add_prefill)
            report.append(f"== mixed: 64 decode rows + 512-token prefill, 32 adapters: median {ms:.2f} ms/step\n{text}")
            print(report[-1].splitlines()[0], flush=True)
        for rid in list(engine.requests._requests):
            engine.abort(rid)
        engine.step()
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "profile_step.txt").write_text(text)


if __name__ == "__main__":
    main()
