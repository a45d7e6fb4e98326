"""What the HTTP gateway costs: latency it adds over a direct Kafka client, and tokens/s through it.

One run, one broker, one database, one worker (``loquetier worker`` subprocess) and one gateway
(``loquetier gateway`` subprocess); this process is both clients:

- direct: publishes ``GenerateRequest`` records itself and reads the replies from its own reply
  topic (the same Kafka path the gateway uses, so the difference is the HTTP layer: parsing,
  auth, validation, the answer's JSON or SSE);
- gateway: ``POST /v1/completions`` over keep-alive HTTP connections; a streamed answer is read as
  raw bytes, split into SSE events, each event's JSON decoded (as the direct client decodes each
  record).

Latency: sequential requests alternating direct / gateway (drift in the worker hits both alike),
non-streaming, greedy, ``--max-tokens`` each; added = gateway percentile - direct percentile.
Throughput: ``--concurrency`` streams at once, each running ``--per-stream`` requests back to
back (stream=True both ways), direct, gateway, direct, gateway; completion tokens / wall time.

    python -m benchmarks.bench_gateway                      # tiny model, embedded broker, local PostgreSQL
    python -m benchmarks.bench_gateway --model DIR --out docs/benchmarks

Writes ``gateway.json`` (``targets``: ≤ 5 ms p50 added, ≥ 0.95× direct tokens/s) and ``gateway.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the quick brown fox", "what is the capital", "a pirate says", "once upon a time", "hello there"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: a tiny random Llama built here)")
    p.add_argument("--requests", type=int, default=200, help="sequential requests per path for latency")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--per-stream", type=int, default=8)
    p.add_argument("--stream-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    return p.parse_args(argv)


# --- services ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def broker(tmp: Path) -> Iterator[str]:
    configured = os.environ.get("LOQUETIER_KAFKA__BOOTSTRAP")
    if configured:
        yield configured
        return
    from loquetier import services

    with services.embedded_broker(tmp / "broker") as service:
        yield service.address


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A fresh database on the configured server (or 127.0.0.1:5432), migrated; dropped afterwards."""
    from .harness import service_stack

    server = os.environ.get("LOQUETIER_DATABASE__URL") or "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    async with service_stack.database(server, prefix="loquetier_bench") as url:
        yield url


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "loquetier.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                answer = await http.get(url)
                if answer.status_code == 200 and answer.json().get("worker") == "ok":
                    return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready:\n{log.read_text()[-3000:]}")


# --- the two clients --------------------------------------------------------------------------


class Direct:
    """Publishes requests and reads its own reply topic with the gateway's Kafka code."""

    def __init__(self, bootstrap: str, kafka: Any) -> None:
        from loquetier.gateway.bus import Bus

        self.kafka = kafka
        self.bus = Bus(bootstrap, kafka, gateway_id=f"bench-direct-{uuid.uuid4().hex[:6]}")

    async def complete(self, prompt: str, max_tokens: int, *, stream: bool = False) -> int:
        from loquetier.messages import GenerateRequest

        rid = f"direct-{uuid.uuid4().hex}"
        record = GenerateRequest(request_id=rid, prompt=prompt, stream=stream, reply_to=self.bus.topic,
                                 sampling={"max_tokens": max_tokens, "temperature": 0.0})  # type: ignore[arg-type]
        queue = self.bus.expect(rid)
        try:
            await self.bus.publish(self.kafka.requests_topic, record, rid)
            while True:
                got = await asyncio.wait_for(queue.get(), 120)
                if got.type == "result":
                    return int(got.usage.completion_tokens)
                if got.type == "error":
                    raise RuntimeError(f"{got.code}: {got.message}")
        finally:
            self.bus.forget(rid)


class Http:
    def __init__(self, base_url: str, key: str, model: str) -> None:
        import httpx

        self.base_url, self.model = base_url, model
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))

    async def complete(self, prompt: str, max_tokens: int, *, stream: bool = False) -> int:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if not stream:
            answer = await self.http.post(f"{self.base_url}/completions", json=body)
            answer.raise_for_status()
            return int(answer.json()["usage"]["completion_tokens"])
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        tokens, pending = 0, b""
        async with self.http.stream("POST", f"{self.base_url}/completions", json=body) as answer:
            answer.raise_for_status()
            async for data in answer.aiter_bytes():  # SSE events split on blank lines, each JSON decoded
                *events, pending = (pending + data).split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: {"):
                        usage = orjson.loads(event[6:]).get("usage")
                        if usage:
                            tokens = int(usage["completion_tokens"])
        return tokens


# --- measurements -----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def latency(direct: Direct, http: Http, n: int, max_tokens: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for i in range(n):
        order = [("direct", direct), ("gateway", http)] if i % 2 == 0 else [("gateway", http), ("direct", direct)]
        for name, path in order:
            start = time.perf_counter()
            await path.complete(PROMPTS[i % len(PROMPTS)], max_tokens)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


async def throughput(path: Direct | Http, concurrency: int, per_stream: int, max_tokens: int) -> tuple[float, int]:
    async def one(stream_index: int) -> int:
        total = 0
        for j in range(per_stream):
            prompt = f"{PROMPTS[(stream_index + j) % len(PROMPTS)]} {stream_index}"
            total += await path.complete(prompt, max_tokens, stream=True)
        return total

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(concurrency))))
    return tokens / (time.perf_counter() - start), tokens


