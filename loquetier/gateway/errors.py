"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

A route raises :class:`APIError`; the app's handlers turn it (and anything unexpected, without
its details) into the JSON answer.
"""

from __future__ import annotations

import logging
import math

import orjson
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}

# Worker error codes (docs/wire-format.md) -> HTTP status.
WORKER_STATUS = {
    "unknown_adapter": 404,
    "invalid_value": 400,
    "invalid_request": 400,
    "wrong_type": 400,
    "missing_field": 400,
    "unknown_field": 400,
    "too_large": 400,
    "prompt_too_long": 400,
    # the worker stopped (a drain, a restart) or its engine failed before the request finished: nothing
    # is wrong with the request, another worker can serve it (the SDKs retry a 503 by themselves)
    "worker_stopped": 503,
    "engine_failed": 503,
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after  # seconds, sent as Retry-After (the SDKs wait that long)

    def body(self) -> dict[str, object]:
        error_type = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return Response(orjson.dumps(self.body()), self.status, headers, media_type="application/json")


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> APIError:
    return APIError(404, message, code=code, param=param)


def from_worker(code: str, message: str) -> APIError:
    """An ``error`` result record as an HTTP error."""
    status = WORKER_STATUS.get(code, 500)
    if status == 503:
        return APIError(503, "the worker stopped before it finished this request; retry", code=code, retry_after=1)
    return APIError(status, message if status < 500 else "the worker could not complete this request", code=code)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path or method) in the same shape."""
    status = int(getattr(exc, "status_code", 500))
    message = "unknown path" if status == 404 else str(getattr(exc, "detail", "")) or "request failed"
    return APIError(status, f"{message}: {request.method} {request.url.path}", code="unknown_url").response()


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("gateway error", extra={"path": request.url.path})
    return APIError(500, "internal error in the gateway", code="internal").response()
