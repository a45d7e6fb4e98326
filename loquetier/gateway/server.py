"""Run the gateway with uvicorn: ``loquetier gateway``, or ``Server`` inside an event loop (tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from loquetier.settings import Settings

from .app import create_app

log = logging.getLogger(__name__)


class _Http(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with bounds on each request before the app sees it:
    - its headers (request line included) must be all in within ``header_timeout``: a client that
      opens sockets and sends its headers a byte at a time (or nothing) loses each socket instead of
      holding it, and the process's file descriptors, for good;
    - they may take ``max_header_bytes`` at most: past it a 431 and the connection closes (the
      parser keeps what it has read of a request's headers, so a client that streamed header lines
      without end grew the gateway by gigabytes in seconds);
    - its body must keep coming: a body that stops for ``header_timeout`` closes the connection (a
      client that promised 1,000 bytes and sent 10 held its socket until it let go);
    - and at ``min_body_rate`` bytes a second on average, after a grace of ``header_timeout``: a
      client that sent a byte every few seconds reset the stall timer each time, and enough such
      sockets (without an API key: the 401 came before the body) filled ``max_connections`` and
      got every other client a 503;
    - past ``max_connections`` the 503 is an OpenAI-style JSON error, as every other answer."""

    header_timeout = 10.0
    min_body_rate = 16 * 1024.0  # bytes a second
    max_header_bytes = 64 * 1024
    _header_deadline: asyncio.TimerHandle | None = None
    _body_deadline: asyncio.TimerHandle | None = None
    _body_started = 0.0  # loop time the body's clock started (the headers' end)
    _body_bytes = 0  # body bytes read since
    _header_bytes: int | None = 0  # bytes read while in a request's headers; None past them
    _parsed = 0  # bytes of the request line and headers the parser gave so far
    _refused = False  # answered 431: nothing more is read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # after a 431: read and dropped until the client closes or the linger ends
            return
        if self._body_deadline is not None:
            self._body_bytes += len(data)
            self._arm_body()  # it keeps coming
        super().data_received(data)
        # still in a request's headers after this chunk: the parser holds a header line that is not
        # complete yet, which on_header cannot see (bounded loosely: a chunk can also carry the end
        # of a pipelined request before the next one's headers)
        if self._header_bytes is not None and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > 4 * self.max_header_bytes:
                self._too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a keep-alive connection's next request: its own deadline

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._add_parsed(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._add_parsed(len(name) + len(value))

    def on_headers_complete(self) -> None:
        self._disarm()
        self._header_bytes = None
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            # uvicorn's own answer past the limit is plain text: ours, for this request only
            app, self.app, self.limit_concurrency = self.app, _busy, None
            try:
                super().on_headers_complete()
            finally:
                self.app, self.limit_concurrency = app, limit
        else:
            super().on_headers_complete()
        if not self.transport.is_closing():
            self._body_started, self._body_bytes = self.loop.time(), 0
            self._arm_body()

    def on_message_complete(self) -> None:
        self._disarm_body()
        super().on_message_complete()
        self._header_bytes = 0  # what comes next on a kept-alive connection is the next request's

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_body()
        super().connection_lost(exc)

    def _add_parsed(self, num: int) -> None:
        """The request line's and headers' bytes parsed so far."""
        self._parsed += num
        if self._parsed > self.max_header_bytes:
            self._too_large()

    def _too_large(self) -> None:
        if self.transport.is_closing() or self._refused:
            return
        log.info("connection closed: request headers too large", extra={"client": str(self.client)})
        self._refused = True
        self._disarm()
        self._disarm_body()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE))
        # close our side once the answer is out and drop what still comes for a moment: a socket
        # closed with unread bytes resets the connection, and the client could lose the answer
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(2.0, self.transport.close)
        else:
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._parsed = 0
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _arm_body(self) -> None:
        """The body's deadline: ``header_timeout`` after its last bytes (a stall), and no later than
        the grace plus what ``min_body_rate`` would have taken for the bytes read so far."""
        self._disarm_body()
        at = min(self.loop.time() + self.header_timeout,
                 self._body_started + self.header_timeout + self._body_bytes / self.min_body_rate)
        self._body_deadline = self.loop.call_at(at, self._body_stalled)

    def _disarm_body(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info("connection closed: no complete request headers in time", extra={"client": str(self.client)})
            self.transport.close()

    def _body_stalled(self) -> None:
        self._body_deadline = None
        if not self.transport.is_closing():
            log.info("connection closed: the request body stopped coming or came too slowly",
                     extra={"client": str(self.client), "body_bytes": self._body_bytes})
            self.transport.close()


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The answer past ``max_connections``: 503 and the connection closes."""
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BUSY)), (b"connection", b"close"),
        (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": _BUSY, "more_body": False})


_BUSY = (b'{"error": {"message": "the gateway has as many connections open as it takes; try again", '
         b'"type": "server_error", "param": null, "code": "too_many_connections"}}')
_TOO_LARGE = (b'{"error": {"message": "the request headers are larger than this gateway takes", '
              b'"type": "invalid_request_error", "param": null, "code": "headers_too_large"}}')


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
    http = type("GatewayHttp", (_Http,), {"header_timeout": gateway.header_timeout_s,
                                          "min_body_rate": float(gateway.min_body_bytes_per_s)})
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
