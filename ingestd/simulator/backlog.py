"""The endpoint's queue for a client that reads slower than the stream (docs/protocol.md §9).

Tweets are published at ``--rate`` whether a client reads them or not. Those its socket has not
taken yet wait in the endpoint's queue for that connection, ``--queue`` messages deep. From 60 %
full, a connection that asked for ``stall_warnings`` gets a ``FALLING_BEHIND`` warning (at most once
per ``--warning-interval``); when the queue is full the endpoint drops it and ends the stream with
disconnect code 4. The simulator never builds the queued tweets: the queue is a count, published
minus taken, so a client that stops reading costs it no memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

QUEUE_DEFAULT = 10_000  # messages; 200 s of a stalled client at the default 50 tweets/s
WARN_PERCENT = 60  # the endpoint's first FALLING_BEHIND says "over 60% full"


@dataclass(slots=True)
class Pace:
    """Tweets due at ``rate`` since ``start`` (monotonic), of which ``sent`` were taken."""

    rate: float
    start: float
    sent: int = 0
    count: int | None = None  # a script's ``deliver: N``: no more are published
    quota: int | None = None  # ``--max-tweets`` left when the pace started

    def published(self, now: float) -> int:
        due = int((now - self.start) * self.rate)
        for cap in (self.count, self.quota):
            if cap is not None:
                due = min(due, cap)
        return due

    def queued(self, now: float) -> int:
        return max(0, self.published(now) - self.sent)

    def rebase(self, now: float) -> None:
        """The source ran dry: what it could not give was never published, so it is not queued."""
        self.start = now - self.sent / self.rate


@dataclass(slots=True)
class Backlog:
    """One connection's queue: when it warns, and when it overflows."""

    capacity: int  # messages; 0 = unbounded: a slow client only meets TCP back-pressure
    warn: bool  # the connection asked for stall_warnings=true
    interval: float  # minimum seconds between warnings
    last_warning: float = -math.inf
    warning: tuple[int, int] | None = None  # (percent full, queued) of a warning not sent yet
    overflow: int | None = None  # queued messages when the queue filled

    def observe(self, queued: int, now: float) -> None:
        """Note the queue's depth; safe while a write is blocked (it sends nothing)."""
        if not self.capacity or self.overflow is not None:
            return
        if queued >= self.capacity:
            self.overflow = queued
            return
        percent = queued * 100 // self.capacity
        if (self.warn and percent >= WARN_PERCENT and self.warning is None
                and now - self.last_warning >= self.interval):
            self.warning = percent // 10 * 10, queued  # 60, 70, 80 or 90, as the endpoint says
            self.last_warning = now

    def take_warning(self) -> tuple[int, int] | None:
        warning, self.warning = self.warning, None
        return warning
