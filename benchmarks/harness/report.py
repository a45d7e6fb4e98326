"""Results out: JSON, a markdown page per run (date, GPU, command, tables, targets) and PNG plots.

Plots need matplotlib; without it they are skipped with a note (the GPU image may not have it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import RequestRecord, ServingSummary, TrainingSummary


@dataclass(frozen=True)
class Target:
    """One performance target (the project's goals in docs/benchmarks/README.md) and where a run stands."""

    name: str
    goal: str  # e.g. ">= 0.85x"
    measured: float
    threshold: float
    higher_is_better: bool = True
    extra_ok: bool = True  # a side condition (e.g. "at equal or better p99 TTFT")
    note: str = ""

    @property
    def ok(self) -> bool | None:
        if math.isnan(self.measured):
            return None
        met = self.measured >= self.threshold if self.higher_is_better else self.measured <= self.threshold
        return met and self.extra_ok

    def row(self) -> list[str]:
        status = {True: "MET", False: "missed", None: "n/a"}[self.ok]
        return [self.name, self.goal, fmt(self.measured, 3), status, self.note]


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


SERVING_HEADERS = [
    "system",
    "requests",
    "finished",
    "window s",
    "out tok/s",
    "req/s",
    "TTFT p50 s",
    "TTFT p99 s",
    "TPOT p50 ms",
    "TPOT p99 ms",
    "SLO att.",
    "admit<=6s att.",
]


def serving_rows(summaries: Mapping[str, ServingSummary]) -> list[list[Any]]:
    return [
        [
            label,
            s.num_requests,
            s.num_finished,
            s.duration_s,
            s.output_tokens_per_s,
            s.requests_per_s,
            s.ttft_p50_s,
            s.ttft_p99_s,
            s.tpot_p50_s * 1e3,
            s.tpot_p99_s * 1e3,
            f"{s.slo_attainment:.1%}",
            f"{s.admit6_attainment:.1%}",
        ]
        for label, s in summaries.items()
    ]


TRAINING_HEADERS = [
    "system",
    "real tokens",
    "padded tokens",
    "seconds",
    "real tok/s",
    "padding",
    "opt. steps",
]


def training_rows(summaries: Mapping[str, TrainingSummary]) -> list[list[Any]]:
    return [
        [
            label,
            s.real_tokens,
            s.padded_tokens,
            s.seconds,
            s.real_tokens_per_s,
            f"{s.padding_fraction:.1%}",
            s.optimizer_steps,
        ]
        for label, s in summaries.items()
    ]


TARGET_HEADERS = ["target (issue 9)", "goal", "measured", "status", "note"]


def targets_table(targets: Sequence[Target]) -> str:
    return markdown_table(TARGET_HEADERS, [t.row() for t in targets])


def _clean(value: Any) -> Any:
    """JSON without NaN/inf (written as null / the string "inf")."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_report(
    out_dir: Path,
    name: str,
    title: str,
    *,
    env: Mapping[str, Any],
    sections: Sequence[tuple[str, str]],
    targets: Sequence[Target],
    results: Mapping[str, Any],
) -> str:
    """Writes ``{name}.json`` and ``{name}.md``; returns the summary text to print last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "env": env,
        "results": results,
        "targets": [
            {"name": t.name, "goal": t.goal, "measured": t.measured, "ok": t.ok, "note": t.note}
            for t in targets
        ],
    }
    (out_dir / f"{name}.json").write_text(json.dumps(_clean(payload), indent=1, default=str))
    head = [
        f"# {title}",
        "",
        f"- date: {env.get('date')}",
        f"- device: {env.get('device')}",
        f"- model: {env.get('model')} ({env.get('dtype')}), random weights",
        f"- command: `{env.get('command')}`",
        f"- torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}",
        "",
    ]
    body: list[str] = []
    for heading, text in sections:
        body += [f"## {heading}", "", text, ""]
    summary = "## Targets\n\n" + targets_table(targets) + "\n"
    (out_dir / f"{name}.md").write_text("\n".join(head + body) + "\n" + summary)
    return "\n".join(f"{h}\n{t}\n" for h, t in sections) + "\n" + summary


# ----------------------------------------------------------------------------------------------------
# plots


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_serving(
    out_dir: Path, name: str, runs: Mapping[str, tuple[Sequence[RequestRecord], ServingSummary]]
) -> list[str]:
    """Output tokens/s per system (log scale) and the TTFT CDF; returns the files written."""
    plt = _pyplot()
    if plt is None or not runs:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(runs)
    values = [max(runs[k][1].output_tokens_per_s, 1e-3) for k in labels]
    ax1.barh(labels, values, color="tab:blue")
    ax1.set_xscale("log")
    ax1.set_xlabel("output tokens/s (log)")
    for i, v in enumerate(values):
        ax1.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    for label in labels:
        ttfts = sorted(r.ttft_s for r in runs[label][0] if math.isfinite(r.ttft_s))
        n = len(runs[label][0])
        if ttfts and n:
            ax2.step(ttfts, [(i + 1) / n for i in range(len(ttfts))], where="post", label=label)
    ax2.set_xscale("log")
    ax2.set_xlabel("TTFT s (log)")
    ax2.set_title("curves end below 1: requests never served", fontsize=9)
    ax2.set_ylabel("fraction of requests")
    ax2.axvline(1.0, color="gray", ls="--", lw=0.8)
    ax2.legend(fontsize=8)
    fig.suptitle(name)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def plot_bars(
    out_dir: Path, name: str, values: Mapping[str, float], xlabel: str, *, log: bool = False
) -> list[str]:
    plt = _pyplot()
    if plt is None or not values:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.5 * len(values)))
    labels = list(values)
    vals = [values[k] if math.isfinite(values[k]) else 0.0 for k in labels]
    ax.barh(labels, vals, color="tab:green")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:,.1f}", va="center", fontsize=8)
    fig.suptitle(name)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def plot_timeline(
    out_dir: Path, name: str, runs: Mapping[str, Sequence[RequestRecord]], window_s: float
) -> list[str]:
    """Per-second arrivals and TTFT over the run (how latency follows the step-rate pattern)."""
    plt = _pyplot()
    if plt is None or not runs:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, records in runs.items():
        pts = sorted((r.arrival_s, r.ttft_s) for r in records if math.isfinite(r.ttft_s))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=3, label=f"{label} TTFT")
    ax.set_yscale("log")
    ax.set_xlabel("arrival time s")
    ax.set_ylabel("TTFT s (log)")
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax2 = ax.twinx()
    first = next(iter(runs.values()))
    bins = max(1, int(math.ceil(window_s)))
    ax2.hist([r.arrival_s for r in first], bins=bins, range=(0, bins), alpha=0.15, color="k")
    ax2.set_ylabel("arrivals per second")
    ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(name)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def images_section(files: Sequence[str]) -> str:
    if not files:
        return "(plots skipped: matplotlib is not installed)"
    return "\n".join(f"![{f}]({f})" for f in files)
