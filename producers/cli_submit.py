"""``loquetier submit generate|train`` and ``loquetier results``: the producer side of the CLI."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from loquetier.cli_errors import UserError
from loquetier.settings import KafkaSettings

from .cli_support import client, configured_database_url, kafka_settings, require_worker
from .client import new_id
from .job_file import FORMAT_HELP, build_job, load_job_file

__all__ = ["load_job_file", "register"]

QUIET_NOTICE_S = 10.0  # say that we are still waiting when nothing came back for this long


def register(subparsers: Any) -> None:
    submit = subparsers.add_parser("submit", help="publish a generate request or a training job")
    kinds = submit.add_subparsers(dest="kind", metavar="KIND", required=True)
    gen = kinds.add_parser(
        "generate",
        help="ask the model (a chat turn by default); prints the answer as it streams",
        description="Sends PROMPT as a user turn of a chat (the model's chat template is applied by the worker), "
        "or with --raw as plain text to continue.",
    )
    gen.add_argument("prompt", help="the user's message (with --raw: the text to continue)")
    gen.add_argument("--adapter", default=None, help="adapter_id (default: the base model); see `loquetier adapters`")
    gen.add_argument("--system", default=None, help="a system turn before the user's message")
    gen.add_argument("--raw", action="store_true", help="send PROMPT as raw text, no chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    gen.add_argument("--request-id", default=None)
    gen.add_argument("--no-stream", action="store_true", help="print only the final text")
    gen.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer (default 120)")
    gen.set_defaults(func=_generate)
    train = kinds.add_parser(
        "train",
        help="submit a training or evaluation job from a YAML or JSON file (e.g. examples/job.yaml)",
        description=FORMAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("file", type=Path, help="the job file, e.g. examples/job.yaml")
    train.add_argument("--job-id", default=None, help="default: the file's job_id, else a new one")
    train.add_argument("--detach", action="store_true", help="print the job_id and return")
    train.set_defaults(func=_train)
    results = subparsers.add_parser(
        "results",
        help="print result records (tokens, results, errors, progress, ...) as JSON lines",
        description="With ids: their records, from the oldest the broker still holds, until each has its final "
        "one (so a job or request that already finished is printed at once). Without ids (or with --follow): "
        "every new record as it arrives, until Ctrl-C. --from-beginning starts at the oldest record the "
        "broker still holds (the embedded broker keeps them in memory until `loquetier down`).",
    )
    results.add_argument("ids", nargs="*", help="request/job ids (default: all)")
    results.add_argument("--follow", "-f", action="store_true", help="keep reading new records")
    results.add_argument("--from-beginning", action="store_true", help="start at the oldest record, not now")
    results.set_defaults(func=_results)


def _generate(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.raw and args.system is not None:
        raise UserError("--system needs a chat: leave out --raw")
    kafka = kafka_settings()
    asyncio.run(require_worker(configured_database_url()))
    return asyncio.run(generate(args, kafka))


def _prompt_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.raw:
        return {"prompt": args.prompt}
    turns = [{"role": "system", "content": args.system}] if args.system is not None else []
    return {"messages": [*turns, {"role": "user", "content": args.prompt}]}


async def generate(args: argparse.Namespace, kafka: KafkaSettings) -> int:
    async with client(kafka) as producer:
        try:
            rid = await producer.submit_generate(
                **_prompt_fields(args),
                adapter_id=args.adapter,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                stream=not args.no_stream,
                request_id=args.request_id,
            )
        except ValueError as exc:  # pydantic's ValidationError: a bad option value
            from loquetier.cli_errors import validation_lines

            raise UserError(f"the request is not valid: {validation_lines(exc)}") from None
        try:
            return await asyncio.wait_for(_print_answer(producer, rid), args.timeout)
        except TimeoutError:
            raise UserError(
                f"no answer within {args.timeout:.0f} s (request {rid})",
                "is a worker running and keeping up? `loquetier requests` shows its row; raise --timeout",
            ) from None


async def _print_answer(producer: Any, rid: str) -> int:
    streamed, seen = False, asyncio.Event()
    watcher = asyncio.create_task(_notice_if_quiet(seen))
    try:
        async for record in producer.results([rid]):
            seen.set()
            if record.type == "token":
                streamed = True
                print(record.text, end="", flush=True)
            elif record.type == "result":
                print("" if streamed else record.text)
                if getattr(record, "finish_reason", None) == "cancelled":
                    print(f"(cancelled: request {rid} was cancelled before it finished)", file=sys.stderr)
                    return 1
                return 0
            elif record.type == "error":
                if streamed:
                    print()
                print(f"error {record.code}: {record.message}", file=sys.stderr)
                hint = _ERROR_HINTS.get(record.code)
                if hint:
                    print(f"  {hint}", file=sys.stderr)
                return 1
    finally:
        watcher.cancel()
    return 1


async def _notice_if_quiet(seen: asyncio.Event) -> None:
    await asyncio.sleep(QUIET_NOTICE_S)
    if not seen.is_set():
        print(f"(no answer yet after {QUIET_NOTICE_S:.0f} s: waiting for a worker to take the request)",
              file=sys.stderr)


_ERROR_HINTS = {
    "unknown_adapter": "`loquetier adapters` lists the adapters; load one with `loquetier adapters load ID PATH`",
    "no_chat_template": "this model has no chat template: send the prompt as raw text with --raw",
    "prompt_too_long": "shorten the prompt or lower --max-tokens",
}


def _train(args: argparse.Namespace) -> int:
    raw = load_job_file(args.file)
    job = build_job(raw, args.file.resolve().parent, job_id=args.job_id or str(raw.get("job_id") or new_id("job")))
    kafka = kafka_settings()
    if not args.detach:
        asyncio.run(require_worker(configured_database_url()))
    return asyncio.run(train(job, kafka, detach=args.detach))


async def train(job: Any, kafka: KafkaSettings, *, detach: bool = False) -> int:
    from tqdm import tqdm

    async with client(kafka) as producer:
        job_id = await producer.submit_training(job)
        print(job_id)
        if detach:
            print(f"follow it with `loquetier results {job_id}` (a job refused at intake, e.g. an adapter_id "
                  "that exists without `overwrite: true`, says why there, and never shows in `loquetier jobs`)",
                  file=sys.stderr)
            return 0
        bar = tqdm(desc=job_id, unit="step", dynamic_ncols=True)
        try:
            async for record in producer.results([job_id]):
                if record.type == "progress":
                    if record.total_steps:
                        bar.total = record.total_steps
                    bar.n = record.step
                    post = {"loss": record.loss, "eval_loss": record.eval_loss}
                    bar.set_postfix({k: f"{v:.4f}" for k, v in post.items() if v is not None}, refresh=False)
                    bar.refresh()
                elif record.type == "checkpoint":
                    bar.write(f"checkpoint at step {record.step} ({record.size_bytes:,} bytes)")
                elif record.type == "job_done":
                    bar.n = record.step
                    bar.refresh()
                    bar.close()
                    print(_done_line(record))
                    return 0 if record.status == "succeeded" else 1
                elif record.type == "error":
                    bar.close()
                    print(f"error {record.code}: {record.message}", file=sys.stderr)
                    hint = _ERROR_HINTS.get(record.code)
                    if hint:
                        print(f"  {hint}", file=sys.stderr)
                    return 1
        finally:
            bar.close()
    return 1


def _done_line(record: Any) -> str:
    if record.status == "succeeded":
        loss = f", loss {record.loss:.4f}" if record.loss is not None else ""
        eval_loss = f", eval loss {record.eval_loss:.4f}" if record.eval_loss is not None else ""
        version = f" v{record.adapter_version}" if record.adapter_version is not None else ""
        return f"succeeded: {record.step} steps{loss}{eval_loss}; adapter {record.adapter_id}{version}"
    why = f": {record.error}" if record.error else ""
    return f"{record.status} at step {record.step}{why}"


def _results(args: argparse.Namespace) -> int:
    return asyncio.run(results(args, kafka_settings()))


async def results(args: argparse.Namespace, kafka: KafkaSettings) -> int:
    async with client(kafka) as producer:
        ids = args.ids or None
        async for record in producer.results(
            # ids of work that may have ended already: their records are looked for from the oldest on
            ids, follow=args.follow or ids is None, from_beginning=args.from_beginning or ids is not None
        ):
            print(record.model_dump_json(by_alias=True), flush=True)
    return 0
