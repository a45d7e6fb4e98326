"""Errors the engine raises for bad input, each with a stable code the worker puts on the wire."""

from __future__ import annotations


class EngineError(ValueError):
    """A request or job the engine cannot take. ``code`` is stable (wire ``error.code``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self) -> tuple[type[EngineError], tuple[str, str]]:  # crosses to a worker from an engine process
        return type(self), (self.code, self.message)


class EngineBroken(RuntimeError):
    """The engine itself cannot step any more (a CUDA error, memory that even the smallest part
    of a step cannot get, a step that fails with no input to blame). Its owner must stop cleanly
    and say why: ``reason`` is a short sentence for logs and operators."""

    code = "engine_broken"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[EngineBroken], tuple[str]]:
        return type(self), (self.reason,)


def describe(exc: BaseException, max_chars: int = 200) -> str:
    """``Type: first line of the message``, short: for an error event, never a traceback."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > max_chars:
        first = first[: max_chars - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
