"""Scale-out: several workers in one consumer group, training jobs shared through PostgreSQL
leases, a killed worker's partitions and jobs taken over, a late worker taking its share.

One broker and one PostgreSQL (embedded, started here), workers as ``loquetier worker``
processes, one per entry of ``--devices``. Phases, each counted from the results topic and the
rows:

1. serving with one worker at ``--rate`` requests/s, then with two at twice the rate;
2. ``--jobs`` training jobs submitted with both workers up (the leases spread them), requests
   flowing, then ``kill -9`` of the second worker after the jobs' first checkpoints: the survivor
   takes its partitions (the gap is measured from the kill to the survivor's new assignment) and
   resumes its jobs from their last checkpoint; every request is answered once;
3. a third worker started later joins: its share of partitions, and of jobs submitted after it.

    python -m benchmarks.bench_scaleout --out DIR                     # CPU, tiny model
    python -m benchmarks.bench_scaleout --devices cuda:0,cuda:1,cuda:1 --model-dir DIR --dtype bfloat16

On one machine's CPU the workers share its cores: the run shows the mechanism, not the scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from benchmarks.harness.metrics import percentile
from benchmarks.harness.report import Target, markdown_table, write_report
from loquetier import services
from loquetier.db import migrate
from loquetier.db.models import CheckpointRow, JobRow, RequestRow
from loquetier.db.session import create_engine, session_factory
from loquetier.producers.client import LoquetierClient
from loquetier.settings import KafkaSettings, Settings
from tests.workers.conftest import make_settings
from tests.workers.procs import WorkerProcess

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
FINAL = {"result", "error", "job_done"}
SESSION_TIMEOUT_S = 10.0  # workers/consumer.py: a dead member is noticed after this
LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def assignments(worker: WorkerProcess) -> list[tuple[float, int]]:
    """(log time, number of request partitions) of each assignment ``worker`` logged."""
    out = []
    for e in worker.logs():
        if e.get("msg") == "partitions assigned":
            parts = e.get("partitions") or []
            out.append((_ts(e), sum(1 for p in parts if ".requests'" in str(p))))
    return out


def _ts(entry: dict[str, Any]) -> float:
    return float(entry.get("ts", "nan"))  # workers/logs.py: the record's epoch seconds


@dataclass
class Fleet:
    root: Path
    model_dir: Path
    dtype: str
    partitions: int
    settings: Settings | None = None  # once the broker and PostgreSQL run
    workers: list[WorkerProcess] = field(default_factory=list)
    services: list[Any] = field(default_factory=list)

    @property
    def kafka(self) -> KafkaSettings:
        assert self.settings is not None
        return self.settings.kafka

    @property
    def database_url(self) -> str:
        assert self.settings is not None and self.settings.database.url
        return self.settings.database.url

    def start_worker(self, device: str, max_jobs: int) -> WorkerProcess:
        assert self.settings is not None
        worker = WorkerProcess(
            self.settings, f"scale-{len(self.workers)}-{uuid.uuid4().hex[:4]}", self.model_dir, self.root,
            device=device, dtype=self.dtype,
            extra_args=("--partitions", str(self.partitions), "--max-jobs", str(max_jobs)),
            extra_env={"LOQUETIER_WORKER__RECONCILE_EVERY_S": "2", "LOQUETIER_ENGINE__NUM_KV_BLOCKS": "512"})
        self.workers.append(worker)
        return worker

    async def query(self, fn: Any) -> Any:
        engine = create_engine(self.database_url)
        try:
            async with session_factory(engine).begin() as s:
                return await fn(s)
        finally:
            await engine.dispose()


async def wait_assigned(fleet: Fleet, workers: list[WorkerProcess], after: float, timeout: float = 180) -> float:
    """Seconds from ``after`` until each of ``workers`` logged an assignment after it and together they
    hold every request partition."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"{w.worker_id} exited: {[e.get('msg') for e in w.logs()[-6:]]}")
        latest = [[a for a in assignments(w) if a[0] >= after] for w in workers]
        if all(latest) and sum(a[-1][1] for a in latest) == fleet.partitions:
            return max(a[-1][0] for a in latest) - after
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no full assignment over {[w.worker_id for w in workers]}")


