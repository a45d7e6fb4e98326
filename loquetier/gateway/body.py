"""Request bodies: a size cap enforced while the bytes arrive, and JSON parsing with clear errors.

The cap is checked against ``Content-Length`` before anything is read and again on every
chunk (a chunked or lying client cannot push more), so a huge body costs the gateway at most
the cap in memory. Uploads (``/v1/files``) get their own, larger cap.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..codec import DEFAULT_LIMITS, RecordError, check_map_widths
from .errors import APIError, bad_request


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes", code="request_too_large")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (``max_upload_bytes`` under ``upload_prefix``)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_upload_bytes: int, upload_prefix: str = "/v1/files"):
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_prefix = upload_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_upload_bytes if scope["path"].startswith(self.upload_prefix) else self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or len(length) > 18 or int(length) > limit):
            error = BodyTooLarge(limit) if length.isdigit() else bad_request("bad Content-Length header")
            await error.response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def client_left_mid_body() -> APIError:
    """A client that closed its connection before its whole body came (499, as proxies log it; nobody
    reads it): not the gateway's error, and no traceback."""
    return APIError(499, "the client closed the connection before its request body was read", code="client_gone")


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = await request.body()
    except ClientDisconnect:
        raise client_left_mid_body() from None
    if not body:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(value).__name__}", code="invalid_json")
    try:
        check_map_widths(value, DEFAULT_LIMITS.max_map_keys)  # each unknown key would be an error to build
    except RecordError as exc:
        raise bad_request(f"the request body has an object with too many fields: {exc.message}",
                          code="invalid_value") from None
    return value
