"""Reconnect policy: how long to wait before the next connection attempt.

The schedules are the endpoint's documented ones (docs/protocol.md §4.2), as hbc and tweepy
implement them: network errors back off linearly (250 ms steps to 16 s), HTTP errors exponentially
(5 s doubling to 320 s), rate limiting (420/429) exponentially from 60 s. What the peers get wrong
and we do not: counters reset only after a connection proved healthy (it delivered a message), a
healthy connection that ends still waits a little, a rolling bound caps attempts per minute
whatever the upstream does, and a wait the server asks for (``response.server_hint``) lengthens
only the endings that may carry one, never past that schedule's cap.
"""

from __future__ import annotations

import collections
import enum
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from ingestd.config.schema import BackoffSettings


class Ending(enum.Enum):
    """How a connection ended; each maps to one schedule."""

    NETWORK = "network"  # connect/TLS/reset/partial transfer: linear schedule
    HTTP = "http"  # 401, 5xx and other retryable statuses: exponential from 5 s
    RATE_LIMITED = "rate_limited"  # 420/429: exponential from 60 s, honours the server's wait
    CONFIG = "config"  # 403/404/406/413/416: retrying cannot help; wait for a reload
    STALL = "stall"  # no byte for read_timeout
    DISCONNECT = "disconnect"  # the server sent a disconnect message, then closed
    CLOSED = "closed"  # clean end of the body
    ABORTED = "aborted"  # our own doing: stop or reload
    # A connection replaced by new filters (make-before-break) ended, however: logged out by
    # the endpoint for its successor (code 7), closed, or at our grace deadline. Counted only.
    RETIRED = "retired"
    # The response head held a line that is no header line (a broken proxy's junk): the network
    # schedule, counted apart so that the operator sees it (source.headers.MALFORMED_HEADER).
    MALFORMED_HEADER = "malformed_response_header"
    # The server's certificate failed the check, or the CA bundle could not be read (libcurl's
    # 51, 60, 77): the network schedule (a fix on the server heals it), counted apart so that an
    # expired or replaced certificate is not one more network blip on the dashboard.
    TLS_CERTIFICATE = "tls_certificate"


# Codes after which reconnecting at once would fight another client using our credentials
# (2 duplicate stream, 7 admin logout): back off as if rate limited (docs/protocol.md §3.1).
CONTESTED_DISCONNECT_CODES = frozenset({2, 7})


@dataclass(frozen=True, slots=True)
class ServerWait:
    """A wait the server asked for, as ``Backoff.delay`` applied it."""

    asked: float  # seconds from now
    cap: float | None  # what it is held to; None: this ending takes no server wait
    setting: str = ""  # the cap's key in stream.backoff, for the log

    @property
    def capped(self) -> bool:
        return self.cap is not None and self.asked > self.cap


class Backoff:
    """Turns connection endings into waits; one instance per stream worker."""

    def __init__(
        self,
        schedule: BackoffSettings,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.schedule = schedule
        self._rng = rng or random.Random()
        self._clock = clock
        self._failures: dict[Ending, int] = collections.Counter()
        self._attempts: collections.deque[float] = collections.deque()
        self.last_delay = 0.0
        self.last_server_wait: ServerWait | None = None  # of the last delay() given one

    def record_attempt(self) -> None:
        """Note a connection attempt now (for the per-minute bound)."""
        self._attempts.append(self._clock())

    def delay(
        self,
        ending: Ending,
        *,
        healthy: bool,
        retry_after: float | None = None,
        disconnect_code: int | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt; None means wait for a settings reload.

        ``retry_after``: seconds the server asked us to wait (``response.server_hint``). It can
        lengthen a rate-limited or HTTP-error wait up to that schedule's cap, and is not
        jittered: a server's value, not our guess, and a cap is the longest an operator lets one
        header silence the stream. Other endings ignore it.
        """
        self.last_server_wait = None
        if ending is Ending.CONFIG:
            self.last_delay = 0.0
            return None
        if ending is Ending.DISCONNECT and disconnect_code in CONTESTED_DISCONNECT_CODES:
            ending = Ending.RATE_LIMITED
        if healthy:
            self._failures.clear()
        base = self._base_delay(ending, healthy)
        wait = base + base * self._rng.uniform(0.0, self.schedule.jitter)
        if retry_after is not None and not math.isnan(retry_after):
            wait = max(wait, self._server_wait(ending, retry_after))
        wait = max(wait, self._rate_bound_wait())
        self.last_delay = wait
        return wait

    def soon(self, seconds: float) -> float:
        """A short wait outside the schedules (their counters unchanged), still bound by
        max_attempts_per_minute."""
        self.last_delay = max(seconds, self._rate_bound_wait())
        return self.last_delay

    def _server_wait(self, ending: Ending, asked: float) -> float:
        """The part of the server's wait this ending honours (0: none), noted for the log."""
        s = self.schedule
        if ending is Ending.RATE_LIMITED:
            used = ServerWait(asked, s.rate_limit_cap, "rate_limit_cap")
        elif ending is Ending.HTTP:
            used = ServerWait(asked, s.http_cap, "http_cap")
        else:
            used = ServerWait(asked, None)
        self.last_server_wait = used
        return 0.0 if used.cap is None else max(min(asked, used.cap), 0.0)

    def _base_delay(self, ending: Ending, healthy: bool) -> float:
        s = self.schedule
        if ending is Ending.ABORTED:
            return 0.0
        if ending is Ending.RATE_LIMITED:
            return self._bump(ending, lambda n: s.rate_limit_start * 2**n, s.rate_limit_cap)
        if healthy:
            # An established connection that ends: reconnect soon, but never in a tight loop.
            return s.reconnect_delay
        if ending is Ending.HTTP:
            return self._bump(ending, lambda n: s.http_start * 2**n, s.http_cap)
        return self._bump(Ending.NETWORK, lambda n: s.network_start + s.network_step * n,
                          s.network_cap)

    def _bump(self, kind: Ending, step: Callable[[int], float], cap: float) -> float:
        """Advance one schedule; switching schedule resets the others (as hbc does)."""
        count = self._failures[kind]
        self._failures = collections.Counter({kind: count + 1})
        return float(min(step(count), cap))

    def _rate_bound_wait(self) -> float:
        """Wait needed so the next attempt stays within max_attempts_per_minute."""
        now = self._clock()
        while self._attempts and now - self._attempts[0] >= 60.0:
            self._attempts.popleft()
        limit = self.schedule.max_attempts_per_minute
        if limit <= 0 or len(self._attempts) < limit:
            return 0.0
        return self._attempts[-limit] + 60.0 - now


def outage_grace(schedule: BackoffSettings) -> float:
    """Seconds without an accepted connection before health says degraded (``status``): twice
    the network schedule's cap (32 s by default). The longest wait that schedule ever takes,
    plus the connect that follows it, fits: one reconnect never flaps health, at whatever step
    it comes. From a reset schedule (0.25 s, +0.25 s per attempt) it is ~15 failed attempts: an
    outage, not a blip. HTTP errors need no grace: they are degraded at once (``Refusal``)."""
    return 2 * schedule.network_cap
