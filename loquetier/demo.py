"""The guided scenario of ``loquetier demo``, driven through Kafka with the producer client."""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

from loquetier.chat import PIRATE_ADAPTER, chat_examples, chat_prompt
from loquetier.cli_errors import UserError
from loquetier.db import status_repo

QUESTIONS = [
    ("What is the capital of France?", None),
    ("What is the capital of France?", "pirate"),
    ("Name a color of the sky.", "pirate"),
    ("What is two plus two?", None),
    ("Can you help me?", "pirate"),
    ("Tell me a fact about octopuses.", None),
]
PROBE = "What is the mascot of Loquetier?"
LORA = {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}


async def _query(database_url: str, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    return await status_repo.fetch_sql(database_url, sql)


async def _wait_for(database_url: str, sql: str, what: str, worker: subprocess.Popen[bytes] | None,
                    timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker is not None and worker.poll() is not None:
            raise RuntimeError(f"the worker exited (code {worker.returncode}) while waiting for {what}")
        try:
            _, rows = await _query(database_url, sql)
            if rows:
                return
        except Exception:  # noqa: BLE001 - the tables may not exist yet; keep polling
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _print_table(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  " + "-+-".join("-" * w for w in widths))


async def run_scenario(bootstrap: str, database_url: str, model: Path, *, steps: int, num_requests: int,
                       worker: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from loquetier.models.tokenizer_load import load_tokenizer
    from loquetier.producers.client import LoquetierClient

    tokenizer = load_tokenizer(model)
    report: dict[str, Any] = {"answers": [], "steps": steps}
    print("waiting for the worker to register (model load)...")
    await _wait_for(database_url, status_repo.RUNNING_WORKER_SQL, "the worker", worker)
    async with LoquetierClient(bootstrap) as client:
        print(f"\n1. loading the ready-made 'pirate' adapter from {PIRATE_ADAPTER}")
        await client.control("load", "pirate", path=str(PIRATE_ADAPTER))
        await _wait_for(database_url, status_repo.READY_PIRATE_SQL,
                        "the pirate adapter", worker)

        job_id = f"mascot-{int(time.time())}"
        print(f"2. fine-tuning a new adapter 'mascot' ({steps} steps, rank 8) while serving chat requests")
        await client.submit_training({
            # a new version of the demo's own adapter on every run (the database keeps the last one)
            "job_id": job_id, "kind": "finetune", "adapter_id": "mascot", "overwrite": True, "lora": LORA,
            "data": chat_examples(tokenizer, "mascot"),
            "params": {"optimizer": "adamw", "lr": 5e-3, "max_steps": steps, "micro_batch_tokens": 1024,
                       "checkpoint_every": max(1, steps // 2), "seed": 0},
        })
        questions = (QUESTIONS * (num_requests // len(QUESTIONS) + 1))[:num_requests]
        rids = {}
        for n, (question, adapter) in enumerate(questions):
            rid = await client.submit_generate(chat_prompt(tokenizer, question), adapter_id=adapter,
                                               max_tokens=32, temperature=0.0, stream=n == 0)
            rids[rid] = (question, adapter)
        bar = tqdm(total=steps, desc="  mascot training", unit="step", leave=True)
        done: dict[str, Any] = {}
        async for record in client.results([*rids, job_id]):
            if record.type == "progress":
                bar.n = record.step
                bar.set_postfix(loss=f"{record.loss:.3f}" if record.loss is not None else "-")
                bar.refresh()
            elif record.type in ("result", "error") and record.request_id in rids:
                question, adapter = rids[record.request_id]
                answer = record.text if record.type == "result" else f"error {record.code}: {record.message}"
                bar.write(f"  [{adapter or 'base':6}] {question}\n           -> {answer.strip()}")
                report["answers"].append({"adapter": adapter, "question": question, "answer": answer})
            elif record.type == "job_done":
                done = record.model_dump()
                bar.n = record.step
                bar.refresh()
            elif record.type == "error" and getattr(record, "job_id", None) == job_id:  # refused before it ran
                done = {"status": "failed", "error": f"{record.code}: {record.message}"}
        bar.close()
        report["job"] = done
        if done.get("status") != "succeeded":
            raise UserError(f"the demo's training job {job_id} did not succeed: {done.get('error') or done}",
                            "the worker's log (its path is printed above) says more")
        print(f"   job {job_id}: {done.get('status')} after {done.get('step')} steps, loss {done.get('loss')}")

        print(f"\n3. the same question to the base model and to the new adapter: {PROBE!r}")
        probe = chat_prompt(tokenizer, PROBE)
        base_id = await client.submit_generate(probe, max_tokens=32, temperature=0.0)
        tuned_id = await client.submit_generate(probe, adapter_id="mascot", max_tokens=32, temperature=0.0)
        base = await client.wait_result(base_id, timeout=300)
        tuned = await client.wait_result(tuned_id, timeout=300)
        report["probe"] = {"base": getattr(base, "text", repr(base)), "mascot": getattr(tuned, "text", repr(tuned))}
        left = textwrap.wrap(report["probe"]["base"].strip(), 38) or [""]
        right = textwrap.wrap(report["probe"]["mascot"].strip(), 38) or [""]
        print(f"   {'base model':38} | {'mascot adapter':38}\n   {'-' * 38}-+-{'-' * 38}")
        for i in range(max(len(left), len(right))):
            print(f"   {(left[i] if i < len(left) else ''):38} | {right[i] if i < len(right) else ''}")

    print("\n4. where are the jobs? (plain SQL on the record in PostgreSQL)\n")
    print(textwrap.indent(status_repo.JOBS_SQL, "   ") + ";\n")
    columns, rows = await _query(database_url, status_repo.JOBS_SQL)
    _print_table(columns, rows)
    report["jobs"] = [dict(zip(columns, r, strict=True)) for r in rows]
    return report
