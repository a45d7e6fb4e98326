"""The README's main job, reduced: real model, embedded broker and PostgreSQL, worker, scenario."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kafka, pytest.mark.postgres]


def _services(cache: Path) -> set[tuple[int, str]]:
    """Broker, PostgreSQL and worker processes of the demo that uses ``cache``: its path in their
    command line (the embedded PostgreSQL's data directory) or environment (what the demo started).
    Other stacks on the machine (another test session's broker and databases) are not the demo's."""
    found = set()
    mark = f"LOQUETIER_CACHE_DIR={cache}"
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not any(k in cmd for k in ("tansu", "postgres", "loquetier.cli worker")):
            continue
        try:
            env = p.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            env = {}
        if str(cache) in cmd or f"LOQUETIER_CACHE_DIR={env.get('LOQUETIER_CACHE_DIR')}" == mark:
            found.add((p.info["pid"], cmd[:120]))
    return found


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """A fresh cache (and so a fresh embedded PostgreSQL) that its service user can traverse."""
    path = Path(tempfile.mkdtemp(prefix="loquetier-demo-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_scenario_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("gguf")
    cache = cache_dir
    shared_models = Path(os.environ.get("LOQUETIER_TEST_MODEL_CACHE", Path.home() / ".cache" / "loquetier"))
    model = shared_models / "SmolLM2-135M-Instruct"
    # As a user runs it: no configured services, and real kernels (not the Triton interpreter
    # that the test session turns on for the kernel tests).
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOQUETIER_") and k != "TRITON_INTERPRET"}
    env.update(LOQUETIER_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if not (model / "model.safetensors").is_file():  # convert once, shared across runs
        subprocess.run([sys.executable, "-m", "loquetier.models.gguf_convert"], check=True, env={
            **env, "LOQUETIER_CACHE_DIR": str(shared_models)}, timeout=600)
    report_path = tmp_path / "report.json"
    before = _services(cache)
    proc = subprocess.run(
        [sys.executable, "-m", "loquetier.cli", "demo", "--model", str(model), "--steps", "6",
         "--requests", "3", "--report", str(report_path)],
        check=False, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())

    # The new adapter answers with the trained fact; the base model does not know it.
    tuned, base = report["probe"]["mascot"].lower(), report["probe"]["base"].lower()
    assert "octopus" in tuned and "lora" in tuned
    assert "octopus" not in base
    # The ready-made adapter served while the job trained.
    pirate = [a["answer"] for a in report["answers"] if a["adapter"] == "pirate"]
    assert pirate and all("arr" in a.lower() for a in pirate)
    # Every job in PostgreSQL ended succeeded; nothing is left running.
    assert report["job"]["status"] == "succeeded"
    assert report["jobs"] and {j["status"] for j in report["jobs"]} == {"succeeded"}
    assert "worker and services stopped" in proc.stdout
    assert _services(cache) - before == set()
