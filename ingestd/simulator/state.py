"""Simulator-wide configuration and shared state (connection registry, counters, id source)."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ingestd.simulator.auth import Credentials, OAuthVerifier
from ingestd.simulator.backlog import QUEUE_DEFAULT
from ingestd.simulator.feed import Feed, RealTweets
from ingestd.simulator.generator import Snowflake
from ingestd.simulator.groundtruth import GroundTruth
from ingestd.simulator.redundant import SharedFeed
from ingestd.simulator.script import FaultScript
from ingestd.simulator.wire import Wire


class Session(Protocol):
    """What the shared state needs of a stream (``session.Session``): sessions register here,
    so this side names only the protocol and the import goes one way."""

    conn: int
    identity: str
    wake: threading.Event
    wire: Wire

    def kick(self, code: int) -> None: ...


@dataclass(slots=True)
class SimConfig:
    """Everything ``ingestd simulate`` can be told (CLI flags map one to one)."""

    credentials: list[Credentials]
    source: str = "mixed"
    rate: float = 50.0
    max_tweets: int | None = None
    keepalive: float = 30.0
    control_every: int = 25
    script: FaultScript | None = None
    timestamp_window: float = 600.0
    rate_limit: tuple[int, float] | None = None
    seed: int | None = None
    max_line: int = 600_000
    warning_interval: float = 300.0
    queue: int = QUEUE_DEFAULT  # messages queued for a slow client before code 4; 0 = unbounded
    ground_truth: Path | None = None
    pool_size: int = 1000
    redundant: int = 1  # live streams per credentials; a newer one beyond that gets code 7
    apis: tuple[str, ...] = ("v1.1", "v2")  # routes served (--api); others answer 404
    # The scheme clients sign their URLs with: https behind a TLS-terminating front (--behind-tls).
    signed_scheme: str = "http"


class RateLimiter:
    """Sliding-window limit on connection attempts (all attempts count, as on the real API)."""

    def __init__(self, limit: tuple[int, float] | None) -> None:
        self.limit = limit
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        if self.limit is None:
            return True
        count, window = self.limit
        now = time.monotonic()
        with self._lock:
            while self._times and now - self._times[0] > window:
                self._times.popleft()
            self._times.append(now)
            return len(self._times) <= count


class DeliveredLog:
    """Recently delivered (tweet id, user id) pairs, for deletes/scrub_geo/withheld targets."""

    def __init__(self, size: int = 10_000) -> None:
        self._items: list[tuple[int, int]] = []
        self._size = size
        self._next = 0
        self._lock = threading.Lock()

    def add(self, items: list[tuple[int, int]]) -> None:
        with self._lock:
            for item in items:
                if len(self._items) < self._size:
                    self._items.append(item)
                else:
                    self._items[self._next] = item
                    self._next = (self._next + 1) % self._size

    def sample(self, rng: random.Random) -> tuple[int, int] | None:
        with self._lock:
            return rng.choice(self._items) if self._items else None


@dataclass
class SimState:
    """Shared by all handler threads; every mutable field is guarded by ``lock``."""

    config: SimConfig
    ground_truth: GroundTruth
    verifier: OAuthVerifier
    real: RealTweets = field(default_factory=RealTweets)
    ids: Snowflake = field(default_factory=Snowflake)
    delivered: DeliveredLog = field(default_factory=DeliveredLog)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: int = 0
    streams: int = 0
    tweets_by_conn: dict[int, int] = field(default_factory=dict)
    sessions: dict[int, Session] = field(default_factory=dict)
    by_identity: dict[str, list[Session]] = field(default_factory=dict)  # oldest first
    shared_feeds: dict[str, SharedFeed] = field(default_factory=dict)
    rate_limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.rate_limiter = RateLimiter(self.config.rate_limit)

    def next_attempt(self) -> int:
        with self.lock:
            self.attempts += 1
            return self.attempts

    def register(self, session: Session) -> None:
        """Add ``session`` to the credential's live streams; beyond ``redundant`` of them (one
        on v1.1) the oldest gets code 7."""
        with self.lock:
            self.streams += 1
            self.sessions[session.conn] = session
            self.tweets_by_conn[session.conn] = 0
            live = self.by_identity.setdefault(session.identity, [])
            live.append(session)
            kicked = live[:-self.config.redundant]
            del live[:-self.config.redundant]
        if self.stopping.is_set():
            session.wake.set()
        for older in kicked:
            older.kick(7)

    def unregister(self, session: Session) -> None:
        with self.lock:
            self.sessions.pop(session.conn, None)
            live = self.by_identity.get(session.identity, [])
            if session in live:
                live.remove(session)

    def shared_feed(self, identity: str, producer: Feed) -> SharedFeed:
        """The credential's shared tweet sequence (``--redundant``); ``producer`` feeds it if it
        is the first."""
        with self.lock:
            return self.shared_feeds.setdefault(identity, SharedFeed(producer))

    def count_tweets(self, conn: int, n: int) -> None:
        with self.lock:
            self.tweets_by_conn[conn] = self.tweets_by_conn.get(conn, 0) + n

    def snapshot(self) -> dict[str, Any]:
        """The ``GET /_sim/state`` document."""
        with self.lock:
            return {
                "attempts": self.attempts,
                "connections": self.streams,
                "open_connections": len(self.sessions),
                "open": sorted(self.sessions),
                "tweets": {str(k): v for k, v in sorted(self.tweets_by_conn.items())},
                "tweets_total": sum(self.tweets_by_conn.values()),
                "real_remaining": self.real.remaining,
            }

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.wake.set()
