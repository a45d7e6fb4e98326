"""Adapters on this worker, kept in step with the ``adapters`` table.

Postgres is the registry every worker shares: a request naming an adapter this worker
lacks loads its latest ready version lazily; a new version (a job finished, an operator
loaded one) replaces the local copy at the next :meth:`AdapterSync.sync`; an archived
adapter (control "unload") is dropped everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

from loquetier.db import repo
from loquetier.db.models import AdapterRow
from loquetier.db.store import Store
from loquetier.settings import WorkerSettings

from .engine_client import EngineClient, EngineStopped

log = logging.getLogger(__name__)


def read_payload(data: bytes | None, uri: str | None, sha256: str | None) -> bytes:
    """A stored blob's bytes: inline, or read from a file URI and checked against sha256."""
    if data is not None:
        return data
    if uri is None:
        raise ValueError("the row has neither data nor uri")
    payload = Path(uri.removeprefix("file://")).read_bytes()
    if sha256 is not None and hashlib.sha256(payload).hexdigest() != sha256:
        raise ValueError(f"{uri}: sha256 mismatch")
    return payload


async def store_blob(settings: WorkerSettings, name: str, data: bytes) -> dict[str, Any]:
    """Row fields for a large blob (a checkpoint, an adapter): its bytes for the table, or, with
    ``checkpoint_storage="uri"``, a file under ``checkpoint_dir`` plus its sha256 (hashed and written
    off the event loop)."""
    if settings.checkpoint_storage == "db":
        return {"data": data}
    path = settings.checkpoint_dir / blob_name(name)
    digest = await asyncio.to_thread(_write_file, path, data)
    return {"uri": f"file://{path}", "sha256": digest, "size_bytes": len(data)}


def remove_blobs(settings: WorkerSettings, uris: list[str]) -> None:
    """Delete the files of ``uris`` that lie under ``checkpoint_dir`` (others are left alone: a URI
    names what a worker wrote there); a file already gone is fine."""
    root = settings.checkpoint_dir.resolve()
    for uri in uris:
        if not uri.startswith("file://"):
            continue
        path = Path(uri.removeprefix("file://")).resolve()
        if path.is_relative_to(root):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def blob_name(name: str) -> str:
    """``name`` (``<id>/<file>``, ids from the wire) as a relative path that stays under its root:
    each part keeps ``[A-Za-z0-9._-]`` (others become ``_``), never starts with a dot, and carries a
    short hash of the original part when it had to change, so two ids never share a file."""
    parts = []
    for part in name.split("/"):
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", part)[:96]
        if safe != part or not safe or safe.startswith("."):
            safe = f"_{safe.lstrip('.')}-{hashlib.sha256(part.encode()).hexdigest()[:12]}"
        parts.append(safe)
    return "/".join(parts)


def _write_file(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def lora_fields(data: bytes, fallback: dict[str, Any]) -> dict[str, Any]:
    """rank / alpha / target_modules / use_rslora of adapter bytes (or the job's lora spec)."""
    try:
        from loquetier.lora.adapter import LoRAAdapter

        config = LoRAAdapter.from_bytes(data).config
        return {
            "rank": config.rank,
            "alpha": config.alpha,
            "target_modules": list(config.target_modules),
            "use_rslora": config.use_rslora,
        }
    except Exception:  # not our adapter blob format (e.g. a test engine): trust the job's spec
        return {
            "rank": int(fallback.get("rank", 8)),
            "alpha": float(fallback.get("alpha", 16.0)),
            "target_modules": list(fallback.get("target_modules", [])),
            "use_rslora": bool(fallback.get("use_rslora", False)),
        }


class AdapterSync:
    def __init__(self, client: EngineClient, store: Store) -> None:
        self._client = client
        self._store = store
        self.versions: dict[str, int | None] = {}  # adapter_id -> database version loaded here
        self._lock = asyncio.Lock()

    async def ensure(self, adapter_id: str) -> bool:
        """Is ``adapter_id`` servable here, loading it from Postgres if needed?"""
        if adapter_id in self.versions or await self._client.has_adapter(adapter_id):
            self.versions.setdefault(adapter_id, None)
            return True
        row = await self._store.tx(lambda s: repo.get_adapter(s, adapter_id))
        if row is None:
            return False
        await self.load_row(row)
        return True

    async def load_row(self, row: AdapterRow) -> None:
        async with self._lock:
            if self.versions.get(row.adapter_id) == row.version:
                return
            payload = await asyncio.to_thread(read_payload, row.data, row.uri, row.sha256)
            # a newer version of an adapter in use goes in once its running sequences end
            await self._client.replace_adapter_bytes(row.adapter_id, payload)
            self.versions[row.adapter_id] = row.version
            log.info("adapter loaded", extra={"adapter_id": row.adapter_id, "version": row.version})

    async def load_latest(self, adapter_id: str) -> bool:
        row = await self._store.tx(lambda s: repo.get_adapter(s, adapter_id))
        if row is None:
            return False
        await self.load_row(row)
        return True

    async def unload(self, adapter_id: str) -> None:
        """Unload from the engine, then forget its version (an engine that refuses keeps both)."""
        if await self._client.has_adapter(adapter_id):
            await self._client.unload_adapter(adapter_id)
        self.versions.pop(adapter_id, None)

    def mark_loaded(self, adapter_id: str, version: int | None) -> None:
        self.versions[adapter_id] = version

    async def sync(self) -> None:
        """Reload adapters with a newer ready version; drop archived ones. One adapter that cannot
        change now (an archived one still in use by running requests, a file that cannot be read)
        is tried again at the next sync and holds up none of the others."""
        known = list(self.versions)
        if not known:
            return
        latest = await self._store.tx(lambda s: repo.ready_versions(s, known))
        for adapter_id in known:
            version = latest.get(adapter_id)
            loaded = self.versions.get(adapter_id)
            try:
                if version is None:
                    if loaded is not None:  # it came from the table and is archived now
                        await self.unload(adapter_id)
                elif loaded is None or version > loaded:
                    await self.load_latest(adapter_id)
            except EngineStopped:
                raise
            except Exception as exc:
                log.info("adapter not synced now; tried again at the next sync",
                         extra={"adapter_id": adapter_id, "error": repr(exc)[:300]})
