"""The chaos scenarios, each a coroutine ``(stack, sizes) -> Tally``.

Every scenario sends its records, waits until each has been answered (or a deadline), counts
the final records per id over the whole results topic (answered once, more than once, never),
and ends with a fresh request that must be served: the worker is alive and responsive.
tests/chaos/test_chaos.py runs them CI-sized; ``python -m benchmarks.chaos`` runs them larger
and writes docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import select

from loquetier.db.models import CheckpointRow, JobRow, RequestRow
from loquetier.messages import decode_record

from .crashy import PILL_EXIT_CODE
from .ledger import Tally, counts_of, final_records
from .stack import OPERATOR_TOKEN, PILL, Stack

TRAIN_LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@dataclass(frozen=True)
class Sizes:
    num_bad: int = 300
    num_good: int = 20
    num_duplicated: int = 10
    num_flood: int = 200
    num_in_flight: int = 24
    train_steps: int = 150
    num_outage: int = 30
    outage_s: float = 3.0
    num_cancels: int = 500


CI = Sizes()
LONG = Sizes(num_bad=2000, num_good=100, num_duplicated=50, num_flood=2000, num_in_flight=48, train_steps=300,
             num_outage=200, outage_s=10.0, num_cancels=5000)


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def good(rid: str, max_tokens: int = 3, prompt: str = "the quick brown fox") -> dict[str, Any]:
    return {"schema": 1, "request_id": rid, "prompt": prompt, "sampling": {"max_tokens": max_tokens,
                                                                            "temperature": 0.0}}


def new_ids(prefix: str, num: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"{prefix}-{tag}-{i}" for i in range(num)]


# --- helpers ------------------------------------------------------------------------------------


async def send_all(stack: Stack, topic: str, values: list[tuple[bytes | None, bytes]], *,
                   max_request_size: int | None = None) -> list[Any]:
    """Send (key, value) pairs at once (batched); returns their RecordMetadata."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.cfg.kafka.bootstrap, linger_ms=5,
                                max_request_size=max_request_size or stack.cfg.kafka.max_record_bytes + 65536)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in values]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


async def wait_answered(stack: Stack, ids: list[str], *, timeout: float, expected: dict[str, int] | None = None,
                        job_ids: set[str] | None = None, settle_s: float = 1.0) -> dict[str, int]:
    """Final records per id, once every id has its expected number or the deadline passed.
    A short settle time lets a late duplicate show up before counting."""
    deadline = time.monotonic() + timeout
    while True:
        counts = counts_of(await final_records(stack.cfg.kafka.bootstrap or "", stack.cfg.kafka.results_topic,
                                               ids), job_ids=job_ids)
        is_done = all(counts.get(i, 0) >= (expected or {}).get(i, 1) for i in ids)
        if is_done or time.monotonic() > deadline or not stack.is_alive():
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(settle_s)
    return counts_of(await final_records(stack.cfg.kafka.bootstrap or "", stack.cfg.kafka.results_topic, ids),
                     job_ids=job_ids)


async def is_responsive(stack: Stack, timeout: float = 60) -> bool:
    """A fresh request is served (a "result"), and the worker process is alive."""
    if not stack.is_alive():
        return False
    (rid,) = new_ids("probe", 1)
    async with stack.client() as client:
        await client.send(stack.cfg.kafka.requests_topic, decode_record("requests", pack(good(rid, 2))), rid)
        try:
            answer = await client.wait_result(rid, timeout)
        except TimeoutError:
            return False
    return stack.is_alive() and answer.type == "result"


async def dead_letter_counts(stack: Stack) -> collections.Counter[tuple[str, int, int]]:
    """DLQ letters per (topic, partition, offset) of the rejected record."""
    counts: collections.Counter[tuple[str, int, int]] = collections.Counter()
    topic = stack.cfg.kafka.dlq_topic
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.cfg.kafka.bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        while batches := await consumer.getmany(timeout_ms=500):
            for records in batches.values():
                for msg in records:
                    letter = decode_record("dlq", msg.value)
                    counts[(letter.topic, letter.partition, letter.offset)] += 1
        return counts
    finally:
        await consumer.stop()


