"""bench_service for real on CPU (issue 21): the session's broker and PostgreSQL, a real worker
subprocess on the tiny model with the SmolLM2 tokenizer, the quick trace and training jobs, then
the engine-alone replays; checks the ledger and the page's targets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_service_quick_on_cpu(kafka_bootstrap: str, pg_server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "LOQUETIER_KAFKA__BOOTSTRAP": kafka_bootstrap, "LOQUETIER_DATABASE__URL": pg_server_url,
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_service", "--model", "tiny", "--device", "cpu", "--quick",
         "--out", str(out), "--cache", str(tmp_path / "cache"), "--start-timeout", "120"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "service.json").read_text())
    svc = report["results"]["service"]
    ledger = svc["ledger"]
    # every published request answered exactly once, and its row in PostgreSQL says the same
    assert ledger["published"] == report["results"]["trace"]["num_requests"] > 0
    assert ledger["answered_once"] == ledger["published"]
    assert ledger["lost"] == 0 and ledger["answered_twice"] == 0
    assert ledger["db_rows"] == ledger["published"] == ledger["db_rows_match"]
    assert all(status in ("succeeded", "cancelled") for status in ledger["jobs"].values())
    summary = svc["summary"]
    # on a busy 2-core machine some may finish after the window's time limit (still answered once)
    assert summary["num_requests"] == ledger["published"] and summary["num_finished"] >= 1
    assert summary["output_tokens"] > 0
    assert summary["output_tokens_per_s"] > 0 and summary["ttft_p50_s"] > 0
    assert svc["records_per_s"]["results: token"] > 0 and svc["records_per_s"]["results: result"] > 0
    assert len(ledger["jobs"]) == 4  # 2 warm-up jobs and the window's 2, each ended and counted
    assert report["results"]["engine_alone"]["training_only_tokens_per_s"] > 0
    assert svc["db"]["row_writes_per_s"] > 0
    assert svc["worker_cpu"]["cpu_s"]["engine thread"] > 0  # the engine thread's OS name is read
    assert svc["loop_lag_p99_ms"] is not None and svc["loop_lag_p99_ms"] >= 0
    assert report["results"]["engine_alone"]["summary"]["output_tokens_per_s"] > 0
    names = [t["name"] for t in report["targets"]]
    assert len(names) == 7 and any("lost" in n for n in names) and any("lag" in n for n in names)
    for t in report["targets"]:
        assert set(t) >= {"name", "goal", "measured", "ok"}
        assert isinstance(t["measured"], float) and math.isfinite(t["measured"]), t
        assert isinstance(t["ok"], bool)
    lost = next(t for t in report["targets"] if t["name"] == "Results lost")
    assert lost["measured"] == 0 and lost["ok"] is True
    assert "## Targets" in (out / "service.md").read_text()
