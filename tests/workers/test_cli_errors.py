"""Every user mistake of issue 18, as a user makes it: the real ``loquetier`` process, one or two
lines on stderr, a non-zero exit, no traceback, within seconds (``--debug`` shows the traceback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MAX_SECONDS = 10.0  # a dead broker or database must be reported well within this


def _dead_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOQUETIER_")}
    base.update(LOQUETIER_CACHE_DIR=str(tmp_path / "cache"), **env)
    return subprocess.run([sys.executable, "-m", "loquetier.cli", *args], capture_output=True, text=True,
                          env=base, timeout=60, check=False, cwd=tmp_path)


def _cases(tmp_path: Path) -> list[tuple[str, list[str], dict[str, str], str]]:
    (tmp_path / "bad.yaml").write_text("adapter_id: a\ndata: [\n")
    (tmp_path / "unknown.yaml").write_text("adapter_id: a\ndata: d.jsonl\nparams: {lr: 0.01, max_stepz: 3}\n")
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    (tmp_path / "baddata.yaml").write_text("adapter_id: a\ndata: broken.jsonl\n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "q", "completion": "a"}\n{"prompt": 3}\n')
    (tmp_path / "list.yaml").write_text("- adapter_id: a\n")
    broker = f"127.0.0.1:{_dead_port()}"
    database = f"postgresql+asyncpg://postgres@127.0.0.1:{_dead_port()}/loquetier"
    stale = {"LOQUETIER_KAFKA__BOOTSTRAP": broker, "LOQUETIER_DATABASE__URL": database}
    return [
        ("missing job file", ["submit", "train", "nope.yaml"], {}, "no such job file: nope.yaml"),
        ("malformed YAML", ["submit", "train", "bad.yaml"], {}, "not valid YAML (line 3"),
        ("unknown field", ["submit", "train", "unknown.yaml"], {}, "params.max_stepz: unknown field"),
        ("bad data line", ["submit", "train", "baddata.yaml"], {}, "line 2:"),
        ("not a mapping", ["submit", "train", "list.yaml"], {}, "expected a mapping"),
        ("no broker configured", ["submit", "generate", "hi"], {}, "no broker configured"),
        ("stale broker", ["submit", "generate", "hi"], stale, f"cannot reach the broker at {broker}"),
        ("stale broker, results", ["results", "--follow"], stale, "cannot reach the broker"),
        ("stale broker, control", ["jobs", "cancel", "j1"], stale, "cannot reach the broker"),
        ("stale database", ["jobs"], stale, "cannot reach the database"),
        ("stale database, sql", ["sql"], stale, "cannot reach the database"),
        ("stale database, export", ["adapters", "export", "a", "out"], stale, "cannot reach the database"),
        ("stale database, keys", ["keys", "create", "zed"], stale, "cannot reach the database"),
        ("stale database, key list", ["keys", "list"], stale, "cannot reach the database"),
        ("the data file as the job", ["submit", "train", "d.jsonl"], {}, "holds training examples"),
        ("worker, missing model", ["worker", "--model", "/nonexistent"], stale, "no model directory /nonexistent"),
        ("up, not a model", ["up", "--model", str(tmp_path)], {}, "not a Hugging Face model directory"),
        ("adapter dir missing", ["adapters", "load", "a", "nowhere"], stale, "no such adapter directory"),
        ("env without a stack", ["env"], {}, "no local stack is running"),
        ("bad max tokens", ["submit", "generate", "--max-tokens", "0", "hi"], stale, "--max-tokens must be"),
        ("write-model into a full dir", ["write-model", str(tmp_path)], {}, "is not an empty directory"),
    ]


def test_mistakes_get_two_lines_and_no_traceback(tmp_path: Path) -> None:
    for name, args, env, expected in _cases(tmp_path):
        started = time.monotonic()
        done = run_cli(args, tmp_path, **env)
        seconds = time.monotonic() - started
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0, (name, done.stdout, done.stderr)
        assert expected in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout and len(lines) <= 2, (name, done.stderr)
        assert lines[0].startswith("error: "), (name, done.stderr)
        assert seconds < MAX_SECONDS, (name, seconds)


def test_a_misspelt_option_shows_its_subcommand_usage(tmp_path: Path) -> None:
    """`make demo ARGS="--stpes 20"`: argparse's message with the usage of the subcommand typed
    (nested ones too), not the top-level usage."""
    for args, usage in ((["demo", "--stpes", "20"], "usage: loquetier demo "),
                        (["jobs", "pause", "j1", "--tiemout", "3"], "usage: loquetier jobs pause ")):
        done = run_cli(args, tmp_path)
        assert done.returncode == 2 and done.stderr.startswith(usage), done.stderr
        assert f"unrecognized arguments: {' '.join(args[-2:])}" in done.stderr and "Traceback" not in done.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = run_cli(["--debug", "submit", "train", "nope.yaml"], tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr and "UserError" in done.stderr
    again = run_cli(["submit", "train", "nope.yaml", "--debug"], tmp_path)  # after the subcommand too
    assert "Traceback" in again.stderr


def test_version_and_help(tmp_path: Path) -> None:
    from loquetier import __version__

    done = run_cli(["--version"], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"loquetier {__version__}"
    train_help = run_cli(["submit", "train", "--help"], tmp_path).stdout
    assert "examples/job.yaml" in train_help and '"messages"' in train_help
    results_help = run_cli(["results", "--help"], tmp_path).stdout
    assert "--from-beginning" in results_help and "--follow" in results_help


@pytest.mark.postgres
def test_sql_opens_psql_on_the_database(tmp_path: Path, database_url: str) -> None:
    done = run_cli(["sql", "-tAc", "SELECT count(*) FROM training_jobs WHERE job_id = 'none'"], tmp_path,
                   LOQUETIER_DATABASE__URL=database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
    # psql's options in the order given, each with its value: two commands, flags after them
    done = run_cli(["sql", "-c", "SELECT 40 + 2", "-c", "SELECT 'x' || 'y'", "-t", "-A"], tmp_path,
                   LOQUETIER_DATABASE__URL=database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", "xy"], done.stdout


def test_load_stages_a_directory_the_worker_may_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`adapters load ID PATH`: a PEFT directory outside the adapter roots is copied into
    LOQUETIER_WORKER__ADAPTER_DIR/ID (the worker reads only there); one inside is sent as it is."""
    from loquetier.cli_errors import UserError
    from loquetier.producers.cli_control import staged_path
    from loquetier.settings import get_settings

    monkeypatch.setenv("LOQUETIER_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        peft = tmp_path / "mine"
        peft.mkdir()
        payload = os.urandom(64)
        (peft / "adapter_config.json").write_text('{"r": 4}')
        (peft / "adapter_model.safetensors").write_bytes(payload)
        staged = staged_path("mine", peft)
        assert staged == (tmp_path / "cache" / "adapters" / "mine").resolve()
        assert (staged / "adapter_model.safetensors").read_bytes() == payload
        assert staged_path("mine", staged) == staged  # already under the adapter directory
        (peft / "adapter_model.safetensors").unlink()
        with pytest.raises(UserError, match="no adapter_model.safetensors"):
            staged_path("mine", peft)
    finally:
        get_settings.cache_clear()
