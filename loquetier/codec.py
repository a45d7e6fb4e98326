"""The wire base: what every record is, how it is packed, and how a bad one fails.

Holds the record base classes, msgpack packing, :class:`Limits` and :class:`RecordError`.
The concrete records live in :mod:`loquetier.messages` (inputs, ``decode_record``) and
:mod:`loquetier.results` (outputs and dead letters).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Annotated, Any, Literal, cast

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_ID_CHARS = 256
_MAX_ERRORS_SHOWN = 5

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
# a list of them stops at its first bad id: one error, not one an item (a few MiB of bad ids were millions)
TokenIds = Annotated[list[TokenId], Field(fail_fast=True)]
Int32 = Annotated[int, Field(ge=-(2**31), lt=2**31)]
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class WireModel(BaseModel):
    """Base of every wire model: frozen, strict, closed; ``schema`` on the wire."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class Record(WireModel):
    """A top-level record; carries the schema version."""

    schema_version: Literal[1] = Field(default=1, alias="schema")


@dataclass(frozen=True)
class Limits:
    """Size limits enforced on decode (code ``too_large``); oversized input is rejected, never
    truncated. The table in docs/wire-format.md lists each one."""

    max_record_bytes: int = 4 * 1024 * 1024
    max_key_bytes: int = 1024
    max_prompt_chars: int = 1_000_000
    max_prompt_tokens: int = 131_072
    max_new_tokens: int = 131_072
    max_stop_sequences: int = 16
    # Inline training data: a larger data set goes in a JSONL file (``data`` as a path).
    max_inline_examples: int = 10_000
    max_example_chars: int = 100_000  # prompt + completion of one text example
    max_example_tokens: int = 131_072  # prompt + completion ids of one token example
    # Chat examples: each assistant turn is located by rendering the conversation up to it, so a
    # record costs about (turns x assistant turns) summed over its examples in template work
    max_chat_turn_renders: int = 1_000_000
    max_list_items: int = 1_000_000
    # Keys of any one map: a record's models have a few dozen fields at most, and every unknown key
    # would be one more validation error to build
    max_map_keys: int = 256
    # Maps and lists in one record: each costs the decoder an object (a 4 MiB record of one-byte empty
    # maps holds four million). A real record spends at least a dozen bytes a container (a chat turn,
    # an example), so 4 MiB of them stays well under this
    max_containers: int = 500_000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"Limits.{name} must be > 0, got {value}")


DEFAULT_LIMITS = Limits()


