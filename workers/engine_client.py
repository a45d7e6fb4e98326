"""The only door from the asyncio side into the engine: an engine thread plus queues.

The engine is synchronous and single-threaded. Its thread alternates between applying
queued commands (submit, abort, load adapter, ...) and running ``engine.step()`` while
there is work; step events travel back to the event loop through an ``asyncio.Queue``.
Nothing here blocks the event loop, so Kafka and Postgres I/O keep flowing while a step
runs.

The engine runs at most ``MAX_STEPS_AHEAD`` steps with events ahead of the loop: when the loop
falls that far behind (a slow database, a flood of records), the engine waits, applying commands
meanwhile, until ``next_events`` takes what is queued. Without that bound a fast engine fills
memory with events nobody reads yet and floods the loop with wake-ups, so the loop answers
nothing else (issue 1: one busy job must not freeze or kill a worker).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar, cast

from .thread_names import ENGINE_THREAD, set_os_thread_name

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineLike(Protocol):
    """What the worker uses of ``loquetier.engine.engine.Engine`` (see issue 6)."""

    def add_request(  # noqa: PLR0917
        self,
        request_id: str,
        prompt: str | None = ...,
        prompt_token_ids: list[int] | None = ...,
        adapter_id: str | None = ...,
        sampling: Any = ...,
        priority: int = ...,
        ttft_ms: float | None = ...,
        tpot_ms: float | None = ...,
        stream: bool = ...,
        arrived_at: float | None = ...,
    ) -> None: ...
    def abort(self, request_id: str) -> bool: ...
    def step(self) -> list[Any]: ...
    def has_work(self) -> bool: ...
    def load_adapter_bytes(self, adapter_id: str, data: bytes) -> int: ...
    def replace_adapter(self, adapter_id: str, source: bytes) -> bool: ...
    def load_adapter(self, adapter_id: str, path: Any) -> int: ...
    def unload_adapter(self, adapter_id: str) -> None: ...
    def has_adapter(self, adapter_id: str) -> bool: ...
    def add_training_job(  # noqa: PLR0917
        self,
        adapter_id: str,
        data: Any,
        params: Any,
        lora: dict[str, Any] | None = ...,
        base_adapter: str | None = ...,
        eval_data: Any = ...,
        job_id: str | None = ...,
        priority: int = ...,
        kind: str = ...,
        checkpoint: bytes | None = ...,
    ) -> str: ...
    def cancel_job(self, job_id: str) -> Any: ...
    def pause_job(self, job_id: str) -> Any: ...
    def checkpoint_job(self, job_id: str) -> bool: ...
    def resume_job(self, job_id: str) -> Any: ...
    def set_checkpoint_window(self, max_unstored: int) -> None: ...
    def checkpoint_stored(self, job_id: str) -> bool: ...
    def export_adapter(self, adapter_id: str) -> bytes: ...
    def stats(self) -> dict[str, Any]: ...


class StepFailed(Exception):
    """``engine.step()`` raised: the engine is broken (``EngineBroken``: a CUDA error, a step no part
    of which could run) or its state is unknown; the worker must stop. ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EngineStopped(RuntimeError):
    """A command for an engine whose thread no longer runs (stopped, or its step failed)."""


StepHook = Callable[[float, list[Any]], None]

# Steps whose events the loop has not taken yet, at most; then the engine waits for the loop.
MAX_STEPS_AHEAD = 64


def _nothing(engine: EngineLike) -> None:
    """A command that does nothing: it wakes an engine thread that waits for the loop."""


def _invoke(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], engine: EngineLike) -> Any:
    return getattr(engine, name)(*args, **kwargs)


def engine_call(name: str, *args: Any, **kwargs: Any) -> Callable[[EngineLike], Any]:
    """``engine.<name>(*args, **kwargs)`` as a command: a module-level partial, so it can be
    pickled to an engine in another process (``engine_process.ProcessEngineClient``)."""
    return functools.partial(_invoke, name, args, kwargs)


