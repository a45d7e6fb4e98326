"""The whole service: producers -> broker -> one worker -> results and PostgreSQL, against the engine alone.

On one machine: the embedded broker (tansu) and PostgreSQL (or the configured ones), one worker
process (``loquetier worker``; on a GPU it warms up and captures its CUDA graphs before it takes
requests) and, in this process, independent producers (requests, training jobs, control commands)
and one reader of the results topic. The model has the benchmark's shape (``--model``) with random
weights and the SmolLM2 tokenizer (vocabulary 49152), so output is detokenized as in production.

1. Service: 32 adapters are loaded through the control topic; a warm-up (requests and short
   training jobs) runs; 4 training jobs are published and start training; then, in the measured
   window, the serving trace of ``bench_serving`` (Poisson, ShareGPT-like lengths, uniform over the
   adapters, streaming) is published, each request at its arrival time. Measured from publish to the record read back:
   output tokens/s, TTFT / TPOT p50 / p99, SLO attainment; training tokens/s (progress records);
   records/s per topic; database commits and row writes/s; the worker's CPU time by thread (event
   loop, engine thread, detokenizer, other); its event-loop lag; and every published id counted
   against the final records read and the rows in PostgreSQL (lost, answered twice).
2. Engine alone, same process after the worker stopped: the same trace and jobs replayed into
   ``Engine.step()`` directly (``harness/replay.py``), and the jobs alone (training-only rate).

    python -m benchmarks.bench_service --model 8b --device cuda --out $OUT
    python -m benchmarks.bench_service --model tiny --device cpu --quick --out /tmp/svc

Writes ``service.json`` (with its ``targets``) and ``service.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .harness import common, report
from .harness.metrics import (
    DEFAULT_TPOT_S,
    DEFAULT_TTFT_S,
    RequestRecord,
    ServingSummary,
    percentile,
    summarize_serving,
)
from .harness.models import TARGET_MODULES, ModelSpec, adapter_ranks, write_adapters
from .harness.tokenizer import VOCAB_SIZE, add_tokenizer, tokenizer_dir
from .harness.workload import Trace, make_trace

SERVICE = "service (producers -> Kafka -> worker -> Kafka)"
ALONE = "engine alone (same trace and jobs)"
NUM_PARTITIONS = 4
INTAKE_STAGES = {"way in: record age when the worker takes it": "loquetier_request_record_age_seconds",
                 "way in: worker intake (row, checks, hand-over)": "loquetier_request_intake_seconds"}
ENGINE_IN = {"process": "in its own process (`LOQUETIER_WORKER__ENGINE_PROCESS=true`, the default)",
             "thread": "on a thread of the worker process (`LOQUETIER_WORKER__ENGINE_PROCESS=false`)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    args.spec = dataclasses.replace(args.spec, name=f"{args.spec.name}-smollm2", vocab_size=VOCAB_SIZE)
    return args


# --- model, adapters, workload --------------------------------------------------------------------


def ensure_model(spec: ModelSpec, root: Path, device: str, dtype: str, seed: int, log: common.Logger) -> Path:
    """The random-weight model directory with the SmolLM2 tokenizer (written once, then reused)."""
    from .harness import models

    path = root / f"llama-{spec.name}-{dtype}"
    if not models._dir_matches(path, spec, dtype):
        t0 = time.perf_counter()
        model = models.build_random_hf_model(spec, device, dtype, seed)
        models.write_model_dir(model, path)
        del model
        common.release()
        log(f"[models] built and wrote {spec.name} to {path} in {time.perf_counter() - t0:.1f}s")
    add_tokenizer(path, tokenizer_dir(root))
    return path


def workload(args: argparse.Namespace) -> tuple[Trace, list[str], common.Jobs]:
    prof, spec = args.profile, args.spec
    ids = [f"svc-r16-{i:02d}" for i in range(prof.num_adapters)]
    trace = make_trace(pattern="poisson", rate=prof.rate, duration_s=prof.duration_s, vocab_size=spec.vocab_size,
                       max_context=prof.max_context, prompt_mean=prof.prompt_mean, output_mean=prof.output_mean,
                       adapter_ids=ids, popularity="uniform", seed=args.seed)
    return trace, ids, common.job_data(args)


def ttft_stages(records: list[RequestRecord], timings: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50 / p99 (ms) of the client's TTFT, the engine's queue time and TTFT, and what the service adds."""
    def pct(values: list[float]) -> dict[str, float]:  # as the serving summary computes its percentiles
        return {"p50": percentile(values, 50), "p99": percentile(values, 99)} if values else {}

    client, queued, engine, added = [], [], [], []
    for rec in records:
        t = timings.get(rec.request_id, {})
        if rec.first_token_s is None or "ttft_ms" not in t:
            continue
        ttft = (rec.first_token_s - rec.arrival_s) * 1e3
        client.append(ttft)
        engine.append(t["ttft_ms"])
        queued.append(t.get("queued_ms", math.nan))
        added.append(ttft - t["ttft_ms"])
    return {"client TTFT": pct(client), "engine: queued": pct([q for q in queued if math.isfinite(q)]),
            "engine TTFT": pct(engine), "added by the service (client - engine)": pct(added)}


