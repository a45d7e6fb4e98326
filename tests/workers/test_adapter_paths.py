"""Load paths: resolved under the roots, files checked and copied with bounds (no service needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loquetier.workers import adapter_paths as ap


def peft(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / ap.CONFIG_FILE).write_text('{"r": 4}')
    (path / ap.WEIGHTS_FILE).write_bytes(weights)
    return path


def test_a_copy_is_private_and_byte_exact(tmp_path: Path) -> None:
    weights = os.urandom(300_000)
    src = peft(tmp_path / "root" / "a", weights)
    directory = ap.resolve("a", [tmp_path / "root"])
    copy = ap.copy_adapter(directory, [tmp_path / "root"], max_adapter_bytes=len(weights))
    try:
        assert copy != src and (copy / ap.WEIGHTS_FILE).read_bytes() == weights
        (src / ap.WEIGHTS_FILE).write_bytes(b"changed later")  # the engine reads the copy
        assert (copy / ap.WEIGHTS_FILE).read_bytes() == weights
    finally:
        for f in copy.iterdir():
            f.unlink()
        copy.rmdir()
    with pytest.raises(ap.PathRefused) as refused:
        ap.copy_adapter(directory, [tmp_path / "root"], max_adapter_bytes=5)
    assert refused.value.code == "too_large"


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    src = peft(tmp_path / "root" / "fifo", b"w")
    (src / ap.CONFIG_FILE).unlink()
    os.mkfifo(src / ap.CONFIG_FILE)  # opening it for reading would wait for a writer forever
    with pytest.raises(ap.PathRefused) as refused:
        ap.copy_adapter(ap.resolve(str(src), [tmp_path / "root"]), [tmp_path / "root"], max_adapter_bytes=10)
    assert refused.value.code == "invalid_value"
    dev = peft(tmp_path / "root" / "dev", b"w")
    (dev / ap.WEIGHTS_FILE).unlink()
    (dev / ap.WEIGHTS_FILE).symlink_to("/dev/zero")
    with pytest.raises(ap.PathRefused) as outside:
        ap.check_adapter(dev, [tmp_path / "root"], max_adapter_bytes=10)
    assert outside.value is ap.OUTSIDE


def test_the_refusal_is_the_same_whatever_exists_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    peft(tmp_path / "secret", b"w")
    messages = set()
    for path in (str(tmp_path / "secret"), str(tmp_path / "missing"), "../secret", "../missing", "/",
                 str(root / ".." / "secret")):
        with pytest.raises(ap.PathRefused) as refused:
            ap.resolve(path, [root])
        messages.add(str(refused.value))
    assert messages == {str(ap.OUTSIDE)}
