"""One model thread serving jobs one at a time from a bounded queue.

The model (decoder and KV cache) is touched only by this thread, so requests never interleave
on it; the event loop stays free to accept, validate and stream. A job is a function run on the
model thread; it reports to its request through an asyncio queue of events (``("piece", ...)``
while it streams, then one ``("done", value)`` or ``("error", APIError)``). Cancelling a job
(the client went away, the server stops) makes :meth:`Job.check` raise :class:`Cancelled` at
the job's next check, which generation does before every token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable

from ..errors import LlmshError
from .errors import APIError

log = logging.getLogger("llmsh.server")


class Cancelled(Exception):
    """Raised inside a job that was cancelled (its client disconnected or the server stops)."""


class Job:
    """One request's work on the model thread: ``fn(job)``; events on :attr:`events`."""

    def __init__(self, fn: Callable[["Job"], Any], loop: asyncio.AbstractEventLoop):
        self.fn = fn
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.reason = APIError(503, "the request was cancelled", code="cancelled")

    def emit(self, kind: str, value=None) -> None:
        """Queue an event for the request (from the model thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:   # the event loop is closed: nobody is listening any more
            pass

    def cancel(self, reason: APIError | None = None) -> None:
        """Stop the job at its next check; ``reason`` is the error its request then gets."""
        if reason is not None and not self._cancel.is_set():
            self.reason = reason
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the job was cancelled (called by the job between steps)."""
        if self._cancel.is_set():
            raise Cancelled()

    async def result(self):
        """The job's value, skipping streamed events. Raises the job's APIError."""
        while True:
            kind, value = await self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value


class ModelWorker:
    """The model thread and its queue of at most ``max_queue`` waiting jobs.

    state: what jobs work on (the loaded model and its KV cache: see
    :class:`llmsh.server.generation.ModelState`), touched by the model thread only.
    """

    def __init__(self, state, max_queue: int = 16):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.state = state
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="llmsh-model", daemon=True)
        self._current: Job | None = None
        self._stopping = False
        self.jobs_done = 0

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs queued behind the running one."""
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def submit(self, fn: Callable[[Job], Any]) -> Job:
        """Queue ``fn`` to run on the model thread (call from the event loop).

        Raises APIError 503 (with Retry-After) when the queue is full or the server is stopping.
        """
        if self._stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        job = Job(fn, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({self.max_queue} requests are waiting): retry later",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        return job

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._current = job
            try:
                job.check()
                job.emit("done", job.fn(job))
            except Cancelled:
                job.emit("error", job.reason)
            except APIError as e:
                job.emit("error", e)
            except LlmshError as e:
                job.emit("error", APIError(400, str(e)))
            except Exception as e:     # a bug: one line in the log, a 500 for the client
                log.exception("llmsh: internal error in a model job")
                job.emit("error", APIError(500, f"internal error: {type(e).__name__}", code="internal_error"))
            finally:
                self._current = None
                self.jobs_done += 1

    def cancel_all(self) -> None:
        """Refuse new jobs and cancel the waiting ones and the running one: each request gets a
        503 "shutting down" error (a stream: an error event, then ``[DONE]``). Safe to call from
        a signal handler."""
        self._stopping = True
        reason = APIError(503, "the server is shutting down", code="shutting_down")
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel(reason)
                job.emit("error", reason)
        current = self._current
        if current is not None:
            current.cancel(reason)

    def stop(self, timeout: float = 10.0) -> None:
        """:meth:`cancel_all`, then end the thread."""
        self.cancel_all()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
