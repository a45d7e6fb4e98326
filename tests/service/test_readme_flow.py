"""The README's service flow, run as written: its bash block under "As a service", line by line, in
a shell on a fresh cache, with the real model (SmolLM2-135M-Instruct), broker and PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kafka, pytest.mark.postgres]
ROOT = Path(__file__).resolve().parents[2]


def readme_block(heading: str) -> list[str]:
    """The commands of the first bash block after ``heading``, comments and blank lines dropped."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block is not None
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """A fresh cache the embedded PostgreSQL's service user can reach, with the shared converted model."""
    path = Path(tempfile.mkdtemp(prefix="loquetier-readme-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    env = {**os.environ, "LOQUETIER_CACHE_DIR": str(path)}
    subprocess.run([sys.executable, "-m", "loquetier.cli", "down", "--purge"], env=env, capture_output=True,
                   check=False, timeout=120)
    shutil.rmtree(path, ignore_errors=True)


def _model(cache: Path, env: dict[str, str]) -> None:
    shared = Path(os.environ.get("LOQUETIER_TEST_MODEL_CACHE", Path.home() / ".cache" / "loquetier"))
    model = shared / "SmolLM2-135M-Instruct"
    if not (model / "model.safetensors").is_file():  # convert once, shared across runs
        subprocess.run([sys.executable, "-m", "loquetier.models.gguf_convert"], check=True,
                       env={**env, "LOQUETIER_CACHE_DIR": str(shared)}, timeout=600)
    (cache / model.name).symlink_to(model)


def test_the_service_flow_as_written(cache_dir: Path) -> None:
    pytest.importorskip("gguf")
    commands = readme_block("### As a service")
    assert commands[0] == ". .venv/bin/activate" and commands[-1] == "loquetier down"
    assert "loquetier up" in commands and "loquetier submit train examples/job.yaml" in commands
    # As a user runs it: nothing configured, real kernels (not the test session's Triton interpreter).
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOQUETIER_") and k != "TRITON_INTERPRET"}
    env.update(LOQUETIER_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               VIRTUAL_ENV_DISABLE_PROMPT="1")
    _model(cache_dir, env)
    venv = Path(sys.executable).parent.parent  # the venv running the tests stands for .venv
    script = ["set -e", f"cd {ROOT}"]
    for number, command in enumerate(commands):
        line = f". {venv}/bin/activate" if command == ". .venv/bin/activate" else command
        script.append(f"echo '### {number}'; {line} < /dev/null")
    done = subprocess.run(["bash", "-c", "\n".join(script)], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    outputs = re.split(r"^### \d+\n", done.stdout, flags=re.M)[1:]
    by_command = dict(zip(commands, outputs, strict=True))
    assert "worker   takes requests" in by_command["loquetier up"]
    assert "adapter  pirate v1 loaded" in by_command["loquetier up"]
    pirate = by_command['loquetier submit generate --adapter pirate "Hello there"'].lower()
    assert any(word in pirate for word in ("arr", "ahoy", "matey", "ye ")), pirate
    assert "succeeded: 8 steps" in by_command["loquetier submit train examples/job.yaml"]
    codename = next(out for cmd, out in by_command.items() if "--adapter codename" in cmd)
    assert "tidepool" in codename.lower()
    jobs = by_command["loquetier jobs"].splitlines()
    assert jobs[0].split()[:4] == ["job_id", "kind", "adapter_id", "status"]
    assert any("codename" in row and "succeeded" in row for row in jobs[1:])
    assert "worker stopped" in by_command["loquetier down"]
