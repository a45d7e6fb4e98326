"""Child processes for embedded services: spawn in a new process group, wait, stop the group.

Each service runs as the leader of its own session/process group, so stopping it signals
the whole group (e.g. postgres and its backends) and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# Popen objects of children started by this process, so that stop() can reap them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(host: str, port: int) -> bool:
    """Can a server bind ``port`` now? (as servers do, past connections in TIME_WAIT)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def spawn(
    argv: list[str],
    *,
    log_path: Path,
    user: int | None = None,
    group: int | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Start ``argv`` as a new session leader (pgid == pid), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=group,
            extra_groups=[] if group is not None else None,
            cwd=cwd,
            env=env,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def is_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def cmdline_contains(pid: int, needle: str) -> bool:
    """Guard against PID reuse before signalling a PID read from a state file."""
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return not Path("/proc").is_dir() and is_alive(pid)  # no procfs: trust the PID


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop_group(pid: int, *, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Signal the process group led by ``pid``; SIGKILL what is left after ``timeout_s``.

    Children that moved to their own process group (postgres backends do) are collected
    first and killed too if they outlive the leader.
    """
    strays = children_of(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and is_alive(pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # stragglers in the group, or a stuck leader
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(timeout=5)
    for stray in strays:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(stray, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (_group_alive(pid) or any(map(_pid_exists, strays))):
        time.sleep(0.05)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, pid: int, what: str, log_path: Path
) -> None:
    """Poll ``predicate()`` until true; fail early if ``pid`` dies, with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if not is_alive(pid):
            raise RuntimeError(f"{what} exited during startup; log {log_path}:\n{tail(log_path)}")
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s; log {log_path}:\n{tail(log_path)}")


def tail(path: Path, num_lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "<no log>"
