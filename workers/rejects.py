"""What a rejected record leaves behind: a bounded DLQ letter and, when its sender can be
named, an answer.

A letter keeps a bad key and value whole when they are small and their first
``max_dlq_excerpt_bytes`` otherwise, always with their full size and sha256: a 3 MB key
plus a 2 MiB value once made a letter larger than the producer's limit, and the worker
retried it forever. The sender is named by the ids in the value or, when the value cannot
be read, by the record key (the request_id / job_id by contract).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

from loquetier.codec import MAX_ID_CHARS, Limits, RecordError, unpack_map
from loquetier.messages import DeadLetter, TopicKind

REDACTED = "<redacted>"
_SECRET_FIELDS = ("token",)


def excerpt(data: bytes | None, max_bytes: int) -> tuple[bytes | None, int | None, str | None]:
    """(the first ``max_bytes``, the full size, the sha256) of a key or value; Nones for None."""
    if data is None:
        return None, None, None
    return data[:max_bytes], len(data), hashlib.sha256(data).hexdigest()


def redact(kind: TopicKind, value: bytes) -> bytes:
    """A control record's secret fields replaced, so a letter never repeats an operator token."""
    if kind != "control":
        return value
    try:
        obj = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception:
        return value
    if not isinstance(obj, dict) or not any(k in obj for k in _SECRET_FIELDS):
        return value
    return bytes(msgpack.packb({k: REDACTED if k in _SECRET_FIELDS else v for k, v in obj.items()}))


def peek_map(value: bytes | None, limits: Limits) -> dict[str, Any]:
    """The fields of a value that may be invalid, when it is a msgpack map at all; never raises."""
    try:
        return unpack_map(bytes(value or b""), limits)
    except RecordError:
        return {}


def sender_ids(kind: TopicKind, key: bytes | None, err: RecordError) -> tuple[str | None, str | None]:
    """(request_id, job_id) to answer: from the value, else from a plausible record key."""
    if err.request_id is not None or err.job_id is not None:
        return err.request_id, err.job_id
    if kind not in ("requests", "training") or key is None or not 0 < len(key) <= 4 * MAX_ID_CHARS:
        return None, None
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return None, None
    if not 0 < len(text) <= MAX_ID_CHARS or "\x00" in text:
        return None, None
    return (text, None) if kind == "requests" else (None, text)


def letter(record: Any, kind: TopicKind, err: RecordError, *, max_excerpt_bytes: int) -> DeadLetter:
    key = bytes(record.key) if record.key is not None else None
    value = bytes(record.value) if record.value is not None else None
    key_part, key_size, key_sha = excerpt(key, max_excerpt_bytes)
    value_part, value_size, value_sha = excerpt(value, max_excerpt_bytes)
    if value is not None and kind == "control":  # whole or not at all: a cut map cannot be redacted
        value_part = redact(kind, value) if len(value) <= max_excerpt_bytes else None
    request_id, job_id = sender_ids(kind, key, err)
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key_part,
        value=value_part,
        code=err.code,
        reason=err.message[:4000],
        request_id=request_id,
        job_id=job_id,
        key_size_bytes=key_size,
        value_size_bytes=value_size,
        key_sha256=key_sha,
        value_sha256=value_sha,
    )
