"""Worker subprocesses for tests where a real process death matters (kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from loquetier.settings import Settings


def worker_env(settings: Settings, worker_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    k, w = settings.kafka, settings.worker
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOQUETIER_")}
    env.pop("TRITON_INTERPRET", None)  # the torch reference ops: the interpreter is for kernel tests
    assert k.bootstrap and settings.database.url
    env.update({
        "LOQUETIER_KAFKA__BOOTSTRAP": k.bootstrap,
        "LOQUETIER_KAFKA__REQUESTS_TOPIC": k.requests_topic,
        "LOQUETIER_KAFKA__TRAINING_TOPIC": k.training_topic,
        "LOQUETIER_KAFKA__CONTROL_TOPIC": k.control_topic,
        "LOQUETIER_KAFKA__RESULTS_TOPIC": k.results_topic,
        "LOQUETIER_KAFKA__DLQ_TOPIC": k.dlq_topic,
        "LOQUETIER_KAFKA__GROUP_ID": k.group_id,
        "LOQUETIER_DATABASE__URL": settings.database.url,
        "LOQUETIER_WORKER__ID": worker_id,
        "LOQUETIER_WORKER__HEARTBEAT_S": str(w.heartbeat_s),
        "LOQUETIER_WORKER__LEASE_S": str(w.lease_s),
        "LOQUETIER_WORKER__PROGRESS_EVERY_S": str(w.progress_every_s),
        "LOQUETIER_ENGINE__NUM_KV_BLOCKS": "256",
        "LOQUETIER_ENGINE__BLOCK_SIZE": "8",
        "OMP_NUM_THREADS": "1",
    })
    env.update(extra or {})
    return env


class WorkerProcess:
    """``loquetier worker`` (or ``module``, a stand-in with the same arguments) as a child process;
    ``extra_env`` adds settings. Logs append to ``<log_dir>/<worker_id>.log`` across restarts."""

    def __init__(self, settings: Settings, worker_id: str, model_dir: Path, log_dir: Path, *,
                 module: str = "loquetier.cli", extra_env: dict[str, str] | None = None, device: str = "cpu",
                 dtype: str = "float32", extra_args: tuple[str, ...] = ("--partitions", "2")) -> None:
        self.worker_id = worker_id
        self.device = device
        self.log_path = log_dir / f"{worker_id}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "worker", "--model", str(model_dir), "--device", device,
                 "--dtype", dtype, *extra_args],
                env=worker_env(settings, worker_id, extra_env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def logs(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode
