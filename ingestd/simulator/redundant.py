"""Redundant connections (``--redundant N``, the v2 Enterprise shape): up to N live streams per
credentials, and every one of them carries the same tweets.

The first stream's ``Feed`` produces; each stream reads the shared sequence through its own
``FeedCursor`` from its start (the last ``KEEP`` tweets), as a v2 connection asking for backfill
would: every stream carries the same ids, whenever it joined, and the ground truth records each
delivery under its own connection.
"""

from __future__ import annotations

import threading
from collections import deque

from ingestd.simulator.feed import Feed, Outgoing
from ingestd.simulator.generator import TweetGenerator

KEEP = 200_000  # tweets kept for a stream that lags; one further behind skips ahead


class SharedFeed:
    """The tweet sequence of one credential's redundant streams."""

    def __init__(self, producer: Feed) -> None:
        self.producer = producer
        self.lock = threading.Lock()
        self.items: deque[Outgoing] = deque(maxlen=KEEP)
        self.base = 0  # sequence number of items[0]

    @property
    def end(self) -> int:
        return self.base + len(self.items)

    def get(self, seq: int) -> tuple[int, Outgoing | None]:
        """(the sequence number served, the tweet); produces when ``seq`` is at the end."""
        with self.lock:
            seq = max(seq, self.base)
            if seq < self.end:
                return seq, self.items[seq - self.base]
            out = self.producer.next()
            if out is None:
                return seq, None
            if len(self.items) == self.items.maxlen:
                self.base += 1
            self.items.append(out)
            return seq, out


class FeedCursor:
    """One stream's position in a ``SharedFeed``; used like a ``Feed`` by the session."""

    def __init__(self, shared: SharedFeed, generator: TweetGenerator) -> None:
        self.shared = shared
        self.generator = generator  # for noise (bad lines, half messages): not shared
        self.seq = 0  # from the start of what is kept (``SharedFeed.get`` skips ahead)

    def next(self) -> Outgoing | None:
        seq, out = self.shared.get(self.seq)
        if out is not None:
            self.seq = seq + 1
        return out
