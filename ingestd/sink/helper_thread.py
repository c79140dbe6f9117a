"""The store worker's one helper thread for MongoDB calls, which never holds up the process exit.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits, even after
``shutdown(wait=False)``. A stop past its drain deadline abandons a call MongoDB does not answer
(a paused or unreachable server): the worker then returned, but its process waited at exit for
that call's timeout (``mongo.timeout_ms``, 30 s by default), past the supervisor's stop budget, and
was SIGKILLed (the stop's exit 1, a ``failed`` unit under systemd). A daemon thread is not joined:
what it was waiting for stays in the spool, stored by the next start (``_id`` absorbs a write
MongoDB did apply).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[concurrent.futures.Future[Any], Callable[[], Any]]


class HelperThread:
    """Runs submitted calls one at a time, in order, on a daemon thread."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if self._closed:  # as the executor: a call queued after the end would never run
            raise RuntimeError("cannot schedule new calls after shutdown")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, fn))
        return future

    def shutdown(self) -> None:
        """Cancel what has not started; the running call, if any, is left to finish (or not)."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # handed to the waiter, as the executor does
                future.set_exception(exc)
            else:
                future.set_result(result)
