"""Drive our engine with a wall-clock trace replay (and optionally fine-tuning jobs) and measure it.

Requests are added when their arrival time has passed, between steps; TTFT is measured on our own
clock from the trace arrival (so time a request spent waiting for a step to end is counted) to the
step that returned its first token. Admission time comes from the engine's ``queued_ms``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loquetier.engine.engine import Engine
from loquetier.engine.events import JobFinished, JobProgress, RequestFailed, RequestFinished, TokenEvent
from loquetier.engine.sequence import SamplingParams
from loquetier.lora.params import TrainingParams

from .metrics import RequestRecord, TrainingSummary, summarize_training, tpot_from_times
from .models import TARGET_MODULES
from .workload import Trace, TraceRequest

Log = Callable[[str], Any]


def make_engine(
    model_dir: Path, device: str, dtype: str, limits: Mapping[str, Any], log: Log = print
) -> Engine:
    """``Engine.from_pretrained`` with ``limits``; limits the engine does not know are dropped (logged)."""
    limits = dict(limits)
    while True:
        try:
            t0 = time.perf_counter()
            engine = Engine.from_pretrained(str(model_dir), device=device, dtype=dtype, **limits)
            log(f"[engine] loaded in {time.perf_counter() - t0:.1f}s with {limits}")
            return engine
        except TypeError as exc:
            bad = [k for k in limits if repr(k) in str(exc) or f"'{k}'" in str(exc)]
            if not bad:
                raise
            log(f"[engine] dropping unknown limits {bad}: {exc}")
            for k in bad:
                limits.pop(k)


def sampling_for(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@dataclass
class EngineRun:
    """What one replay observed."""

    records: list[RequestRecord]
    window_s: float
    training: TrainingSummary | None = None
    num_steps: int = 0
    step_times_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    # per step: the scheduler's StepRecord fields, the replay's wall time (wall_s) and the Triton
    # kernels the step built (built, comma-separated)
    step_records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> list[tuple[float, int, int, int, str]]:
        """Per step: (wall s, decode rows, prefill tokens, training + eval tokens, kernels built)."""
        return [(r["wall_s"], r["num_decode_rows"], r["num_prefill_tokens"],
                 r["num_train_tokens"] + r["num_eval_tokens"], r["built"]) for r in self.step_records]

    def step_mix(self) -> dict[str, Any]:
        """Decode-only, prefill (no training) and training steps: count, total and median wall time,
        mean rows; the slowest steps with what they carried and the steps that built kernels."""
        out: dict[str, Any] = {}
        steps = self.steps
        for name, rows in (("decode_only", [s for s in steps if not s[2] and not s[3]]),
                           ("prefill", [s for s in steps if s[2] and not s[3]]),
                           ("training", [s for s in steps if s[3]])):
            if rows:
                times = sorted(r[0] for r in rows)
                out[name] = {"steps": len(rows), "total_s": round(sum(times), 3),
                             "median_ms": round(times[len(times) // 2] * 1e3, 2),
                             "mean_decode_rows": round(sum(r[1] for r in rows) / len(rows), 1),
                             "mean_prefill_tokens": round(sum(r[2] for r in rows) / len(rows), 1),
                             "mean_train_tokens": round(sum(r[3] for r in rows) / len(rows), 1)}
        slow = sorted(steps, reverse=True)[:6]
        out["slowest"] = [[round(s[0] * 1e3, 1), *s[1:]] for s in slow]
        built = [s for s in steps if s[4]]
        out["steps_with_kernel_builds"] = {"steps": len(built), "total_s": round(sum(s[0] for s in built), 3)}
        return out


class KernelBuilds:
    """Names of the Triton kernels compiled since the last ``take()`` (through Triton's JIT cache
    hook; empty where this Triton has no such hook). Kernel builds inside measured windows are what
    ``Engine.warmup`` exists to prevent; the replay logs the steps that still had some."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._knobs: Any = None
        try:
            from triton import knobs  # type: ignore[attr-defined]

            self._knobs = knobs.runtime
            self._prev = self._knobs.jit_cache_hook
            self._knobs.jit_cache_hook = self._hook
        except Exception:  # no Triton, or one without knobs: nothing is recorded
            self._knobs = None

    def _hook(self, *args: Any, **kwargs: Any) -> bool:
        fn = kwargs.get("fn")
        self._names.append(getattr(fn, "name", "?"))
        return False  # never skip the compile

    def take(self) -> str:
        names, self._names = self._names, []
        return ",".join(sorted(set(names)))

    def close(self) -> None:
        if self._knobs is not None:
            self._knobs.jit_cache_hook = self._prev
            self._knobs = None


