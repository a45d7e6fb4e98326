"""Run the gateway with uvicorn: ``loquetier gateway``, or ``Server`` inside an event loop (tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from loquetier.settings import Settings

from .app import create_app

log = logging.getLogger(__name__)


class _Http(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers: a client that opens
    sockets and sends its headers a byte at a time (or nothing) loses each socket after
    ``header_timeout`` instead of holding it, and the process's file descriptors, for good."""

    header_timeout = 10.0
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a keep-alive connection's next request: its own deadline

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info("connection closed: no complete request headers in time", extra={"client": str(self.client)})
            self.transport.close()


def _raise_open_file_limit() -> None:
    """The soft limit on open files up to the hard one (often 1,024 against 1,048,576): every
    connection is a descriptor, and running out of them stops the gateway answering anyone."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:  # not on this platform, or not allowed
        log.info("open-file limit not raised", extra={"error": repr(exc)})


def uvicorn_config(settings: Settings, *, bootstrap: str, database_url: str, log_level: str = "info") -> uvicorn.Config:
    app = create_app(settings, bootstrap=bootstrap, database_url=database_url)
    _raise_open_file_limit()
    gateway = settings.gateway
    http = type("GatewayHttp", (_Http,), {"header_timeout": gateway.header_timeout_s})
    return uvicorn.Config(
        app, host=gateway.host, port=gateway.port, log_level=log_level, access_log=False,
        lifespan="on", timeout_graceful_shutdown=10, server_header=False, http=http,
        limit_concurrency=gateway.max_connections,
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
