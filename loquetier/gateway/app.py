"""The ASGI app: routes per resource, OpenAI-shaped errors, body limits, metrics, lifespan.

``create_app(settings, bootstrap=..., database_url=...)`` builds it; ``serve`` (server.py)
runs it with uvicorn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loquetier.settings import Settings

from . import completions, files, fine_tuning, models
from .body import BodyLimit
from .errors import APIError, on_api_error, on_http_error, on_unexpected
from .metrics import REGISTRY, Metrics
from .state import Gateway


async def _status(gw: Gateway) -> dict[str, object]:
    try:
        await gw.require_worker()
        worker = "ok"
    except APIError as exc:
        worker = exc.code or "unavailable"
    return {"status": "ok", "gateway_id": gw.config.id, "reply_topic": gw.bus.topic, "model": gw.model_name,
            "worker": worker, "in_flight": gw.bus.num_waiting}


async def health(request: Request) -> Response:
    """Liveness: 200 while the gateway answers; the body says whether a worker is running."""
    body = await _status(request.app.state.gateway)
    return Response(orjson.dumps(body), media_type="application/json")


async def ready(request: Request) -> Response:
    """Readiness: 200 when a worker is running, so that completions can be served; else 503 (with
    ``Retry-After``), so that a load balancer sends requests to another gateway meanwhile."""
    body = await _status(request.app.state.gateway)
    if body["worker"] == "ok":
        return Response(orjson.dumps(body), media_type="application/json")
    return Response(orjson.dumps({**body, "status": "not_ready"}), status_code=503, media_type="application/json",
                    headers={"Retry-After": "5"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/models", models.list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", models.get_model, methods=["GET"]),
    Route("/v1/models/{model:path}", models.delete_model, methods=["DELETE"]),
    Route("/v1/chat/completions", completions.chat_completions, methods=["POST"]),
    Route("/v1/completions", completions.completions, methods=["POST"]),
    Route("/v1/files", files.upload, methods=["POST"]),
    Route("/v1/files", files.list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", files.get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", files.delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", files.file_content, methods=["GET"]),
    Route("/v1/fine_tuning/jobs", fine_tuning.create, methods=["POST"]),
    Route("/v1/fine_tuning/jobs", fine_tuning.list_jobs, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}", fine_tuning.get_job, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/cancel", fine_tuning.cancel, methods=["POST"]),
    Route("/v1/fine_tuning/jobs/{job_id}/pause", fine_tuning.pause, methods=["POST"]),
    Route("/v1/fine_tuning/jobs/{job_id}/resume", fine_tuning.resume, methods=["POST"]),
    Route("/v1/fine_tuning/jobs/{job_id}/events", fine_tuning.events, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", fine_tuning.checkpoints, methods=["GET"]),
]


def create_app(settings: Settings, *, bootstrap: str, database_url: str) -> Starlette:

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = Gateway(settings, bootstrap=bootstrap, database_url=database_url)  # Kafka clients need the loop
        await gateway.start()
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.stop()

    config = settings.gateway
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(Metrics),
            Middleware(BodyLimit, max_bytes=config.max_body_bytes, max_upload_bytes=config.max_file_bytes),
        ],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected},
        lifespan=lifespan,
    )
    # "/v1/files/" is an unknown path (a JSON 404), not a bodiless 307 to "/v1/files"
    app.router.redirect_slashes = False
    return app
