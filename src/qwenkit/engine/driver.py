"""The one owner of an engine: a background thread that steps it and routes each output to its request.

Callers (the chat loop, server handlers on an asyncio loop, evaluation threads) never step the engine;
they submit a request and read its own stream of ``StepOutput``s, synchronously or with ``async for``.
Adding and aborting go through the driver's inbox, so the engine is only ever touched by its thread.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

from qwenkit.engine.engine import Engine, StepOutput
from qwenkit.engine.request import RequestId
from qwenkit.engine.sampling import SamplingParams, SamplingParamsError
from qwenkit.errors import ModelClosedError, QwenkitError, RankLostError

log = logging.getLogger(__name__)
T = TypeVar("T")
SHUTDOWN_WAIT_SECONDS = 10.0  # how long close() waits for the step under way (the thread stops after it)


class StreamKindError(QwenkitError, TypeError):
    """A stream read with ``for`` that was opened for asyncio (``loop=``), or with ``async for`` that was
    not (an assert said so, and under ``python -O`` the read failed on a None queue) or on another loop
    than its own (its outputs never arrived)."""


class RequestStream:
    """One request's outputs, in order, ending with the one that has a finish reason."""

    def __init__(self, request_id: RequestId, driver: EngineDriver, loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self._driver = driver
        self._loop = loop
        self._sync: queue.SimpleQueue[StepOutput] | None = None if loop else queue.SimpleQueue()
        self._async: asyncio.Queue[StepOutput] | None = asyncio.Queue() if loop else None
        self.finished = False
        self.aborted = False  # asked to stop: the driver never starts it if it has not yet

    def _put(self, output: StepOutput) -> bool:  # driver thread
        """Deliver an output; False when the reader's event loop is gone (nobody will read it)."""
        if self._loop is None:
            self._sync.put(output)
            return True
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, output)
        except RuntimeError:  # the loop was closed
            return False
        return True

    def abort(self) -> None:
        """Stop the request (no-op once finished); its KV memory is freed at the next step."""
        if not self.finished:
            self.aborted = True
            self._driver.abort(self.request_id, self)

    def abandon(self) -> None:
        """``abort`` for a stream nobody can read any more (its owner is being collected): takes no lock
        and wakes nobody, as a collection may run in any thread, the engine's too, at any allocation. A
        running request is stepped, so the engine's thread sees the message before its next step."""
        if not self.finished:
            self.aborted = True
            self._driver._inbox.put(("abort", self.request_id, self))

    def __iter__(self) -> Iterator[StepOutput]:
        if self._sync is None:
            raise StreamKindError("this stream was opened for asyncio (loop=...): use `async for`")
        while not self.finished:
            try:
                output = self._sync.get(timeout=0.2)  # a timeout keeps Ctrl-C responsive
            except queue.Empty:
                continue
            self.finished = output.finish_reason is not None
            yield output

    async def __aiter__(self) -> AsyncIterator[StepOutput]:
        if self._async is None:
            raise StreamKindError("this stream was opened without an event loop: use `for`")
        if asyncio.get_running_loop() is not self._loop:  # its outputs go to that loop: it waited forever
            raise StreamKindError(
                "this stream was opened for another event loop: submit with loop=asyncio.get_running_loop()"
            )
        while not self.finished:
            output = await self._async.get()
            self.finished = output.finish_reason is not None
            yield output


