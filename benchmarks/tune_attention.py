"""Launch parameters of the paged decode attention kernel, timed the way a decode step runs it.

    python -m benchmarks.tune_attention --out DIR     # ~2 min on one GPU; DIR/tune_attention.{json,md}

One decode step's attention of a Llama-3-8B shape (32 layers, each with a KV cache of its own so
that no layer reads another's keys from L2; 32 query heads over 8 KV heads of 128; pages of 16
tokens, scattered) is captured in one CUDA graph per variant (``kernels.paged_attention.AttnTuning``
fields: keys per loop step, warps, pipeline stages, and the context-partition rule) and replayed.
Contexts are drawn per sequence from 129-328 tokens (the offline and decode benchmarks' 128- and
200-token prompts with up to 128 new tokens) at batches 32, 64 and 128, and from 1,800-2,100 tokens
at batch 16 (long chats). Every variant is first checked against the torch reference. Reported: µs
per layer (median of replays) against the KV-read floor (each visible key and value once at 4.27
TB/s); variants are ranked by the mean over the cases of their time relative to the defaults'.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import random
import statistics
from typing import Any

PEAK_BYTES_PER_S = 4.27e12
DEVICE = "cuda"
LAYERS, HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 32, 8, 128, 16
# (label, batch, contexts drawn from this range)
CASES = [("batch 32", 32, (129, 328)), ("batch 64", 64, (129, 328)), ("batch 128", 128, (129, 328)),
         ("batch 16, long", 16, (1800, 2100))]
DEFAULT = "defaults"
PREVIOUS = "block_n=32,warps=4"  # the defaults before this page's first run
# (block_n, warps, stages) x (waves, min_split_tokens): the partition rule splits until about `waves`
# programs per SM run, no partition shorter than `min_split_tokens` keys
TILES = [(n, w, s) for n, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4))]
RULES = [(2, 256), (4, 64), (8, 64)]


def variants() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {DEFAULT: {}}
    base = {f.name: f.default for f in dataclasses.fields(_tuning_cls())}
    for (n, w, s), (waves, min_split) in itertools.product(TILES, RULES):
        over = {"block_n": n, "warps": w, "stages": s, "waves": waves, "min_split_tokens": min_split}
        over = {k: v for k, v in over.items() if base[k] != v}
        if over:
            out[",".join(f"{k}={v}" for k, v in over.items())] = over
    return out


def _tuning_cls() -> Any:
    from loquetier.kernels.paged_attention import AttnTuning

    return AttnTuning


def _case(batch: int, context: tuple[int, int], gen: Any, rng: random.Random) -> dict[str, Any]:
    """Per layer a scattered paged cache; one q per layer; block tables and context lengths shared."""
    import torch

    ctx = [rng.randint(*context) for _ in range(batch)]
    pages = [(c + PAGE - 1) // PAGE for c in ctx]
    num_blocks = sum(pages)
    width = max(pages)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(batch))
    at = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[at : at + n]
        at += n
    shape = (num_blocks, PAGE, KV_HEADS, HEAD_DIM)
    layers = [(torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=gen),
               torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=gen),
               torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen))
              for _ in range(LAYERS)]  # fmt: skip
    floor_us = 2 * sum(ctx) * KV_HEADS * HEAD_DIM * 2 / PEAK_BYTES_PER_S * 1e6
    return {"ctx": ctx, "tables": tables.to(DEVICE), "lens": torch.tensor(ctx, dtype=torch.int32, device=DEVICE),
            "layers": layers, "floor_us": floor_us}


def _reference(case: dict[str, Any], layer: int) -> Any:
    """softmax(q k^T / sqrt(d)) v per sequence in fp32, from the pages of its table."""
    import torch

    kc, vc, q = case["layers"][layer]
    out = torch.empty(q.shape, dtype=torch.float32, device=DEVICE)
    for s, c in enumerate(case["ctx"]):
        blocks = case["tables"][s, : (c + PAGE - 1) // PAGE].long()
        k = kc[blocks].reshape(-1, KV_HEADS, HEAD_DIM)[:c].float().repeat_interleave(HEADS // KV_HEADS, 1)
        v = vc[blocks].reshape(-1, KV_HEADS, HEAD_DIM)[:c].float().repeat_interleave(HEADS // KV_HEADS, 1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[s].float(), k) * HEAD_DIM**-0.5, dim=-1)
        out[s] = torch.einsum("ht,thd->hd", p, v)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from triton.testing import do_bench

    from benchmarks.harness.common import captured
    from loquetier.kernels import paged_attention as pa

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rng = random.Random(0)
    names = variants()
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                               "gpu": torch.cuda.get_device_name(), "batches": {}}
    for label, batch, context in CASES:
        case = _case(batch, context, gen, rng)
        ref = _reference(case, 0)
        max_ctx = max(case["ctx"])
        row: dict[str, Any] = {"floor_us": case["floor_us"], "variants": {}}
        for name, over in names.items():
            tuning = dataclasses.replace(pa.AttnTuning(), **over)

            def step(tuning: Any = tuning, case: dict[str, Any] = case) -> None:
                for kc, vc, q in case["layers"]:
                    pa.paged_decode(q, kc, vc, case["tables"], case["lens"], HEAD_DIM**-0.5, max_ctx,
                                    tuning=tuning)  # fmt: skip

            try:
                kc, vc, q = case["layers"][0]
                got = pa.paged_decode(q, kc, vc, case["tables"], case["lens"], HEAD_DIM**-0.5, max_ctx,
                                      tuning=tuning).float()  # fmt: skip
                err = float((got - ref).abs().max() / ref.abs().max())
                graph = captured(step)
                ms = [do_bench(graph.replay, warmup=3, rep=30, return_mode="median") for _ in range(2)]
                splits = pa.num_splits_for(batch, KV_HEADS, max_ctx, torch.device(DEVICE), tuning)
                row["variants"][name] = {"us": statistics.median(ms) * 1e3 / LAYERS, "rel_err": err, "splits": splits}
            except Exception as exc:  # noqa: BLE001 (a variant a GPU cannot run is a result)
                row["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        results["batches"][label] = row
        best = sorted((v["us"], n) for n, v in row["variants"].items() if "us" in v)[:3]
        print(f"{label}: floor {case['floor_us']:.1f} us, default {row['variants'][DEFAULT].get('us')}, "
              f"best {best}", flush=True)
        del case
        torch.cuda.empty_cache()
    return results


def _total(results: dict[str, Any], name: str) -> float:
    """The mean over the cases of the variant's time / the defaults' (inf: an error or a wrong result)."""
    batches = results["batches"].values()
    us = [b["variants"].get(name, {}).get("us") for b in batches]
    ok = all(b["variants"].get(name, {}).get("rel_err", 1.0) < 3e-2 for b in batches)
    base = [b["variants"][DEFAULT].get("us") for b in batches]
    if any(u is None for u in us) or not ok or any(not x for x in base):
        return float("inf")
    return statistics.fmean(u / x for u, x in zip(us, base, strict=True))


def pick(results: dict[str, Any]) -> str:
    """``LOQUETIER_ATTN_TUNING=...`` of the variant with the least time over the batches when it beats
    the defaults by 3 % or more ("" otherwise)."""
    names = list(next(iter(results["batches"].values()))["variants"])
    best = min(names, key=lambda n: _total(results, n))
    if best == DEFAULT or _total(results, best) > 0.97:
        return ""
    return f"{best}\n"


def table(results: dict[str, Any], top: int = 12, extra: tuple[str, ...] = ()) -> str:
    """The defaults, the ``top`` fastest variants and the ``extra`` ones, one row each."""
    names = list(next(iter(results["batches"].values()))["variants"])
    ranked = sorted(names, key=lambda n: _total(results, n))
    shown = [DEFAULT, *[n for n in ranked if n != DEFAULT][:top], *[n for n in extra if n in names]]
    batches = results["batches"]
    lines = ["| variant | " + " | ".join(batches) + " | mean of time / defaults' |",
             "|---|" + "---|" * (len(batches) + 1)]
    for name in shown:
        cells = []
        for b in batches.values():
            v = b["variants"].get(name, {})
            if "us" not in v:
                cells.append("error")
                continue
            wrong = "" if v["rel_err"] < 3e-2 else " WRONG"
            cells.append(f"{v['us']:.1f} us ({v['us'] / b['floor_us']:.2f}x floor, {v['splits']} split"
                         f"{'s' if v['splits'] > 1 else ''}){wrong}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_total(results, name):.3f} |")
    lines.append("| KV-read floor | " + " | ".join(f"{b['floor_us']:.1f} us" for b in batches.values()) + " | |")
    return "\n".join(lines)


def page(results: dict[str, Any]) -> str:
    n = len(next(iter(results["batches"].values()))["variants"])
    return (f"# Paged decode attention launch parameters, one 8B decode step\n\n{results['date']}, {results['gpu']}, "
            "`python -m benchmarks.tune_attention`. µs per layer from one CUDA graph of 32 layers' "
            "`paged_decode` calls (each layer its own scattered cache; 32 query heads over 8 KV heads of 128, "
            "pages of 16, contexts 129-328 tokens, or 1,800-2,100 for the long case); the defaults of "
            f"`kernels.paged_attention.AttnTuning`, the fastest {min(12, n - 1)} of {n - 1} variants by their mean "
            f"time relative to the defaults', and `{PREVIOUS}` (the defaults before this page's first run; "
            "`LOQUETIER_ATTN_TUNING` spells a variant the same way). Splits: context partitions per sequence, "
            "from the partition rule (`waves`, `min_split_tokens`); more than one adds the combine kernel.\n\n"
            + table(results, extra=(PREVIOUS,)) + "\n")


def main() -> None:
    from benchmarks.harness.common import tuner_outputs, tuner_parser

    ap = tuner_parser(__doc__, "LOQUETIER_ATTN_TUNING", "the fastest variant over the cases")
    args, _ = ap.parse_known_args()
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    tuner_outputs(args, "tune_attention", results, pick(results), page(results))


if __name__ == "__main__":
    main()
