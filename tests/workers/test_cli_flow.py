"""The CLI against a real worker (tiny Llama, CPU), the real broker and PostgreSQL: chat by default,
the example job, a failed job's reason, readable tables, PEFT export, and control acknowledgements."""

from __future__ import annotations

import asyncio
import importlib
import json
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from loquetier import cli
from loquetier.chat import chat_prompt_ids
from loquetier.engine.sequence import SamplingParams
from loquetier.settings import Settings, get_settings
from tests.tiny import CORPUS
from tests.workers.conftest import running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HAS_ACKS = hasattr(importlib.import_module("loquetier.results"), "ControlAck")


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings, cache: Path) -> None:
    """The environment a user's shell would have after `eval "$(loquetier env)"`, for these topics."""
    kafka = settings.kafka
    env = {"BOOTSTRAP": kafka.bootstrap, "REQUESTS_TOPIC": kafka.requests_topic,
           "TRAINING_TOPIC": kafka.training_topic, "CONTROL_TOPIC": kafka.control_topic,
           "RESULTS_TOPIC": kafka.results_topic, "DLQ_TOPIC": kafka.dlq_topic}
    for name, value in env.items():
        monkeypatch.setenv(f"LOQUETIER_KAFKA__{name}", str(value))
    monkeypatch.setenv("LOQUETIER_DATABASE__URL", str(settings.database.url))
    monkeypatch.setenv("LOQUETIER_CACHE_DIR", str(cache))
    get_settings.cache_clear()


