"""Load paths: resolved under the roots, files checked and copied with bounds (no service needed)."""

from __future__ import annotations

import os
import random
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
    too_long = "x" * random.randint(4096, 8192)  # past the file system's name and path limits
    for path in (str(tmp_path / "secret"), str(tmp_path / "missing"), "../secret", "../missing", "/",
                 str(root / ".." / "secret"), too_long, str(root / too_long), "a/" * 3000):
        with pytest.raises(ap.PathRefused) as refused:
            ap.resolve(path, [root])
        messages.add(str(refused.value))
    assert messages == {str(ap.OUTSIDE)}


def test_data_files_are_read_only_from_under_the_data_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    body = "".join(f'{{"prompt": "q{i}", "completion": "{os.urandom(4).hex()}"}}\n' for i in range(20)).encode()
    (root / "train.jsonl").write_bytes(body)
    (outside / "secret.jsonl").write_bytes(b'{"prompt": "s", "completion": "t"}\n')
    (root / "link-out.jsonl").symlink_to(outside / "secret.jsonl")
    os.mkfifo(root / "fifo.jsonl")
    assert ap.read_data_file(str(root / "train.jsonl"), [root], max_bytes=len(body)) == body
    assert ap.read_data_file("train.jsonl", [outside, root], max_bytes=len(body)) == body  # relative: each root
    refused = {}
    for name, path in {"absolute outside": str(outside / "secret.jsonl"), "symlink out": str(root / "link-out.jsonl"),
                       "traversal": str(root / ".." / "elsewhere" / "secret.jsonl"), "relative traversal":
                       "../elsewhere/secret.jsonl", "missing": str(root / "nothing.jsonl"), "etc": "/etc/passwd",
                       "directory": str(root), "fifo": str(root / "fifo.jsonl"),
                       "name too long": str(root / ("y" * random.randint(256, 8192)))}.items():
        with pytest.raises(ap.PathRefused) as exc:
            ap.read_data_file(path, [root], max_bytes=1 << 20)
        refused[name] = (exc.value.code, exc.value.message)
    assert {code for code, _ in refused.values()} == {"forbidden_path"}
    assert len({message for _, message in refused.values()}) == 1  # nothing told about what exists
    with pytest.raises(ap.PathRefused) as big:
        ap.read_data_file(str(root / "train.jsonl"), [root], max_bytes=len(body) - 1)
    assert big.value.code == "too_large"
