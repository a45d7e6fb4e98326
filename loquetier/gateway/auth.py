"""``Authorization: Bearer KEY`` -> the key's tenant, with a short cache and a per-key rate limit.

Keys are looked up by their sha256 (``loquetier.db.keys_repo``); a found key is cached for
``key_cache_s`` seconds so that a request costs no database round trip, which bounds how long a
revoked key keeps working. Unknown keys are not cached (a typo must not stick). The rate limit
is a token bucket per key and per gateway: ``max_requests_per_minute`` with a burst of the same
size, each choice of a call (prompts x ``n``) one request; behind N gateways a key gets up to N
times its rate.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from loquetier.db.keys_repo import KeyOwner, hash_key

from .errors import APIError

Lookup = Callable[[str], Awaitable[KeyOwner | None]]
MAX_KEY_CHARS = 256


@dataclass
class _Bucket:
    tokens: float
    stamp: float = field(default_factory=time.monotonic)


class Auth:
    def __init__(self, lookup: Lookup, *, cache_s: float) -> None:
        self._lookup = lookup
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, KeyOwner]] = {}
        self._buckets: dict[str, _Bucket] = {}

    async def owner(self, request: Request) -> KeyOwner:
        """The caller's key owner; 401 without a valid key, 429 over the key's rate."""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_CHARS:
            message = "missing or malformed API key: send 'Authorization: Bearer KEY'"
            raise APIError(401, message, code="invalid_api_key")
        owner = await self._resolve(key)
        if owner is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        if owner.max_requests_per_minute is not None:
            self._take(owner.key_id, owner.max_requests_per_minute)
        return owner

    async def _resolve(self, key: str) -> KeyOwner | None:
        now = time.monotonic()
        digest = hash_key(key)  # the cache holds hashes, like the table: a memory dump shows no key
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        owner = await self._lookup(key)
        if owner is None:
            self._cache.pop(digest, None)
            return None
        if len(self._cache) > 10_000:  # bounded: drop the expired, then everything if still large
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) > 10_000:
                self._cache.clear()
        self._cache[digest] = (now + self._cache_s, owner)
        return owner

    def charge(self, owner: KeyOwner, requests: int) -> None:
        """Take ``requests`` more from the key's bucket (a call of several prompts or ``n`` choices:
        each choice is a request for the workers, the call's first was taken by :meth:`owner`)."""
        per_minute = owner.max_requests_per_minute
        if per_minute is None or requests <= 0:
            return
        try:
            if requests + 1 > per_minute:  # never within the limit: no retry would help
                raise APIError(
                    429, f"this call is {requests + 1} requests (prompts x n), more than the key's rate limit of "
                    f"{per_minute} requests per minute allows at once; send fewer choices a call",
                    code="rate_limit_exceeded",
                )
            self._take(owner.key_id, per_minute, requests)
        except APIError:  # a refused call costs the key nothing: the request owner() took goes back
            bucket = self._buckets.get(owner.key_id)
            if bucket is not None:
                bucket.tokens = min(float(per_minute), bucket.tokens + 1.0)
            raise

    def _take(self, key_id: str, per_minute: int, amount: int = 1) -> None:
        now = time.monotonic()
        bucket = self._buckets.setdefault(key_id, _Bucket(float(per_minute), now))
        bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.stamp) * per_minute / 60.0)
        bucket.stamp = now
        if bucket.tokens < amount:
            wait_s = (amount - bucket.tokens) * 60.0 / per_minute
            raise APIError(
                429, f"rate limit of {per_minute} requests per minute reached; retry in {wait_s:.1f} s",
                code="rate_limit_exceeded", retry_after=wait_s,
            )
        bucket.tokens -= amount
