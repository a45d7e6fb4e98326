"""Host time of one engine decode step, with the model's forward replaced by a stub.

    python -m benchmarks.host_step [--rows 64] [--out docs/benchmarks]   # ~1 min on a CPU

What a decode step costs the host around the model: scheduling, laying out the batch, sampling,
detokenizing and stop-string checks, stream events. The model's forward returns fixed random logits,
so the numbers are the Python and torch-dispatch work a GPU step waits on, measured on whatever CPU
runs this. A tiny Llama with a byte-level BPE tokenizer serves ``--rows`` requests (sampled at
temperature 0.7, and greedy), timed at two output lengths; each row is measured twice in the same
run, with the engine's incremental detokenizer and with a baseline that decodes the whole output
on every token (a cost that grows with the output). Each is timed on both paths of a step: the
eager one (``BatchBuilder``, the model's forward stubbed) and the CUDA graphs' (``DecodeGraphs``
laying the rows into its static buffers, the replay stubbed; decode windows off, so every step is
one a served engine runs when a prompt waits or a job trains).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class WholeOutputDetokenizer:
    """Baseline: decode the whole output on every update (cost grows with the output)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop, self.text, self.stopped = tokenizer, tuple(stop), "", False

    def update(self, token_ids: Sequence[int]) -> str:
        full = self.tokenizer.decode(list(token_ids), skip_special_tokens=True).rstrip("\ufffd")
        delta, self.text = full[len(self.text) :], max(full, self.text, key=len)
        return delta

    def finish(self, token_ids: Sequence[int]) -> str:
        return self.update(token_ids)


def measure(model_dir: Path, rows: int, temperature: float, lengths: Sequence[int], steps: int,  # noqa: PLR0917
            graphs: bool = False) -> list[float]:
    """ms of host time per decode step once the outputs are ``lengths`` tokens long (the tiny model's
    context is 512 tokens: 16 of prompt, the longest length plus ``steps`` must fit)."""
    import torch

    from loquetier import Engine, SamplingParams
    from loquetier.models.llama import ForwardOutput

    engine = Engine.from_pretrained(model_dir, num_kv_blocks=rows * (max(lengths) + steps + 40) // 16 + 8,
                                    block_size=16, max_num_batched_tokens=4096, max_num_seqs=rows,
                                    cuda_graphs="eager" if graphs else "off", decode_window=1)
    sampling = SamplingParams(max_tokens=max(lengths) + steps + 8, temperature=temperature, ignore_eos=True)
    for i in range(rows):
        engine.add_request(f"r{i}", prompt_token_ids=[5 + i % 50] * 16, sampling=sampling)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, engine.model.cfg.vocab_size, generator=gen)

    def forward(batch: Any, kv: Any = None) -> ForwardOutput:
        n = len(batch.logits_seq_ids)
        return ForwardOutput(logits=logits[:n] + 0.0, loss_sum=None, token_count=None, correct=None)

    engine.model.forward = forward  # type: ignore[method-assign]
    if graphs:  # the static layout and its staging run; the replay returns the same logits
        assert engine.runner.graphs is not None
        engine.runner.graphs._execute = lambda: logits  # type: ignore[method-assign]
    out, done = [], 0
    steps_before = engine.runner.num_graph_steps
    assert 16 + max(lengths) + steps < engine.max_model_len, "outputs would end at the context limit"
    for length in lengths:
        while done < length:
            engine.step()
            done += 1
        blocks = []  # the fastest of three blocks: this is a shared CPU
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(steps // 3):
                engine.step()
            blocks.append(1e3 * (time.perf_counter() - t0) / (steps // 3))
        done += 3 * (steps // 3)
        out.append(min(blocks))
    assert (engine.runner.num_graph_steps > steps_before) == graphs, "the step took the other path"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 400])
    ap.add_argument("--steps", type=int, default=30, help="decode steps timed at each length")
    ap.add_argument("--out", type=Path, default=None, help="write host_step.md here")
    args, _ = ap.parse_known_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import platform

    from tiny import make_tiny_model

    import loquetier.engine.requests as requests_mod

    engine_detok = requests_mod.IncrementalDetokenizer
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "tiny", num_layers=1)
        rows = []
        for path in ("eager", "graphs"):
            for temperature in (0.7, 0.0):
                for label, cls in (("incremental (engine)", engine_detok),
                                   ("whole output (baseline)", WholeOutputDetokenizer)):
                    requests_mod.IncrementalDetokenizer = cls  # type: ignore[misc,assignment]
                    try:
                        ms = measure(model_dir, args.rows, temperature, args.lengths, args.steps, path == "graphs")
                        rows.append((path, temperature, label, ms))
                    finally:
                        requests_mod.IncrementalDetokenizer = engine_detok  # type: ignore[misc]
    head = " | ".join(f"output {n} tok" for n in args.lengths)
    lines = [f"| step path | sampling | detokenizer | {head} |", "|---|---|---|" + "---|" * len(args.lengths)]
    for path, temperature, label, ms in rows:
        cells = " | ".join(f"{m:.2f} ms" for m in ms)
        lines.append(f"| {path} | {'greedy' if temperature == 0 else f'T={temperature}'} | {label} | {cells} |")
    ratios = [f"{b[-1][-1] / a[-1][-1]:.1f}x" for a, b in zip(rows[::2], rows[1::2], strict=True)]
    text = (f"# Host time per decode step ({args.rows} rows, model forward stubbed)\n\n"
            f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
            f"`python -m benchmarks.host_step --rows {args.rows}`. ms per step around the model "
            "(scheduling, batch layout, sampling, detokenizing, events; the fastest of three blocks of steps), "
            "both step paths and both detokenizers in one run: eager (the batch built for the model's forward, "
            "stubbed) and graphs (the rows laid into the captured graphs' static buffers, the replay stubbed; "
            "decode windows off, asynchronous steps on as by default: the stubbed replay returns at once, so "
            "nothing overlaps and each step's whole host work is counted).\n\n"
            + "\n".join(lines)
            + f"\n\nAt {args.lengths[-1]} output tokens the baseline takes {' / '.join(ratios)} "
            "(eager sampled / greedy, graphs sampled / greedy) "
            "the engine's host time.\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_step.md").write_text(text)


if __name__ == "__main__":
    main()
