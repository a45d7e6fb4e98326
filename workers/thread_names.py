"""OS-level thread names (Linux ``/proc/<pid>/task/<tid>/comm``), so that CPU time can be read per
thread from outside the process (``top -H``, ``benchmarks/bench_service.py``). Python gives its
threads names of its own only; the kernel's stays the process's unless set here."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15
ENGINE_THREAD = "lq-engine"


def set_os_thread_name(name: str) -> bool:
    """Name the calling thread (15 bytes at most); False where the platform cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