async def run(args: argparse.Namespace, tmp: Path, bootstrap: str) -> dict[str, Any]:
    import psutil

    from loquetier import services
    from loquetier.db import keys_repo
    from loquetier.db.session import create_engine, session_factory
    from loquetier.settings import KafkaSettings

    model = Path(args.model) if args.model else None
    if model is None:
        sys.path.insert(0, str(ROOT))
        from tests.tiny import make_tiny_model

        model = make_tiny_model(tmp / "tiny-llama")
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    kafka = KafkaSettings(bootstrap=bootstrap, requests_topic=f"{prefix}.requests", training_topic=f"{prefix}.training",
                          control_topic=f"{prefix}.control", results_topic=f"{prefix}.results",
                          dlq_topic=f"{prefix}.dlq", group_id=f"{prefix}-workers", num_partitions=2)
    await services.create_topics(bootstrap, kafka.topics(), num_partitions=2)
    async with database() as url:
        env = {**os.environ, "LOQUETIER_KAFKA__BOOTSTRAP": bootstrap, "LOQUETIER_DATABASE__URL": url,
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LOQUETIER_CACHE_DIR": str(tmp),
               # prompts are scheduled at once instead of held to be batched: less spread in the worker's time,
               # which both paths share and which otherwise hides the milliseconds measured here
               "LOQUETIER_ENGINE__PREFILL_COALESCE_MS": "0"}
        env.pop("TRITON_INTERPRET", None)  # a CPU worker runs the torch reference ops, not Triton's interpreter
        for field in ("requests_topic", "training_topic", "control_topic", "results_topic", "dlq_topic", "group_id"):
            env[f"LOQUETIER_KAFKA__{field.upper()}"] = getattr(kafka, field)
        engine = create_engine(url)
        async with session_factory(engine).begin() as s:
            _, key = await keys_repo.create_key(s, name="bench", tenant_id="bench")
        await engine.dispose()
        port = free_port()
        worker = spawn(["worker", "--model", str(model), "--worker-id", f"{prefix}-w", "--metrics-port", "0"], env,
                       tmp / "worker.log")
        gateway = spawn(["gateway", "--port", str(port), "--model-name", "bench-model", "--gateway-id",
                         f"{prefix}-gw", "--log-level", "warning"], env, tmp / "gateway.log")
        direct = Direct(bootstrap, kafka)
        http = Http(f"http://127.0.0.1:{port}/v1", key, "bench-model")
        try:
            await wait_http(f"http://127.0.0.1:{port}/health", gateway, tmp / "gateway.log")
            await direct.bus.start()
            for i in range(10):  # warm-up: connections, kernels, caches
                await direct.complete(PROMPTS[i % 5], args.max_tokens)
                await http.complete(PROMPTS[i % 5], args.max_tokens)
            lat = await latency(direct, http, args.requests, args.max_tokens)
            runs: dict[str, list[float]] = {"direct": [], "gateway": []}
            cpu: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
            paths = {"direct": direct, "gateway": http}
            procs = {"worker": psutil.Process(worker.pid), "gateway": psutil.Process(gateway.pid),
                     "client": psutil.Process()}
            for name in ("direct", "gateway", "gateway", "direct", "direct", "gateway", "gateway", "direct"):
                before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
                rate, tokens = await throughput(paths[name], args.concurrency, args.per_stream, args.stream_tokens)
                runs[name].append(rate)  # ABBA order: a steady drift in the worker's speed hits both alike
                cpu[name].append({k: (sum(p.cpu_times()[:2]) - before[k]) * 1e6 / tokens for k, p in procs.items()})
        finally:
            await http.http.aclose()
            with contextlib.suppress(Exception):
                await direct.bus.stop()
            stop(gateway)
            stop(worker)
    return {"latency_ms": lat, "tokens_per_s": runs, "cpu_us_per_token": cpu, "model": str(model.name)}


