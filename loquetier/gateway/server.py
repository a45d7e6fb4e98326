"""Run the gateway with uvicorn: ``loquetier gateway``, or ``Server`` inside an event loop (tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn

from loquetier.settings import Settings

from .app import create_app

log = logging.getLogger(__name__)


def uvicorn_config(settings: Settings, *, bootstrap: str, database_url: str, log_level: str = "info") -> uvicorn.Config:
    app = create_app(settings, bootstrap=bootstrap, database_url=database_url)
    return uvicorn.Config(
        app, host=settings.gateway.host, port=settings.gateway.port, log_level=log_level, access_log=False,
        lifespan="on", timeout_graceful_shutdown=10, server_header=False,
    )


def serve(settings: Settings, *, bootstrap: str, database_url: str, log_level: str = "info") -> None:
    """Blocking: run until SIGINT/SIGTERM (uvicorn's handlers: finish open requests, then stop)."""
    uvicorn.Server(uvicorn_config(settings, bootstrap=bootstrap, database_url=database_url,
                                  log_level=log_level)).run()


@asynccontextmanager
async def running(settings: Settings, *, bootstrap: str, database_url: str) -> AsyncIterator[str]:
    """A gateway inside the current event loop on a free port; yields its base URL (``.../v1``)."""
    with socket.socket() as probe:
        probe.bind((settings.gateway.host, 0))
        port = probe.getsockname()[1]
    settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"port": port})})
    server = uvicorn.Server(uvicorn_config(settings, bootstrap=bootstrap, database_url=database_url,
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the gateway stopped while starting")
        await asyncio.sleep(0.02)
    try:
        yield f"http://{settings.gateway.host}:{port}/v1"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
