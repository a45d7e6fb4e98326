"""One launch path for every Triton kernel of the package: ``launch(kernel, grid, *args, **meta)``.

Semantics: ``kernel[grid](*args, **meta)``. On a GPU, Triton's own call path binds and specializes
every argument again on each call (tens of µs of host time per launch, which an eager engine step
pays ~1,000 times over). Here the first launch of each *specialization* goes through Triton, which
compiles if needed and hands back its compiled kernel; later launches with the same specialization
call that compiled kernel directly.

The specialization key is conservative: for tensors their dtype, device and whether the address is
16-byte aligned; for ints whether each is 1, a multiple of 16, and whether it fits in 32 bits (the
properties Triton specializes on, whether or not a parameter opts out); everything passed by
keyword (constexprs, ``num_warps``, ``num_stages``) by value. Two calls with one key therefore get
the same compiled kernel from Triton too. Under the interpreter (``TRITON_INTERPRET=1``) or with
``LOQUETIER_FAST_LAUNCH=0`` every call goes through Triton.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, TypeVar

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MISSING = object()


def _enabled() -> bool:
    return not INTERPRET and os.environ.get("LOQUETIER_FAST_LAUNCH", "1") != "0"


_FAST = _enabled()
_cache: dict[tuple[Any, ...], tuple[Any, tuple[Any, ...]] | None] = {}


def arg_key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What Triton's specialization can depend on in the runtime arguments (see the module doc)."""
    key: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.device, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None:
            key.append(a)
        elif isinstance(a, int):
            key.append((a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
        elif isinstance(a, float):
            key.append(float)
        else:  # anything else: by value (hashable) or never cached
            key.append(a)
    return tuple(key)


def _trailing(kernel: Any, num_args: int, meta: dict[str, Any]) -> tuple[Any, ...] | None:
    """The values of the parameters after the positional ones, in signature order (the compiled
    kernel takes every parameter, constexprs included), or None when one has no value."""
    params = list(inspect.signature(kernel.fn).parameters.values())[num_args:]
    out = []
    for p in params:
        value = meta.get(p.name, p.default if p.default is not inspect.Parameter.empty else _MISSING)
        if value is _MISSING:
            return None
        out.append(value)
    return tuple(out)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``: runtime arguments positionally, constexprs and launch options
    (``num_warps``, ``num_stages``) by keyword."""
    if not _FAST:
        kernel[grid](*args, **meta)
        return
    try:
        key = (kernel, arg_key(args), tuple(sorted(meta.items())))
        hash(key)
    except TypeError:  # an unhashable argument: Triton's path every time
        kernel[grid](*args, **meta)
        return
    entry = _cache.get(key, _MISSING)
    if entry is _MISSING:
        compiled = kernel[grid](*args, **meta)
        trailing = _trailing(kernel, len(args), meta)
        ok = compiled is not None and hasattr(compiled, "__getitem__") and trailing is not None
        _cache[key] = (compiled, trailing) if ok else None
        return
    if entry is None:
        kernel[grid](*args, **meta)
        return
    compiled, trailing = entry
    compiled[(*grid, 1, 1)[:3]](*args, *trailing)


def clear() -> None:
    """Forget the compiled kernels handed back so far (tests)."""
    _cache.clear()


T = TypeVar("T")


def tuning_from_spec(cls: type[T], spec: str, env: str) -> T:
    """``cls()`` (a dataclass of int launch parameters) with the fields of "NAME=INT,NAME=INT"
    overridden; ``env`` names the variable the spec came from, for the error."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    overrides: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.strip().split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in fields or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{env}: expected NAME=INT items with NAME one of {sorted(fields)}, got {item!r}")
        overrides[name] = int(value)
    return dataclasses.replace(cls(), **overrides)  # type: ignore[type-var]
