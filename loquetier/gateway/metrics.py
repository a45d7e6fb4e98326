"""Prometheus metrics of the gateway, in a registry of its own (``GET /metrics``).

A pure ASGI middleware counts every answer by route and status and times it; the route label
collapses ids (``/v1/files/*``) so the label set stays small.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter("loquetier_gateway_http_requests", "HTTP answers", ["route", "status"], registry=REGISTRY)
HTTP_SECONDS = Histogram(
    "loquetier_gateway_http_seconds",
    "time to the end of the answer (streams: the whole stream)",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("loquetier_gateway_requests_in_flight", "requests waiting for worker results", registry=REGISTRY)
TOKENS = Counter("loquetier_gateway_completion_tokens", "completion tokens returned", ["route"], registry=REGISTRY)

_EXACT = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/files", "/v1/fine_tuning/jobs",
          "/health", "/metrics"}


def route_label(path: str) -> str:
    if path in _EXACT:
        return path
    for prefix in ("/v1/fine_tuning/jobs/", "/v1/files/", "/v1/models/"):
        if path.startswith(prefix):
            return prefix + "*"
    return "other"


class Metrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = route_label(scope["path"])
            HTTP_REQUESTS.labels(route, str(status)).inc()
            HTTP_SECONDS.labels(route).observe(time.perf_counter() - start)
