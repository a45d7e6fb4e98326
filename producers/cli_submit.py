"""``loquetier submit generate|train`` and ``loquetier results``: the producer side of the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from loquetier.settings import KafkaSettings, get_settings

from .client import LoquetierClient


def register(subparsers: Any) -> None:
    submit = subparsers.add_parser("submit", help="publish a generate request or a training job")
    kinds = submit.add_subparsers(dest="kind", metavar="KIND", required=True)
    gen = kinds.add_parser("generate", help="generate text; prints it as it streams")
    gen.add_argument("prompt")
    gen.add_argument("--adapter", default=None, help="adapter_id (default: the base model)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--request-id", default=None)
    gen.add_argument("--no-stream", action="store_true", help="print only the final text")
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.set_defaults(func=_generate)
    train = kinds.add_parser("train", help="submit a training/eval job (YAML or JSON file)")
    train.add_argument("file", type=Path)
    train.add_argument("--detach", action="store_true", help="print the job_id and return")
    train.set_defaults(func=_train)
    results = subparsers.add_parser("results", help="print result records as JSON lines")
    results.add_argument("ids", nargs="*", help="request/job ids (default: all)")
    results.add_argument("--follow", "-f", action="store_true", help="keep reading new records")
    results.add_argument("--from-beginning", action="store_true")
    results.set_defaults(func=_results)


def _kafka() -> KafkaSettings:
    kafka = get_settings().kafka
    if kafka.bootstrap is None:
        raise SystemExit("no broker: set LOQUETIER_KAFKA__BOOTSTRAP (or run `loquetier up`)")
    return kafka


def load_job_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping at the top level")
    return data


def _generate(args: argparse.Namespace) -> int:
    return asyncio.run(generate(args, _kafka()))


async def generate(args: argparse.Namespace, kafka: KafkaSettings) -> int:
    assert kafka.bootstrap is not None
    async with LoquetierClient(kafka.bootstrap, kafka) as client:
        rid = await client.submit_generate(
            args.prompt,
            adapter_id=args.adapter,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            stream=not args.no_stream,
            request_id=args.request_id,
        )

        async def follow() -> int:
            streamed = False
            async for record in client.results([rid]):
                if record.type == "token":
                    streamed = True
                    print(record.text, end="", flush=True)
                elif record.type == "result":
                    print("" if streamed else record.text)
                    return 0
                elif record.type == "error":
                    print(f"\nerror {record.code}: {record.message}", file=sys.stderr)
                    return 1
            return 1

        return await asyncio.wait_for(follow(), args.timeout)


def _train(args: argparse.Namespace) -> int:
    return asyncio.run(train(load_job_file(args.file), _kafka(), detach=args.detach))


async def train(job: dict[str, Any], kafka: KafkaSettings, *, detach: bool = False) -> int:
    from tqdm import tqdm

    assert kafka.bootstrap is not None
    async with LoquetierClient(kafka.bootstrap, kafka) as client:
        job_id = await client.submit_training(job)
        print(job_id)
        if detach:
            return 0
        bar = tqdm(desc=job_id, unit="step", dynamic_ncols=True)
        try:
            async for record in client.results([job_id]):
                if record.type == "progress":
                    if record.total_steps:
                        bar.total = record.total_steps
                    bar.n = record.step
                    post = {"loss": record.loss, "eval_loss": record.eval_loss}
                    bar.set_postfix({k: f"{v:.4f}" for k, v in post.items() if v is not None}, refresh=False)
                    bar.refresh()
                elif record.type == "checkpoint":
                    bar.write(f"checkpoint at step {record.step} ({record.size_bytes} bytes)")
                elif record.type == "job_done":
                    bar.n = record.step
                    bar.refresh()
                    bar.close()
                    print(
                        f"{record.status}: step {record.step}, loss {record.loss}, "
                        f"adapter {record.adapter_id} v{record.adapter_version}"
                    )
                    return 0 if record.status == "succeeded" else 1
                elif record.type == "error":
                    bar.close()
                    print(f"error {record.code}: {record.message}", file=sys.stderr)
                    return 1
        finally:
            bar.close()
    return 1


def _results(args: argparse.Namespace) -> int:
    return asyncio.run(results(args, _kafka()))


async def results(args: argparse.Namespace, kafka: KafkaSettings) -> int:
    assert kafka.bootstrap is not None
    async with LoquetierClient(kafka.bootstrap, kafka) as client:
        ids = args.ids or None
        async for record in client.results(
            ids, follow=args.follow or ids is None, from_beginning=args.from_beginning
        ):
            print(record.model_dump_json(by_alias=True), flush=True)
    return 0