def engine_env(args: argparse.Namespace) -> dict[str, Any]:
    """EngineSettings fields both the worker and the engine-alone replay use."""
    prof, spec = args.profile, args.spec
    block_size = 16
    bytes_per_block = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * block_size * (
        4 if args.dtype == "float32" else 2)
    env: dict[str, Any] = {
        "max_num_seqs": prof.max_num_seqs,
        # the worker's prefill chunk is the engine's default (512): a step must hold one
        "max_num_batched_tokens": max(prof.max_num_batched_tokens, 512),
        "block_size": block_size,
        "max_adapter_slots": prof.num_adapters + prof.num_jobs,
        "max_lora_rank": 64,
    }
    if args.device != "cuda":  # on a GPU the KV cache is sized from the card, as a worker's is by default
        env["num_kv_blocks"] = max(64, int(prof.kv_memory_gb * (1 << 30) // bytes_per_block))
    return env


def engine_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The worker's own conversion of those settings (``loquetier worker``), for the replay."""
    from loquetier.settings import EngineSettings

    return {**EngineSettings(**engine_env(args)).limits(), "seed": args.seed}


# --- 1. the service -------------------------------------------------------------------------------


@dataclasses.dataclass
class ServiceRun:
    records: list[RequestRecord]
    window_s: float
    summary: ServingSummary
    extra: dict[str, Any]


async def run_service(args: argparse.Namespace, model_dir: Path, adapter_root: Path, ids: list[str], trace: Trace,
                      jobs: common.Jobs, tmp: Path, log: common.Logger) -> ServiceRun:
    from loquetier import procs, services
    from loquetier.settings import KafkaSettings

    from .harness import service_stack as stack

    with stack.broker(tmp / "broker") as bootstrap, stack.postgres_server(tmp / "pg") as server:
        async with stack.database(server) as url:
            prefix = f"svcbench{uuid.uuid4().hex[:6]}"
            kafka = KafkaSettings(bootstrap=bootstrap, requests_topic=f"{prefix}.requests",
                                  training_topic=f"{prefix}.training", control_topic=f"{prefix}.control",
                                  results_topic=f"{prefix}.results", dlq_topic=f"{prefix}.dlq",
                                  group_id=f"{prefix}-workers", num_partitions=NUM_PARTITIONS)
            await services.create_topics(bootstrap, kafka.topics(), num_partitions=NUM_PARTITIONS)
            env = {**os.environ, "LOQUETIER_KAFKA__BOOTSTRAP": bootstrap, "LOQUETIER_DATABASE__URL": url,
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "LOQUETIER_CACHE_DIR": str(tmp / "cache"),
                   "LOQUETIER_WORKER__ADAPTER_ROOTS": f'["{adapter_root}"]',
                   "LOQUETIER_WORKER__PROGRESS_EVERY_S": "0.5",
                   "LOQUETIER_WORKER__MAX_INFLIGHT": "4096",
                   "LOQUETIER_WORKER__DRAIN_TIMEOUT_S": "5",
                   # 8B-shape adapters and checkpoints are hundreds of MB: files plus checksums, as
                   # the README advises for large adapters, not rows of bytes
                   "LOQUETIER_WORKER__CHECKPOINT_STORAGE": "uri",
                   "LOQUETIER_WORKER__CHECKPOINT_DIR": str(tmp / "blobs"),
                   "LOQUETIER_WORKER__ENGINE_PROCESS": str(getattr(args, "engine_in", "process") == "process").lower()}
            for f in ("requests_topic", "training_topic", "control_topic", "results_topic", "dlq_topic", "group_id"):
                env[f"LOQUETIER_KAFKA__{f.upper()}"] = getattr(kafka, f)
            if args.device == "cpu":
                # the torch reference ops, as the engine-alone replay here and a CPU worker run them: Triton's
                # interpreter (TRITON_INTERPRET=1, set by the test session) is for kernel tests
                env.pop("TRITON_INTERPRET", None)
            for k, v in engine_env(args).items():
                env[f"LOQUETIER_ENGINE__{k.upper()}"] = str(v)
            port = procs.free_port()
            worker_log = Path(args.out) / "service_worker.log" if args.keep_logs else tmp / "worker.log"
            worker_log.parent.mkdir(parents=True, exist_ok=True)
            t_start = time.perf_counter()
            worker = stack.spawn_worker(["--model", str(model_dir), "--device", args.device, "--dtype", args.dtype,
                                         "--worker-id", f"{prefix}-w", "--metrics-port", str(port),
                                         "--max-jobs", str(args.profile.num_jobs), "--partitions",
                                         str(NUM_PARTITIONS), "--log-level", "INFO"], env, worker_log)
            try:
                extra = await _drive(args, kafka, url, worker, worker_log, port, adapter_root, ids, trace, jobs, log,
                                     t_start)
            finally:
                rc = stack.stop_worker(worker)
                log(f"[service] worker stopped, rc {rc}")
            lag_all = stack.log_lines(worker_log, "event loop lag, whole run")
            extra["loop_lag_whole_run"] = {k: lag_all[-1].get(k) for k in ("num", "p50_ms", "p99_ms", "max_ms")} \
                if lag_all else None
            extra["worker_rc"] = rc
            kv = stack.log_lines(worker_log, "kv cache")  # the worker's KV cache and, sized from the GPU, its plan
            extra["kv_cache"] = {k: v for k, v in kv[-1].items() if k not in ("ts", "time", "level", "logger", "msg")} \
                if kv else None
            return extra.pop("_run")  # type: ignore[no-any-return]


async def _drive(args: argparse.Namespace, kafka: Any, url: str, worker: Any, worker_log: Path, port: int,
                 adapter_root: Path, ids: list[str], trace: Trace, jobs: common.Jobs, log: common.Logger,
                 t_start: float) -> dict[str, Any]:
    from loquetier.messages import ControlCommand, GenerateRequest, SamplingSpec, SLOSpec, TrainingJobRecord

    from .harness import service_stack as stack
    from .harness.service_client import Ledger, Producer, ResultsReader

    prof = args.profile
    bootstrap = kafka.bootstrap
    ledger = Ledger()
    reader = ResultsReader(bootstrap, kafka.results_topic, ledger)
    requests, training, control = Producer(bootstrap, "requests"), Producer(bootstrap, "training"), \
        Producer(bootstrap, "control")
    await reader.start()
    for p in (requests, training, control):
        await p.start()
    try:
        # adapters, through the control topic: the first ack also says the worker is serving
        for a in ids:
            await control.send(kafka.control_topic, ControlCommand(command_id=f"load-{a}", action="load",
                                                                    target_id=a, path=str(adapter_root / a)), a)
        await stack.wait_for(lambda: all(f"load-{a}" in ledger.acks for a in ids), args.start_timeout,
                             "the worker to load the adapters", worker, worker_log)
        bad = {k: v for k, v in ledger.acks.items() if not v.get("ok")}
        if bad:
            raise RuntimeError(f"adapter loads refused: {list(bad.values())[:3]}")
        log(f"[service] worker serving, {len(ids)} adapters loaded, {time.perf_counter() - t_start:.1f}s after spawn")

        def request(rid: str, prompt: list[int], adapter: str | None, max_tokens: int) -> GenerateRequest:
            return GenerateRequest(request_id=rid, adapter_id=adapter, prompt_token_ids=prompt, stream=True,
                                   sampling=SamplingSpec(max_tokens=max_tokens, temperature=0.0),
                                   slo=SLOSpec(ttft_ms=DEFAULT_TTFT_S * 1e3, tpot_ms=DEFAULT_TPOT_S * 1e3))

        def job(job_id: str, adapter: str, examples: list[dict[str, list[int]]],
                max_steps: int | None) -> TrainingJobRecord:
            return TrainingJobRecord.model_validate({
                "job_id": job_id, "adapter_id": adapter,
                "lora": {"rank": common.RANK, "alpha": 2 * common.RANK, "target_modules": list(TARGET_MODULES)},
                "data": examples,
                "params": {"optimizer": "adamw", "lr": common.LR, "micro_batch_tokens": prof.micro_batch_tokens,
                           "epochs": None if max_steps else 1, "max_steps": max_steps}})

        # warm-up: requests on several adapters and short jobs (the step shapes the window will meet)
        warm_ids = []
        for i, r in enumerate(trace.requests[: min(len(trace), 2 * prof.num_jobs + 4)]):
            rid = f"warm-{uuid.uuid4().hex[:8]}-{i}"
            ledger.records[rid] = RequestRecord(rid, 0.0, r.num_prompt_tokens, r.max_tokens, r.adapter_id)
            await requests.send(kafka.requests_topic, request(rid, r.prompt_token_ids, r.adapter_id, r.max_tokens), rid)
            warm_ids.append(rid)
        warm_jobs = [f"warm-job-{k}-{uuid.uuid4().hex[:6]}" for k in range(prof.num_jobs)]
        for k, jid in enumerate(warm_jobs):
            await training.send(kafka.training_topic, job(jid, f"svc-warm-{k}-{jid[-6:]}", jobs[k][1][:16], 2), jid)
        try:
            await stack.wait_for(lambda: ledger.num_answered(warm_ids) == len(warm_ids)
                                 and all(ledger.job_done[j] for j in warm_jobs), args.start_timeout,
                                 "the warm-up", worker, worker_log)
        except TimeoutError as e:
            waiting = [r for r in warm_ids if ledger.num_answered([r]) == 0] + \
                [j for j in warm_jobs if not ledger.job_done[j]]
            raise TimeoutError(f"{e}\nstill waiting for: {waiting}") from None
        log(f"[service] warm-up done, {time.perf_counter() - t_start:.1f}s after spawn")
        await asyncio.sleep(1.0)

        # the jobs first, as the engine-alone replay has them: training when the trace starts
        job_ids = [f"svc-job-{k}-{uuid.uuid4().hex[:6]}" for k in range(prof.num_jobs)]
        for k, jid in enumerate(job_ids):
            await training.send(kafka.training_topic, job(jid, f"svc-ft-{k}-{jid[-6:]}", jobs[k][1], None), jid)
        await stack.wait_for(lambda: all(ledger.progress.get(j) for j in job_ids), args.start_timeout,
                             "the jobs to train", worker, worker_log)
        log(f"[service] {len(job_ids)} jobs training, {time.perf_counter() - t_start:.1f}s after spawn")

        # the measured window
        text0 = stack.scrape(port)
        cpu0, lag0, db0 = stack.thread_cpu(worker.pid), stack.lag_buckets(text0), await stack.db_counters(url)
        counts0 = dict(ledger.counts)
        t0 = time.perf_counter()
        ledger.t0, ledger.in_window = t0, True
        sends: list[asyncio.Task[None]] = []
        rids = []
        for r in trace.requests:
            delay = t0 + r.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rid = f"svc-{r.request_id}-{uuid.uuid4().hex[:6]}"
            now = time.perf_counter()
            ledger.records[rid] = RequestRecord(rid, now - t0, r.num_prompt_tokens, r.max_tokens, r.adapter_id)
            ledger.published[rid] = now
            rids.append(rid)
            sends.append(asyncio.create_task(requests.send(kafka.requests_topic, request(
                rid, r.prompt_token_ids, r.adapter_id, r.max_tokens), rid)))
        await asyncio.gather(*sends)
        try:
            await stack.wait_for(lambda: ledger.num_answered(rids) == len(rids),
                                 max(1.0, prof.serve_limit_s - (time.perf_counter() - t0)), "the trace", worker,
                                 worker_log)
        except TimeoutError:
            log(f"[service] time limit: {ledger.num_answered(rids)}/{len(rids)} answered")
        t_end = time.perf_counter()
        window = t_end - t0
        ledger.in_window = False
        text1 = stack.scrape(port)
        cpu1, lag1 = stack.thread_cpu(worker.pid), stack.lag_buckets(text1)
        await asyncio.sleep(1.2)  # PostgreSQL publishes other sessions' counters about once a second
        db1 = await stack.db_counters(url)
        db1["t"] = t_end  # the writes are the window's: divide by its length
        counts1 = dict(ledger.counts)

        # training tokens/s from the progress records read inside the window
        train_tokens, last_t = 0, t0
        for jid in job_ids:  # progress counts a job's tokens since it started: from the last count before t0
            before = max((n for t, n in ledger.progress.get(jid, []) if t <= t0), default=0)
            seen = [(t, n) for t, n in ledger.progress.get(jid, []) if t0 < t <= t_end]
            if seen:
                train_tokens += max(n for _, n in seen) - before
                last_t = max(last_t, *(t for t, _ in seen))
        train_rate = train_tokens / (last_t - t0) if last_t > t0 else 0.0

        # end the jobs, let late or duplicate records arrive, then count
        for jid in job_ids:
            await control.send(kafka.control_topic, ControlCommand(command_id=f"cancel-{jid}", action="cancel",
                                                                    target_id=jid), jid)
        try:
            await stack.wait_for(lambda: all(ledger.job_done[j] for j in job_ids)
                                 and ledger.num_answered(rids) == len(rids), 60.0, "the jobs' end", worker,
                                 worker_log)
        except TimeoutError as exc:
            log(f"[service] {exc}")
        await asyncio.sleep(2.0)
        rows = await stack.request_rows(url, rids)
        once = sum(1 for r in rids if ledger.answers[r] == 1)
        twice = sum(1 for r in rids if ledger.answers[r] > 1)
        lost = sum(1 for r in rids if ledger.answers[r] == 0)
        rows_ok = sum(1 for r in rids if r in rows and rows[r][0] == "succeeded" and rows[r][1] == ledger.usage.get(r))
        records = [ledger.records[r] for r in rids]
        for rec in records:  # to the window's clock
            for f in ("first_token_s", "finish_s"):
                v = getattr(rec, f)
                if v is not None:
                    setattr(rec, f, v - t0)
            if rec.finish_s is not None and rec.finish_s > window:  # finished after the window
                rec.finish_s = None
        summary = summarize_serving(records, window)
        stages = ttft_stages(records, ledger.engine_timings)
        for name, metric in INTAKE_STAGES.items():  # the worker's histograms over the window
            b0, b1 = stack.buckets(text0, metric), stack.buckets(text1, metric)
            stages[name] = {f"p{q}": stack.lag_percentile(b0, b1, q).get("ms", math.nan) for q in (50, 99)}
        per_topic = {
            "requests (published)": len(rids) / window,
            "training (published)": len(job_ids) / window,
            **{f"results: {k}": (counts1.get(k, 0) - counts0.get(k, 0)) / window
               for k in sorted(set(counts1) | set(counts0))},
        }
        lag = stack.lag_percentile(lag0, lag1, 99)
        extra = {
            "_run": None,
            "window_s": window,
            "ledger": {"published": len(rids), "answered_once": once, "answered_twice": twice, "lost": lost,
                       "db_rows": len(rows), "db_rows_match": rows_ok, "errors": list(ledger.errors.values())[:5],
                       "jobs": dict(ledger.job_status)},
            "training_tokens": train_tokens,
            "training_tokens_per_s": train_rate,
            "records_per_s": per_topic,
            "token_records_per_token": (counts1.get("token", 0) - counts0.get("token", 0))
            / max(1, sum(r.num_output_tokens for r in records)),
            "db": stack.db_rates(db0, db1),
            "worker_cpu": stack.cpu_split(worker.pid, cpu0, cpu1, window),
            "loop_lag_p99_ms": lag.get("ms"),
            "loop_lag_window": lag,
            "ttft_stages": stages,
        }
        extra["_run"] = ServiceRun(records, window, summary, extra)
        log(f"[service] {summary.num_finished}/{len(rids)} finished in {window:.1f}s, "
            f"{summary.output_tokens_per_s:.1f} out tok/s, TTFT p99 {summary.ttft_p99_s * 1e3:.0f} ms, "
            f"lost {lost}, twice {twice}, db rows match {rows_ok}/{len(rids)}")
        return extra
    finally:
        await reader.stop()
        for p in (requests, training, control):
            await p.stop()


# --- 2. the engine alone ----------------------------------------------------------------------------


def run_engine_alone(args: argparse.Namespace, model_dir: Path, adapter_root: Path, ids: list[str], trace: Trace,
                     jobs: common.Jobs, log: common.Logger) -> dict[str, Any]:
    from .harness.replay import add_training_jobs, cancel_jobs, make_engine, replay_engine, warmup

    prof, dev = args.profile, args.device
    engine = make_engine(model_dir, dev, args.dtype, engine_limits(args), log)
    for a in ids:
        engine.load_adapter(a, adapter_root / a)
    warmup(engine, args.spec.vocab_size, ids, training=True, micro_batch_tokens=prof.micro_batch_tokens,
           num_jobs=prof.num_jobs, log=log)

    def add(engine: Any, tag: str) -> list[str]:
        return add_training_jobs(engine, [(f"alone-{tag}-{k}", ex) for k, (_, ex) in enumerate(jobs)],
                                 rank=common.RANK, lr=common.LR, micro_batch_tokens=prof.micro_batch_tokens, epochs=1)

    job_ids = add(engine, "mixed")
    run = replay_engine(engine, trace.renamed("alone"), time_limit_s=prof.serve_limit_s, job_ids=job_ids,
                        ttft_ms=DEFAULT_TTFT_S * 1e3, tpot_ms=DEFAULT_TPOT_S * 1e3, device=dev, log=log, label=ALONE)
    cancel_jobs(engine, job_ids)
    job_ids = add(engine, "train")
    train = replay_engine(engine, None, time_limit_s=prof.train_only_s, job_ids=job_ids, device=dev, log=log,
                          label="training only")
    cancel_jobs(engine, job_ids)
    del engine
    common.release()
    return {"records": run.records, "window_s": run.window_s, "summary": summarize_serving(run.records, run.window_s),
            "training_tokens_per_s": run.training.real_tokens_per_s if run.training else math.nan,
            "training_only_tokens_per_s": train.training.real_tokens_per_s if train.training else math.nan}


# --- report -----------------------------------------------------------------------------------------


def targets(svc: ServiceRun, alone: dict[str, Any] | None) -> list[report.Target]:
    s, x = svc.summary, svc.extra
    nan = math.nan
    a: ServingSummary | None = alone["summary"] if alone else None
    ratio = s.output_tokens_per_s / a.output_tokens_per_s if a and a.output_tokens_per_s else nan
    # per request: its client TTFT less the engine's own TTFT for it (counted from the worker's
    # intake), so the way in before the intake and the way out; the p99s of two runs differ by more
    # than that whenever their schedules do
    added = x.get("ttft_stages", {}).get("added by the service (client - engine)", {}).get("p99", nan)
    train_only = alone["training_only_tokens_per_s"] if alone else nan
    led = x["ledger"]
    return [
        report.Target("Service / engine alone, out tok/s (same trace + 4 jobs)", ">= 0.9x at >= 99% SLO", ratio, 0.9,
                      extra_ok=s.slo_attainment >= 0.99,
                      note=f"{s.output_tokens_per_s:.1f} vs {a.output_tokens_per_s if a else nan:.1f} tok/s; SLO "
                           f"{s.slo_attainment:.1%} vs {a.slo_attainment if a else nan:.1%}"),
        report.Target("Service SLO attainment", ">= 0.99", s.slo_attainment, 0.99),
        report.Target("TTFT added by the service, p99 over requests (ms)", "<= 50 ms", added, 50.0,
                      higher_is_better=False,
                      note=f"client TTFT - engine TTFT per request; TTFT p99 {s.ttft_p99_s * 1e3:.0f} vs "
                           f"{a.ttft_p99_s * 1e3 if a else nan:.0f} ms engine alone, p50 {s.ttft_p50_s * 1e3:.0f} vs "
                           f"{a.ttft_p50_s * 1e3 if a else nan:.0f} ms"),
        report.Target("Results lost", "0", float(led["lost"]), 0.0, higher_is_better=False,
                      note=f"{led['published']} published, DB rows matching {led['db_rows_match']}"),
        report.Target("Results answered twice", "0", float(led["answered_twice"]), 0.0, higher_is_better=False),
        report.Target("Training with serving / training only, tok/s", ">= 0.5x", x["training_tokens_per_s"] / train_only
                      if train_only and not math.isnan(train_only) else nan, 0.5,
                      note=f"{x['training_tokens_per_s']:.0f} vs {train_only:.0f} tok/s (engine alone with the trace: "
                           f"{alone['training_tokens_per_s'] if alone else nan:.0f})"),
        report.Target("Worker event-loop lag p99 (ms)", "< 10 ms", float(x["loop_lag_p99_ms"] or nan), 10.0,
                      higher_is_better=False),
    ]


def write(args: argparse.Namespace, trace: Trace, svc: ServiceRun, alone: dict[str, Any] | None,
          errors: dict[str, str]) -> str:
    prof, x = args.profile, svc.extra
    engine_in = ENGINE_IN[getattr(args, "engine_in", "process")]
    summaries = {SERVICE: svc.summary}
    if alone:
        summaries[ALONE] = alone["summary"]
    cpu = x["worker_cpu"]
    led = x["ledger"]
    lag_all = x.get("loop_lag_whole_run") or {}
    sections = [
        ("Setup",
         f"One machine: embedded broker (tansu), PostgreSQL, one worker process (`loquetier worker --device "
         f"{args.device} --dtype {args.dtype}`) with its engine {engine_in}, {NUM_PARTITIONS} "
         "partitions per topic, adapters and checkpoints stored as files plus checksums "
         f"(`LOQUETIER_WORKER__CHECKPOINT_STORAGE=uri`). Trace: {len(trace)} requests, "
         f"Poisson {prof.rate}/s for {prof.duration_s}s over {prof.num_adapters} rank-16 adapters (uniform), "
         f"prompt/output means {prof.prompt_mean}/{prof.output_mean}, greedy, streaming; {prof.num_jobs} training "
         f"jobs (rank 16, micro-batch {prof.micro_batch_tokens} tokens) published before the window and "
         "training when it starts (as in the engine-alone replay), cancelled after it. "
         f"SLO {DEFAULT_TTFT_S:.0f} s TTFT / {DEFAULT_TPOT_S * 1e3:.0f} ms TPOT. SmolLM2 "
         "tokenizer (vocabulary 49152): output is detokenized as in production. Service times are a client's: "
         "from the moment a request is handed to its producer to the moment its records are read back."
         + (f" The worker's KV cache (its log's `kv cache` line): {x['kv_cache']}." if x.get("kv_cache") else "")),
        ("Serving", report.markdown_table(report.SERVING_HEADERS, report.serving_rows(summaries))),
        ("Training",
         report.markdown_table(["run", "tokens/s"], [
             ["service, beside the trace (progress records)", x["training_tokens_per_s"]],
             ["engine alone, beside the trace", alone["training_tokens_per_s"] if alone else math.nan],
             ["engine alone, training only", alone["training_only_tokens_per_s"] if alone else math.nan]])),
        ("Records and database (per second of the window)",
         report.markdown_table(["stream", "per s"], [[k, v] for k, v in x["records_per_s"].items()])
         + f"\n\nToken records per output token: {x['token_records_per_token']:.3f}. Database: "
           f"{x['db']['commits_per_s']:.1f} commits/s, {x['db']['row_writes_per_s']:.1f} row writes/s "
           f"({x['db']['rows_inserted']:.0f} inserted, {x['db']['rows_updated']:.0f} updated)."),
        ("Worker CPU time by thread (window)",
         report.markdown_table(["thread", "CPU s", "share of one core"],
                               [[k, v, cpu["core_share"][k]] for k, v in cpu["cpu_s"].items()])
         + f"\n\nBy OS thread name (`@engine`: a thread of the engine process): {cpu['by_thread_name']}. The "
           "detokenizer runs inside the engine step (its time is in the engine thread's)."),
        ("TTFT by stage (ms, service)",
         report.markdown_table(["stage", "p50", "p99"], [
             [name, v.get("p50"), v.get("p99")] for name, v in x.get("ttft_stages", {}).items()])
         + "\n\nThe engine's own times come with each result (`timings`): `queued` from the request's intake by "
           "the worker (its `arrived_at`: the wait for the row and for the step in flight counts) to its first "
           "step, `engine TTFT` to its first token; the rest of the client's TTFT is the way in (producer, broker, "
           "consumer, decode) and out (token record, broker, reader). The two "
           "`way in` rows are the worker's histograms over the window (`loquetier_request_record_age_seconds`: the "
           "record's Kafka timestamp to its intake; `loquetier_request_intake_seconds`: intake to the engine), "
           "their percentiles interpolated inside buckets."),
        ("Event loop",
         f"Lag of a 10 ms timer on the worker's loop, window p99 {x['loop_lag_p99_ms']:.2f} ms (from the histogram "
         f"`loquetier_event_loop_lag_seconds`, {x['loop_lag_window'].get('num', 0):.0f} samples); whole run "
         f"(worker log): {lag_all}."),
        ("Delivery",
         f"{led['published']} requests published: {led['answered_once']} answered once, {led['answered_twice']} "
         f"more than once, {led['lost']} never; {led['db_rows']} rows in PostgreSQL, {led['db_rows_match']} "
         f"succeeded with the token count of their result. Jobs: {led['jobs']}. Errors: {led['errors']}."),
    ]
    if errors:
        sections.append(("Errors", "\n".join(f"- {k}: {v}" for k, v in errors.items())))
    results = {"service": {"summary": svc.summary.to_dict(), **{k: v for k, v in x.items() if k != "_run"}},
               "engine_alone": {k: (v.to_dict() if k == "summary" else v) for k, v in (alone or {}).items()
                                if k != "records"},
               "trace": trace.meta, "errors": errors, "engine_in": getattr(args, "engine_in", "process")}
    env = common.environment(args)
    return report.write_report(Path(args.out), "service", "The whole service vs the engine alone", env=env,
                               sections=sections, targets=targets(svc, alone), results=results)


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--no-engine-alone", action="store_true", help="skip the engine-alone replays")
    extra.add_argument("--keep-logs", action="store_true", help="write the worker's log to OUT/service_worker.log")
    extra.add_argument("--start-timeout", type=float, default=600.0, help="seconds for the worker to start")
    extra.add_argument("--engine-in", choices=("process", "thread"), default="process",
                       help="the worker's engine in its own process (the default) or on a thread of the worker")
    own, rest = extra.parse_known_args(argv if argv is not None else sys.argv[1:])
    args = parse_args(rest)
    args.no_engine_alone, args.keep_logs, args.start_timeout = own.no_engine_alone, own.keep_logs, own.start_timeout
    args.engine_in = own.engine_in
    log = common.Logger()
    spec: ModelSpec = args.spec
    model_dir = ensure_model(spec, args.cache, args.device, args.dtype, args.seed, log)
    trace, ids, jobs = workload(args)
    adapter_root = args.cache / f"adapters-{spec.name}-r16"
    write_adapters(spec, adapter_root, ids, adapter_ranks(len(ids), False), seed=args.seed, log=log)
    log(f"trace: {len(trace)} requests over {trace.duration_s:.1f}s, {trace.num_output_tokens} output tokens")
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        os.chmod(tmp, 0o755)  # as root an embedded PostgreSQL runs as another user, which must reach its data
        svc = asyncio.run(run_service(args, model_dir, adapter_root, ids, trace, jobs, Path(tmp), log))
    alone = None
    if not args.no_engine_alone:
        alone = common.attempt(ALONE, errors, log, run_engine_alone, args, model_dir, adapter_root, ids, trace, jobs,
                               log)
    print(write(args, trace, svc, alone, errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

