"""Decode-step time at a fixed batch vs its memory floor, with and without 32 adapters.

    python -m benchmarks.bench_decode --model 8b --device cuda --out DIR

64 requests (200-token prompts) are prefilled, then pure decode steps (every row one token) are
timed; the floor is the weight bytes one step must read / 4.27 TB/s. A torch profile of one decode
step splits the time into GPU kernel time and the rest (host work: Python, launches, batch building).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness.models import SPECS, prepare_base
from loquetier import Engine, SamplingParams
from loquetier.engine.graphs import DecodeGraphs, DecodeRow
from loquetier.kernels import fused, set_lora_overlap
from loquetier.lora.adapter import LoRAAdapter
from loquetier.lora.config import LoRAConfig
from loquetier.models import llama
from loquetier.models.batch import BatchBuilder

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HBM = 4.27e12


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_steps(engine: Engine, steps: int) -> list[float]:
    """Seconds per decode step over ``steps`` calls of ``engine.step()``; a call that ran a decode window
    of k steps counts as k steps of a k-th of its time each."""
    times = []
    for _ in range(steps):
        before = engine.num_steps
        _sync()
        t = time.perf_counter()
        engine.step()
        _sync()
        made = max(1, engine.num_steps - before)
        times += [(time.perf_counter() - t) / made] * made
    return times


def _pipelined_ms(engine: Engine, steps: int) -> float:
    """Milliseconds per decode step over ``steps`` calls of ``engine.step()`` with one synchronization
    at the end: the rate of the engine's own loop, its host work beside the GPU's (``_timed_steps``
    synchronizes around each call, so a call's host work adds to its time)."""
    _sync()
    before, t = engine.num_steps, time.perf_counter()
    while engine.num_steps - before < steps:  # a call that runs a decode window makes several steps
        engine.step()
    _sync()
    return (time.perf_counter() - t) / max(1, engine.num_steps - before) * 1e3


def _profiled_gpu_ms(engine: Engine) -> float:
    from torch.profiler import ProfilerActivity, profile

    before = engine.num_steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        _sync()
    made = max(1, engine.num_steps - before)  # a decode window makes several steps
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    kernels = sorted((e for e in averages if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    TOP_KERNELS[:] = [(e.key[:90], e.count // made, round(e.self_device_time_total / 1e3 / made, 4))
                      for e in kernels[:16]]  # (name, launches a step, ms a step)
    return sum(e.self_device_time_total for e in averages) / 1e3 / made


TOP_KERNELS: list[tuple[str, int, float]] = []  # the last profiled step's kernels by GPU time


def _rows(engine: Engine) -> tuple[list[DecodeRow], BatchBuilder]:
    """The running sequences' next decode rows, as graph rows and as a plain batch."""
    rows = []
    b = BatchBuilder(engine.config.block_size)
    for seq in engine.scheduler.running:
        table = engine.blocks.block_table(seq.seq_id)
        if len(table) * engine.config.block_size <= seq.num_computed_tokens:
            continue  # its next block is allocated by the next scheduled step, not here
        slot = engine.runner._slot(seq.adapter_id)
        rows.append(DecodeRow(seq.seq_id, seq.token_ids[-1], seq.num_computed_tokens, table, slot))
        b.add_decode(seq.seq_id, seq.token_ids[-1], seq.num_computed_tokens, table, slot=slot)
    return rows, b


def _compare_graphs(engine: Engine, first: DecodeGraphs, second: DecodeGraphs) -> dict[str, float]:
    """One decode step's logits from two graph sets on the same rows and state: whether they are the
    same bits (both write the same K/V values at the same slots)."""
    rows, _ = _rows(engine)
    if not rows:
        return {}
    with torch.no_grad():
        a, ids_a = first.run(rows)
        a = a.clone()
        b, ids_b = second.run(rows)
    assert ids_a == ids_b
    return {"max_abs_diff": (a - b).abs().max().item(), "same_bits": float(torch.equal(a, b))}


def _check_graph_logits(engine: Engine, graphs: DecodeGraphs, fused_graph: bool = False) -> dict[str, float]:
    """One decode step's logits from the captured graph vs the plain forward (torch elementwise ops),
    same rows, same state (both write the same K/V values at the same slots)."""
    rows, b = _rows(engine)
    if not rows:  # every row is about to cross into a new block: check at the next bucket capture
        return {}
    with torch.no_grad():
        fb = b.build(engine.device)
        fused.force(False)
        plain = engine.model.forward(fb, engine.kv).logits
        fused.force(fused_graph)
        got, ids = graphs.run(rows)
        fused.force(None)
    assert plain is not None
    order = {sid: i for i, sid in enumerate(fb.logits_seq_ids)}
    plain = plain[[order[i] for i in ids]]
    diff = (got - plain).abs().max().item()
    scale = plain.abs().max().item()
    agree = (got.argmax(-1) == plain.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff, "max_abs_logit": scale, "argmax_agreement": agree}


def _carry_ab(engine: Engine, graphs: DecodeGraphs, fused_graphs: DecodeGraphs, steps: int) -> dict[str, float]:
    """The fused graph against one captured with each layer's MLP output added at the layer's end
    (``llama.CARRY_MLP_OUTPUT`` off: one more elementwise launch a layer), two rounds each, timed
    step by step and pipelined; whether the two give the same logits bits. The switch follows the
    graph set in use: a set captures its graph at its first step."""
    added = DecodeGraphs(engine.model, engine.kv, graphs.max_batch, graphs.max_model_len,
                         graphs.scratch_block, mode=graphs.mode)
    sets = {"carry": fused_graphs, "add": added}

    def use(name: str) -> None:
        llama.CARRY_MLP_OUTPUT = name == "carry"
        engine.runner.graphs = sets[name]

    out: dict[str, float] = {}
    times: dict[str, list[float]] = {"carry": [], "add": [], "carry_pipelined": [], "add_pipelined": []}
    rows = len(engine.scheduler.running)
    try:
        use("add")  # ``added`` captures its graph in the comparison, with the add per layer
        out |= {f"carry_vs_add_{k}": v for k, v in _compare_graphs(engine, fused_graphs, added).items()}
        for _ in range(2):
            for name in ("carry", "add"):
                use(name)
                times[name] += _timed_steps(engine, steps)
                times[f"{name}_pipelined"].append(_pipelined_ms(engine, steps))
        use("add")
        out["fused_graph_add_gpu_kernel_ms_per_step"] = _profiled_gpu_ms(engine)
        if len(engine.scheduler.running) != rows:  # a shrinking batch would time smaller steps
            raise RuntimeError(f"{rows - len(engine.scheduler.running)} sequences finished during the timing")
    finally:
        use("carry")
    for name in ("carry", "add"):
        out[f"fused_graph_{name}_step_ms_median"] = statistics.median(times[name]) * 1e3
        out[f"fused_graph_{name}_pipelined_ms"] = statistics.median(times[f"{name}_pipelined"])
    return out


def run_case(engine: Engine, batch: int, adapters: list[str | None], steps: int,
             overlaps: tuple[str, ...] = ()) -> dict[str, float]:
    for i in range(batch):
        prompt = torch.randint(3, min(30000, engine.model.cfg.vocab_size), (200,)).tolist()
        engine.add_request(f"d{len(adapters)}-{i}-{time.time()}", prompt_token_ids=prompt,
                           adapter_id=adapters[i % len(adapters)],
                           # every timing below at the full batch: 1,800 tokens outlast the case's ~1,100 steps
                           sampling=SamplingParams(max_tokens=1800, temperature=0.0, ignore_eos=True))
    graphs = engine.runner.graphs
    engine.runner.graphs = None
    while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    # first (every block table already holds the next position): captures this bucket's graph
    check = _check_graph_logits(engine, graphs) if graphs is not None else {}
    eager = _timed_steps(engine, steps)
    eager_gpu = _profiled_gpu_ms(engine)
    out: dict[str, float] = {"step_ms_median": statistics.median(eager) * 1e3, "step_ms_min": min(eager) * 1e3,
                             "gpu_kernel_ms_per_step": eager_gpu}
    if graphs is not None:
        engine.runner.graphs = graphs
        before = engine.runner.num_graph_steps
        replayed = _timed_steps(engine, steps)
        assert engine.runner.num_graph_steps - before == len(replayed), "decode steps did not replay graphs"
        out |= {"graph_step_ms_median": statistics.median(replayed) * 1e3, "graph_step_ms_min": min(replayed) * 1e3,
                "graph_gpu_kernel_ms_per_step": _profiled_gpu_ms(engine), **{f"graph_{k}": v for k, v in check.items()}}
        # the same with the fused elementwise kernels (kernels/fused.py): eager steps, then a new graph
        fused.force(True)
        try:
            engine.runner.graphs = None
            out["fused_step_ms_median"] = statistics.median(_timed_steps(engine, steps)) * 1e3
            fused_graphs = DecodeGraphs(engine.model, engine.kv, graphs.max_batch, graphs.max_model_len,
                                        graphs.scratch_block, mode=graphs.mode)
            check = _check_graph_logits(engine, fused_graphs, fused_graph=True)
            fused.force(True)
            engine.runner.graphs = fused_graphs
            replayed = _timed_steps(engine, steps)
            out |= {"fused_graph_step_ms_median": statistics.median(replayed) * 1e3,
                    "fused_graph_gpu_kernel_ms_per_step": _profiled_gpu_ms(engine),
                    "fused_graph_top_kernels": list(TOP_KERNELS),
                    **{f"fused_graph_{k}": v for k, v in check.items()}}
            out |= _carry_ab(engine, graphs, fused_graphs, steps)
            for mode in overlaps:  # fused graphs with the LoRA shrinks beside the base GEMMs (1) or not (0)
                try:
                    set_lora_overlap(mode == "1")
                    side = DecodeGraphs(engine.model, engine.kv, graphs.max_batch, graphs.max_model_len,
                                        graphs.scratch_block, mode=graphs.mode)
                    same = _compare_graphs(engine, fused_graphs, side)
                    engine.runner.graphs = side
                    replayed = _timed_steps(engine, steps)
                    out |= {f"overlap_{mode}_graph_step_ms_median": statistics.median(replayed) * 1e3,
                            f"overlap_{mode}_graph_gpu_kernel_ms_per_step": _profiled_gpu_ms(engine),
                            f"overlap_{mode}_graph_top_kernels": list(TOP_KERNELS),
                            **{f"overlap_{mode}_vs_fused_graph_{k}": v for k, v in same.items()}}
                except Exception as exc:  # noqa: BLE001 - the numbers above stay
                    out[f"overlap_{mode}_error"] = repr(exc)[:500]
                finally:
                    set_lora_overlap(None)
                    engine.runner.graphs = fused_graphs
        except Exception as exc:  # noqa: BLE001 - an untried kernel must not lose the numbers above
            out["fused_error"] = repr(exc)[:500]
        finally:
            fused.force(None)
            engine.runner.graphs = graphs
    for rid in list(engine.requests._requests):
        engine.abort(rid)
    engine.step()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cuda-graphs", default="auto", help="engine cuda_graphs: auto | on | off | eager")
    ap.add_argument("--quick", action="store_true", help="8 timed steps per variant")
    ap.add_argument("--lora-overlap", default="0,1",
                    help="time the fused graph again with its LoRA shrinks beside the base GEMMs (1) or not (0), "
                         "each captured anew, in this order (comma list; '' none)")
    args = ap.parse_args()
    overlaps = tuple(m for m in args.lora_overlap.split(",") if m)
    if args.quick:
        args.steps = min(args.steps, 8)
    spec = SPECS[args.model]
    model, path = prepare_base(spec, Path("/tmp/loquetier-bench"), args.device, "bfloat16")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    kv_gb = 20.0 if args.device == "cuda" else 0.2
    engine = Engine.from_pretrained(path, device=args.device, dtype="bfloat16", kv_memory_gb=kv_gb,
                                    max_num_seqs=256, max_num_batched_tokens=8192, max_prefill_chunk=4096,
                                    max_adapter_slots=32, num_train_slots=0, max_lora_rank=16, max_model_len=2048,
                                    adapter_cache_bytes=16 << 30, cuda_graphs=args.cuda_graphs)
    for i in range(32):
        a = LoRAAdapter.new(LoRAConfig(rank=16, alpha=32, target_modules=TARGETS), engine.model.dims, seed=i)
        for _, b in a.weights.values():
            b.normal_(0, 0.01)
        engine.load_adapter(f"a{i}", a)
    floor_ms = spec.decode_weight_bytes() / HBM * 1e3
    results: dict[str, object] = {"floor_ms": floor_ms, "gpu": torch.cuda.get_device_name() if args.device == "cuda"
                                  else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for name, adapters in (("no adapters", [None]), ("32 adapters r16", [f"a{i}" for i in range(32)])):
        r = run_case(engine, args.batch, adapters, args.steps, overlaps if adapters != [None] else ())
        r["x_floor"] = r["step_ms_median"] / floor_ms
        if "graph_step_ms_median" in r:
            r["graph_x_floor"] = r["graph_step_ms_median"] / floor_ms
        results[name] = r
        print(name, json.dumps(r), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "decode.json").write_text(json.dumps(results, indent=1))
    t = time.perf_counter()
    captured = engine.capture_graphs()
    results["capture_all"] = {"graphs": captured, "seconds": time.perf_counter() - t}
    print("captured", results["capture_all"], flush=True)
    print(f"\n| case, batch {args.batch} | path | decode step ms (median) | GPU kernel ms | floor ms | x floor |")
    print("|---|---|---|---|---|---|")
    for name in ("no adapters", "32 adapters r16"):
        r = results[name]
        assert isinstance(r, dict)
        print(f"| {name} | eager | {r['step_ms_median']:.2f} | {r['gpu_kernel_ms_per_step']:.2f} | "
              f"{floor_ms:.2f} | {r['x_floor']:.2f} |")
        if "graph_step_ms_median" in r:
            print(f"| {name} | CUDA graph | {r['graph_step_ms_median']:.2f} | {r['graph_gpu_kernel_ms_per_step']:.2f}"
                  f" | {floor_ms:.2f} | {r['graph_x_floor']:.2f} |")
        if "fused_graph_step_ms_median" in r:
            ms = r["fused_graph_step_ms_median"]
            print(f"| {name} | eager + fused | {r['fused_step_ms_median']:.2f} | – | {floor_ms:.2f} | "
                  f"{r['fused_step_ms_median'] / floor_ms:.2f} |")
            print(f"| {name} | CUDA graph + fused | {ms:.2f} | {r['fused_graph_gpu_kernel_ms_per_step']:.2f} | "
                  f"{floor_ms:.2f} | {ms / floor_ms:.2f} |")
        for way, what in (("carry", "MLP output carried into the next norm"), ("add", "MLP output added per layer")):
            if f"fused_graph_{way}_step_ms_median" in r:
                ms, piped = r[f"fused_graph_{way}_step_ms_median"], r[f"fused_graph_{way}_pipelined_ms"]
                gpu = r.get(f"fused_graph_{way}_gpu_kernel_ms_per_step", r["fused_graph_gpu_kernel_ms_per_step"])
                print(f"| {name} | CUDA graph + fused, {what} (2 rounds) | {ms:.2f} | {gpu:.2f} | {floor_ms:.2f} | "
                      f"{ms / floor_ms:.2f} |")
                print(f"| {name} | the same, pipelined (one sync per {args.steps} calls) | {piped:.2f} | – | "
                      f"{floor_ms:.2f} | {piped / floor_ms:.2f} |")
        for mode in overlaps:
            if f"overlap_{mode}_graph_step_ms_median" in r:
                ms = r[f"overlap_{mode}_graph_step_ms_median"]
                gpu_ms = r[f"overlap_{mode}_graph_gpu_kernel_ms_per_step"]
                print(f"| {name} | CUDA graph + fused, LoRA overlap {'on' if mode == '1' else 'off'} | {ms:.2f} | "
                      f"{gpu_ms:.2f} | {floor_ms:.2f} | {ms / floor_ms:.2f} |")
    if args.out:
        Path(args.out, "decode.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
