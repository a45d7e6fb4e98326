"""The CLI tree: subcommands registered per module; migrate and status tables on real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loquetier import cli
from loquetier.producers.cli_submit import load_job_file
from loquetier.producers.cli_tables import render
from loquetier.settings import get_settings


def test_subcommands_are_registered() -> None:
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"migrate", "worker", "submit", "results", "jobs", "requests", "adapters"} <= set(choices)
    args = parser.parse_args(["submit", "generate", "--adapter", "a", "hello"])
    assert args.adapter == "a" and args.prompt == "hello" and args.func is not None
    args = parser.parse_args(["worker", "--model", "/m", "--partitions", "8"])
    assert args.partitions == 8


def test_job_files_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "j.yaml").write_text("adapter_id: a\ndata: /data.jsonl\nparams: {max_steps: 3}\n")
    (tmp_path / "j.json").write_text('{"adapter_id": "a", "data": "/data.jsonl"}')
    assert load_job_file(tmp_path / "j.yaml")["params"] == {"max_steps": 3}
    assert load_job_file(tmp_path / "j.json")["adapter_id"] == "a"


def test_render_table() -> None:
    out = render(["a", "bb"], [(1, None), (2.5, "x")]).splitlines()
    assert out[0].split() == ["a", "bb"] and out[1].split() == ["1", "-"] and out[2].split() == ["2.5", "x"]


@pytest.mark.postgres
def test_migrate_then_tables(empty_database: str, monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setenv("LOQUETIER_DATABASE__URL", empty_database)
    get_settings.cache_clear()
    try:
        assert cli.main(["migrate"]) == 0
        for table in ("jobs", "requests", "adapters"):
            assert cli.main([table, "--limit", "5"]) == 0
        out = capsys.readouterr().out
        assert "job_id" in out and "request_id" in out and "adapter_id" in out
    finally:
        get_settings.cache_clear()


def test_a_large_data_file_is_handed_over_under_the_data_directory(tmp_path: Path, monkeypatch: Any) -> None:
    from loquetier.producers import job_file

    data_dir = tmp_path / "cache" / "data"
    monkeypatch.setattr(job_file, "DEFAULT_DATA_DIR", data_dir)
    lines = [f'{{"prompt": "question {i}", "completion": "{i * 7919 % 1000:03d} {"x" * 40}"}}' for i in range(25_000)]
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines) + "\n")
    assert big.stat().st_size > job_file.MAX_INLINE_FILE_BYTES
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines[:3]) + "\n")
    job = job_file.build_job({"adapter_id": "a", "data": "big.jsonl", "eval_data": "small.jsonl"}, tmp_path, job_id="j")
    sent = Path(str(job.data))
    assert sent.parent == data_dir and sent.read_bytes() == big.read_bytes()
    assert [e.model_dump() for e in job.eval_data] == [json.loads(line) for line in lines[:3]]  # type: ignore[union-attr]
    again = job_file.build_job({"adapter_id": "a", "data": str(big)}, tmp_path, job_id="k")
    assert again.data == str(sent) and len(list(data_dir.iterdir())) == 1  # named by content: one copy