def add_training_jobs(
    engine: Engine,
    jobs: Sequence[tuple[str, list[dict[str, list[int]]]]],
    *,
    rank: int = 16,
    lr: float = 1e-4,
    micro_batch_tokens: int = 1024,
    max_steps: int | None = None,
    epochs: int | None = None,
) -> list[str]:
    """One job per ``(adapter_id, examples)``: a fresh rank-``rank`` LoRA on all seven targets."""
    job_ids = []
    for adapter_id, examples in jobs:
        params = TrainingParams(
            optimizer="adamw",
            lr=lr,
            micro_batch_tokens=micro_batch_tokens,
            max_steps=max_steps,
            epochs=epochs,
        )
        job_ids.append(
            engine.add_training_job(
                adapter_id,
                examples,
                params,
                lora=dict(rank=rank, alpha=2 * rank, target_modules=list(TARGET_MODULES)),
                job_id=f"job-{adapter_id}",
            )
        )
    return job_ids


@dataclass
class _Bookkeeping:
    """What a replay tracks between steps: per-request records and streamed token times, when each
    request was added, and each job's progress."""

    records: dict[str, RequestRecord]
    token_times: dict[str, list[float]]
    job_ids: Sequence[str]
    job_tokens: dict[str, int]
    job_steps: dict[str, int]
    jobs_live: set[str]
    counted_from: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    num_done: int = 0
    jobs_done_s: float | None = None

    @classmethod
    def start(cls, reqs: Sequence[TraceRequest], job_ids: Sequence[str]) -> _Bookkeeping:
        return cls(
            records={
                r.request_id: RequestRecord(r.request_id, r.arrival_s, r.num_prompt_tokens, r.max_tokens, r.adapter_id)
                for r in reqs
            },
            token_times={r.request_id: [] for r in reqs},
            job_ids=job_ids,
            job_tokens=dict.fromkeys(job_ids, 0),
            job_steps=dict.fromkeys(job_ids, 0),
            jobs_live=set(job_ids),
        )

    def take(self, ev: Any, t: float) -> None:
        """Account one engine event that came out of the step ending at ``t``."""
        if isinstance(ev, TokenEvent):
            if ev.request_id in self.token_times:
                self.token_times[ev.request_id].extend([t] * len(ev.token_ids))
        elif isinstance(ev, RequestFinished):
            if ev.request_id in self.records:
                _finish(self.records[ev.request_id], ev, t, self.counted_from[ev.request_id],
                        self.token_times[ev.request_id])
                self.num_done += 1
        elif isinstance(ev, RequestFailed):
            self.failures.append(f"{ev.request_id}: {ev.code} {ev.message}")
            if ev.request_id in self.records:
                self.num_done += 1
        elif isinstance(ev, JobProgress):
            self.job_tokens[ev.job_id] = max(self.job_tokens.get(ev.job_id, 0), ev.tokens_processed)
            self.job_steps[ev.job_id] = max(self.job_steps.get(ev.job_id, 0), ev.step)
        elif isinstance(ev, JobFinished):
            self.jobs_live.discard(ev.job_id)
            if self.job_ids and not self.jobs_live:
                self.jobs_done_s = t
            if ev.status != "succeeded":
                self.failures.append(f"{ev.job_id}: {ev.status} {ev.error}")

    def settle_cut_off(self, engine: Engine, reqs: Sequence[TraceRequest]) -> None:
        """Fill the records of requests the window cut off and abort them (the engine is left clean
        for the next replay)."""
        for r in reqs:
            rec, times = self.records[r.request_id], self.token_times[r.request_id]
            if rec.is_finished:
                continue
            if times:  # streamed tokens of a request cut off by the time limit
                rec.first_token_s = times[0]
                rec.tpot_s = tpot_from_times(times)
            if r.request_id in self.counted_from:
                _fill_partial(engine, rec, self.counted_from[r.request_id])
                engine.abort(r.request_id)
            rec.num_output_tokens = max(rec.num_output_tokens, len(times))


