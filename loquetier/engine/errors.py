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