def summarize(args: argparse.Namespace, raw: dict[str, Any], command: str) -> dict[str, Any]:
    lat = raw["latency_ms"]
    rows = {name: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "mean": statistics.fmean(v)} for name, v in lat.items()}
    added_p50 = rows["gateway"]["p50"] - rows["direct"]["p50"]
    added_p99 = rows["gateway"]["p99"] - rows["direct"]["p99"]
    paired = [g - d for g, d in zip(lat["gateway"], lat["direct"], strict=True)]  # neighbours in time
    tps = {name: statistics.fmean(v) for name, v in raw["tokens_per_s"].items()}
    ratio = tps["gateway"] / tps["direct"]
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": command,
           "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
           "model": raw["model"], "args": vars(args)}
    targets = [
        {"name": "Latency the gateway adds, p50", "goal": "<= 5 ms", "measured": added_p50, "ok": added_p50 <= 5.0,
         "note": f"p99 added {added_p99:.2f} ms; median of paired differences {statistics.median(paired):.2f} ms"},
        {"name": "Tokens/s through the gateway / direct Kafka client", "goal": ">= 0.95x", "measured": ratio,
         "ok": ratio >= 0.95, "note": f"{tps['gateway']:.0f} vs {tps['direct']:.0f} tok/s"},
    ]
    added = {"p50": added_p50, "p99": added_p99, "paired_median": statistics.median(paired)}
    return {"env": env, "results": {"latency_ms": rows, "added_ms": added,
                                    "tokens_per_s": tps, "tokens_per_s_runs": raw["tokens_per_s"],
                                    "cpu_us_per_token": {name: {k: statistics.fmean(r[k] for r in runs)
                                                                for k in runs[0]}
                                                         for name, runs in raw["cpu_us_per_token"].items()},
                                    "latency_samples_ms": lat}, "targets": targets}


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gateway.json").write_text(json.dumps(report, indent=1) + "\n")
    env, res = report["env"], report["results"]
    a = env["args"]
    lines = [
        "# Gateway: latency added over a direct Kafka client, tokens/s through it",
        "",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- host: {env['host']} (no GPU), Python {env['python']}; model: {env['model']} on the CPU worker",
        "- one broker (embedded tansu), one PostgreSQL, one worker and one gateway (subprocesses); this process",
        "  runs both clients. Direct = the same Kafka path the gateway uses (publish with `reply_to`, read the",
        "  reply topic), so the difference is the HTTP layer.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        value = f"{t['measured']:.2f} ms" if "Latency" in t["name"] else f"{t['measured']:.3f}x"
        lines.append(f"| {t['name']} | {t['goal']} | {value} ({t['note']}) | {'yes' if t['ok'] else 'no'} |")
    lines += [
        "",
        f"## Latency ({a['requests']} sequential requests per path, alternating; {a['max_tokens']} tokens, greedy)",
        "",
        "| path | p50 ms | p99 ms | mean ms |",
        "|---|---|---|---|",
    ]
    for name, row in res["latency_ms"].items():
        lines.append(f"| {name} | {row['p50']:.2f} | {row['p99']:.2f} | {row['mean']:.2f} |")
    lines += [
        "",
        f"## Throughput ({a['concurrency']} concurrent streams × {a['per_stream']} requests, {a['stream_tokens']} "
        "tokens each, stream=True; four runs each, in ABBA order)",
        "",
        "| path | tok/s (mean) | runs |",
        "|---|---|---|",
    ]
    for name, value in res["tokens_per_s"].items():
        runs = ", ".join(f"{v:.0f}" for v in res["tokens_per_s_runs"][name])
        lines.append(f"| {name} | {value:.0f} | {runs} |")
    lines += [
        "",
        "CPU time per completion token (µs, mean of the runs; the gateway process idles in direct runs):",
        "",
        "| path | worker | gateway | client (this process) |",
        "|---|---|---|---|",
    ]
    for name, row in res["cpu_us_per_token"].items():
        lines.append(f"| {name} | {row['worker']:.0f} | {row['gateway']:.0f} | {row['client']:.0f} |")
    lines += [
        "",
        "## Reading these numbers",
        "",
        "- A request takes ~250 ms on either path although the tiny model needs far less: most of it is",
        "  fetch waits. On the embedded broker (tansu) a fetch returned a record a median 115 ms after it",
        "  was produced with a 500 ms wait (the worker consumer's), 6 ms with a 20 ms wait (the reply",
        "  readers'), in a probe on this machine (2026-12-02); Kafka answers as soon as a record arrives.",
        "  Both paths pay it alike.",
        "- Everything runs on one shared 2-core machine: the gateway's CPU time per token (the gateway",
        "  column minus its idle share in direct runs) is taken from the worker, so the throughput ratio",
        "  here is a lower bound for a worker on its own GPU host. p99 and single runs move with whatever",
        "  else the machine runs; the p50s and the ABBA means are the stable figures.",
    ]
    (out / "gateway.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.bench_gateway " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        with broker(tmp) as bootstrap:
            raw = asyncio.run(run(args, tmp, bootstrap))
    report = summarize(args, raw, command.strip())
    write(report, Path(args.out))
    for t in report["targets"]:
        print(f"{t['name']}: {t['measured']:.3f} (goal {t['goal']}; {t['note']}) -> {'ok' if t['ok'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
