"""Where a control "load" path, a job's base_adapter path or a job's data file may point, and
reading it boundedly.

A path is resolved with every symlink followed, then must lie under one of the configured
roots (``WorkerSettings.load_roots()``: ``adapter_dir`` plus ``adapter_roots``, by default
the shipped data directory). Anything else is refused with one message whatever exists
there, so the answer tells nothing about the filesystem outside the roots. Relative paths
are taken relative to each root in turn.

The PEFT files are then checked as regular files under size limits and copied into a
private directory that the engine reads: a file swapped or grown after the check never
reaches the engine thread, and a config linked to a huge file is refused before any read.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"  # the PEFT directory format (loquetier/lora/adapter.py)
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024


class PathRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


OUTSIDE = PathRefused("forbidden_path", "the path is not a directory under the worker's adapter roots "
                      "(LOQUETIER_WORKER__ADAPTER_DIR, LOQUETIER_WORKER__ADAPTER_ROOTS)")


DATA_OUTSIDE = PathRefused("forbidden_path", "the data path is not a file under the worker's data roots "
                           "(LOQUETIER_WORKER__DATA_ROOTS)")


def _is_under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _under_roots(path: str, roots: list[Path]) -> list[Path]:
    """Where ``path`` may point, symlinks resolved, that lies under a root (an absolute path as it
    is, a relative one under each root in turn)."""
    if "\x00" in path:  # no file name holds a NUL (os.path.realpath raises ValueError on it)
        return []
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    given = Path(path)
    candidates = [given] if given.is_absolute() else [root / given for root in real_roots]
    reals = (Path(os.path.realpath(candidate)) for candidate in candidates)
    return [real for real in reals if _is_under(real, real_roots)]


def _is(path: Path, kind: Any) -> bool:
    """Whether ``path`` is of ``kind`` (``stat.S_ISDIR``, ``stat.S_ISREG``); False where it cannot be
    looked at (a name too long for the file system, a component that is not a directory)."""
    try:
        return bool(kind(path.stat().st_mode))
    except (OSError, ValueError):
        return False


def resolve(path: str, roots: list[Path]) -> Path:
    """The directory ``path`` names, symlinks resolved, if it lies under a root; else :data:`OUTSIDE`."""
    for real in _under_roots(path, roots):
        if _is(real, stat.S_ISDIR):
            return real
    raise OUTSIDE


def _open_checked(path: Path, roots: list[Path], max_bytes: int) -> int:
    """A descriptor of ``path``: under the roots, a regular file, at most ``max_bytes``."""
    real = Path(os.path.realpath(path))
    if not _is_under(real, [Path(os.path.realpath(root)) for root in roots]):
        raise OUTSIDE  # a file linked out of the roots
    try:  # no following a link swapped in since, no blocking on a FIFO
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise PathRefused("not_found", f"the adapter directory has no readable {path.name}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = PathRefused("invalid_value", f"{path.name} is not a regular file")
    elif info.st_size > max_bytes:
        problem = PathRefused("too_large", f"{path.name} is {info.st_size} bytes, the limit is {max_bytes}")
    if problem is not None:
        os.close(fd)
        raise problem
    return fd


def _copy_bounded(fd: int, target: Path, name: str, max_bytes: int) -> None:
    copied = 0
    with os.fdopen(fd, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            copied += len(chunk)
            if copied > max_bytes:
                raise PathRefused("too_large", f"{name} grew past the limit of {max_bytes} bytes")
            dst.write(chunk)


def copy_adapter(directory: Path, roots: list[Path], *, max_adapter_bytes: int) -> Path:
    """A private copy of the PEFT files of ``directory`` (checked, bounded); the caller removes it."""
    limits = {CONFIG_FILE: MAX_CONFIG_BYTES, WEIGHTS_FILE: max_adapter_bytes}
    fds: dict[str, int] = {}
    target = Path(tempfile.mkdtemp(prefix="loquetier-adapter-"))
    try:
        for name, limit in limits.items():
            fds[name] = _open_checked(directory / name, roots, limit)
        for name, limit in limits.items():
            _copy_bounded(fds.pop(name), target / name, name, limit)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def check_adapter(directory: Path, roots: list[Path], *, max_adapter_bytes: int) -> None:
    """The checks of :func:`copy_adapter` without the copy (a job's base adapter, read by the engine)."""
    for name, limit in ((CONFIG_FILE, MAX_CONFIG_BYTES), (WEIGHTS_FILE, max_adapter_bytes)):
        os.close(_open_checked(directory / name, roots, limit))


def read_data_file(path: str, roots: list[Path], *, max_bytes: int) -> bytes:
    """The bytes of a training data file named by a job: symlinks resolved, a regular file under
    one of ``roots`` (a relative path is tried under each root in turn), at most ``max_bytes``.
    Anything outside the roots, or missing, gets :data:`DATA_OUTSIDE` whatever exists there."""
    for real in _under_roots(path, roots):
        if not _is(real, stat.S_ISREG):
            continue
        try:
            fd = _open_checked(real, roots, max_bytes)
        except PathRefused as exc:
            if exc.code == "too_large":
                raise PathRefused("too_large", f"the data file is {real.stat().st_size} bytes, "
                                  f"the limit is {max_bytes}") from None
            raise DATA_OUTSIDE from None
        with os.fdopen(fd, "rb") as src:
            blob = src.read(max_bytes + 1)
        if len(blob) > max_bytes:
            raise PathRefused("too_large", f"the data file grew past the limit of {max_bytes} bytes")
        return blob
    raise DATA_OUTSIDE
