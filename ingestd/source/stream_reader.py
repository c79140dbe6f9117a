"""The stream reader: keeps one healthy connection to the endpoint open, reconnecting with back-off
and switching filters make-before-break on a reload.

One ``CurlMulti`` loop drives every connection, so the stream worker stays single-threaded and can
check its stop flag, its stall timers and a pending reload at least every ``TICK`` seconds, even on
a silent stream (a blocking ``perform()`` cannot be interrupted; see docs/protocol.md §8). Bytes go
through the ``BodyIntake`` to the sink; ``response`` says how a connection ended.
"""

from __future__ import annotations

import dataclasses
import math
import select
import time
from collections.abc import Callable, Iterable, Mapping

import pycurl
import structlog

from ingestd.config.schema import AuthSettings, StreamSettings
from ingestd.source.api import api_for
from ingestd.source.backoff import Backoff, Ending
from ingestd.source.body import BodyIntake, Sink
from ingestd.source.connection import Connection, open_connection
from ingestd.source.curl_errors import curl_error_text
from ingestd.source.request import filter_key
from ingestd.source.response import (
    classify,
    describe,
    describe_hint,
    disconnect_code,
    server_hint,
)
from ingestd.source.stats import ReaderStats
from ingestd.spool.events import GapMarkers
from ingestd.spool.watch import drain_wakeups

log = structlog.get_logger("ingestd.source.stream_reader")

TICK = 0.1  # seconds between checks of stop flag, stall timers and reloads
# On a quiet healthy connection (keep-alives only) the loop sleeps up to this long: bytes and
# SIGTERM end the sleep at once, stall timers stay exact to this, and the caller's timers
# (fsync, heartbeat) shorten it through ``max_wait``.
IDLE_TICK = 0.5
# A pass that moved fewer body bytes than this (a few tweets, a keep-alive), or under
# GATHER_RATE_BELOW at under GATHER_RATE since the previous read, is followed by a pause of
# GATHER_SECONDS before the next wait: the stream is slow, so reading a few messages per pass
# costs nothing in throughput and wakes the worker a few times less (≤ 0.1 s of latency). The
# rate keeps a slow stream (50 tweets/s ≈ 190 KB/s) gathering on every pass: the bytes of one
# pause alone pass 16 KiB. A larger pass never counts as slow: a starved worker whose reads are
# capped by libcurl's buffer would see a low rate on a fast stream.
GATHER_BELOW = 16 * 1024
GATHER_RATE_BELOW = 64 * 1024
GATHER_RATE = 1024 * 1024  # bytes/s (~270 tweets/s of 3.8 KB); a 5k/s stream is ~19 MB/s
GATHER_SECONDS = 0.1
# After a filter switch the old connection is still read until the server closes it (it logs out
# the older connection of an account by itself) or this many seconds pass: bytes already in its
# socket are tweets the endpoint delivered.
RETIRE_GRACE = 5.0
# v2 allows one connection per app, so a reload that changes the connection closes the old one
# first (no make-before-break). The endpoint notices the close only a moment later (the simulator
# within its 50 ms poll; the real one on its next write, which on a flowing stream is well under a
# second), so the new connection may meet 429 TooManyConnections about our own old one. Such a
# 429 within OWN_CLOSE_WINDOW seconds of our close is retried after these waits (~4.5 s in all,
# 3 attempts: within max_attempts_per_minute) before the documented 429 schedule (60 s doubling),
# which is for another client holding the app's connection (docs/protocol.md §7).
OWN_CLOSE_RETRIES = (1.0, 1.5, 2.0)
OWN_CLOSE_WINDOW = 15.0
# On losing the standby lease, bytes already on their way are still read for this long at most
# (ha.mode: standby; the stream worker sets it below the lease's safety margin, see ``stand_down``).
STAND_DOWN_DRAIN = 0.3
# On a clean stop each streaming connection is half-closed (our FIN) and read until the endpoint
# closes it, for at most this long: an endpoint that stops writing when its client closes (the
# simulator does) then has sent nothing we did not read. One that ignores the FIN is read until
# the bound: only the bytes still on the wire then are lost. A full spool no longer pushes back
# meanwhile (``when_full: block``): what TCP held would be discarded by our close, uncounted.
STOP_DRAIN = 0.5
# A reload that must close the connection before opening the next (v2: one per app) reads the
# old one to the endpoint's close for at most this long, as a stop does (``STOP_DRAIN``).
RELOAD_CLOSE_DRAIN = 0.5
# The coverage ledger's cause for a gap that begins with this ending of the active connection.
GAP_CAUSES = {
    Ending.NETWORK: "reconnect", Ending.CLOSED: "reconnect", Ending.DISCONNECT: "reconnect",
    Ending.STALL: "stall", Ending.RATE_LIMITED: "rate_limited", Ending.HTTP: "http_error",
    Ending.CONFIG: "rejected", Ending.ABORTED: "reload", Ending.MALFORMED_HEADER: "reconnect",
    Ending.TLS_CERTIFICATE: "reconnect",
}


