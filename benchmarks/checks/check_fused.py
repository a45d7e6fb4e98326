"""How far each bf16 inference path's logits are from an fp32 reference: fused elementwise kernels or not.

    python -m benchmarks.checks.check_fused --model 8b --device cuda [--out DIR]

Two paths in bf16 compute the same rows (32 prompts of 200 random tokens, one adapter each of 32
rank-16 adapters on all seven targets, round robin): the torch elementwise ops, and the fused
Triton kernels (``kernels/fused.py``). The same rows in fp32 are the reference. For each bf16 path
it reports the largest and mean |logit - reference|, the share of rows whose argmax is the
reference's, and that share among rows whose reference top-2 margin exceeds the path's own error
(rows where a bf16 rounding cannot decide the token). It also reports the agreement of the two bf16
paths with each other, which is what an argmax comparison between them measures.

A random-weight model's logits over 128k tokens have top-2 margins of a few hundredths, well
inside bf16's rounding through 32 layers, so two correct bf16 paths disagree on many rows' argmax;
the question the check answers is whether the fused path is further from the truth than the
unfused one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.models import SPECS, prepare_base, write_adapters
from loquetier import Engine
from loquetier.kernels import fused
from loquetier.models.batch import BatchBuilder


def _logits(engine: Engine, prompts: list[list[int]], adapters: list[str | None]) -> torch.Tensor:
    """Last-position logits [n, V] fp32 of each prompt, prefilled in one eager forward."""
    b = BatchBuilder(engine.config.block_size)
    ids = []
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        sid = f"chk-{i}"
        engine.blocks.allocate(sid, prompt)
        ids.append(sid)
        slot = -1 if adapter is None else engine.adapters.acquire_slot(adapter)
        b.add_prefill(sid, prompt, 0, engine.blocks.block_table(sid), slot=slot, needs_logits=True)
    try:
        with torch.no_grad():
            fb = b.build(engine.device)
            out = engine.model.forward(fb, engine.kv)
        assert out.logits is not None
        order = {s: k for k, s in enumerate(fb.logits_seq_ids)}
        return out.logits[[order[s] for s in ids]].float()
    finally:
        for sid in ids:
            engine.blocks.free(sid)


def _compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (got - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    err = diff.max(dim=-1).values
    agree = got.argmax(-1) == ref.argmax(-1)
    decided = margin > 2 * err
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "argmax_agreement": agree.float().mean().item(),
            "rows_decided": int(decided.sum().item()),
            "argmax_agreement_decided": agree[decided].float().mean().item() if decided.any() else float("nan"),
            "median_ref_margin": margin.median().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/loquetier-bench"))
    args = ap.parse_args()
    spec = SPECS[args.model]
    model, path = prepare_base(spec, args.cache, args.device, "bfloat16")
    del model
    ids = [f"r16-{i:02d}" for i in range(32)]
    write_adapters(spec, args.cache / "adapters-r16", ids, [16] * 32)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, min(30000, spec.vocab_size), (args.rows, 200), generator=gen).tolist()
    adapters: list[str | None] = [ids[i % len(ids)] for i in range(args.rows)]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "rows": args.rows, "model": args.model}
    logits: dict[str, torch.Tensor] = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine.from_pretrained(path, device=args.device, dtype=dtype, max_num_seqs=64,
                                        max_adapter_slots=40, num_train_slots=0, max_lora_rank=16,
                                        kv_memory_gb=4.0, max_model_len=512, cuda_graphs="off",
                                        max_num_batched_tokens=8192, max_prefill_chunk=8192)
        for adapter_id in ids:
            engine.load_adapter(adapter_id, args.cache / "adapters-r16" / adapter_id)
        variants = [("fp32", None)] if dtype == "float32" else [("bf16 torch ops", False), ("bf16 fused", True)]
        for name, on in variants:
            fused.force(on)
            try:
                for label, rows in (("lora", adapters), ("base", [None] * args.rows)):
                    logits[f"{name} {label}"] = _logits(engine, prompts, rows).cpu()
            finally:
                fused.force(None)
        del engine
        torch.cuda.empty_cache()
    for label in ("lora", "base"):
        ref = logits[f"fp32 {label}"]
        for name in ("bf16 torch ops", "bf16 fused"):
            results[f"{name} vs fp32, {label}"] = _compare(logits[f"{name} {label}"], ref)
        results[f"fused vs torch ops, {label}"] = _compare(logits[f"bf16 fused {label}"],
                                                           logits[f"bf16 torch ops {label}"])
    for key, value in results.items():
        print(key, json.dumps(value) if isinstance(value, dict) else value, flush=True)
    targets = []
    for label in ("lora", "base"):
        ratio = (results[f"bf16 fused vs fp32, {label}"]["mean_abs_diff"]
                 / results[f"bf16 torch ops vs fp32, {label}"]["mean_abs_diff"])
        targets.append({"name": f"fused bf16 no further from fp32 than torch-ops bf16 ({label}), mean |dlogit| ratio",
                        "goal": "<= 1.05x", "measured": ratio, "ok": ratio <= 1.05})
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "fused.json").write_text(json.dumps({"results": results, "targets": targets}, indent=1))


if __name__ == "__main__":
    main()