async def rows(stack: Stack, ids: list[str]) -> dict[str, RequestRow]:
    async def fetch(s: Any) -> dict[str, RequestRow]:
        found = (await s.scalars(select(RequestRow).where(RequestRow.request_id.in_(ids)))).all()
        return {r.request_id: r for r in found}

    result: dict[str, RequestRow] = await stack.query(fetch)
    return result


# --- scenarios -----------------------------------------------------------------------------------


def _bad_value(rng: random.Random, rid: str) -> bytes:
    base = good(rid)
    choice = rng.randrange(9)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 400))
    if choice == 1:
        return pack(base)[: rng.randrange(1, 20)]  # truncated msgpack
    if choice == 2:
        return pack(rng.choice([[1, 2], 7, "x", None, 3.5]))
    if choice == 3:
        return pack({k: v for k, v in base.items() if k != "schema"})
    if choice == 4:
        return pack(base | {"schema": rng.choice([0, 2, "1", True])})
    if choice == 5:
        return pack(base | {"sampling": {"max_tokens": rng.choice([0, -1, "many", 2**64 - 1])}})
    if choice == 6:
        return pack(base | {"surprise": rng.random()})
    if choice == 7:
        return pack(base | {"request_id": f"nul\x00{rid}"})
    return rng.randbytes(6) + pack(base)


