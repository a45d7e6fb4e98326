"""The engine in its own process, so that it shares no GIL with the worker's event loop.

With the engine on a thread of the worker process, every Python instruction of a step competes
with the event loop's Kafka, PostgreSQL and record work for one interpreter lock; on a GPU the
step's host work is most of a decode step, so what the loop does shows up as slower, noisier steps
and later admissions (docs/benchmarks/service.md). Here the engine runs in a child process
(``spawn``: a fresh interpreter, CUDA initialised there only) and the worker talks to it through
one pipe:

- worker -> engine: ``("call", id, fn)`` with ``fn(engine)`` a picklable command
  (``engine_client.engine_call``), applied between steps in the order sent; ``("taken", n)`` when the
  worker's loop took the events of ``n`` steps; ``("stop",)``.
- engine -> worker: ``("ready", info)`` once the model is loaded, warmed up and its graphs captured;
  ``("result", id, ok, value)``; ``("step", seconds, events)`` after every step; ``("failed", reason)``
  when a step raised (the engine process then exits).

The engine runs at most ``spec.max_steps_ahead`` steps with events that the worker's loop has not
taken yet (the ``taken`` messages count them down), as the engine thread does
(``engine_client.MAX_STEPS_AHEAD``); the pipe's reader never waits, so answers to commands always
get through.

:class:`ProcessEngineClient` has the same async face as :class:`~.engine_client.EngineClient`, so
the worker does not know where its engine runs. A job's data is tokenized on the worker's side (a
thread, with a tokenizer of its own: ``DataPreparer``), so that long Python work never shares the
engine's interpreter; only the prepared sequences cross. A dead engine process (killed, crashed) is seen as
the pipe's end: the client fails every waiting command and the next ``next_events`` raises
``StepFailed``, which stops the worker as a failed step does.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from .engine_client import MAX_STEPS_AHEAD, EngineClient, EngineLike, _reason
from .thread_names import ENGINE_THREAD, set_os_thread_name

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What an engine process builds: ``Engine.from_pretrained(model_dir, device, dtype, **limits)``,
    warmed up (on CUDA) and with its graphs captured."""

    model_dir: str
    device: str
    dtype: str
    limits: dict[str, Any]
    switch_interval_s: float = 0.005
    log_level: str = "INFO"
    max_steps_ahead: int = MAX_STEPS_AHEAD


def build_engine(spec: EngineSpec) -> Any:
    """The engine a worker serves with, ready for its first request (kernels built, graphs captured)."""
    from loquetier.engine.engine import Engine

    engine = Engine.from_pretrained(spec.model_dir, device=spec.device, dtype=spec.dtype, **spec.limits)
    kv = {"num_kv_blocks": engine.blocks.num_blocks, "block_size": engine.config.block_size,
          "kv_tokens": engine.blocks.num_blocks * engine.config.block_size}
    if engine.memory_plan is not None:  # sized from the GPU's memory: say where it went
        kv.update(engine.memory_plan.as_dict())
    log.info("kv cache", extra=kv)
    if engine.device.type == "cuda":  # kernel builds before the first request, not inside a served step
        log.info("engine warmed up", extra=engine.warmup())
    captured = engine.capture_graphs()  # before the first request: no capture inside a served step
    if captured:
        log.info("decode CUDA graphs captured", extra={"graphs": captured})
    return engine


class EngineProcessFailed(RuntimeError):
    """The engine process could not start, or reported a failed step; ``reason`` says why."""

    crashed = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[EngineProcessFailed], tuple[str]]:
        return type(self), (self.reason,)


class EngineProcessDied(EngineProcessFailed):
    """The engine process ended without a word (killed, a segfault, an out-of-memory kill): the
    worker leaves its in-flight requests for redelivery, as if it had died itself."""

    crashed = True


# --- the worker's side ----------------------------------------------------------------------------


