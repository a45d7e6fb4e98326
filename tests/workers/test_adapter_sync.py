"""The worker's adapter sync (each heartbeat): one adapter that cannot change now holds up no other."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from loquetier.workers import adapters as adapters_mod
from loquetier.workers.adapters import AdapterSync
from loquetier.workers.engine_client import EngineStopped


class _Client:
    def __init__(self, busy: set[str], stopped: bool = False) -> None:
        self.loaded = {"busy": b"v1", "other": b"v1", "broken": b"v1"}
        self.busy, self.stopped = busy, stopped

    async def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.loaded

    async def unload_adapter(self, adapter_id: str) -> None:
        if self.stopped:
            raise EngineStopped("the engine stopped")
        if adapter_id in self.busy:
            raise RuntimeError(f"adapter_busy: adapter {adapter_id!r} is used by running requests")
        del self.loaded[adapter_id]

    async def replace_adapter_bytes(self, adapter_id: str, payload: bytes) -> bool:
        self.loaded[adapter_id] = payload
        return True


class _Store:
    async def tx(self, fn: Any) -> Any:
        return await fn(None)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Ready versions: 'busy' archived (none ready), 'broken' at v2 with no payload, 'other' at v2."""
    rows = {"broken": SimpleNamespace(adapter_id="broken", version=2, data=None, uri=None, sha256=None),
            "other": SimpleNamespace(adapter_id="other", version=2, data=b"v2", uri=None, sha256=None)}

    async def ready_versions(session: Any, known: list[str]) -> dict[str, int]:
        return {a: rows[a].version for a in known if a in rows}

    async def get_adapter(session: Any, adapter_id: str) -> Any:
        return rows.get(adapter_id)

    monkeypatch.setattr(adapters_mod.repo, "ready_versions", ready_versions)
    monkeypatch.setattr(adapters_mod.repo, "get_adapter", get_adapter)
    return rows


async def test_an_adapter_that_cannot_change_now_holds_up_no_other(table: dict[str, Any]) -> None:
    client = _Client(busy={"busy"})
    sync = AdapterSync(client, _Store())  # type: ignore[arg-type]
    sync.versions.update({"busy": 1, "broken": 1, "other": 1})
    await sync.sync()
    assert client.loaded["other"] == b"v2" and sync.versions["other"] == 2  # its newer version went in
    assert sync.versions["busy"] == 1 and "busy" in client.loaded  # still in use: tried again later
    assert sync.versions["broken"] == 1 and client.loaded["broken"] == b"v1"  # unreadable: kept as it was
    client.busy.clear()
    await sync.sync()
    assert "busy" not in client.loaded and "busy" not in sync.versions


async def test_an_engine_that_stopped_ends_the_sync(table: dict[str, Any]) -> None:
    sync = AdapterSync(_Client(busy=set(), stopped=True), _Store())  # type: ignore[arg-type]
    sync.versions.update({"busy": 1})
    with pytest.raises(EngineStopped):
        await sync.sync()
