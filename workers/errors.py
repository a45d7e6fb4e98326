"""What an error result may say: a user-facing error's own code and message, else ``internal``.

Errors raised for bad input (the codec's RecordError, the engine's EngineError, a control
command's ControlError) carry a stable code and a message written for users. Anything else is
unexpected (a database error, a bug): its text can hold SQL, paths or a stack, so the wire gets
only ``internal`` and a short sentence, and the detail goes to the log.
"""

from __future__ import annotations

import logging
from typing import Any

from loquetier.codec import RecordError
from loquetier.db.store import StoreError  # a database refusal, already mapped to a code without SQL
from loquetier.engine.errors import EngineError

from .adapter_paths import PathRefused

INTERNAL = "internal"
MAX_MESSAGE_CHARS = 2000


class ControlError(Exception):
    """A control command refused for a reason its sender can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def public_error(exc: BaseException, what: str, log: logging.Logger, **context: Any) -> tuple[str, str]:
    """(code, message) for an error result about ``what`` ("this request", "this job", ...).

    An unexpected error is logged here with its traceback and ``context``.
    """
    if isinstance(exc, RecordError | EngineError | ControlError | StoreError | PathRefused):
        return exc.code, exc.message[:MAX_MESSAGE_CHARS]
    log.error("unexpected error", exc_info=exc, extra={"error_type": type(exc).__name__, **context})
    return INTERNAL, f"the worker could not process {what}; the detail is in its log"
