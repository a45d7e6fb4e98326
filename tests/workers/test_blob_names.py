"""Blob files named from wire ids stay under their root and never collide."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from loquetier.settings import WorkerSettings
from loquetier.workers.adapters import blob_name, store_blob

HOSTILE = ["../../etc/passwd", "..", ".", "", "a/../../b", "/abs", "ok-id", "x\x00y", "ü" * 200, ".hidden"]


def test_blob_names_stay_under_their_root(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    names = {}
    for job_id in HOSTILE:
        name = blob_name(f"{job_id}/step-3.ckpt")
        resolved = (root / name).resolve()
        assert resolved.is_relative_to(root.resolve()), (job_id, name)
        assert not any(part in ("", ".", "..") or part.startswith(".") for part in name.split("/")), name
        names[name] = job_id
    assert len(names) == len(HOSTILE)  # no two ids share a file
    assert blob_name("ok-id/step-3.ckpt") == "ok-id/step-3.ckpt"  # plain ids keep their names


def test_a_blob_goes_to_a_file_with_its_checksum(tmp_path: Path) -> None:
    settings = WorkerSettings(checkpoint_storage="uri", checkpoint_dir=tmp_path / "ckpt")
    data = bytes(range(256)) * 97
    fields = asyncio.run(store_blob(settings, "../../escape/adapter.bin", data))
    path = Path(fields["uri"].removeprefix("file://"))
    assert path.is_relative_to(tmp_path / "ckpt") and path.read_bytes() == data
    assert fields["sha256"] == hashlib.sha256(data).hexdigest() and fields["size_bytes"] == len(data)
    assert asyncio.run(store_blob(WorkerSettings(), "j/x", data)) == {"data": data}
