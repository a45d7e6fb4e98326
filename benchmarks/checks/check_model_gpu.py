"""GPU check of the model core: correctness vs transformers in bf16, then attention variants timed.

    python -m benchmarks.checks.check_model_gpu --out docs/benchmarks/model_gpu.json   # on the H200
    python -m benchmarks.checks.check_model_gpu --device cpu --small                  # CPU smoke run

1. Correctness: a random-weight Llama (GQA) built with transformers, saved, loaded by us. One mixed
   batch (prefill chunks + decode rows) per attention impl (reference, sdpa, flash, triton) vs HF's logits
   for the same rows (bf16 and an fp32 copy of HF). Then training rows with two LoRA slots: loss and
   pool gradients for every impl vs the reference impl.
2. Attention timing at the Llama-3-8B attention shape (32 q heads, 8 kv heads, head_dim 128):
   varlen fwd+bwd (train rows), paged decode (many rows, and few long rows) and chunked prefill over a
   paged cache; decode also times the Triton launcher alone at forced context-partition counts
   (``triton/N``, ``*`` = the count ``num_splits_for`` picks); each variant
   timed twice (median of CUDA-event runs) and reported as a multiple of its KV-read floor
   (bytes / 4.27 TB/s). Prints a table last and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loquetier.engine.kv_cache import BlockManager
from loquetier.kernels import backend_for
from loquetier.lora.pool import LoRASlotPool
from loquetier.models import BatchBuilder, LlamaModel, weighted_loss
from loquetier.models.attention import paged_attention, varlen_attention, write_kv

HBM_BYTES_PER_S = 4.27e12


def _time_ms(fn, device: torch.device, reps: int = 10) -> float:
    fn()  # warm-up (and compile)
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) * 1e3 / reps
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _impls(device: torch.device, decode: bool = False) -> list[str]:
    """Attention impls to compare; ``decode``: also ``triton`` (it differs from flash on decode rows only)."""
    cuda = device.type == "cuda"
    return ["reference", "sdpa"] + (["flash"] if cuda else []) + (["triton"] if cuda and decode else [])


def check_correctness(device: torch.device, small: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dims = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=1000) if small else dict(
                hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000)  # fmt: skip
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf = LlamaForCausalLM(LlamaConfig(**dims, initializer_range=0.05)).to(device, dtype).eval()
    results: dict = {"dtype": str(dtype)}
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = LlamaModel.from_pretrained(tmp, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(1)
    prompts = {f"s{i}": torch.randint(0, dims["vocab_size"], (n,), generator=gen).tolist()
               for i, n in enumerate([37, 200, 5, 129])}  # fmt: skip
    hf32 = LlamaForCausalLM(hf.config).to(device).eval()
    hf32.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
    with torch.no_grad():
        ref = {s: hf(torch.tensor([p], device=device)).logits[0, -1].float() for s, p in prompts.items()}
        ref32 = {s: hf32(torch.tensor([p], device=device)).logits[0, -1].float() for s, p in prompts.items()}
    for impl in _impls(device, decode=True):
        try:
            results[f"logits_{impl}"] = _mixed_step(model, impl, prompts, ref, ref32, device)
        except Exception as exc:  # report and go on: the lead reads every row
            results[f"logits_{impl}"] = {"error": repr(exc)}
    try:
        results["grads"] = _check_grads(model, device, dims["vocab_size"])
    except Exception as exc:
        results["grads"] = {"error": repr(exc)}
    return results


def _mixed_step(  # noqa: PLR0917
    model: LlamaModel, impl: str, prompts: dict, ref: dict, ref32: dict, device: torch.device
) -> dict:
    model.attn_impl = impl
    bm, kv = BlockManager(256, 16), model.make_kv_cache(256, 16)
    # step 1: s0, s1 prefill (s1 in two chunks: the first now), s2/s3 prefill minus their last token
    b = BatchBuilder(16)
    for s, p in prompts.items():
        bm.allocate(s, p[:-1] if s in ("s2", "s3") else p)
        end = {"s0": 37, "s1": 120, "s2": 4, "s3": 128}[s]
        b.add_prefill(s, p[:end], 0, bm.block_table(s), -1, s == "s0")
    with torch.no_grad():
        model.forward(b.build(device), kv)
    b = BatchBuilder(16).add_prefill("s1", prompts["s1"][120:], 120, bm.block_table("s1"))
    for s in ("s2", "s3"):  # decode rows: the last prompt token
        bm.append(s, prompts[s][-1:])
        b.add_decode(s, prompts[s][-1], len(prompts[s]) - 1, bm.block_table(s))
    batch = b.build(device)
    with torch.no_grad():
        out = model.forward(batch, kv)
    errs = {}
    for s, row in zip(batch.logits_seq_ids, out.logits, strict=True):
        scale = float(ref32[s].abs().max())
        errs[s] = {"vs_hf_bf16": float((row - ref[s]).abs().max()) / scale,
                   "vs_hf_fp32": float((row - ref32[s]).abs().max()) / scale}  # fmt: skip
    return errs


def _check_grads(model: LlamaModel, device: torch.device, vocab: int) -> dict:
    pool = LoRASlotPool(model.dims, num_slots=2, max_rank=16, num_train_slots=2, dtype=model.cfg.dtype,
                        device=device)  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    for slot, r in ((0, 8), (1, 16)):
        w = {}
        for (layer, name), lora in pool.modules.items():
            w[(layer, name)] = (0.05 * torch.randn(r, lora.in_features, generator=gen),
                                0.05 * torch.randn(lora.out_features, r, generator=gen))  # fmt: skip
        pool.write_slot(slot, {k: (a.to(device), b.to(device)) for k, (a, b) in w.items()}, scale=2.0)
    model.attach_lora_pool(pool)
    b = BatchBuilder(16)
    for i, n in enumerate([300, 77, 512]):
        b.add_train(torch.randint(0, vocab, (n,), generator=gen).tolist(), None, i % 2, group=i % 2)
    batch = b.build(device)
    out: dict = {"smlm_backend": backend_for(device).name}
    grads = {}
    for impl in _impls(device):
        model.attn_impl = impl
        for lora in pool.modules.values():
            lora.grad_a.zero_()
            lora.grad_b.zero_()
        res = model.forward(batch)
        weighted_loss(res.loss_sum, res.token_count.float()).backward()
        grads[impl] = torch.cat(
            [torch.cat([m.grad_a.flatten(), m.grad_b.flatten()]) for m in pool.modules.values()]
        )
        out[f"loss_{impl}"] = (res.loss_sum / res.token_count).tolist()
    for impl, g in grads.items():
        out[f"grad_rel_err_{impl}"] = float((g - grads["reference"]).norm() / grads["reference"].norm())
    model.attach_lora_pool(None)
    return out


def time_attention(device: torch.device, small: bool) -> list[dict]:
    hq, hkv, d = (8, 2, 64) if small else (32, 8, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bs, rows = 16, []
    scale = d**-0.5

    def rnd(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    # train: varlen fwd+bwd
    lens = [256] * 4 if small else [1024] * 8
    meta = BatchBuilder(bs)
    for n in lens:
        meta.add_train([0] * n)
    train = meta.build(device).train
    t = sum(lens)
    q, k, v = rnd(t, hq, d, grad=True), rnd(t, hkv, d, grad=True), rnd(t, hkv, d, grad=True)
    for impl in _impls(device):
        if impl == "reference" and not small:
            continue

        def step(impl: str = impl) -> None:
            varlen_attention(q, k, v, train, scale, impl=impl).sum().backward()

        rows.append({"case": f"varlen fwd+bwd {len(lens)}x{lens[0]}", "impl": impl,
                     "ms": [_time_ms(step, device) for _ in range(2)]})  # fmt: skip
    # paged: decode rows, and prefill chunks over a cached prefix
    cases = [("decode", 16 if small else 64, 1, 512 if small else 2048),
             ("decode", 2 if small else 4, 1, 1023 if small else 8191),  # few rows: split-K territory
             ("prefill", 2 if small else 4, 64 if small else 512, 256 if small else 1536)]  # fmt: skip
    for name, num_seqs, q_len, cached in cases:
        ctx = cached + q_len
        nb_per = (ctx + bs - 1) // bs
        kc, vc = rnd(num_seqs * nb_per + 1, bs, hkv, d), rnd(num_seqs * nb_per + 1, bs, hkv, d)
        perm = torch.randperm(num_seqs * nb_per).tolist()  # scattered blocks
        b = BatchBuilder(bs)
        for s in range(num_seqs):
            table = perm[s * nb_per : (s + 1) * nb_per]
            if q_len == 1:
                b.add_decode(s, 0, cached, table)
            else:
                b.add_prefill(s, [0] * q_len, cached, table)
        paged = b.build(device).paged
        qp = rnd(num_seqs * q_len, hq, d)
        write_kv(kc, vc, rnd(num_seqs * q_len, hkv, d), rnd(num_seqs * q_len, hkv, d), paged.slot_mapping)
        floor_ms = 2 * num_seqs * ctx * hkv * d * kc.element_size() / HBM_BYTES_PER_S * 1e3
        ref = paged_attention(qp, kc, vc, paged, scale, impl="sdpa").float()
        if q_len == 1 and device.type == "cuda":
            rows += _time_triton_splits(qp, kc, vc, paged, scale, ref, floor_ms, name, device)
        for impl in _impls(device, decode=q_len == 1):
            try:
                with torch.no_grad():
                    got = paged_attention(qp, kc, vc, paged, scale, impl=impl).float()
            except Exception as exc:
                rows.append({"case": f"paged {name}", "impl": impl, "ms": [], "error": repr(exc)})
                continue
            with torch.no_grad():
                ms = [_time_ms(lambda impl=impl: paged_attention(qp, kc, vc, paged, scale, impl=impl), device)
                      for _ in range(2)]  # fmt: skip
            rows.append({"case": f"paged {name} {num_seqs}x(q={q_len}, ctx={ctx})", "impl": impl, "ms": ms,
                         "x_floor": statistics.mean(ms) / floor_ms,
                         "max_err_vs_sdpa": float((got - ref).abs().max())})  # fmt: skip
    return rows


def _time_triton_splits(  # noqa: PLR0917
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, paged, scale: float, ref: torch.Tensor,
    floor_ms: float, name: str, device: torch.device,
) -> list[dict]:
    """The Triton decode launcher alone at forced context-partition counts (to tune ``num_splits_for``)."""
    from loquetier.kernels.paged_attention import num_splits_for, paged_decode

    auto = num_splits_for(paged.num_seqs, kc.shape[2], paged.max_context_len, device)
    rows = []
    for splits in sorted({1, 2, 4, 8, auto}):
        def call(splits: int = splits) -> torch.Tensor:
            return paged_decode(q, kc, vc, paged.block_tables, paged.context_lens, scale,
                                paged.max_context_len, None, splits)  # fmt: skip

        try:
            with torch.no_grad():
                got = call().float()
                ms = [_time_ms(call, device) for _ in range(2)]
        except Exception as exc:
            rows.append({"case": f"paged {name}", "impl": f"triton/{splits}", "ms": [], "error": repr(exc)})
            continue
        rows.append({"case": f"paged {name} {paged.num_seqs}x(q=1, ctx={paged.max_context_len})",
                     "impl": f"triton/{splits}" + ("*" if splits == auto else ""), "ms": ms,
                     "x_floor": statistics.mean(ms) / floor_ms,
                     "max_err_vs_sdpa": float((got - ref).abs().max())})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    correctness = check_correctness(device, args.small)
    timing = time_attention(device, args.small)
    result = {"info": info, "correctness": correctness, "attention": timing}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(correctness, indent=1))
    print(f"\n{'case':<42} {'impl':<10} {'ms (2 runs)':<18} {'x floor':>8} {'err':>9}")
    for r in timing:
        ms = "/".join(f"{m:.3f}" for m in r["ms"])
        print(f"{r['case']:<42} {r['impl']:<10} {ms:<18} {r.get('x_floor', float('nan')):>8.1f} "
              f"{r.get('max_err_vs_sdpa', float('nan')):>9.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