class EngineClient:
    """Async facade over an engine running in its own thread."""

    def __init__(self, engine: EngineLike, *, on_step: StepHook | None = None, idle_wait_s: float = 0.02,
                 max_steps_ahead: int = MAX_STEPS_AHEAD):
        self._engine = engine
        self.max_steps_ahead = max_steps_ahead
        self._ahead = 0  # lists of step events posted and not yet taken by next_events
        self._ahead_lock = threading.Lock()
        self._on_step = on_step
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[tuple[Callable[[EngineLike], Any], Future[Any]]] = queue.SimpleQueue()
        self._events: asyncio.Queue[list[Any] | BaseException] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.failure: BaseException | None = None  # why the engine thread ended, if a step failed
        self._thread_done = threading.Event()  # set as the thread leaves its loop, before it exits
        self.num_steps = 0
        self._failed: BaseException | None = None  # a step failure seen behind events not yet returned

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread_done.clear()
        self._thread = threading.Thread(target=self._run, name="loquetier-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 30.0)
        self._thread = None

    def abandon(self) -> None:
        """Give up on an engine that failed or stalls, without waiting for it (a thread is left
        behind as a daemon; an engine process is killed)."""
        self._stopping.set()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._thread_done.is_set()

    # --- commands (applied between steps, on the engine thread) --------------------------

    async def call(self, fn: Callable[[EngineLike], T]) -> T:
        """Run ``fn(engine)`` on the engine thread; its exception is raised here, and
        :class:`EngineStopped` when the thread is not running (or ends before it gets to ``fn``).
        Commands are applied in the order they were called, between steps. ``fn`` should be
        picklable (a module-level function or a partial of one, see :func:`engine_call`) so the
        same command also reaches an engine in its own process."""
        if not self.is_running:
            raise self._stopped()
        done: Future[T] = Future()
        self._submit(fn, done)
        if not self.is_running:  # the thread ended meanwhile: nothing would ever answer
            self._fail_pending()
        return await asyncio.wrap_future(done)

    def _submit(self, fn: Callable[[EngineLike], Any], done: Future[Any]) -> None:
        self._commands.put((fn, done))

    def _stopped(self) -> EngineStopped:
        why = f": {_reason(self.failure)}" if self.failure is not None else ""
        return EngineStopped(f"the engine thread is not running{why}")

    def _fail_pending(self) -> None:
        while True:
            try:
                _, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                done.set_exception(self._stopped())

    async def submit(self, request_id: str, **kwargs: Any) -> None:
        await self.call(engine_call("add_request", request_id, **kwargs))

    async def abort(self, request_id: str) -> bool:
        return cast(bool, await self.call(engine_call("abort", request_id)))

    async def add_job(self, adapter_id: str, data: Any, params: Any, **kwargs: Any) -> str:
        return cast(str, await self.call(engine_call("add_training_job", adapter_id, data, params, **kwargs)))

    async def prepare_data(self, data: Any, micro_batch_tokens: int | None = None,
                           stop: threading.Event | None = None) -> Any:
        """A job's data read, tokenized and checked in a worker thread, not on the engine thread:
        a large data set then never stalls the steps (``Engine.prepare_data``); setting ``stop``
        ends the thread's work early. An engine without that method gets ``data`` back unchanged."""
        prepare = getattr(self._engine, "prepare_data", None)
        if prepare is None:
            return data
        return await asyncio.to_thread(prepare, data, micro_batch_tokens, stop)

    async def cancel_job(self, job_id: str) -> bool:
        """Whether the engine held the job (its ``JobFinished("cancelled")`` then comes with a later step)."""
        return bool(await self.call(engine_call("cancel_job", job_id)))

    async def pause_job(self, job_id: str) -> None:
        await self.call(engine_call("pause_job", job_id))

    async def checkpoint_job(self, job_id: str) -> bool:
        """Whether a checkpoint of the job as it stands is on its way (a ``JobCheckpoint`` event)."""
        return bool(await self.call(engine_call("checkpoint_job", job_id)))

    async def resume_job(self, job_id: str) -> None:
        await self.call(engine_call("resume_job", job_id))

    async def set_checkpoint_window(self, max_unstored: int) -> None:
        await self.call(engine_call("set_checkpoint_window", max_unstored))

    async def checkpoint_stored(self, job_id: str) -> bool:
        return cast(bool, await self.call(engine_call("checkpoint_stored", job_id)))

    async def has_adapter(self, adapter_id: str) -> bool:
        return cast(bool, await self.call(engine_call("has_adapter", adapter_id)))

    async def load_adapter(self, adapter_id: str, path: str) -> int:
        return cast(int, await self.call(engine_call("load_adapter", adapter_id, path)))

    async def load_adapter_bytes(self, adapter_id: str, data: bytes) -> int:
        return cast(int, await self.call(engine_call("load_adapter_bytes", adapter_id, data)))

    async def replace_adapter_bytes(self, adapter_id: str, data: bytes) -> bool:
        """``Engine.replace_adapter``: now (True), or once the sequences running on it end (False)."""
        return bool(await self.call(engine_call("replace_adapter", adapter_id, data)))

    async def unload_adapter(self, adapter_id: str) -> None:
        await self.call(engine_call("unload_adapter", adapter_id))

    async def export_adapter(self, adapter_id: str) -> bytes:
        return cast(bytes, await self.call(engine_call("export_adapter", adapter_id)))

    async def stats(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self.call(engine_call("stats")))

    # --- events ------------------------------------------------------------------------

    async def next_events(self) -> list[Any]:
        """The events of every step that ended since the last call (waiting for the next one that
        produced any), in step order; raises :class:`StepFailed`.

        A caller that fell behind the engine gets several steps at once and can answer them with
        fewer records (one token record per request, not per step). A failure after events that are
        returned is raised by the next call."""
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise StepFailed(_reason(failed)) from failed
        item = await self._events.get()
        if isinstance(item, BaseException):
            raise StepFailed(_reason(item)) from item
        events = list(item)
        taken = 1
        while not self._events.empty():
            more = self._events.get_nowait()
            if isinstance(more, BaseException):
                self._failed = more
                break
            events.extend(more)
            taken += 1
        self._taken(taken)
        return events

    def _taken(self, count: int) -> None:
        """``count`` lists of step events reached the loop: the engine may run that many steps more."""
        with self._ahead_lock:
            was_full = self._ahead >= self.max_steps_ahead
            self._ahead -= count
        if was_full:  # the engine thread may be waiting: wake it now, not at its next poll
            self._submit(_nothing, Future())

    # --- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        set_os_thread_name(ENGINE_THREAD)
        try:
            self._loop_steps()
        except BaseException as exc:  # a broken engine (EngineBroken) or a bug: report it, stop stepping
            self.failure = exc
            log.error("engine step failed; the engine thread stops", exc_info=exc,
                      extra={"reason": _reason(exc)})
            self._post(exc)
        finally:
            self._thread_done.set()
            self._fail_pending()  # no awaiting coroutine may hang on a command nobody will run

    def _loop_steps(self) -> None:
        engine = self._engine
        while not self._stopping.is_set():
            self._apply_commands(block=False)
            if not engine.has_work() or self._ahead >= self.max_steps_ahead:
                self._apply_commands(block=True)
                continue
            started = time.perf_counter()
            events = engine.step()
            self.num_steps += 1
            if self._on_step is not None:
                self._on_step(time.perf_counter() - started, events)
            if events:
                self._post(events)
        self._apply_commands(block=False)

    def _apply_commands(self, *, block: bool) -> None:
        while True:
            try:
                fn, done = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn(self._engine))
            except Exception as exc:  # handed to the awaiting coroutine
                done.set_exception(exc)
            except BaseException:  # ends the thread; its caller must not wait forever
                done.set_exception(EngineStopped("the engine thread ended while running this command"))
                raise

    def _post(self, item: list[Any] | BaseException) -> None:
        loop = self._loop
        if not isinstance(item, BaseException):
            with self._ahead_lock:
                self._ahead += 1
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._events.put_nowait, item)


def _reason(exc: BaseException) -> str:
    """A broken engine's own sentence, else the error's type and first line."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