def replay_engine(
    engine: Engine,
    trace: Trace | None,
    *,
    time_limit_s: float,
    job_ids: Sequence[str] = (),
    stop_when_trace_done: bool = True,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
    device: str = "cpu",
    log: Log = print,
    label: str = "engine",
    arrival_from_trace: bool = True,
) -> EngineRun:
    """Replay ``trace`` (None: training only) until it is served, every job ends, or the time limit.

    The engine counts each request from its trace arrival (``arrived_at``), the wait for the step in
    flight included; ``arrival_from_trace=False`` lets it count from ``add_request`` instead (the
    engine then plans as if no time had passed; TTFT is still reported from the trace arrival).

    With jobs and a trace, the window ends when the trace is done (``stop_when_trace_done``); the
    training tokens counted are those of micro-batches finished inside the window.
    """
    reqs = trace.requests if trace is not None else []
    book = _Bookkeeping.start(reqs, job_ids)
    run = EngineRun([], 0.0, failures=book.failures)
    _sync(device)
    train_tokens_before = _scheduler_counter(engine, "num_train_tokens")
    start = time.perf_counter()
    wall_start = time.time()

    def clock() -> float:
        return time.perf_counter() - start

    nxt = 0
    builds = KernelBuilds()
    while True:
        now = clock()
        while nxt < len(reqs) and reqs[nxt].arrival_s <= now:
            r = reqs[nxt]
            engine.add_request(r.request_id, prompt_token_ids=r.prompt_token_ids, adapter_id=r.adapter_id,
                               sampling=sampling_for(r.max_tokens), ttft_ms=ttft_ms, tpot_ms=tpot_ms, stream=True,
                               arrived_at=wall_start + r.arrival_s if arrival_from_trace else None)
            # the engine counts from the trace arrival (the wait for the step in flight included)
            book.counted_from[r.request_id] = r.arrival_s if arrival_from_trace else now
            nxt += 1
        if now >= time_limit_s:
            break
        trace_done = book.num_done >= len(reqs)
        if trace_done and (not book.jobs_live or (reqs and stop_when_trace_done)):
            break
        if not engine.has_work():
            if nxt >= len(reqs):
                break
            time.sleep(max(0.0, min(reqs[nxt].arrival_s - now, time_limit_s - now)))
            continue
        t0 = time.perf_counter()
        events = engine.step()
        t = clock()
        run.step_times_s.append(time.perf_counter() - t0)
        last = engine.scheduler.metrics.last_step
        if last is not None:
            run.step_records.append({**dataclasses.asdict(last), "wall_s": run.step_times_s[-1],
                                     "built": builds.take()})
        for ev in events:
            book.take(ev, t)
    builds.close()
    _sync(device)
    run.window_s = clock()
    book.settle_cut_off(engine, reqs)
    run.records = [book.records[r.request_id] for r in reqs if r.arrival_s <= run.window_s]
    run.num_steps = len(run.step_times_s)
    if job_ids:
        # tokens the steps actually trained on (packed, no padding); JobProgress as a fallback
        counted = _scheduler_counter(engine, "num_train_tokens") - train_tokens_before
        real = counted if counted > 0 else sum(book.job_tokens.values())
        # jobs that ran out of data before the window ended are timed until they finished
        seconds = book.jobs_done_s if book.jobs_done_s is not None else run.window_s
        run.training = summarize_training(real, seconds, optimizer_steps=sum(book.job_steps.values()))
    _close_run(engine, run, label, log, f"{book.num_done}/{len(reqs)}")
    return run


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _close_run(engine: Engine, run: EngineRun, label: str, log: Log, done: str) -> None:
    """The engine's stats into ``run``; the step dump (``LOQUETIER_BENCH_STEP_DUMP``) and the log lines."""
    try:
        run.stats = _jsonable(engine.stats())
    except Exception as exc:  # stats are informative only
        run.stats = {"error": repr(exc)}
    dump = os.environ.get("LOQUETIER_BENCH_STEP_DUMP")
    if dump and run.step_records:  # every step's composition, measured and predicted time (one JSON line each)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        Path(dump).mkdir(parents=True, exist_ok=True)
        with open(Path(dump) / f"steps_{slug}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in run.step_records)
    if run.step_records:
        log(f"[{label}] step mix: {run.step_mix()}")
        log(f"[{label}] fitted step cost: {run.stats.get('step_cost')}")
    served = sum(r.num_output_tokens for r in run.records)
    train = f", train {run.training.real_tokens} tokens" if run.training else ""
    fails = f"; {len(run.failures)} failures: {run.failures[:3]}" if run.failures else ""
    log(
        f"[{label}] {run.num_steps} steps, {done} requests, {served} output tokens{train} "
        f"in {run.window_s:.1f}s{fails}"
    )


def _finish(rec: RequestRecord, ev: RequestFinished, t: float, counted_from: float, times: list[float]) -> None:
    """Fill a record from the finish event: TTFT/TPOT from the engine's timings (its clock starts at
    ``counted_from``, the trace arrival it was given as ``arrived_at``), else from streamed token times."""
    rec.finish_s = t
    rec.num_output_tokens = len(ev.token_ids)
    rec.admitted_s = counted_from + ev.timings.queued_ms / 1000.0
    if ev.timings.ttft_ms is not None:
        rec.first_token_s = counted_from + ev.timings.ttft_ms / 1000.0
        rec.tpot_s = ev.timings.tpot_ms / 1000.0 if ev.timings.tpot_ms is not None else None
    elif times:
        rec.first_token_s = times[0]
        rec.tpot_s = tpot_from_times(times + [t] * (len(ev.token_ids) - len(times)))
    else:
        rec.first_token_s = t


def _scheduler_counter(engine: Engine, name: str) -> int:
    try:
        return int(engine.stats()["scheduler"].get(name, 0))
    except Exception:
        return 0


def _fill_partial(engine: Engine, rec: RequestRecord, counted_from: float) -> None:
    """Tokens and first-token time of a request cut off by the time limit, read from the engine's
    sequence (its clock starts at ``counted_from``); left as is when the engine cannot tell."""
    try:
        seq = engine.scheduler.get(rec.request_id)
    except Exception:
        return
    if seq is None:
        return
    rec.num_output_tokens = int(seq.num_output_tokens)
    if seq.ttft_s is not None and rec.first_token_s is None:
        rec.first_token_s = counted_from + seq.ttft_s
        rec.tpot_s = seq.mean_tpot_s


def decode_step_times(
    engine: Engine,
    *,
    batch: int,
    prompt_len: int,
    num_steps: int,
    vocab_size: int,
    adapter_ids: Sequence[str | None],
    device: str,
    seed: int = 0,
) -> tuple[list[float], int]:
    """Wall time of steps that were pure decode at ``batch`` rows (checked with the scheduler's
    counters: ``batch`` decode tokens and no prefill or training tokens in the step).

    Returns (step times, mean context length during the measured steps).
    """
    gen = torch.Generator().manual_seed(seed)
    warm = 2
    max_tokens = warm + num_steps + 8 + 64  # a decode window may run past the last measured step
    for i in range(batch):
        ids = torch.randint(3, vocab_size, (prompt_len,), generator=gen).tolist()
        engine.add_request(
            f"decode-{seed}-{i}",
            prompt_token_ids=ids,
            adapter_id=adapter_ids[i % len(adapter_ids)] if adapter_ids else None,
            sampling=sampling_for(max_tokens),
        )
    times: list[float] = []
    num_pure = 0
    contexts: list[int] = []
    for _ in range(10_000):
        if len(times) >= num_steps or not engine.has_work():
            break
        before = engine.stats()["scheduler"]
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        after = engine.stats()["scheduler"]
        made = after["num_steps"] - before["num_steps"]  # a decode window makes several steps
        pure = (
            made >= 1
            and after["num_decode_tokens"] - before["num_decode_tokens"] == batch * made
            and after["num_prefill_tokens"] == before["num_prefill_tokens"]
            and after["num_train_tokens"] == before["num_train_tokens"]
        )
        if pure:
            for _ in range(made):
                num_pure += 1
                if num_pure > warm:
                    times.append(dt / made)
                    contexts.append(prompt_len + num_pure)
    while engine.has_work():
        engine.step()
    if not times:
        raise RuntimeError(f"no pure decode step at batch {batch} was observed")
    return times, int(sum(contexts) / len(contexts))


def warmup(
    engine: Engine,
    vocab_size: int,
    adapter_ids: Sequence[str],
    *,
    training: bool,
    micro_batch_tokens: int = 1024,
    num_jobs: int = 1,
    log: Log = print,
) -> None:
    """Untimed: ``Engine.warmup`` (every step shape once: kernel builds stay out of the measured
    windows), one short generate on the benchmark's own adapters and, with ``training``, training
    steps of ``num_jobs`` jobs at the benchmark's micro-batch size (a step's SMLM launches depend on
    how many training segments it holds); then every decode CUDA graph is captured."""
    t0 = time.perf_counter()
    report = engine.warmup()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab_size, (24,), generator=gen).tolist() for _ in range(2)]
    ids: list[str | None] = [None, adapter_ids[0] if adapter_ids else None]
    engine.generate(prompts, adapter_ids=ids, sampling=sampling_for(4))
    if training:
        n = max(2, micro_batch_tokens // 64)
        examples = [
            {
                "prompt_token_ids": torch.randint(3, vocab_size, (16,), generator=gen).tolist(),
                "completion_token_ids": torch.randint(3, vocab_size, (16,), generator=gen).tolist(),
            }
            for _ in range(n)
        ]
        add_training_jobs(
            engine, [(f"warmup-train-{i}", examples) for i in range(num_jobs)],
            micro_batch_tokens=micro_batch_tokens, max_steps=2,
        )
        for _ in range(10_000):
            if not engine.has_work():
                break
            engine.step()
    t1 = time.perf_counter()
    captured = engine.capture_graphs()  # decode CUDA graphs of every batch bucket, before any timing
    log(
        f"[engine] warm-up in {t1 - t0:.1f}s ({report['steps']} steps of Engine.warmup in "
        f"{report['seconds']:.1f}s), {captured} decode CUDA graphs in {time.perf_counter() - t1:.1f}s"
    )


def cancel_jobs(engine: Engine, job_ids: Sequence[str]) -> None:
    """Cancel what is left of ``job_ids`` and drain the engine (their events are dropped)."""
    for job_id in job_ids:
        engine.cancel_job(job_id)
    for _ in range(10_000):
        if not engine.has_work():
            break
        engine.step()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return repr(value)