async def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``loquetier ARGS`` in a thread (it runs its own event loop); (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    def apply(settings: Settings) -> None:
        use_settings(monkeypatch, settings, tmp_path / "cache")

    yield apply
    get_settings.cache_clear()


async def test_generate_train_tables_and_export(
    topics: Any, make_engine: Any, tiny_model_dir: Path, cli_env: Any, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    rng = random.Random()
    question = " ".join(rng.choice(" ".join(CORPUS).split()) for _ in range(4))
    reference = make_engine()
    chat = reference.generate([chat_prompt_ids(reference.tokenizer, [{"role": "user", "content": question}])],
                              sampling=SamplingParams(max_tokens=6, temperature=0.0))[0]
    raw = reference.generate([question], sampling=SamplingParams(max_tokens=6, temperature=0.0))[0]
    settings = await topics()
    cli_env(settings)
    async with running_worker(make_engine(), settings):
        code, out, _ = await run(capsys, "submit", "generate", "--max-tokens", "6", question)
        assert code == 0 and out == chat.text + "\n"  # a chat turn by default
        code, out, _ = await run(capsys, "submit", "generate", "--raw", "--max-tokens", "6", "--no-stream", question)
        assert code == 0 and out == raw.text + "\n"
        code, _, err = await run(capsys, "submit", "generate", "--adapter", "nope", "hi")
        assert code == 1 and "error unknown_adapter" in err and "loquetier adapters load" in err

        job_file = tmp_path / "job.yaml"  # the example job, its data beside it, on the tiny model
        shutil.copy(EXAMPLES / "job.yaml", job_file)
        shutil.copy(EXAMPLES / "codename.jsonl", tmp_path / "codename.jsonl")
        code, out, _ = await run(capsys, "submit", "train", str(job_file), "--job-id", "cli-example")
        assert code == 0 and out.splitlines()[0] == "cli-example"
        assert out.splitlines()[-1].startswith("succeeded: 8 steps, loss ") and "adapter codename v1" in out

        bad = tmp_path / "bad.yaml"
        bad.write_text("adapter_id: too-big\ndata: codename.jsonl\nlora: {rank: 999}\nparams: {max_steps: 2}\n")
        code, out, _ = await run(capsys, "submit", "train", str(bad), "--job-id", "cli-bad")
        assert code == 1 and "failed at step 0: " in out and "max_lora_rank" in out  # the reason, not None

        # a job that ended before the command: its records, at once (read from the oldest on)
        code, out, _ = await asyncio.wait_for(run(capsys, "results", "cli-bad"), timeout=30)
        finals = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and finals[-1]["type"] == "job_done" and finals[-1]["status"] == "failed"

        code, out, _ = await run(capsys, "jobs")
        header, *rows = out.splitlines()
        assert header.split()[-1] == "error" and any("cli-bad" in r and "max_lora_rank" in r for r in rows)
        code, out, _ = await run(capsys, "requests", "--limit", "3")
        assert code == 0 and "e+" not in out  # readable numbers, never 2.177e+04
        code, out, _ = await run(capsys, "jobs", "events", "cli-example")
        header, *rows = out.splitlines()
        assert code == 0 and header.split() == ["created_at", "level", "kind", "worker_id", "message"]
        assert "Created fine-tuning job cli-example" in rows[0] and "Step 8/8: training loss=" in out
        assert rows[-1].split()[3] == "succeeded" and rows[-1].endswith("new fine-tuned model: codename")
        code, out, _ = await run(capsys, "jobs", "events", "cli-bad", "--limit", "1")
        assert code == 0 and len(out.splitlines()) == 2 and "max_lora_rank" in out  # the whole reason, uncut
        code, _, err = await run(capsys, "jobs", "events", "no-such-job")
        assert code == 1 and "no job 'no-such-job'" in err and "`loquetier jobs` lists the jobs" in err

        out_dir = tmp_path / "codename-peft"
        code, out, _ = await run(capsys, "adapters", "export", "codename", str(out_dir))
        assert code == 0 and "exported codename v1" in out
        code, _, err = await run(capsys, "adapters", "export", "codename", str(out_dir))
        assert code == 1 and "--force" in err
    _peft_matches_engine(out_dir, make_engine(), tiny_model_dir, question)


def _peft_matches_engine(peft_dir: Path, engine: Any, model_dir: Path, question: str) -> None:
    """HF PEFT loads the export and generates what our engine generates with the same adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine.load_adapter("codename", peft_dir)
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": question}])
    ours = engine.generate([ids], ["codename"], sampling=SamplingParams(max_tokens=6, temperature=0.0))[0]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             eos_token_id=engine.tokenizer.eos_token_id)
        tuned_logits = model(torch.tensor([ids])).logits
        with model.disable_adapter():
            base_logits = model(torch.tensor([ids])).logits
    theirs = out[0, len(ids):].tolist()
    assert ours.token_ids and theirs[: len(ours.token_ids)] == list(ours.token_ids)
    assert (tuned_logits - base_logits).abs().max() > 1e-3  # the adapter is really applied


async def until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


@pytest.mark.skipif(not HAS_ACKS, reason="control acknowledgements (control_ack) are not in this version")
async def test_control_commands_wait_for_the_acknowledgement(
    topics: Any, make_engine: Any, cli_env: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = await topics(adapter_dir=tmp_path / "cache" / "adapters")  # as `up`: the CLI's cache
    cli_env(settings)
    name = f"cli-{uuid.uuid4().hex[:8]}"  # adapters and jobs of this test only (the database is shared)
    long_job = tmp_path / "long.yaml"
    long_job.write_text(f"adapter_id: {name}-long\ndata: codename.jsonl\n"
                        "params: {max_steps: 100000, micro_batch_tokens: 512}\n")
    short_job = tmp_path / "short.yaml"
    short_job.write_text(f"adapter_id: {name}\ndata: codename.jsonl\n"
                         "params: {max_steps: 2, micro_batch_tokens: 512}\n")
    shutil.copy(EXAMPLES / "codename.jsonl", tmp_path / "codename.jsonl")
    async with running_worker(make_engine(), settings) as worker:
        code, out, _ = await run(capsys, "submit", "train", str(long_job), "--job-id", f"{name}-long", "--detach")
        assert code == 0
        await until(lambda: f"{name}-long" in worker.jobs.running)  # the job row exists and runs
        for action, done in (("pause", "paused"), ("resume", "resumed"), ("cancel", "cancelled")):
            code, out, err = await run(capsys, "jobs", action, f"{name}-long")
            assert code == 0 and out.startswith(f"{done} {name}-long"), (out, err)
        code, out, _ = await run(capsys, "jobs", "pause", f"{name}-long")
        assert code == 1 and "invalid_state" in out
        code, out, _ = await run(capsys, "jobs", "cancel", "no-such-job")
        assert code == 1 and out.startswith("error ")

        export = tmp_path / "exported"
        code, out, _ = await run(capsys, "submit", "train", str(short_job), "--job-id", f"{name}-short")
        assert code == 0, out
        code, out, _ = await run(capsys, "adapters", "export", name, str(export))
        assert code == 0, out
        copy = f"{name}-copy"  # the export loaded back under another name: copied where the worker reads
        code, out, err = await run(capsys, "adapters", "load", copy, str(export))
        assert code == 0 and f"loaded {copy} v1" in out and "copied" in out, (out, err)
        code, out, _ = await run(capsys, "submit", "generate", "--adapter", copy, "--max-tokens", "3", "hi")
        assert code == 0
        code, out, _ = await run(capsys, "adapters", "unload", copy)
        assert code == 0 and out.startswith(f"unloaded {copy}")
        code, _, err = await run(capsys, "submit", "generate", "--adapter", copy, "hi")
        assert code == 1 and "unknown_adapter" in err
        code, out, _ = await run(capsys, "adapters", "load", f"{name}-bad", str(tmp_path))
        assert code == 1 and "not a PEFT adapter directory" in out + _