class RecordError(ValueError):
    """The one error a bad record raises.

    ``code`` is machine-readable (documented in docs/wire-format.md); ``message`` is for
    humans; ``request_id`` / ``job_id`` are set when they could be read from the record,
    so the worker can publish an "error" result for it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.job_id = job_id

    def with_ids(self, ids: tuple[str | None, str | None]) -> RecordError:
        return RecordError(self.code, self.message, *ids)


def encode(model: BaseModel) -> bytes:
    """A model as a msgpack map (field names as on the wire, nulls included)."""
    packed: bytes = msgpack.packb(model.model_dump(mode="python", by_alias=True), use_bin_type=True)
    return packed


def unpack_map(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Bytes -> a msgpack map with string keys, or RecordError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordError("undecodable", f"record value must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_record_bytes:
        raise RecordError("too_large", f"record is {len(data)} bytes, the limit is {limits.max_record_bytes}")
    left = limits.max_containers

    def count(container: Any) -> Any:  # called by the C decoder for every map and list it builds
        nonlocal left
        left -= 1
        if left < 0:
            raise _TooManyContainers
        return container

    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_array_len=limits.max_list_items,
            max_map_len=limits.max_list_items,
            object_hook=count,
            list_hook=count,
        )
    except _TooManyContainers:
        raise RecordError("too_large", f"record holds more than {limits.max_containers} maps and lists",
                          *_top_ids(data)) from None
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        reason = str(exc) or type(exc).__name__
        raise RecordError("undecodable", f"not a msgpack value: {reason}") from None
    if not isinstance(obj, dict):
        raise RecordError("not_a_map", f"record must be a msgpack map, got {type(obj).__name__}")
    check_map_widths(obj, limits.max_map_keys)
    return obj


class _TooManyContainers(Exception):
    pass


def _top_ids(data: bytes) -> tuple[str | None, str | None]:
    """(request_id, job_id) read from the top map of a record too costly to decode whole: the
    other values are skipped by the decoder without building them."""
    found: dict[str, str] = {}
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
        unpacker.feed(data)
        for _ in range(min(unpacker.read_map_header(), 64)):
            key = unpacker.unpack()
            if key in ("request_id", "job_id"):
                value = unpacker.unpack()
                if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
                    found[key] = value
            else:
                unpacker.skip()
    except Exception:  # best effort: the record is refused either way
        pass
    return found.get("request_id"), found.get("job_id")


def check_map_widths(obj: object, max_keys: int) -> None:
    """RecordError ``too_large`` when a map anywhere in ``obj`` has more than ``max_keys`` keys. One
    pass over the containers, before validation: pydantic reports every unknown key of a map as an
    error of its own, and a few MiB of them took seconds and gigabytes to report.

    The pass goes level by level, each level's containers gathered and measured by C-level
    builtins (``map``, ``chain``, ``max``) rather than one Python step per container: a record of
    millions of empty maps costs about what reading it did."""
    level: list[object] = [obj]
    while level:
        kinds = set(map(type, level))
        if kinds == {dict}:  # a level of maps only (a list of examples, of empty maps): no sorting
            dicts, lists = cast(list[dict[Any, Any]], level), []
        elif kinds == {list}:
            dicts, lists = [], cast(list[list[Any]], level)
        else:
            dicts = [v for v in level if v.__class__ is dict] if dict in kinds else []
            lists = [v for v in level if v.__class__ is list] if list in kinds else []
        if dicts:
            widest = max(map(len, dicts))
            if widest > max_keys:
                raise RecordError("too_large", f"a map has {widest} keys, the limit is {max_keys}", *ids_of(obj))
        level = list(chain.from_iterable(map(dict.values, dicts)))
        level.extend(chain.from_iterable(lists))


def check_key(key: bytes | None, limits: Limits = DEFAULT_LIMITS) -> None:
    """A Kafka record key within ``max_key_bytes`` (keys are ids: at most 256 characters)."""
    if key is not None and len(key) > limits.max_key_bytes:
        raise RecordError("too_large", f"record key is {len(key)} bytes, the limit is {limits.max_key_bytes}")


def ids_of(obj: object) -> tuple[str | None, str | None]:
    """(request_id, job_id) when present and plausible, else None each."""
    if not isinstance(obj, dict):
        return None, None

    def pick(name: str) -> str | None:
        value = obj.get(name)
        ok = isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS
        return value if ok else None

    return pick("request_id"), pick("job_id")


def peek_ids(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[str | None, str | None]:
    """Best-effort (request_id, job_id) of a record that may be invalid; never raises."""
    try:
        return ids_of(unpack_map(data, limits))
    except RecordError:
        return None, None


def _code_for(error_type: str) -> str:
    if error_type == "missing":
        return "missing_field"
    if error_type == "extra_forbidden":
        return "unknown_field"
    if error_type.endswith("_type") or error_type in {"union_tag_invalid", "union_tag_not_found"}:
        return "wrong_type"
    return "invalid_value"


def from_validation_error(exc: ValidationError, obj: dict[str, Any]) -> RecordError:
    """Collapse pydantic's error list into one RecordError (code from the first error)."""
    errors = exc.errors(include_url=False, include_input=False)
    parts = []
    for err in errors[:_MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in err["loc"]) or "<record>"
        parts.append(f"{loc}: {err['msg']}")
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"... and {len(errors) - _MAX_ERRORS_SHOWN} more")
    code = _code_for(errors[0]["type"]) if errors else "invalid_value"
    return RecordError(code, "; ".join(parts), *ids_of(obj))


def check_schema(obj: dict[str, Any], supported: frozenset[int]) -> None:
    """Reject a missing or unknown ``schema`` before anything else is judged."""
    if "schema" not in obj:
        raise RecordError("missing_field", "schema: Field required", *ids_of(obj))
    version = obj["schema"]
    if not isinstance(version, int) or isinstance(version, bool) or version not in supported:
        raise RecordError(
            "unsupported_schema",
            f"schema version {version!r} is not supported (supported: {sorted(supported)})",
            *ids_of(obj),
        )
