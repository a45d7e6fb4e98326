"""The CLI tree: subcommands registered per module; migrate and status tables on real PostgreSQL."""

from __future__ import annotations

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
