"""An attempt started on the store worker's helper thread, and when it ended: a batch's first
``insert_many`` runs while the worker takes the next batch (``retry.Retrier.start``)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Started(Generic[T]):
    """An attempt started on the helper thread (``Retrier.start``), and when it ended."""

    __slots__ = ("_ended", "future", "started")

    def __init__(self, future: concurrent.futures.Future[T], started: float) -> None:
        self.future, self.started = future, started
        # Set on the helper thread. Not a bound method: the future would hold this object and
        # this the future, a cycle only the cyclic GC frees (with the batch behind it).
        self._ended: list[float | None] = [None]
        ended = self._ended
        future.add_done_callback(lambda _: ended.__setitem__(0, time.monotonic()))

    @property
    def ended(self) -> float:
        """When the attempt ended; read once the future is done. A waiter can wake before the
        future runs its callbacks: then it ended just now."""
        ended = self._ended[0]
        return time.monotonic() if ended is None else ended