@dataclasses.dataclass
class Refusal:
    """Every attempt since the last connection was answered with an HTTP error (401, 420, 5xx,
    406…): the endpoint refuses the stream, and retrying alone may never help (``status``)."""

    status: int  # the last answer's
    reason: str  # ``describe``'s line for it: the status, the body and the hint (401)
    since: float  # wall clock of the first refused attempt
    attempts: int = 1

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class StreamReader:
    """Keeps one healthy connection open, switching filters make-before-break on reload."""

    def __init__(
        self,
        stream: StreamSettings,
        auth: AuthSettings,
        generation: int,
        sink: Sink,
        *,
        is_full: Callable[[], bool],
        drop_when_full: bool,
        flush: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        may_connect: Callable[[], bool] = lambda: True,
        markers: GapMarkers | None = None,
        first_conn_id: int = 1,
    ) -> None:
        self.stream, self.auth, self.generation = stream, auth, generation
        # The standby lease (ha.mode: standby): no connection is opened, and every open one is
        # closed, while this says no. Always yes in the other modes.
        self.may_connect = may_connect
        # Why the lease says no, for the stand-down's gap (``LeaseGate.stand_down_why``).
        self.stand_down_why: Callable[[], str | None] = lambda: None
        self.stand_down_drain = STAND_DOWN_DRAIN
        # The slow-stream pause (0: none). A standby pair's holder sets 0: its lease margin counts
        # on a look at the lease every TICK, and a pause would be added to that reaction time.
        self.gather_seconds = GATHER_SECONDS
        self._sink_flush = flush  # the sink writes what it coalesced from the callbacks
        self._clock = clock
        self._multi = pycurl.CurlMulti()
        self.backoff = Backoff(stream.backoff, clock=clock)
        self.active: Connection | None = None
        self.pending: Connection | None = None  # the new connection during a filter change
        self.retiring: list[Connection] = []  # replaced connections still being read
        self.next_attempt_at: float | None = clock()
        self.state = "connecting"
        self.stats = ReaderStats()
        self._body = BodyIntake(sink, self.stats, is_full=is_full, drop_when_full=drop_when_full,
                              clock=clock, on_first_body=self._mark_connected)
        self._markers = markers  # coverage: when and why the stream stopped delivering
        self._next_conn_id = first_conn_id
        self._by_handle: dict[int, Connection] = {}
        # Seconds until the caller's next timer (set by the stream worker): the longest sleep.
        self.max_wait: Callable[[], float] = lambda: TICK
        self.wake_fds: list[int] = []  # readable = stop sleeping (the signal wake-up pipe)
        self._read_at = clock()  # when the previous pass read (the gather's rate)
        self.gathers = 0  # gather pauses taken (published: a slow stream's passes are countable)
        self.refused: Refusal | None = None  # since the last connection (None: none refused)
        # When we closed the connection ourselves for a v2 reload, and the short retries of a
        # 429 TooManyConnections taken since (``OWN_CLOSE_RETRIES``).
        self._own_close_at: float | None = None
        self._own_close_retries = 0

    @property
    def connected(self) -> bool:
        """The current connection was accepted (HTTP 200): what health asks of the stream; a
        silent one is ended by the stall timer, not judged here."""
        return self.active is not None and self.active.status == 200

    @property
    def last_message_ns(self) -> int:
        """Wall clock of the last framed message (metrics); 0 before the first."""
        return self._body.last_message_ns

    # -- public control -------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool], tick: Callable[[], None]) -> None:
        """Read until ``should_stop()``; ``tick()`` runs every loop pass (heartbeat, reloads)."""
        try:
            while not should_stop():
                self.step()
                tick()
            self.drain()
        finally:
            self.close()

    def drain(self, budget: float = STOP_DRAIN) -> None:
        """A clean stop: read every connection to the endpoint's close (``_read_to_close``), the
        spool no longer pushing back, framing and spooling what comes; ``close`` follows.
        Closing at once lost what had arrived while the loop did not read (a gather pause, a
        slow fsync or status write in ``tick``, a busy machine) and what the endpoint wrote
        after our last read (a stop in the middle of a burst): it had sent both."""
        started = self._clock()
        received, nbytes, chunks = self.stats.received, self.stats.bytes, self._body.chunks
        dropped = self.stats.dropped["spool_full"]
        self._body.stop_pushing_back()
        closed = self._read_to_close(self._connections(), budget)
        log.info("stream_stop_drained", messages=self.stats.received - received,
                 bytes=self.stats.bytes - nbytes, reads=self._body.chunks - chunks,
                 seconds=round(self._clock() - started, 3), endpoint_closed=closed,
                 dropped_at_stop=self.stats.dropped["spool_full"] - dropped)

    def _read_to_close(self, closing: list[Connection], budget: float) -> bool:
        """Half-close each of ``closing`` that streams (our FIN) and read until the endpoint has
        closed them, at most ``budget`` seconds (one that could not be half-closed: until a pass
        reads nothing); whether it closed them all. Their endings are left to the caller, who
        ends them as planned (no reconnect, no gap of their own); any other connection's ending
        is handled as in ``step``."""
        deadline = self._clock() + budget
        waiting = {id(c.curl) for c in closing if c.status == 200 and c.half_close()}
        mine = {id(c.curl) for c in closing}
        while True:
            self._resume(self._connections())
            before = self._body.chunks
            self._perform()
            self._flush()
            for curl, errno, errmsg in self._ended():
                waiting.discard(id(curl))
                if id(curl) not in mine and id(curl) in self._by_handle:
                    self._finished(self._by_handle[id(curl)], errno, errmsg)
            left = deadline - self._clock()
            if left <= 0 or not (waiting or self._body.chunks > before):
                return not waiting
            if waiting:  # the endpoint has not closed yet: wait for its bytes or its close
                self._multi.select(min(left, TICK))

    def _ended(self) -> list[tuple[pycurl.Curl, int | None, str]]:
        """The handles libcurl finished since the last look: (handle, error or None, message)."""
        ended: list[tuple[pycurl.Curl, int | None, str]] = []
        while True:
            queued, ok, failed = self._multi.info_read()
            ended += [(curl, None, "") for curl in ok]
            ended += failed
            if not queued:
                return ended

    def step(self) -> None:
        """One loop pass: connect if due, move bytes, reap endings, check timers."""
        if not self.may_connect():
            self.stand_down()
        now = self._clock()
        if (self.active is None and self.pending is None and self._attempt_due(now)
                and self.may_connect()):
            self.active = self._open(self.stream, self.generation)
        self._resume((self.active, self.pending, *self.retiring))
        before = self.stats.bytes
        self._perform()
        moved = self.stats.bytes - before
        slow = moved > 0 and self._slow(moved)
        if self.pending is not None and self.pending.body_bytes > 0:
            # Promote here, not in a callback: libcurl forbids removing handles there.
            self._promote(self.pending)
        if self.active is not None and self.active.body_bytes and not self.active.announced:
            self._announce(self.active)
        if self.refused is not None and self.connected:
            self.refused = None
        self._reap()
        self._check_stalls(self._clock())
        self._flush()  # before waiting: nothing framed stays unwritten across the select
        if slow and self.gather_seconds > 0:
            # A slow stream: let a few more messages arrive than wake up for each one.
            self.gathers += 1
            self._sleep(self.gather_seconds, with_curl=False)
        self._sleep(self._select_timeout())

    def _resume(self, conns: Iterable[Connection | None]) -> None:
        """Resume paused connections the spool has room for; end those whose held-back body
        turned out undecodable (outside a callback: no error from libcurl will end them)."""
        for conn in self._body.resume_if_room(conns):
            self._finished(conn, None, "")

    def _flush(self) -> None:
        """Frame the bytes the callbacks held, then write them: a pass ends, or the reader writes
        to the spool itself (a coverage marker goes after every message read before it)."""
        self._body.settle()
        self._sink_flush()

    def _slow(self, moved: int) -> bool:
        """Whether ``moved`` bytes, read now, make a slow stream: a small pass, or a pass under
        ``GATHER_RATE_BELOW`` at a rate under ``GATHER_RATE`` since the previous read (a gather
        pause's bytes on a 50 tweets/s stream). A fast stream's passes are unchanged: large, or
        many close together."""
        now = self._clock()
        elapsed, self._read_at = now - self._read_at, now
        return moved < GATHER_BELOW or moved < min(GATHER_RATE_BELOW, GATHER_RATE * elapsed)

    def _sleep(self, timeout: float, with_curl: bool = True) -> None:
        """Wait for libcurl's sockets (unless ``with_curl`` is false), a wake-up descriptor or
        ``timeout``. SIGTERM may be delivered to any thread of the process: only the signal
        wake-up pipe in ``wake_fds`` ends the main thread's wait on it at once."""
        read, write, exc = self._multi.fdset() if with_curl else ([], [], [])
        ready, _, _ = select.select([*read, *self.wake_fds], write, exc, timeout)
        for fd in self.wake_fds:
            if fd in ready:
                drain_wakeups(fd)

    def _select_timeout(self) -> float:
        """TICK while a connection is being made, replaced or paused; IDLE_TICK on a healthy
        one; never past libcurl's own next timer or the caller's."""
        active = self.active
        busy = active is None or active.paused or self.pending is not None or self.retiring
        wait = TICK if busy else IDLE_TICK
        curl_ms = self._multi.timeout()
        if curl_ms >= 0:
            wait = min(wait, curl_ms / 1000)
        return max(0.0, min(wait, self.max_wait()))

    def reload(self, stream: StreamSettings, auth: AuthSettings, generation: int) -> None:
        """Apply new settings; reconnect (make-before-break) only if a connection key
        (``request.CONNECTION_KEYS``: filters, url, gzip, ...) or the credentials changed."""
        changed = filter_key(stream) != filter_key(self.stream) or auth != self.auth
        self.stream, self.auth, self.generation = stream, auth, generation
        self.backoff.schedule = stream.backoff
        self._retime(stream.read_timeout)
        waiting_for_reload = self.active is None and self.next_attempt_at is None
        if waiting_for_reload:
            # The server rejected our request as misconfigured: any valid reload is a new try.
            self.next_attempt_at = self._clock()
            return
        if not changed:
            return
        if self.pending is not None:
            self._end(self.pending, Ending.ABORTED)
            self.pending = None
        if self.active is None or not self.active.healthy or not api_for(stream).make_before_break:
            # Nothing worth keeping: replace at once (also leaves a degraded "wait for reload").
            if self.active is not None:
                # Closed now, before the new connection is opened on the next pass: on v2 the
                # endpoint refuses a second connection of the app. Read to its close first, as a
                # stop does: what the endpoint wrote after our last read was sent all the same.
                self._read_to_close([self.active], RELOAD_CLOSE_DRAIN)
            if self.active is not None:  # (not ended meanwhile: held bytes found undecodable)
                self._end(self.active, Ending.ABORTED)
                self._mark_gap(self.active, Ending.ABORTED)
                self.active = None
                self._own_close_at, self._own_close_retries = self._clock(), 0
            self.next_attempt_at = self._clock()
            return
        if self.may_connect():
            self.pending = self._open(stream, generation)
        self.active.replaced = self.pending is not None

    def _retime(self, read_timeout: float) -> None:
        """A new ``read_timeout`` reaches the open connections at once, not only the next one
        (their stall is measured from their last byte); a replaced one keeps its grace."""
        for conn in (self.active, self.pending):
            if conn is not None and conn.stream.read_timeout != read_timeout:
                conn.stream = dataclasses.replace(conn.stream, read_timeout=read_timeout)

    def stand_down(self) -> None:
        """The lease is gone: end every connection, and connect again as soon as
        ``may_connect`` allows. Bytes already on their way are read first, for at most
        ``stand_down_drain`` seconds and only while they keep coming: a frozen process that
        wakes up holds tweets the endpoint counted as delivered."""
        conns = self._connections()
        if not conns:
            if self.state.startswith(("connected", "reconnecting", "degraded")):
                # The endpoint had already closed it (a newer connection logged this one out
                # while this process was frozen): standing by all the same, and the open gap
                # says so (the ledger's handover to the new holder reads it).
                self._mark_standby()
                self.state = "standby"
                log.warning("stream_stood_down", conns=[],
                            reason="no valid lease (ha.mode: standby); no connection was open")
            return
        deadline = self._clock() + self.stand_down_drain
        quiet = self.stand_down_drain / 3  # no byte for this long: the socket is empty
        while self._by_handle and (left := deadline - self._clock()) > 0:
            before = self.stats.bytes
            self._multi.select(min(quiet, left))
            self._perform()
            self._reap()
            if self.stats.bytes == before:
                break
        active, why = self.active, self._why()
        for conn in self._connections():
            self._end(conn, Ending.ABORTED)
        if active is not None:
            self._mark_gap(active, Ending.ABORTED, cause="standby", more=why)
        else:  # it ended while draining (the endpoint's logout notice was in the socket)
            self._mark_standby()
        self._flush()
        self.active = self.pending = None
        self.retiring.clear()
        self.next_attempt_at = self._clock()
        self.state = "standby"
        log.warning("stream_stood_down", conns=[c.conn_id for c in conns],
                    reason="no valid lease (ha.mode: standby)")

    def _mark_standby(self) -> None:
        """The open gap (the connection already ended) is now also a stand-down: the ledger's
        handover to the new holder looks for it."""
        if self._markers is not None:
            self._flush()
            self._markers.gap("standby", detail=self._why())

    def _why(self) -> dict[str, str]:
        """The stand-down gap's ``lease`` detail: ``lost`` (another instance holds it),
        ``unreachable`` (it could not be renewed: then nobody streams, and no instance writes a
        takeover gap) or ``lapsed`` (not renewed in time, no error known: a frozen process)."""
        why = self.stand_down_why()
        return {"lease": why} if why else {}

    def _connections(self) -> list[Connection]:
        return [c for c in (self.pending, self.active, *self.retiring) if c is not None]

    def close(self) -> None:
        """Abort every connection; frames already appended stay in the spool."""
        self._body.settle()
        for conn in self._connections():
            self._end(conn, Ending.ABORTED)
        self._flush()
        self.active = self.pending = None
        self.retiring.clear()
        self._multi.close()
        self.state = "stopped"

    # -- connections ----------------------------------------------------------------------

    def _attempt_due(self, now: float) -> bool:
        return self.next_attempt_at is not None and now >= self.next_attempt_at

    def _backfill_for_gap(self, stream: StreamSettings) -> StreamSettings:
        """v2: ask for the minutes of backfill the open gap needs, up to ``backfill_minutes``
        (the bound the settings allow; the endpoint's is 5). No gap known: the bound."""
        start = self._markers.gap_start_ns() if self._markers is not None else None
        if not stream.backfill_minutes or not start:
            return stream
        minutes = min(stream.backfill_minutes, max(1, math.ceil((time.time_ns() - start) / 60e9)))
        return dataclasses.replace(stream, backfill_minutes=minutes)

    @property
    def last_conn_id(self) -> int:
        """The id of the newest connection attempted (0: none yet), answered or not."""
        return self._next_conn_id - 1

    def _open(self, stream: StreamSettings, generation: int) -> Connection:
        stream = self._backfill_for_gap(stream)
        conn_id = self._next_conn_id
        self._next_conn_id += 1
        conn = open_connection(conn_id, generation, stream, self.auth, self._clock(),
                               self._body.on_data)
        self._by_handle[id(conn.curl)] = conn
        self._multi.add_handle(conn.curl)
        self.backoff.record_attempt()
        self.stats.attempts += 1
        self.next_attempt_at = None
        log.info("connecting", conn=conn_id, generation=generation, url=stream.url)
        return conn

    def _announce(self, conn: Connection) -> None:
        conn.announced = True
        self.state = f"connected conn={conn.conn_id} gen={conn.generation}"
        log.info("connected", conn=conn.conn_id, generation=conn.generation,
                 gzip=conn.headers.get("content-encoding") == "gzip",
                 after=round(self._clock() - conn.opened_at, 3))
        if conn.head.ignored:  # a broken proxy's junk in the head: the stream is read all the same
            log.warning("response_header_lines_skipped", conn=conn.conn_id, lines=conn.head.ignored)

    def _mark_connected(self, conn: Connection) -> None:
        """A 200's first body bytes (in libcurl's callback): the coverage marker goes before the
        connection's first message, after everything spooled before."""
        if self._markers is None:
            return
        self._flush()
        backfill = conn.stream.backfill_minutes if conn.stream.api == "v2" else 0
        self._markers.connected(conn.conn_id, backfill_minutes=backfill)

    def _promote(self, conn: Connection) -> None:
        """The new connection delivers: the old one retires (make-before-break)."""
        old, self.active, self.pending = self.active, conn, None
        if old is not None:
            old.retire_at = self._clock() + min(RETIRE_GRACE, old.stream.read_timeout)
            self.retiring.append(old)
        log.info("filters_switched", conn=conn.conn_id, generation=conn.generation,
                 old_conn=old.conn_id if old else None)

    # -- endings ----------------------------------------------------------------------------

    def _perform(self) -> None:
        """Move bytes; what the callbacks held is framed before anything looks at the
        connections (their counts, disconnect notices, a message cut by an ending)."""
        while True:
            ret, _ = self._multi.perform()
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        self._body.settle()

    def _reap(self) -> None:
        for curl, errno, errmsg in self._ended():
            self._finished(self._by_handle[id(curl)], errno, errmsg)

    def _check_stalls(self, now: float) -> None:
        for old in [c for c in self.retiring if now >= c.retire_at]:
            self._retired(old, Ending.ABORTED)
        for conn in (self.active, self.pending):
            if conn is None or conn.paused or conn.abort is not None:
                continue
            if now - conn.last_byte_at < conn.stream.read_timeout:
                continue
            if conn.status in (0, 200):
                log.warning("stream_stalled", conn=conn.conn_id,
                            silent_for=round(now - conn.last_byte_at, 2))
                conn.abort = Ending.STALL
            else:  # an error answer whose body did not end in time: refused as its status says
                log.warning("stream_error_body_unfinished", conn=conn.conn_id, status=conn.status,
                            after=round(now - conn.opened_at, 2))
            self._finished(conn, None, "stall")

    def _finished(self, conn: Connection, errno: int | None, errmsg: str) -> None:
        conn.malformed = conn.head.refused_by_curl(errno, errmsg)  # a junk head line (error 8)
        ending = classify(conn, errno)
        if conn is self.active and self.pending is not None and conn.switched_out:
            # Logged out for our new connection before that one delivered its first byte (the
            # endpoint streams to it from now on): retired, no gap, no reconnect.
            self.active = None
            self.retiring.append(conn)
        if conn in self.retiring:
            self._retired(conn, ending)
            return
        self._end(conn, ending)
        if conn is self.pending:
            self._pending_failed(conn, ending)
            return
        if conn is not self.active:
            return  # an old connection we already replaced
        self.active = None
        self._mark_gap(conn, ending)
        self._schedule_reconnect(conn, ending, curl_error_text(errno, errmsg))

    def _mark_gap(self, conn: Connection, ending: Ending, cause: str | None = None,
                  more: Mapping[str, object] | None = None) -> None:
        """The active connection ended: the stream stops delivering (coverage marker); ``cause``
        overrides the one its ending implies; ``more`` is added to its detail."""
        if self._markers is None:
            return
        self._flush()  # what it delivered goes before the marker
        code = conn.disconnect.get("code") if conn.disconnect else None
        detail = {"conn": conn.conn_id, "ending": ending.value,
                  **({"status": conn.status} if conn.status not in (0, 200) else {}),
                  **({"code": code} if isinstance(code, int | str) else {}), **(more or {})}
        self._markers.gap(cause or GAP_CAUSES[ending], detail=detail)

    def _retired(self, conn: Connection, ending: Ending) -> None:
        """The replaced connection is done: by the server's own close, or our grace deadline."""
        self.retiring.remove(conn)
        self._end(conn, ending, counted=Ending.RETIRED)  # a planned end, however it came
        log.info("old_connection_closed", conn=conn.conn_id, ending=ending.value,
                 messages=conn.messages, **conn.cut_fields())

    def _pending_failed(self, conn: Connection, ending: Ending) -> None:
        """New filters did not connect: keep streaming with the old ones, report degraded."""
        self.pending = None
        reason = describe(conn, ending, "")
        log.error("reload_connect_failed", conn=conn.conn_id, reason=reason)
        self.state = f"degraded: new filters not accepted ({reason}); old filters still streaming"
        if self.active is not None:
            self.active.replaced = False  # its logout would no longer be ours
        else:  # the old one was logged out for this one meanwhile: nothing streams now
            self._mark_gap(conn, ending)
            self._schedule_reconnect(conn, ending, "")

    def _schedule_reconnect(self, conn: Connection, ending: Ending, errmsg: str) -> None:
        own = self._own_close_wait(conn)
        hint = None if own is not None else server_hint(conn.status, conn.headers, time.time())
        wait = own if own is not None else self.backoff.delay(
            ending, healthy=conn.healthy, retry_after=hint.seconds if hint else None,
            disconnect_code=disconnect_code(conn),
        )
        # What became of the server's wait: a capped one explains a shorter wait than it asked.
        note = describe_hint(hint, self.backoff.last_server_wait) if hint else None
        reason = describe(conn, ending, errmsg)
        if conn.status not in (0, 200) and own is None:  # our own old connection is no refusal
            self._note_refusal(conn.status, reason)
        if wait is None:
            self.next_attempt_at = None
            self.state = f"degraded: {reason}; fix the settings and reload"
            log.error("stream_rejected", conn=conn.conn_id, reason=reason,
                      action="waiting for a corrected settings file (SIGHUP)")
            return
        self.next_attempt_at = self._clock() + wait
        self.state = f"reconnecting in {wait:.1f}s ({reason}{f'; {note}' if note else ''})"
        log.warning("stream_ended", conn=conn.conn_id, ending=ending.value, reason=reason,
                    healthy=conn.healthy, messages=conn.messages, backoff=round(wait, 3),
                    **({"server_wait": note} if note else {}), **conn.cut_fields())

    def _own_close_wait(self, conn: Connection) -> float | None:
        """A short wait if ``conn`` met 429 TooManyConnections soon after we closed the app's
        connection ourselves (the endpoint has not noticed yet); None: the usual schedule."""
        closed_at, tries = self._own_close_at, self._own_close_retries
        if (closed_at is None or conn.status != 429 or tries >= len(OWN_CLOSE_RETRIES)
                or conn.opened_at - closed_at > OWN_CLOSE_WINDOW
                or b"TooManyConnections" not in conn.error_body):
            self._own_close_at = None
            return None
        self._own_close_retries += 1
        return self.backoff.soon(OWN_CLOSE_RETRIES[tries])

    def _note_refusal(self, status: int, reason: str) -> None:
        last = self.refused
        self.refused = Refusal(status, reason, last.since if last else time.time(),
                               last.attempts + 1 if last else 1)

    def _end(self, conn: Connection, ending: Ending, counted: Ending | None = None) -> None:
        """Take the handle out of the loop and close it; count the ending (as ``counted`` if
        given) and any message cut."""
        if id(conn.curl) not in self._by_handle:
            return
        del self._by_handle[id(conn.curl)]
        self._multi.remove_handle(conn.curl)
        self._body.end(conn)
        conn.close(ending)
        self.stats.count_ending(counted or ending, conn.cut_bytes)
        if conn.held_dropped:  # a full spool held them back (when_full: block) as it closed
            self.stats.dropped["spool_full"] += conn.held_dropped
        if self.active is conn and ending is not Ending.ABORTED:
            self.state = "reconnecting"

