"""GPU check of the whole engine: exactness vs transformers, then mixed serving + training steps.

    python -m benchmarks.checks.check_engine_gpu --out DIR          # on the H200
    python -m benchmarks.checks.check_engine_gpu --device cpu       # CPU smoke run

1. fp32 on the device: a random Llama (GQA, 4 layers) and three LoRA adapters; greedy generation
   through Engine.generate must equal transformers' greedy generate for the base rows, and PEFT's
   for adapter rows.
2. bf16: the same engine serving 64 requests over 8 adapters while two fine-tuning jobs train;
   prints step-time percentiles by step composition and the jobs' tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loquetier import Engine, SamplingParams, TrainingParams  # noqa: E402
from loquetier.engine.events import JobFinished, RequestFinished  # noqa: E402
from loquetier.lora.adapter import LoRAAdapter  # noqa: E402
from loquetier.lora.config import LoRAConfig  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(path: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                      max_position_embeddings=2048, eos_token_id=vocab - 1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(path)


def adapter(engine: Engine, seed: int, rank: int) -> LoRAAdapter:
    a = LoRAAdapter.new(LoRAConfig(rank=rank, alpha=2 * rank, target_modules=TARGETS), engine.model.dims, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _, b in a.weights.values():
        b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return a


def exactness(model_dir: Path, device: str, report: dict) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    engine = Engine.from_pretrained(model_dir, device=device, dtype="float32", kv_memory_gb=1.0,
                                    max_adapter_slots=4, num_train_slots=1)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    prompts = [torch.randint(0, 500, (n,)).tolist() for n in (5, 40, 77, 130)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    base = engine.generate(prompts, sampling=sp)
    ok = []
    for p, o in zip(prompts, base, strict=True):
        ref = hf.generate(torch.tensor([p], device=device), max_new_tokens=12, do_sample=False,
                          eos_token_id=None)[0, len(p):].tolist()
        ok.append(o.token_ids == ref)
    ad = adapter(engine, 3, 8)
    with tempfile.TemporaryDirectory() as d:
        ad.save(d)
        engine.load_adapter("x", d)
        peft = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)))
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft, load_file(os.path.join(d, "adapter_model.safetensors")))
        outs = engine.generate(prompts, ["x"] * len(prompts), sp)
        for p, o in zip(prompts, outs, strict=True):
            ref = peft.generate(input_ids=torch.tensor([p], device=device), max_new_tokens=12, do_sample=False,
                                eos_token_id=None)[0, len(p):].tolist()
            ok.append(o.token_ids == ref)
    report["exact_greedy_matches"] = ok
    print("exactness (base x4, adapter x4):", ok, flush=True)


def mixed(model_dir: Path, device: str, report: dict, num_requests: int) -> None:
    engine = Engine.from_pretrained(model_dir, device=device, dtype="bfloat16", kv_memory_gb=8.0,
                                    max_num_batched_tokens=4096, max_prefill_chunk=2048, max_adapter_slots=12,
                                    num_train_slots=2, max_num_seqs=128, default_tpot_ms=60)
    for i in range(8):
        engine.load_adapter(f"a{i}", adapter(engine, 100 + i, (8, 16, 64)[i % 3]))
    data = [{"prompt_token_ids": torch.randint(0, 1000, (64,)).tolist(),
             "completion_token_ids": torch.randint(0, 1000, (192,)).tolist()} for _ in range(64)]
    for j in range(2):
        engine.add_training_job(f"t{j}", data, TrainingParams(lr=1e-4, max_steps=20, micro_batch_tokens=1024, seed=j),
                                lora=dict(rank=16, alpha=32, target_modules=list(TARGETS)))
    for i in range(num_requests):
        engine.add_request(f"r{i}", prompt_token_ids=torch.randint(0, 1000, (200,)).tolist(),
                           adapter_id=f"a{i % 8}" if i % 9 else None,
                           sampling=SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    times: list[float] = []
    finished, jobs = 0, {}
    while engine.has_work():
        s = time.perf_counter()
        for e in engine.step():
            finished += isinstance(e, RequestFinished)
            if isinstance(e, JobFinished):
                jobs[e.job_id] = e.metrics
        torch.cuda.synchronize() if device.startswith("cuda") else None
        times.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    m = engine.scheduler.metrics
    report["mixed"] = {"wall_s": wall, "steps": len(times), "requests_finished": finished,
                       "step_ms_p50": statistics.median(times) * 1e3,
                       "step_ms_p99": sorted(times)[int(0.99 * (len(times) - 1))] * 1e3,
                       "output_tokens_per_s": finished * 128 / wall,
                       "train_tokens": dict(m.train_tokens_by_job), "jobs": jobs}
    print(json.dumps(report["mixed"], indent=1), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--smlm-fused-decode", choices=("0", "1"), default=None,
                    help="one SMLM launch per LoRA module in decode-sized steps (1) or two (0); default: "
                         "the LOQUETIER_SMLM_FUSED_DECODE environment variable, else 1")
    args = ap.parse_args()
    from loquetier.kernels import fused_decode_enabled, set_fused_decode

    if args.smlm_fused_decode is not None:
        set_fused_decode(args.smlm_fused_decode == "1")
    small = args.device == "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "smlm_fused_decode": fused_decode_enabled()}
    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "model"
        build_model(model_dir, hidden=256 if small else 1024, layers=2 if small else 8, vocab=1000 if small else 32000)
        for name, fn in (("exactness", lambda: exactness(model_dir, args.device, report)),
                         ("mixed", lambda: mixed(model_dir, args.device, report, 8 if small else 64))):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - record and continue with the next check
                report[f"{name}_error"] = repr(exc)
                import traceback

                traceback.print_exc()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "engine_gpu.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