class ProcessEngineClient(EngineClient):
    """An :class:`EngineClient` whose engine runs in a child process (see the module's docstring).

    ``launch`` (blocking) starts the process and waits until its engine is ready; ``start`` (async,
    in the worker's loop) starts the two threads that move messages; ``stop`` asks the engine to
    stop and ends the process."""

    def __init__(self, spec: EngineSpec, *, on_step: Callable[[float, list[Any]], None] | None = None):
        super().__init__(None, on_step=on_step,  # type: ignore[arg-type]  # the engine lives elsewhere
                         max_steps_ahead=spec.max_steps_ahead)
        self.spec = spec
        self.info: dict[str, Any] = {}
        self._process: Any = None
        self._conn: Connection | None = None
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._pending: dict[int, Future[Any]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []
        self._preparer: Any = None

    # --- lifecycle -----------------------------------------------------------------------

    def launch(self, timeout_s: float = 1800.0) -> dict[str, Any]:
        """Start the engine process and wait for its engine (model load, warm-up, graph capture).
        Raises :class:`EngineProcessFailed` with the engine's own reason when it cannot start."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        # daemon: a worker that exits in any way takes its engine with it (the engine process
        # also leaves as soon as the worker's end of the pipe closes)
        self._process = ctx.Process(target=_engine_main, args=(child, self.spec), name="loquetier-engine",
                                    daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout_s):
            self._kill()
            raise EngineProcessFailed(f"the engine process was not ready within {timeout_s:g} s")
        try:
            message = parent.recv()
        except (EOFError, OSError):
            self._process.join(5.0)
            raise EngineProcessFailed(f"the engine process exited while starting (exit code "
                                      f"{self._process.exitcode})") from None
        if message[0] != "ready":
            self._process.join(10.0)
            raise EngineProcessFailed(str(message[1]))
        self.info = dict(message[1])
        log.info("engine process ready", extra={"pid": self._process.pid, **self.info})
        return self.info

    async def start(self) -> None:
        import asyncio

        if self._conn is None:
            self.launch()
        self._loop = asyncio.get_running_loop()
        self._thread_done.clear()
        self._threads = [threading.Thread(target=self._read, name="lq-engine-reader", daemon=True),
                         threading.Thread(target=self._write, name="lq-engine-writer", daemon=True)]
        for t in self._threads:
            t.start()

    async def stop(self) -> None:
        import asyncio

        self._stopping.set()
        self._outbox.put(("stop",))
        self._outbox.put(None)
        process = self._process
        if process is not None:
            await asyncio.to_thread(process.join, 30.0)
            if process.is_alive():
                log.warning("the engine process did not stop within 30 s; killing it")
                self._kill()
        for t in self._threads:
            await asyncio.to_thread(t.join, 5.0)
        self._threads = []

    def abandon(self) -> None:
        self._stopping.set()
        self._kill()
        self._outbox.put(None)

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            process.join(10.0)

    @property
    def is_running(self) -> bool:
        process = self._process
        return (process is not None and process.is_alive() and bool(self._threads)
                and not self._thread_done.is_set())

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    # --- commands ------------------------------------------------------------------------

    def _taken(self, count: int) -> None:  # the engine process counts what it may run ahead
        with self._ahead_lock:
            self._ahead -= count
        self._outbox.put(("taken", count))

    def _submit(self, fn: Callable[[EngineLike], Any], done: Future[Any]) -> None:
        cid = next(self._ids)
        with self._pending_lock:
            self._pending[cid] = done
        self._outbox.put(("call", cid, fn))

    async def prepare_data(self, data: Any, micro_batch_tokens: int | None = None,
                           stop: threading.Event | None = None) -> Any:
        """Tokenized and checked here, on a worker thread with a tokenizer of this process: the
        engine process only unpickles the result."""
        import asyncio

        if self._preparer is None:
            self._preparer = await asyncio.to_thread(self._make_preparer)
        return await asyncio.to_thread(self._preparer.prepare, data, micro_batch_tokens, stop)

    def _make_preparer(self) -> Any:
        from pathlib import Path

        from loquetier.engine.jobs import DataPreparer
        from loquetier.models.tokenizer_load import load_tokenizer

        return DataPreparer(load_tokenizer(Path(self.spec.model_dir)), int(self.info["vocab_size"]),
                            int(self.info["max_num_batched_tokens"]), self.info.get("max_model_len"))

    def _fail_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for done in pending.values():
            if done.set_running_or_notify_cancel():
                done.set_exception(self._stopped())

    def _answer(self, cid: int, ok: bool, value: Any) -> None:
        with self._pending_lock:
            done = self._pending.pop(cid, None)
        if done is None or not done.set_running_or_notify_cancel():
            return
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)

    # --- the two threads that move messages ----------------------------------------------

    def _write(self) -> None:
        conn = self._conn
        assert conn is not None
        while (message := self._outbox.get()) is not None:
            try:
                conn.send(message)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # the command itself
                if message[0] == "call":
                    self._answer(message[1], False, TypeError(f"a command the engine process cannot take: {exc}"))
            except (OSError, ValueError):  # the pipe is gone: the reader reports why
                return

    def _read(self) -> None:
        set_os_thread_name("lq-engine-read")
        conn = self._conn
        assert conn is not None
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    if not self._stopping.is_set() and self.failure is None:
                        self._process.join(5.0)
                        self.failure = EngineProcessDied(
                            f"the engine process exited (exit code {self._process.exitcode})")
                        self._post(self.failure)
                    return
                kind = message[0]
                if kind == "step":
                    self.num_steps += 1
                    if self._on_step is not None:
                        self._on_step(message[1], message[2])
                    if message[2]:
                        self._post(message[2])
                elif kind == "result":
                    self._answer(message[1], message[2], message[3])
                elif kind == "failed":
                    self.failure = EngineProcessFailed(message[1])
                    self._post(self.failure)
        except BaseException as exc:  # a bug on this side: the worker must not wait forever
            log.exception("engine reader failed")
            self.failure = exc
            self._post(exc)
        finally:
            self._thread_done.set()
            self._fail_pending()
            self._outbox.put(None)


# --- the engine's side ----------------------------------------------------------------------------

def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001  # any exception must cross, as its type and message
        return RuntimeError(_reason(exc))
    return exc


def _engine_main(conn: Connection, spec: EngineSpec) -> None:  # noqa: C901, PLR0915  # one loop, its helpers inline
    """The engine process: build the engine, then apply commands and step until told to stop
    (or until the worker's end of the pipe closes: a dead worker leaves no engine behind)."""
    from . import logs

    # A SIGTERM or Ctrl-C to the worker's whole process group (systemd's default KillMode, `kill --
    # -PGID`, a terminal) reaches this process too: the worker stops it (a "stop" command, or the
    # pipe closing when the worker is gone), so that the worker drains first instead of finding its
    # engine dead and leaving every request in flight for redelivery.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(spec.log_level)
    set_os_thread_name(ENGINE_THREAD)
    sys.setswitchinterval(spec.switch_interval_s)
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    try:
        engine = build_engine(spec)
    except BaseException as exc:  # noqa: BLE001  # the worker reports why and exits non-zero
        log.exception("the engine could not start")
        send(("startup_failed", _reason(exc)))
        return
    send(("ready", {"device": str(engine.device), "pid": os.getpid(), "vocab_size": engine.model.cfg.vocab_size,
                    "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens,
                    "max_model_len": engine.max_model_len}))

    inbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    stopping = threading.Event()

    def receive() -> None:
        try:
            while True:
                message = conn.recv()
                if message[0] == "stop":
                    break
                inbox.put(message)
        except (EOFError, OSError):
            pass
        stopping.set()
        inbox.put(None)

    threading.Thread(target=receive, name="lq-engine-inbox", daemon=True).start()

    def run(cid: int, fn: Callable[[Any], Any]) -> None:
        try:
            value = fn(engine)
        except Exception as exc:  # noqa: BLE001  # handed to the awaiting coroutine
            send(("result", cid, False, _picklable(exc)))
            return
        try:
            send(("result", cid, True, value))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            send(("result", cid, False, TypeError(f"the engine's answer cannot cross to the worker: {exc}")))

    ahead = 0  # steps whose events the worker's loop has not taken yet

    def apply(*, block: bool) -> None:
        nonlocal ahead
        while True:
            try:
                message = inbox.get(timeout=0.02) if block else inbox.get_nowait()
            except queue.Empty:
                return
            if message is None:
                return
            block = False
            if message[0] == "taken":
                ahead -= message[1]
                continue
            _, cid, fn = message
            run(cid, fn)

    try:
        while not stopping.is_set():
            apply(block=False)
            if not engine.has_work() or ahead >= spec.max_steps_ahead:
                apply(block=True)
                continue
            started = time.perf_counter()
            events = engine.step()
            send(("step", time.perf_counter() - started, events))
            if events:
                ahead += 1
    except BaseException as exc:  # noqa: BLE001  # a broken engine: report it, then exit
        log.error("engine step failed; the engine process stops", exc_info=exc, extra={"reason": _reason(exc)})
        try:
            send(("failed", _reason(exc)))
        except (OSError, ValueError):
            pass