class Ledger:
    """Every record of the results topic, by id: arrival times and final records."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.finals: dict[str, list[Any]] = {}
        self.sent: dict[str, float] = {}

    async def follow(self, client: LoquetierClient, stop: asyncio.Event) -> None:
        async for record in client.results(follow=True, since_ms=int(time.time() * 1000) - 1000):
            rid = getattr(record, "request_id", None) or getattr(record, "job_id", None)
            if rid is None:
                continue
            now = time.time()
            self.first.setdefault(rid, now)
            if record.type in FINAL:
                self.finals.setdefault(rid, []).append((now, record))
            if stop.is_set():
                return

    def answered(self, ids: list[str]) -> tuple[int, int, int]:
        counts = [len(self.finals.get(i, [])) for i in ids]
        return sum(c == 1 for c in counts), sum(c > 1 for c in counts), sum(c == 0 for c in counts)


async def publish(client: LoquetierClient, ledger: Ledger, rng: random.Random, *, rate: float, seconds: float,
                  max_tokens: int, ttft_ms: float, tag: str) -> list[str]:
    """Open-loop (Poisson) requests at ``rate``/s for ``seconds``; their ids."""
    ids: list[str] = []
    start = time.monotonic()
    due = 0.0
    while due < seconds:
        await asyncio.sleep(max(0.0, start + due - time.monotonic()))
        rid = f"{tag}-{len(ids)}-{uuid.uuid4().hex[:6]}"
        ledger.sent[rid] = time.time()
        await client.submit_generate(prompt_token_ids=[rng.randrange(3, 300) for _ in range(rng.randint(8, 24))],
                                     max_tokens=max_tokens, temperature=0.0, stream=True, ttft_ms=ttft_ms,
                                     request_id=rid)
        ids.append(rid)
        due += rng.expovariate(rate)
    return ids


async def settle(ledger: Ledger, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(i not in ledger.finals for i in ids):
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # a late duplicate shows up


def serving_summary(ledger: Ledger, ids: list[str], ttft_slo_s: float) -> dict[str, Any]:
    done = [i for i in ids if i in ledger.finals]
    ttfts = [ledger.first[i] - ledger.sent[i] for i in done]
    tokens = sum(len(getattr(ledger.finals[i][0][1], "token_ids", []) or []) for i in done)
    span = max((ledger.finals[i][0][0] for i in done), default=0.0) - min(ledger.sent[i] for i in ids)
    once, twice, lost = ledger.answered(ids)
    ok = sum(1 for i in done if ledger.finals[i][0][1].type == "result" and ledger.first[i] - ledger.sent[i]
             <= ttft_slo_s)
    return {"requests": len(ids), "tokens_per_s": tokens / span if span > 0 else 0.0,
            "slo_attainment": ok / len(ids) if ids else 0.0, "once": once, "twice": twice, "lost": lost,
            "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
            "ttft_p99_s": percentile(ttfts, 99) if ttfts else None}


def training_data(rng: random.Random) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(6)],
             "completion_token_ids": [rng.randrange(3, 300) for _ in range(6)]} for _ in range(16)]


def job_starts(workers: list[WorkerProcess]) -> list[dict[str, Any]]:
    return [{"worker": w.worker_id, "job_id": e.get("job_id"), "from_step": e.get("from_step"), "t": _ts(e)}
            for w in workers for e in w.logs() if e.get("msg") == "job started"]


async def run(args: argparse.Namespace, model_dir: Path, root: Path) -> dict[str, Any]:  # noqa: PLR0915
    rng = random.Random(args.seed)
    prefix = f"s{uuid.uuid4().hex[:6]}"
    fleet = Fleet(root, model_dir, args.dtype, args.partitions)
    devices = args.devices.split(",")
    results: dict[str, Any] = {"devices": devices}
    broker = services.start_broker(log_dir=root / "broker")
    fleet.services.append(broker)
    pg_root = root / "pg"
    pg_root.mkdir(mode=0o755)
    postgres = await asyncio.to_thread(services.start_postgres, data_dir=pg_root / "data")
    fleet.services.append(postgres)
    fleet.settings = make_settings(broker.address, postgres.address, prefix, heartbeat_s=0.5, lease_s=3.0,
                                   progress_every_s=0.2)
    kafka = fleet.kafka
    await migrate.upgrade_async(postgres.address)
    await services.create_topics(broker.address, kafka.topics(), num_partitions=args.partitions)
    ledger, stop = Ledger(), asyncio.Event()
    try:
        async with LoquetierClient(broker.address, kafka) as client:
            follower = asyncio.create_task(ledger.follow(client, stop))
            # 1. one worker, then two at twice the rate
            t0 = time.time()
            first = fleet.start_worker(devices[0], args.max_jobs)
            await wait_assigned(fleet, [first], t0, timeout=args.start_timeout)
            await _warm(client, ledger)
            one = await publish(client, ledger, rng, rate=args.rate, seconds=args.seconds,
                                max_tokens=args.max_tokens, ttft_ms=args.ttft_ms, tag="one")
            await settle(ledger, one, 120)
            results["one_worker"] = serving_summary(ledger, one, args.ttft_ms / 1000)
            t1 = time.time()
            second = fleet.start_worker(devices[1 % len(devices)], args.max_jobs)
            results["join_gap_s"] = await wait_assigned(fleet, [first, second], t1, timeout=args.start_timeout)
            await _warm(client, ledger)
            two = await publish(client, ledger, rng, rate=2 * args.rate, seconds=args.seconds,
                                max_tokens=args.max_tokens, ttft_ms=args.ttft_ms, tag="two")
            await settle(ledger, two, 120)
            results["two_workers"] = serving_summary(ledger, two, args.ttft_ms / 1000)
            results["two_workers"]["by_worker"] = await _served_by(fleet, two)

            # 2. jobs spread by the leases; kill -9 the second worker after their first checkpoints
            jobs = [await client.submit_training({"adapter_id": f"{prefix}-job{i}", "data": training_data(rng),
                                                  "lora": LORA, "params": {
                                                      "max_steps": args.train_steps, "micro_batch_tokens": 32,
                                                      "lr": 1e-3, "checkpoint_every": args.checkpoint_every,
                                                      "seed": i}}) for i in range(args.jobs)]
            await _until_checkpoints(fleet, jobs, second.worker_id, timeout=args.start_timeout)
            # the spread once every job that fits on the two workers has started somewhere (a worker
            # polls for leases between its own work, so one may start its share a little later)
            await _until_started([first, second], jobs, min(len(jobs), 2 * args.max_jobs), args.start_timeout)
            spread = {w.worker_id: sorted({s["job_id"] for s in job_starts([w])}) for w in (first, second)}
            in_flight = publish(client, ledger, rng, rate=args.rate, seconds=args.seconds / 2,
                                max_tokens=args.max_tokens, ttft_ms=args.ttft_ms, tag="kill")
            flight = asyncio.create_task(in_flight)
            await asyncio.sleep(1.0)  # requests in flight on both workers
            victims = await fleet.query(lambda s: _running_on(s, second.worker_id))
            t_kill = time.time()
            second.kill()
            # read once the killed worker can write nothing more: its jobs had done at least their
            # row's last reported step and their last checkpoint's step (progress lags checkpoints)
            before_kill = await fleet.query(lambda s: _checkpoints(s, jobs))
            rows_at_kill = await fleet.query(lambda s: _steps(s, jobs))
            steps_at_kill = {j: max(rows_at_kill.get(j, 0), before_kill.get(j, 0)) for j in jobs}
            gap = await wait_assigned(fleet, [first], t_kill, timeout=120)
            revoked = [_ts(e) for e in first.logs() if e.get("msg") == "partitions revoked" and _ts(e) >= t_kill]
            killed_ids = await flight
            await settle(ledger, killed_ids, 180)
            await settle(ledger, jobs, 600)
            starts_after = [s for s in job_starts([first]) if s["t"] >= t_kill and s["job_id"] in victims]
            redone = {s["job_id"]: steps_at_kill.get(s["job_id"], 0) - (s["from_step"] or 0) for s in starts_after}
            status = await fleet.query(lambda s: _statuses(s, jobs))
            results["failover"] = {
                "jobs": len(jobs), "spread": {k: len(v) for k, v in spread.items()}, "victims": len(victims),
                "resumed_on_survivor": len({s["job_id"] for s in starts_after}),
                "resumed_from": {s["job_id"]: s["from_step"] for s in starts_after},
                "checkpoints_at_kill": before_kill, "steps_redone_max": max(redone.values(), default=0),
                "checkpoint_every": args.checkpoint_every, "takeover_gap_s": gap,
                "noticed_s": (revoked[0] - t_kill) if revoked else None,
                "jobs_succeeded": sum(1 for v in status.values() if v == "succeeded"),
                "job_done_once": ledger.answered(jobs)[0],
                "requests": serving_summary(ledger, killed_ids, args.ttft_ms / 1000),
                "request_rows": await fleet.query(lambda s: _row_count(s, killed_ids)),
            }

            # 3. a late worker takes its share of partitions and of new jobs
            t3 = time.time()
            third = fleet.start_worker(devices[2 % len(devices)], args.max_jobs)
            results["late_join_gap_s"] = await wait_assigned(fleet, [first, third], t3, timeout=args.start_timeout)
            late_jobs = [await client.submit_training({"adapter_id": f"{prefix}-late{i}", "data": training_data(rng),
                                                       "lora": LORA, "params": {"max_steps": args.train_steps // 2,
                                                                                "micro_batch_tokens": 32}})
                         for i in range(2 * args.max_jobs)]
            late = await publish(client, ledger, rng, rate=args.rate, seconds=args.seconds / 2,
                                 max_tokens=args.max_tokens, ttft_ms=args.ttft_ms, tag="late")
            await settle(ledger, late + late_jobs, 600)
            parts = {w.worker_id: (assignments(w) or [(0, 0)])[-1][1] for w in (first, third)}
            results["late_join"] = {
                "partitions": parts, "requests_by_worker": await _served_by(fleet, late),
                "jobs_by_worker": {w.worker_id: len({s["job_id"] for s in job_starts([w])
                                                      if s["job_id"] in late_jobs}) for w in (first, third)},
                "answered_once": ledger.answered(late + late_jobs)[0], "sent": len(late) + len(late_jobs),
            }
            stop.set()
            follower.cancel()
    finally:
        for w in fleet.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in fleet.workers:
            try:
                w.proc.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        for service in fleet.services:
            services.stop_service(service)
    return results


async def _warm(client: LoquetierClient, ledger: Ledger) -> None:
    """One request through the new assignment, so that start-up is not timed as serving."""
    rid = f"warm-{uuid.uuid4().hex[:8]}"
    ledger.sent[rid] = time.time()
    await client.submit_generate(prompt_token_ids=[5, 6, 7], max_tokens=2, temperature=0.0, request_id=rid)
    await settle(ledger, [rid], 120)


async def _served_by(fleet: Fleet, ids: list[str]) -> dict[str, int]:
    async def q(s: Any) -> dict[str, int]:
        rows = (await s.execute(select(RequestRow.worker_id).where(RequestRow.request_id.in_(ids)))).all()
        out: dict[str, int] = {}
        for (worker_id,) in rows:
            out[str(worker_id)] = out.get(str(worker_id), 0) + 1
        return out
    return dict(await fleet.query(q))


async def _row_count(s: Any, ids: list[str]) -> int:
    return len((await s.execute(select(RequestRow.request_id).where(RequestRow.request_id.in_(ids)))).all())


async def _running_on(s: Any, worker_id: str) -> set[str]:
    rows = (await s.execute(select(JobRow.job_id).where(JobRow.worker_id == worker_id,
                                                         JobRow.status == "running"))).all()
    return {r[0] for r in rows}


async def _checkpoints(s: Any, jobs: list[str]) -> dict[str, int]:
    rows = (await s.execute(select(CheckpointRow.job_id, CheckpointRow.step).where(
        CheckpointRow.job_id.in_(jobs)))).all()
    out: dict[str, int] = {}
    for job_id, step in rows:
        out[job_id] = max(out.get(job_id, 0), step)
    return out


async def _steps(s: Any, jobs: list[str]) -> dict[str, int]:
    rows = (await s.execute(select(JobRow.job_id, JobRow.step).where(JobRow.job_id.in_(jobs)))).all()
    return {job_id: step for job_id, step in rows}


async def _statuses(s: Any, jobs: list[str]) -> dict[str, str]:
    rows = (await s.execute(select(JobRow.job_id, JobRow.status).where(JobRow.job_id.in_(jobs)))).all()
    return {job_id: status for job_id, status in rows}


async def _until_started(workers: list[WorkerProcess], jobs: list[str], want: int, timeout: float) -> None:
    """Until ``want`` of ``jobs`` were started by ``workers`` (their logs), or ``timeout``: the spread is
    then read as it is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len({s["job_id"] for s in job_starts(workers)} & set(jobs)) >= want:
            return
        await asyncio.sleep(0.2)


