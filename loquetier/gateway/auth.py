"""``Authorization: Bearer KEY`` -> the key's tenant, with a short cache and a per-key rate limit.

Keys are looked up by their sha256 (``loquetier.db.keys_repo``); a found key is cached for
``key_cache_s`` seconds so that a request costs no database round trip, which bounds how long a
revoked key keeps working. Unknown keys are not cached (a typo must not stick).

Rate limits are buckets per key and per gateway, each with a burst of a minute's worth; behind N
gateways a key gets up to N times its rates:
- ``max_requests_per_minute``: each choice of a call (prompts x ``n``) is one request;
- ``max_tokens_per_minute``: a call takes, before it runs, its prompts' tokens (counted where the
  prompt is token ids, estimated at 4 bytes a token for text) and its ``max_tokens`` for each
  choice, as OpenAI counts a call against this limit; a chat that asks no ``max_tokens`` gets as
  many as the key's minute holds past its prompts, shared among its choices. Each choice's answer
  then settles what it took against the tokens it used (its ``usage``): the unused part goes back,
  and where the prompt estimate fell short the bucket can run below zero, and the key waits until
  it has refilled.
A refused call costs the key nothing. Answers carry OpenAI's ``x-ratelimit-*`` headers for the
limits the key has.
"""

from __future__ import annotations

import math
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
        self._buckets: dict[str, _Bucket] = {}  # requests, by key_id
        self._token_buckets: dict[str, _Bucket] = {}

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
            self._take(self._buckets, owner.key_id, owner.max_requests_per_minute)
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

    def charge(self, owner: KeyOwner, requests: int, tokens: int = 0) -> None:
        """Take ``requests`` more from the key's request bucket (a call of several prompts or ``n``
        choices: each choice is a request for the workers, the call's first was taken by
        :meth:`owner`) and ``tokens`` from its token bucket; a refusal gives back all it took,
        the request :meth:`owner` took included."""
        taken = 0
        try:
            per_minute = owner.max_requests_per_minute
            if per_minute is not None and requests > 0:
                if requests + 1 > per_minute:  # never within the limit: no retry would help
                    raise APIError(
                        429, f"this call is {requests + 1} requests (prompts x n), more than the key's rate limit "
                        f"of {per_minute} requests per minute allows at once; send fewer choices a call",
                        code="rate_limit_exceeded",
                    )
                self._take(self._buckets, owner.key_id, per_minute, requests, "requests")
                taken = requests
            token_limit = owner.max_tokens_per_minute
            if token_limit is not None and tokens > 0:
                if tokens > token_limit:
                    raise APIError(
                        429, f"this call may use {tokens} tokens (its prompts, and max_tokens for each choice), "
                        f"more than the key's limit of {token_limit} tokens per minute allows at once; lower "
                        "max_tokens or send fewer choices a call", code="rate_limit_exceeded",
                    )
                self._take(self._token_buckets, owner.key_id, token_limit, tokens, "tokens")
        except APIError:  # a refused call costs the key nothing
            if owner.max_requests_per_minute is not None:
                self._give_back(self._buckets, owner.key_id, owner.max_requests_per_minute, taken + 1)
            raise

    def settle_tokens(self, owner: KeyOwner, taken: int, used: int) -> None:
        """A choice took ``taken`` tokens before it ran and used ``used``: the difference goes back
        (or is taken, below zero if need be)."""
        if owner.max_tokens_per_minute is not None and taken != used:
            self._give_back(self._token_buckets, owner.key_id, owner.max_tokens_per_minute, taken - used)

    def headers(self, owner: KeyOwner) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits the key has: the limit, what is left
        now, and how long until the bucket is full again."""
        out: dict[str, str] = {}
        for unit, buckets, per_minute in (("requests", self._buckets, owner.max_requests_per_minute),
                                          ("tokens", self._token_buckets, owner.max_tokens_per_minute)):
            if per_minute is None:
                continue
            left = self._refilled(buckets, owner.key_id, per_minute).tokens
            out[f"x-ratelimit-limit-{unit}"] = str(per_minute)
            out[f"x-ratelimit-remaining-{unit}"] = str(max(0, math.floor(left)))
            out[f"x-ratelimit-reset-{unit}"] = _duration(max(0.0, (per_minute - left) * 60.0 / per_minute))
        return out

    def _refilled(self, buckets: dict[str, _Bucket], key_id: str, per_minute: int) -> _Bucket:
        now = time.monotonic()
        bucket = buckets.setdefault(key_id, _Bucket(float(per_minute), now))
        bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.stamp) * per_minute / 60.0)
        bucket.stamp = now
        return bucket

    def _give_back(self, buckets: dict[str, _Bucket], key_id: str, per_minute: int, amount: float) -> None:
        bucket = self._refilled(buckets, key_id, per_minute)
        bucket.tokens = min(float(per_minute), bucket.tokens + amount)

    def _take(self, buckets: dict[str, _Bucket], key_id: str, per_minute: int, amount: int = 1,
              unit: str = "requests") -> None:
        bucket = self._refilled(buckets, key_id, per_minute)
        if bucket.tokens < amount:
            wait_s = (amount - bucket.tokens) * 60.0 / per_minute
            raise APIError(
                429, f"rate limit of {per_minute} {unit} per minute reached; retry in {wait_s:.1f} s",
                code="rate_limit_exceeded", retry_after=wait_s,
            )
        bucket.tokens -= amount


def _duration(seconds: float) -> str:
    """A wait as OpenAI's reset headers write it: ``1.5s``, ``6m0s``."""
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"