async def hostile_bytes(stack: Stack, sizes: Sizes) -> Tally:
    """Random bytes, truncated msgpack, wrong types and fields among valid requests."""
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    tally = Tally("hostile bytes")
    bad_ids, good_ids = new_ids("bad", sizes.num_bad), new_ids("good", sizes.num_good)
    values: list[tuple[bytes | None, bytes]] = [(rid.encode(), _bad_value(rng, rid)) for rid in bad_ids]
    for i, rid in enumerate(good_ids):
        values.insert(i * (len(values) // len(good_ids)), (rid.encode(), pack(good(rid))))
    topic = stack.cfg.kafka.requests_topic
    metas = await send_all(stack, topic, values)
    counts = await wait_answered(stack, good_ids, timeout=120)
    tally.add(counts, good_ids)
    letters = await dead_letter_counts(stack)
    bad = [(m.topic, m.partition, m.offset) for (key, _), m in zip(values, metas, strict=True)
           if key is not None and key.decode() in set(bad_ids)]
    tally.add({str(p): letters.get(p, 0) for p in bad}, [str(p) for p in bad])
    tally.notes.append(f"{sizes.num_bad} malformed records dead-lettered, {sizes.num_good} valid ones served")
    return tally


async def oversized_record(stack: Stack, sizes: Sizes) -> Tally:
    """A 3 MB key with a 2 MiB non-msgpack value, then valid requests on the same partition."""
    tally = Tally("3 MB key + 2 MiB value")
    k = stack.cfg.kafka
    key, value = os.urandom(3_000_000), b"\xc1" + os.urandom(2 * 1024 * 1024)
    (meta,) = await send_all(stack, k.requests_topic, [(key, value)], max_request_size=16 << 20)
    ids = new_ids("after-huge", 8)
    await send_all(stack, k.requests_topic, [(rid.encode(), pack(good(rid))) for rid in ids])
    tally.add(await wait_answered(stack, ids, timeout=60), ids)
    letters = await dead_letter_counts(stack)
    tally.add({"huge": letters.get((meta.topic, meta.partition, meta.offset), 0)}, ["huge"])
    tally.notes.append("the letter keeps 64 KiB excerpts, sizes and sha256")
    return tally


async def duplicates(stack: Stack, sizes: Sizes) -> Tally:
    """Each request sent three times at once; other requests reuse an id for other content. Copies that
    meet while their request runs share its one result (their readers read it under the same id); a
    copy read after the request finished gets the stored result again: 1 to 3 results for 3 copies."""
    tally = Tally("duplicates")
    same, reused = new_ids("dup", sizes.num_duplicated), new_ids("reuse", sizes.num_duplicated)
    values = [(rid.encode(), pack(good(rid, 6))) for rid in same for _ in range(3)]
    values += [(rid.encode(), pack(good(rid, 4, prompt))) for rid in reused
               for prompt in ("the quick brown fox", "a pirate says")]
    await send_all(stack, stack.cfg.kafka.requests_topic, values)
    counts = await wait_answered(stack, same + reused, timeout=120,
                                 expected={rid: 1 for rid in same} | {rid: 2 for rid in reused})
    tally.sent = len(values)
    for rid in same:  # each of the 3 copies is answered when at least one result is out
        got = counts.get(rid, 0)
        tally.once += 3 if got else 0
        tally.twice += max(0, got - 3)
        tally.lost += 0 if got else 3
    for rid in reused:  # one result and one duplicate_request_id refusal
        got = counts.get(rid, 0)
        tally.once += min(got, 2)
        tally.twice += max(0, got - 2)
        tally.lost += max(0, 2 - got)
    found = await rows(stack, same + reused)
    computed = sum(r.attempts for r in found.values())
    shared = sum(counts.get(rid, 0) for rid in same)
    tally.facts = {"computed": computed, "ids": len(found)}
    tally.notes.append(f"{len(values)} records, {computed} computations for {len(found)} request ids; "
                       f"{shared} results for the {3 * len(same)} copies")
    return tally


async def flood(stack: Stack, sizes: Sizes) -> Tally:
    tally = Tally(f"flood of {sizes.num_flood}")
    ids = new_ids("flood", sizes.num_flood)
    started = time.monotonic()
    await send_all(stack, stack.cfg.kafka.requests_topic, [(rid.encode(), pack(good(rid, 2))) for rid in ids])
    tally.add(await wait_answered(stack, ids, timeout=300), ids)
    tally.notes.append(f"all answered in {time.monotonic() - started:.0f} s")
    return tally


async def kill_while_serving(stack: Stack, sizes: Sizes) -> Tally:
    """kill -9 with requests in flight; the restarted worker answers them."""
    tally = Tally("kill -9 while serving")
    ids = new_ids("inflight", sizes.num_in_flight)
    await send_all(stack, stack.cfg.kafka.requests_topic, [(rid.encode(), pack(good(rid, 48))) for rid in ids])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = await rows(stack, ids)
        if sum(1 for r in found.values() if r.status == "running") >= 2:
            break
        await asyncio.sleep(0.05)
    stack.kill_worker()
    before = await final_records(stack.cfg.kafka.bootstrap or "", stack.cfg.kafka.results_topic, ids)
    in_flight = [rid for rid in ids if rid not in before]
    tally.facts["in_flight"] = len(in_flight)
    stack.start_worker()
    await stack.wait_serving()
    counts = await wait_answered(stack, ids, timeout=120)
    tally.add(counts, ids)
    again = [rid for rid in ids if counts.get(rid, 0) > 1]
    tally.facts["in_flight_once"] = all(counts.get(r, 0) == 1 for r in in_flight)
    tally.facts["again_before_kill"] = all(r in before for r in again)
    tally.notes.append(f"{len(in_flight)} in flight at the kill, each answered once after the restart"
                       if all(counts.get(r, 0) == 1 for r in in_flight) else "in-flight requests answered twice")
    if again:
        tally.notes.append(f"{len(again)} finished before the kill but not yet committed: republished")
    return tally


async def kill_while_training(stack: Stack, sizes: Sizes) -> Tally:
    """kill -9 after a checkpoint; the restarted worker resumes the job from it."""
    tally = Tally("kill -9 while training")
    (job_id,) = new_ids("job", 1)
    data = [{"prompt_token_ids": [1, 10 + i, 11 + i], "completion_token_ids": [40 + i, 41, 42 + i]} for i in range(6)]
    params = {"lr": 5e-3, "max_steps": sizes.train_steps, "micro_batch_tokens": 20, "seed": 7,
              "checkpoint_every": max(1, sizes.train_steps // 10)}
    async with stack.client() as client:
        await client.submit_training({"job_id": job_id, "adapter_id": f"chaos-{job_id}", "data": data,
                                      "lora": TRAIN_LORA, "params": params})

    async def checkpoint(s: Any) -> int | None:
        step: int | None = await s.scalar(select(CheckpointRow.step).where(CheckpointRow.job_id == job_id)
                                          .order_by(CheckpointRow.step.desc()).limit(1))
        return step

    deadline = time.monotonic() + 120
    step = None
    while time.monotonic() < deadline and step is None:
        step = await stack.query(checkpoint)
        await asyncio.sleep(0.02)
    since = len(stack.logs())
    stack.kill_worker()
    step = await stack.query(checkpoint)
    stack.start_worker()
    await stack.wait_serving(since=since)
    counts = await wait_answered(stack, [job_id], timeout=180, job_ids={job_id})
    tally.add(counts, [job_id])
    job = await stack.query(lambda s: s.scalar(select(JobRow).where(JobRow.job_id == job_id)))
    resumed = [e.get("from_step") for e in stack.logs(since) if e.get("msg") == "job started"]
    tally.facts = {"checkpoint": step, "resumed_from": resumed[-1] if resumed else None,
                   "status": job.status if job else None, "step": job.step if job else None,
                   "attempts": job.attempts if job else None}
    tally.notes.append(f"killed after the step-{step} checkpoint of {sizes.train_steps}; resumed from step "
                       f"{tally.facts['resumed_from']}; {tally.facts['status']} at step {tally.facts['step']}")
    return tally


async def poison_pill(stack: Stack, sizes: Sizes) -> Tally:
    """A request whose engine call kills the process: restarted twice, then failed "poisoned"."""
    tally = Tally("poison pill (crashes the worker)")
    (rid,) = new_ids("pill", 1)
    value = {"schema": 1, "request_id": rid, "prompt_token_ids": PILL, "sampling": {"max_tokens": 4}}
    await send_all(stack, stack.cfg.kafka.requests_topic, [(rid.encode(), pack(value))])
    num_crashes, since_crash = 0, len(stack.logs())
    for _ in range(stack.options.max_attempts):  # a supervisor restarts the worker each time it dies
        assert stack.worker is not None
        await asyncio.to_thread(stack.worker.proc.wait, 120)
        num_crashes += any(f"exit code {PILL_EXIT_CODE}" in str(e.get("reason", "")) + str(e.get("engine_failure", ""))
                           for e in stack.logs(since_crash))
        since = since_crash = len(stack.logs())
        stack.start_worker()
    await stack.wait_serving(since=since)
    counts = await wait_answered(stack, [rid], timeout=60)
    tally.add(counts, [rid])
    records = (await final_records(stack.cfg.kafka.bootstrap or "", stack.cfg.kafka.results_topic, [rid]))[rid]
    codes = sorted({getattr(r, "code", r.type) for r in records})
    tally.facts = {"crashes": num_crashes, "codes": codes}
    tally.notes.append(f"{num_crashes} crashes, then answered {', '.join(codes)}")
    return tally


async def broker_restart(stack: Stack, sizes: Sizes) -> Tally:
    """The broker restarts under a running worker; then SIGTERM while the broker is away."""
    tally = Tally("broker restart, SIGTERM with the broker away")
    assignments = sum(1 for e in stack.logs() if e.get("msg") == "partitions assigned")
    await stack.restart_broker(down_s=2.0)
    deadline = time.monotonic() + 90
    while sum(1 for e in stack.logs() if e.get("msg") == "partitions assigned") <= assignments:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not rejoin the restarted broker")
        await asyncio.sleep(0.2)
    ids = new_ids("after-broker", 10)
    await send_all(stack, stack.cfg.kafka.requests_topic, [(rid.encode(), pack(good(rid))) for rid in ids])
    tally.add(await wait_answered(stack, ids, timeout=90), ids)
    stack.stop_broker()
    code, seconds = await asyncio.to_thread(stack.terminate_worker, 60)
    tally.facts = {"exit_code": code, "stop_s": seconds}
    tally.notes.append(f"rejoined after a 2 s outage; SIGTERM with the broker away: exit {code} in {seconds:.1f} s")
    await stack.start_broker_again()
    since = len(stack.logs())
    stack.start_worker()
    await stack.wait_serving(since=since)
    return tally


async def postgres_outage(stack: Stack, sizes: Sizes) -> Tally:
    """PostgreSQL stops for a few seconds while requests flow."""
    tally = Tally(f"PostgreSQL down {sizes.outage_s:g} s")
    ids = new_ids("pg", sizes.num_outage)
    await send_all(stack, stack.cfg.kafka.requests_topic, [(rid.encode(), pack(good(rid, 24))) for rid in ids])
    await asyncio.sleep(0.5)
    await stack.restart_postgres(down_s=sizes.outage_s)
    counts = await wait_answered(stack, ids, timeout=180)
    tally.add(counts, ids)
    found = await rows(stack, ids)
    tally.notes.append(f"{sum(1 for r in found.values() if r.status == 'succeeded')}/{len(ids)} rows succeeded")
    return tally


async def control_commands(stack: Stack, sizes: Sizes) -> Tally:
    """Refused and unknown commands: every one acknowledged, none obeyed."""
    tally = Tally("hostile control commands")
    async with stack.client() as client:
        acks = [await client.control("drain", "*", wait=True),
                await client.control("drain", "*", token=OPERATOR_TOKEN + "?", wait=True),
                await client.control("load", "etc", path="/etc", wait=True),
                await client.control("load", "up", path="../../../../etc", wait=True),
                await client.control("unload", "never-loaded", wait=True),
                await client.control("cancel", "no-such-job", wait=True),
                await client.control("pause", "no-such-job", wait=True)]
    tally.sent = len(acks)
    tally.once = sum(1 for a in acks if not a.ok)
    tally.notes.append(", ".join(sorted({str(a.code) for a in acks})))
    return tally


async def cancel_storm(stack: Stack, sizes: Sizes) -> Tally:
    """Cancels of made-up ids (a client that calls and leaves, over and over), then a real cancel
    of a running job that would train for a million steps: every command acknowledged once, the
    job stopped."""
    tally = Tally(f"storm of {sizes.num_cancels} cancels")
    (job_id,) = new_ids("victim", 1)
    data = [{"prompt_token_ids": [1, 10 + i, 11 + i], "completion_token_ids": [40 + i, 41, 42 + i]} for i in range(6)]
    params = {"lr": 5e-3, "max_steps": 10**6, "micro_batch_tokens": 20, "seed": 7, "checkpoint_every": 10**6}
    async with stack.client() as client:
        await client.submit_training({"job_id": job_id, "adapter_id": f"chaos-{job_id}", "data": data,
                                      "lora": TRAIN_LORA, "params": params})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not await stack.query(
            lambda s: s.scalar(select(JobRow.step > 0).where(JobRow.job_id == job_id))):  # training
        await asyncio.sleep(0.05)
    commands = new_ids("cmd", sizes.num_cancels)
    storm = [(f"nobody-{cid}".encode(), pack({"schema": 1, "command_id": cid, "action": "cancel",
                                              "target_id": f"nobody-{cid}"})) for cid in commands]
    started = time.monotonic()
    await send_all(stack, stack.cfg.kafka.control_topic, storm)
    sent_s = time.monotonic() - started
    async with stack.client() as client:
        real = await client.control("cancel", job_id, wait=True, timeout=120)
    real_s = time.monotonic() - started
    counts = await wait_answered(stack, [*commands, job_id], timeout=120, job_ids={job_id})
    tally.add(counts, [*commands, job_id])
    found = await final_records(stack.cfg.kafka.bootstrap or "", stack.cfg.kafka.results_topic, commands)
    codes = collections.Counter(str(getattr(r, "code", None)) for c in commands for r in found.get(c, []))
    job = await stack.query(lambda s: s.scalar(select(JobRow).where(JobRow.job_id == job_id)))
    tally.sent += 1  # the real cancel's own acknowledgement
    tally.once += 1 if real.ok else 0
    tally.lost += 0 if real.ok else 1
    tally.facts = {"codes": dict(codes), "real_ok": real.ok, "real_s": real_s,
                   "status": job.status if job else None, "step": job.step if job else None}
    tally.notes.append(f"{sizes.num_cancels} sent in {sent_s:.1f} s; the real cancel acknowledged "
                       f"{real_s:.1f} s after the storm began; the job it named {tally.facts['status']} at "
                       f"step {tally.facts['step']}")
    return tally


def hostile_adapters(root: Any) -> list[Any]:
    """PEFT adapters for the tiny model that must not load: NaN B weights; lora_alpha 1e30."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from loquetier.lora.adapter import LoRAAdapter
    from loquetier.lora.config import LoRAConfig
    from loquetier.lora.pool import ModelDims

    dims = ModelDims(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)
    adapter = LoRAAdapter.new(LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), dims, seed=3)
    adapter.save(root / "huge-alpha")
    config_path = root / "huge-alpha" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"lora_alpha": 1e30}))
    adapter.save(root / "nan")
    weights_path = root / "nan" / "adapter_model.safetensors"
    tensors = load_file(weights_path)  # written past LoRAAdapter, which refuses to save such weights
    save_file({k: torch.full_like(t, float("nan")) if "lora_B" in k else t for k, t in tensors.items()},
              weights_path)
    return [root / "nan", root / "huge-alpha"]


async def hostile_values(stack: Stack, sizes: Sizes) -> Tally:
    """Values the wire format's types allow and an engine cannot take, next to innocent requests:
    an infinite SLO, a 64-bit top_k, lr 1e300, 10^12 epochs, NaN weights, a 1e30 alpha. Each must be refused
    with one answer while the innocent requests are served."""
    tally = Tally("hostile values")
    (inf_slo, top_k, innocent, bystander), (lr_job, epochs_job) = new_ids("val", 4), new_ids("valjob", 2)
    data = [{"prompt": "the quick brown fox", "completion": " jumps"}]
    values = [(inf_slo, good(inf_slo, 8) | {"slo": {"tpot_ms": float("inf"), "ttft_ms": float("inf")}}),
              (innocent, good(innocent, 8)),
              (top_k, good(top_k, 8) | {"sampling": {"max_tokens": 8, "top_k": 2**64 - 1, "temperature": 0.7}}),
              (bystander, good(bystander, 8))]
    await send_all(stack, stack.cfg.kafka.requests_topic, [(rid.encode(), pack(v)) for rid, v in values])
    jobs = [(lr_job, {"params": {"lr": 1e300, "max_steps": 4}}), (epochs_job, {"params": {"epochs": 10**12}})]
    await send_all(stack, stack.cfg.kafka.training_topic, [
        (job_id.encode(), pack({"schema": 1, "job_id": job_id, "adapter_id": f"a-{job_id}", "data": data} | extra))
        for job_id, extra in jobs])
    paths = await asyncio.to_thread(hostile_adapters, stack.root / "adapters")
    async with stack.client() as client:
        acks = [await client.control("load", path.name, path=str(path), wait=True, timeout=60) for path in paths]
    ids = [inf_slo, top_k, innocent, bystander, lr_job, epochs_job]
    counts = await wait_answered(stack, ids, timeout=60, job_ids={lr_job, epochs_job})
    tally.add(counts | {path.name: 1 for path in paths}, [*ids, *(path.name for path in paths)])
    found = await final_records(stack.cfg.kafka.bootstrap or "", stack.cfg.kafka.results_topic, ids)
    outcome = {i: [getattr(r, "code", None) or getattr(r, "status", r.type) for r in found.get(i, [])] for i in ids}
    accepted = [i for i in (inf_slo, top_k) if "result" in {r.type for r in found.get(i, [])}]
    accepted += [i for i in (lr_job, epochs_job) if "succeeded" in outcome[i]]
    accepted += [path.name for path, ack in zip(paths, acks, strict=True) if ack.ok]
    served = all(r.type == "result" for i in (innocent, bystander) for r in found.get(i, [None]) if r)
    tally.facts = {"accepted": accepted, "innocents_served": served and all(found.get(i) for i in (innocent,
                                                                                                   bystander))}
    names = {inf_slo: "inf SLO", top_k: "top_k 2^64-1", innocent: "innocent", bystander: "innocent",
             lr_job: "lr 1e300", epochs_job: "epochs 1e12"}
    tally.notes.append(", ".join(f"{names[k]}: {'/'.join(map(str, v)) or 'no answer'}" for k, v in outcome.items())
                       + "".join(f", adapter {p.name}: {a.code or 'loaded'}" for p, a in zip(paths, acks, strict=True)))
    return tally


SCENARIOS = [hostile_bytes, oversized_record, duplicates, flood, control_commands, cancel_storm, kill_while_serving,
             kill_while_training, poison_pill, postgres_outage, broker_restart, hostile_values]


async def run(stack: Stack, scenario: Any, sizes: Sizes) -> Tally:
    started = time.monotonic()
    tally: Tally = await scenario(stack, sizes)
    tally.is_alive = await is_responsive(stack)
    tally.seconds = time.monotonic() - started
    return tally