async def _until_checkpoints(fleet: Fleet, jobs: list[str], worker_id: str, timeout: float) -> None:
    """Until the jobs running on ``worker_id`` each have a checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = await fleet.query(lambda s: _running_on(s, worker_id))
        ckpts = await fleet.query(lambda s: _checkpoints(s, jobs))
        if mine and all(j in ckpts for j in mine):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no checkpointed job on {worker_id}")


def report(results: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> str:
    one, two, fo, late = results["one_worker"], results["two_workers"], results["failover"], results["late_join"]
    ratio = two["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else 0.0
    serving = markdown_table(
        ["workers", "rate (req/s)", "requests", "tokens/s", "TTFT p50 (s)", "TTFT p99 (s)", "SLO", "once/twice/lost",
         "by worker"],
        [["1", args.rate, one["requests"], f"{one['tokens_per_s']:.0f}", _f(one["ttft_p50_s"]), _f(one["ttft_p99_s"]),
          f"{one['slo_attainment']:.1%}", f"{one['once']}/{one['twice']}/{one['lost']}", ""],
         ["2", 2 * args.rate, two["requests"], f"{two['tokens_per_s']:.0f}", _f(two["ttft_p50_s"]),
          _f(two["ttft_p99_s"]), f"{two['slo_attainment']:.1%}", f"{two['once']}/{two['twice']}/{two['lost']}",
          ", ".join(f"{v}" for v in two["by_worker"].values())]])
    req = fo["requests"]
    failover = markdown_table(["fact", "value"], [
        ["jobs, spread over the two workers by the leases", f"{fo['jobs']}: {list(fo['spread'].values())}"],
        ["jobs running on the killed worker", fo["victims"]],
        ["resumed on the survivor / from steps", f"{fo['resumed_on_survivor']} / {fo['resumed_from']}"],
        ["steps redone at most (checkpoint_every)", f"{fo['steps_redone_max']} ({fo['checkpoint_every']})"],
        ["jobs succeeded / job_done once", f"{fo['jobs_succeeded']} / {fo['job_done_once']}"],
        ["survivor holds every partition, seconds after the kill", f"{fo['takeover_gap_s']:.1f}"],
        ["of which: until the group noticed (survivor's partitions revoked)", _f(fo["noticed_s"])],
        ["requests around the kill: once/twice/lost, rows", f"{req['once']}/{req['twice']}/{req['lost']}, "
                                                             f"{fo['request_rows']}"],
        ["requests around the kill: TTFT p50 / p99 (s), within the TTFT SLO",
         f"{_f(req['ttft_p50_s'])} / {_f(req['ttft_p99_s'])}, {req['slo_attainment']:.1%}"]])
    joined = markdown_table(["fact", "value"], [
        ["seconds from start to a shared assignment", f"{results['late_join_gap_s']:.1f}"],
        ["request partitions by worker", list(late["partitions"].values())],
        ["requests served by worker", list(late["requests_by_worker"].values())],
        ["new jobs started by worker", list(late["jobs_by_worker"].values())],
        ["answered once / sent", f"{late['answered_once']} / {late['sent']}"]])
    targets = [
        Target("two workers / one worker, tokens/s at twice the rate", ">= 1.8x", ratio, 1.8,
               note="CPU: both share the machine's cores" if "cpu" in args.devices else ""),
        Target("SLO attainment with two workers", ">= 99 %", two["slo_attainment"] * 100, 99.0),
        Target("steps redone after kill -9 <= checkpoint_every", f"<= {fo['checkpoint_every']}",
               fo["steps_redone_max"], fo["checkpoint_every"], higher_is_better=False,
               extra_ok=fo["resumed_on_survivor"] == fo["victims"] and fo["jobs_succeeded"] == fo["jobs"]),
        Target("requests around the kill answered twice or lost", "0", req["twice"] + req["lost"], 0.0,
               higher_is_better=False, extra_ok=fo["request_rows"] == req["requests"]),
        Target("survivor holds every partition, seconds after the kill", f"<= {SESSION_TIMEOUT_S:.0f} s",
               fo["takeover_gap_s"], SESSION_TIMEOUT_S, higher_is_better=False,
               note="the consumer's session timeout; after it the survivor finishes its own in-flight requests "
                    "(at most drain_timeout_s) before it rejoins"),
        Target("late worker's share of partitions", "> 0", min(late["partitions"].values()), 1.0),
    ]
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if "cuda" in args.devices and torch.cuda.is_available() else "no GPU"
    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "device": f"workers on {args.devices}; {gpu}; {os.cpu_count()} CPU cores", "model": args.model_label,
           "dtype": args.dtype, "command": "python -m benchmarks.bench_scaleout " + shlex.join(argv),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": "-"}
    return write_report(Path(args.out), "scaleout", "Scale-out: workers in one consumer group", env=env,
                        sections=[("Serving, one worker then two", serving),
                                  ("kill -9 of one worker with jobs and requests in flight", failover),
                                  ("A worker that joins later", joined)],
                        targets=targets, results=results)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="cpu,cpu,cpu", help="one per worker: first, second, late joiner")
    p.add_argument("--model-dir", default=None, help="a model directory (default: a tiny random Llama)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rate", type=float, default=2.0, help="requests/s with one worker (twice with two)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ttft-ms", type=float, default=2000.0)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--max-jobs", type=int, default=4, help="jobs run at once by one worker")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DOCS))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loquetier-scaleout-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # the embedded PostgreSQL runs as another user that must reach its directory
        if args.model_dir:
            model_dir, args.model_label = Path(args.model_dir), Path(args.model_dir).name
        else:
            from tests.tiny import make_tiny_model

            model_dir, args.model_label = make_tiny_model(root / "llama"), "tiny Llama"
        try:
            results = asyncio.run(run(args, model_dir, root))
        finally:
            shutil.rmtree(root / "pg", ignore_errors=True)
    print(report(results, args, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