class EngineDriver:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[RequestId, RequestStream] = {}
        # ids of requests aborted because their reader's event loop closed, until their abort output
        self._orphans: set[RequestId] = set()
        self._wake = threading.Event()
        self._ids = itertools.count()
        # ids of requests submitted and not yet ended (under _lock): a caller's id that is in use is
        # refused at submit, and generated ids skip the ids callers chose
        self._open_ids: set[RequestId] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False  # set once by shutdown: the thread stops, new requests raise
        self._held = threading.local()  # .batch: this thread's requests held by together() (unset: none)
        # Engine steps that raised since the last one that ran, and the last one's error: a server's
        # /health reads them (a fault that fails every step must not look healthy)
        self.failed_steps = 0
        self.last_error: str | None = None

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: RequestId = None,
        loop: asyncio.AbstractEventLoop | None = None,
        name: str | None = None,
    ) -> RequestStream:
        """Queue a request (validated here, in the caller's thread, so bad input raises at once).
        ``name``: without ``request_id``, the id to give it (``name#2``, ... where one open has it), so
        the engine's log lines name a request as its caller knows it (a server: its x-request-id)."""
        self.engine.validate(prompt_ids, params)
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            # it was taken, and the engine's thread died on the request's first output
            raise SamplingParamsError(f"loop must be an asyncio event loop or None, got {loop!r:.60}")
        try:  # a list failed below with a bare "unhashable type" from the id set
            hash(request_id)
        except TypeError:
            raise SamplingParamsError(
                f"request_id must be hashable (a string or an int), got {request_id!r:.60}"
            ) from None
        with self._lock:
            if request_id is None:
                ids = (f"req-{n}" for n in self._ids) if name is None else _named(name)
                request_id = next(i for i in ids if i not in self._open_ids)
            elif request_id in self._open_ids:
                raise SamplingParamsError(f"request id {request_id!r} is already in use")
            self._open_ids.add(request_id)
        stream = RequestStream(request_id, self, loop)
        request = (request_id, list(prompt_ids), params, stream)
        held = getattr(self._held, "batch", None)
        if held is not None:
            held.append(request)
        else:
            self._send(("add", [request]))
        return stream

    @contextmanager
    def together(self) -> Iterator[None]:
        """Within: this thread's submissions are held back and queued as one batch at the end, which the
        engine takes whole before its next step. So the steps do not depend on how fast the caller
        submitted (tensor-parallel ranks that each run the same requests must batch them alike)."""
        if getattr(self._held, "batch", None) is not None:  # already inside: one batch
            yield
            return
        self._held.batch = []
        try:
            yield
        finally:
            batch, self._held.batch = self._held.batch, None
            if batch:
                self._send(("add", batch))

    def abort(self, request_id: RequestId, stream: RequestStream) -> None:
        """Stop ``stream``'s request. The stream goes with the id: an abort that arrives after its request
        ended never stops a later one the caller submitted under the same id."""
        self._send(("abort", request_id, stream))

    def between_steps(self, change: Callable[[], T]) -> Future[T]:
        """Run ``change`` in the engine's thread before its next step (a change to what the engine
        serves, which no step may see half made); the future holds its result or exception."""
        future: Future[T] = Future()
        self._send(("call", change, future))
        return future

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted request has finished and been forgotten; False after ``timeout``
        seconds. Only tests call it (shutdown aborts what is open instead of waiting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # an id stays open from submit until its request has ended: a request the thread has taken
            # from the inbox but not yet given the engine is neither queued nor unfinished, yet open
            if self._inbox.empty() and not self.engine.has_unfinished() and not self._open_ids:
                return True
            time.sleep(0.01)
        return False

    def shutdown(self) -> None:
        """Stop the thread between steps and end every request still open with finish_reason "abort"
        (its reader gets nothing more); the driver then takes no new requests. The thread holds the
        engine (and with it the model and KV pool) while it runs; after this they go with the driver."""
        with self._lock:
            self._closed = True
            self._wake.set()
            thread = self._thread
        if thread is threading.current_thread():  # the LLM collected in its own engine's thread: it
            return  # stops at its next look at the flag, and ends the open requests then
        if thread is not None:  # inside a step longer than that: the thread ends them after the step
            thread.join(timeout=SHUTDOWN_WAIT_SECONDS)
        if thread is None or not thread.is_alive():  # the thread ended them as it stopped: a no-op then
            self._end_open()

    def _end_open(self) -> None:
        """End every request still open with finish_reason "abort": by the thread as it stops (a reader
        of a request closed inside a step longer than shutdown waits read on forever), or by shutdown
        where no thread runs."""
        ended = list(self._streams.items())
        while not self._inbox.empty():  # added after the thread's last look at its inbox
            message = self._inbox.get_nowait()
            if message[0] == "add":
                ended += [(request_id, stream) for request_id, _, _, stream in message[1]]
            elif message[0] == "call":
                message[2].set_exception(ModelClosedError("this model has been closed (LLM.close)"))
        self._streams.clear()
        for rid in self._orphans:
            self._forget(rid)
        self._orphans.clear()
        for rid, stream in ended:
            self._forget(rid)
            stream._put(StepOutput(rid, [], "abort"))

    def _send(self, message: tuple) -> None:
        with self._lock:
            if self._closed:
                if message[0] == "abort":  # every request has ended with the shutdown
                    return
                raise ModelClosedError("this model has been closed (LLM.close): load it again to generate")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="qwenkit-engine", daemon=True)
                self._thread.start()
                # Stop between steps at exit: a daemon thread killed inside a torch op aborts the process.
                atexit.register(_shutdown_at_exit, weakref.ref(self))
            self._inbox.put(message)  # under the lock: a shutdown sees every message sent before it
        self._wake.set()

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            if self._closed:
                self._end_open()

    def _serve(self) -> None:
        engine = self.engine
        while not self._closed:
            self._drain_inbox()
            if not engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except RankLostError as exc:  # not a bug here: the launcher names the rank that died
                log.error("engine step failed, failing requests %s: %s", self._open_names(), exc)
                self._failed(str(exc))
                continue
            except Exception as exc:  # a bug, not bad input: fail the running requests, keep serving
                log.exception("engine step failed, failing requests %s", self._open_names())
                self._failed(f"internal error: {type(exc).__name__}: {exc}")
                continue
            self.failed_steps = 0
            for output in outputs:
                rid = output.request_id
                stream = self._streams.get(rid)
                if stream is None:
                    if output.finish_reason is not None and rid in self._orphans:
                        self._orphans.discard(rid)
                        self._forget(rid)
                    continue
                if output.finish_reason is not None:  # its id is free before its reader sees the end
                    del self._streams[rid]
                    self._forget(rid)
                if not stream._put(output) and output.finish_reason is None:
                    # nobody reads it: stop it; the id stays in use until the engine has let it go
                    del self._streams[rid]
                    self._orphans.add(rid)
                    engine.abort(rid)

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = message[0]
            if kind == "add":  # one request, or a batch the engine takes before its next step
                for request in message[1]:
                    self._add(*request)
            elif kind == "call":
                _, change, future = message
                try:
                    future.set_result(change())
                except Exception as exc:
                    future.set_exception(exc)
            else:  # "abort": of this stream's request, if it still runs
                _, rid, stream = message
                if self._streams.get(rid) is stream:
                    self.engine.abort(rid)

    def _add(self, rid: RequestId, ids: list[int], params: SamplingParams, stream: RequestStream) -> None:
        if stream.aborted:  # stopped before it was sent (inside together()): it never runs
            self._forget(rid)
            stream._put(StepOutput(rid, [], "abort"))
            return
        try:
            self.engine.add_request(ids, params, request_id=rid)
        except Exception as exc:
            self._forget(rid)
            stream._put(StepOutput(rid, [], "error", error=str(exc)))
            return
        self._streams[rid] = stream

    def _forget(self, rid: RequestId) -> None:
        """The request has ended: its id may be used again."""
        with self._lock:
            self._open_ids.discard(rid)

    def _open_names(self) -> str:
        """The ids of the requests a failed step fails (its log line names them: a server's are its
        requests' x-request-ids, which each failed request's own log line and response carry)."""
        return ", ".join(str(rid) for rid in self._streams) or "(none)"

    def _failed(self, error: str) -> None:
        self.failed_steps += 1
        self.last_error = error
        self._fail_all(error)

    def _fail_all(self, error: str) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            self._forget(rid)
            stream._put(StepOutput(rid, [], "error", error=error))
        self._streams.clear()
        for rid in self._orphans:  # already aborted: this step lets them go too
            self._forget(rid)
        self._orphans.clear()
        try:
            self.engine.step()  # forget the aborted requests (their outputs were delivered above)
        except Exception:
            log.exception("engine step failed again while failing requests")


def _named(name: str) -> Iterator[str]:
    """``name``, then ``name#2``, ``name#3``, ...: two clients may send one x-request-id."""
    yield name
    for n in itertools.count(2):
        yield f"{name}#{n}"


def _shutdown_at_exit(driver_ref: weakref.ref) -> None:
    driver = driver_ref()
    if driver is not None:
        driver.shutdown()
