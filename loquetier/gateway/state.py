"""One gateway process: settings, the Kafka bus, the database, the caches in front of it.

Every request needs its key's tenant, its model's adapter and a live worker; each is cached
for a short, configured time so that the hot path makes no database round trip (the
benchmark's ≤ 5 ms budget), while changes still show within seconds. An adapter that is not
in the cache is looked up directly, so a just-finished fine-tune is servable at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from loquetier.db import keys_repo, tenancy_repo, workers_repo
from loquetier.db.keys_repo import KeyOwner
from loquetier.db.session import DatabaseError, Session, create_engine, session_factory
from loquetier.db.store import public_error
from loquetier.settings import Settings

from .auth import Auth
from .bus import Bus
from .errors import APIError, bad_request, not_found
from .tokens import TokenText

log = logging.getLogger(__name__)

T = TypeVar("T")


def base_model_name(settings: Settings) -> str:
    if settings.gateway.model_name:
        return settings.gateway.model_name
    if settings.engine.model_dir is not None:
        return settings.engine.model_dir.name
    return "base"


class Gateway:
    def __init__(self, settings: Settings, *, bootstrap: str, database_url: str) -> None:
        self.settings = settings
        self.config = settings.gateway
        self.model_name = base_model_name(settings)
        self.bus = Bus(bootstrap, settings.kafka, gateway_id=self.config.id)
        self.db = create_engine(database_url)
        self._sessions = session_factory(self.db)
        self.auth = Auth(self._find_key, cache_s=self.config.key_cache_s)
        self.tokens = TokenText(settings.engine.model_dir)
        self._adapters: dict[str | None, tuple[float, frozenset[str]]] = {}
        self._workers_checked = (0.0, 0)
        self._held: dict[str, int] = {}  # key_id -> its requests in flight here

    async def start(self) -> None:
        await self.bus.start()

    async def stop(self) -> None:
        await self.bus.stop()
        await self.db.dispose()

    async def tx(self, fn: Callable[[Session], Awaitable[T]]) -> T:
        """``fn`` in one transaction; a database failure is a 503, never a traceback; a value the
        database cannot hold (a NUL character in an id, a number out of range) is the caller's 400."""
        try:
            async with self._sessions.begin() as session:
                return await fn(session)
        except (DatabaseError, OSError) as exc:
            refused = public_error(exc)
            if refused is not None and refused.code == "invalid_value":
                raise APIError(400, refused.message, code="invalid_value") from None
            log.warning("database call failed", extra={"error": str(exc)[:300]})
            raise APIError(503, "the database is unavailable; retry later", code="database_unavailable") from None

    async def _find_key(self, key: str) -> KeyOwner | None:
        return await self.tx(lambda s: keys_repo.find_key(s, key))

    # --- models ----------------------------------------------------------------------------

    async def visible_adapters(self, tenant_id: str) -> frozenset[str]:
        now = time.monotonic()
        hit = self._adapters.get(tenant_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        rows = await self.tx(lambda s: tenancy_repo.visible_adapters(s, tenant_id))
        names = frozenset(row[0] for row in rows)
        self._adapters[tenant_id] = (now + self.config.model_cache_s, names)
        return names

    def forget_adapters(self, tenant_id: str) -> None:
        """Drop the cached adapter names of ``tenant_id`` (one of them was deleted)."""
        self._adapters.pop(tenant_id, None)

    async def resolve_model(self, owner: KeyOwner, model: str) -> str | None:
        """``model`` -> the adapter id to use (None: the base model); 404 if the caller may not use it."""
        if model == self.model_name:
            return None
        if model in await self.visible_adapters(owner.tenant_id):
            return model
        if await self.tx(lambda s: tenancy_repo.adapter_is_visible(s, model, owner.tenant_id)):
            self._adapters.pop(owner.tenant_id, None)
            return model
        raise not_found(f"the model {model!r} does not exist or you do not have access to it",
                        code="model_not_found", param="model")

    # --- workers ---------------------------------------------------------------------------

    async def require_worker(self) -> None:
        """503 when no worker has heartbeated lately (a request would only wait)."""
        checked_at, count = self._workers_checked
        now = time.monotonic()
        if now - checked_at > 1.0 or count == 0:
            within = self.config.worker_alive_s
            count = await self.tx(lambda s: workers_repo.count_live_workers(s, within_s=within))
            self._workers_checked = (now, count)
        if count == 0:
            raise APIError(503, "no worker is running; start one (`loquetier worker`) and retry", code="no_worker")

    def admit(self, num: int, key_id: str) -> None:
        """429 when ``num`` more results would take this gateway past ``max_inflight`` waiting ones, or
        the key past ``max_inflight_per_key``; 400 when ``num`` alone is past a limit (waiting would
        not help)."""
        limit = min(self.config.max_inflight, self.config.max_inflight_per_key)
        if num > limit:
            raise bad_request(f"{num} completions in one call are more than this gateway's limit of {limit} "
                              "requests in flight", param="n")
        if self.bus.num_waiting + num > self.config.max_inflight:
            raise APIError(429, f"the gateway is at its limit of {self.config.max_inflight} requests in flight; "
                           "retry shortly", code="too_many_requests", retry_after=1)
        if self._held.get(key_id, 0) + num > self.config.max_inflight_per_key:
            raise APIError(429, f"this API key is at its limit of {self.config.max_inflight_per_key} requests in "
                           "flight; retry when some have finished", code="too_many_requests", retry_after=1)

    def hold(self, key_id: str, num: int) -> None:
        """``num`` of the key's requests are in flight (``admit`` counts them until ``release``)."""
        self._held[key_id] = self._held.get(key_id, 0) + num

    def release(self, key_id: str, num: int) -> None:
        left = self._held.get(key_id, 0) - num
        if left > 0:
            self._held[key_id] = left
        else:
            self._held.pop(key_id, None)
