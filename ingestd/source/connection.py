"""The stream reader: pycurl connections to the endpoint, framed messages appended to the spool.

One ``CurlMulti`` loop drives every connection, so the stream worker stays single-threaded and can
check its stop flag, its stall timers and a pending reload at least every ``TICK`` seconds, even on
a silent stream (a blocking ``perform()`` cannot be interrupted; see protocol.md §8). The reader
never parses tweets: it frames bytes and appends them to the spool, where the store worker picks
them up.
"""

from __future__ import annotations

import email.utils
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import certifi
import orjson
import pycurl
import structlog

from ingestd import __version__
from ingestd.config.settings import AuthSettings, StreamSettings
from ingestd.source.backoff import Backoff, Ending, Schedule
from ingestd.source.framing import BadFrame, LengthFramer, LineFramer, Oversize
from ingestd.source.headers import parse_header_line
from ingestd.source.oauth import encode_form, sign_request
from ingestd.source.v2_request import DIAGNOSE_401 as V2_DIAGNOSE_401
from ingestd.source.v2_request import stream_request as v2_stream_request
from ingestd.spool.format import KIND_BADFRAME, KIND_MESSAGE, KIND_OVERSIZE
from ingestd.spool.writer import DropReason

log = structlog.get_logger("ingestd.source.connection")

TICK = 0.1  # seconds between checks of stop flag, stall timers and reloads
ERROR_BODY_CAP = 4096
# libcurl's receive buffer (default 16 KiB): a plain body then reaches the write callback in larger
# slices, so fewer callbacks, framer calls and spool writes per tweet. Only what is already in the
# socket is handed over: no added latency. (Inflated gzip output still comes 16 KiB at a time.)
RECV_BUFFER = 256 * 1024
USER_AGENT = f"ingestd/{__version__}"
CONFIG_STATUSES = frozenset({403, 404, 406, 413, 416})
RATE_LIMIT_STATUSES = frozenset({420, 429})
# Control messages the reader itself must understand (connection endings, health figures).
# v2: a line of only ``errors`` is an in-stream error such as operational-disconnect (§7.4).
WATCHED_PREFIXES = (b'{"disconnect"', b'{"warning"', b'{"limit"', b'{"errors"')
V2_OPERATIONAL_DISCONNECT = "operational-disconnect"
SKEW_THRESHOLD = 60.0  # seconds of clock difference worth blaming for a 401
# After a filter switch the old connection is still read until the server closes it (it logs out
# the older connection of an account by itself) or this many seconds pass: bytes already in its
# socket are tweets the endpoint delivered.
RETIRE_GRACE = 5.0
CUT_BY_DISCONNECT: DropReason = "cut_by_disconnect"  # a message cut by a connection's end

Sink = Callable[[Sequence[tuple[int, bytes]], int, int, int], None]


@dataclass
class Connection:
    """One HTTP request to the endpoint and what it has delivered so far."""

    conn_id: int
    generation: int
    stream: StreamSettings
    curl: pycurl.Curl
    framer: LineFramer | LengthFramer
    opened_at: float
    last_byte_at: float
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    error_body: bytearray = field(default_factory=bytearray)
    messages: int = 0
    body_bytes: int = 0
    disconnect: dict[str, Any] | None = None
    limit_track: int = 0
    paused: bool = False
    announced: bool = False  # "connected" logged once the first bytes of a 200 arrived
    retire_at: float = 0.0  # when a replaced connection is closed at the latest
    abort: Ending | None = None  # set when we end it ourselves (stall, stop, reload)
    cut_bytes: int = 0  # bytes of the message this connection's end cut off (dropped)

    @property
    def healthy(self) -> bool:
        """A connection that delivered a message proved the credentials and filters work."""
        return self.status == 200 and self.messages > 0


@dataclass
class ReaderStats:
    """Counters published in run/stream.json (the metrics issue exports them)."""

    received: int = 0
    keepalives: int = 0
    oversize: int = 0
    bad_frames: int = 0
    partial: int = 0
    dropped: Counter[DropReason] = field(default_factory=Counter)
    bytes: int = 0
    endings: Counter[str] = field(default_factory=Counter)
    disconnect_codes: Counter[str] = field(default_factory=Counter)
    limit_missed: int = 0
    warnings: int = 0
    attempts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received, "keepalives": self.keepalives, "oversize": self.oversize,
            "bad_frames": self.bad_frames, "partial": self.partial, "dropped": dict(self.dropped),
            "bytes": self.bytes, "endings": dict(self.endings),
            "disconnect_codes": dict(self.disconnect_codes), "limit_missed": self.limit_missed,
            "warnings": self.warnings, "attempts": self.attempts,
        }


class Reader:
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
    ) -> None:
        self.stream, self.auth, self.generation = stream, auth, generation
        self._sink, self._is_full, self._drop_when_full = sink, is_full, drop_when_full
        self._flush = flush  # ends a pass: the sink writes what it coalesced from the callbacks
        self._clock = clock
        self._multi = pycurl.CurlMulti()
        self.backoff = Backoff(schedule_from(stream), clock=clock)
        self.active: Connection | None = None
        self.pending: Connection | None = None  # the new connection during a filter change
        self.retiring: list[Connection] = []  # replaced connections still being read
        self.next_attempt_at: float | None = clock()
        self.state = "connecting"
        self.stats = ReaderStats()
        self.last_message_ns = 0  # wall clock of the last framed message (metrics)
        self._next_conn_id = 1
        self._by_handle: dict[int, Connection] = {}

    # -- public control -------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool], tick: Callable[[], None]) -> None:
        """Read until ``should_stop()``; ``tick()`` runs every loop pass (heartbeat, reloads)."""
        try:
            while not should_stop():
                self.step()
                tick()
        finally:
            self.close()

    def step(self) -> None:
        """One loop pass: connect if due, move bytes, reap endings, check timers."""
        now = self._clock()
        if self.active is None and self.pending is None and self._attempt_due(now):
            self.active = self._open(self.stream, self.generation)
        self._resume_if_room()
        self._perform()
        if self.pending is not None and self.pending.body_bytes > 0:
            # Promote here, not in a callback: libcurl forbids removing handles there.
            self._promote(self.pending)
        if self.active is not None and self.active.body_bytes and not self.active.announced:
            self._announce(self.active)
        self._reap()
        self._check_stalls(self._clock())
        self._flush()  # before waiting: nothing framed stays unwritten across the select
        self._multi.select(TICK)

    def reload(self, stream: StreamSettings, auth: AuthSettings, generation: int) -> None:
        """Apply new settings; reconnect (make-before-break) only if the filters changed."""
        changed = stream.filter_key() != self.stream.filter_key() or auth != self.auth
        self.stream, self.auth, self.generation = stream, auth, generation
        self.backoff.schedule = schedule_from(stream)
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
        # v2 allows one connection per app (a second one gets 429): no make-before-break there;
        # v2 rules changes never get here (not in filter_key), only fields/url changes do.
        if self.active is None or not self.active.healthy or stream.api == "v2":
            # Nothing worth keeping: replace at once (also leaves a degraded "wait for reload").
            if self.active is not None:
                self._end(self.active, Ending.ABORTED)
                self.active = None
            self.next_attempt_at = self._clock()
            return
        self.pending = self._open(stream, generation)

    def close(self) -> None:
        """Abort every connection; frames already appended stay in the spool."""
        for conn in [c for c in (self.pending, self.active, *self.retiring) if c is not None]:
            self._end(conn, Ending.ABORTED)
        self._flush()
        self.active = self.pending = None
        self.retiring.clear()
        self._multi.close()
        self.state = "stopped"

    # -- connections ----------------------------------------------------------------------

    def _attempt_due(self, now: float) -> bool:
        return self.next_attempt_at is not None and now >= self.next_attempt_at

    def _open(self, stream: StreamSettings, generation: int) -> Connection:
        conn_id = self._next_conn_id
        self._next_conn_id += 1
        now = self._clock()
        framer: LineFramer | LengthFramer = (
            LengthFramer(stream.max_message_bytes) if stream.delimited
            else LineFramer(stream.max_message_bytes)
        )
        curl = pycurl.Curl()
        conn = Connection(conn_id, generation, stream, curl, framer, now, now)
        self._configure(curl, conn)
        self._by_handle[id(curl)] = conn
        self._multi.add_handle(curl)
        self.backoff.record_attempt()
        self.stats.attempts += 1
        self.next_attempt_at = None
        log.info("connecting", conn=conn_id, generation=generation, url=stream.url)
        return conn

    def _configure(self, curl: pycurl.Curl, conn: Connection) -> None:
        stream = conn.stream
        if stream.api == "v2":  # X API v2: GET, fields as query parameters, bearer token
            url, header_lines = v2_stream_request(stream, self.auth)
            curl.setopt(pycurl.URL, url)
            curl.setopt(pycurl.HTTPGET, 1)
            curl.setopt(pycurl.HTTPHEADER, header_lines)
        else:
            body = encode_form(stream.post_params())
            headers = sign_request(stream.url, body, self.auth)
            headers["User-Agent"] = USER_AGENT
            curl.setopt(pycurl.URL, stream.url)
            curl.setopt(pycurl.POSTFIELDS, body)
            curl.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()])
        curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        curl.setopt(pycurl.BUFFERSIZE, RECV_BUFFER)
        if stream.gzip:
            curl.setopt(pycurl.ACCEPT_ENCODING, "deflate, gzip")
        curl.setopt(pycurl.WRITEFUNCTION, lambda data: self._on_data(conn, data))
        curl.setopt(pycurl.HEADERFUNCTION, lambda line: self._on_header(conn, line))
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.CONNECTTIMEOUT, max(1, round(stream.connect_timeout)))
        curl.setopt(pycurl.TCP_KEEPALIVE, 1)
        curl.setopt(pycurl.TCP_KEEPIDLE, 30)
        curl.setopt(pycurl.TCP_KEEPINTVL, 15)
        # TLS is always verified; settings refuse plain http:// for anything but loopback.
        curl.setopt(pycurl.CAINFO, stream.ca_file or certifi.where())
        curl.setopt(pycurl.SSL_VERIFYPEER, 1)
        curl.setopt(pycurl.SSL_VERIFYHOST, 2)

    # -- libcurl callbacks (must not raise: an exception would surface as a generic error) --

    def _on_header(self, conn: Connection, line: bytes) -> None:
        if (status := parse_header_line(line, conn.headers)) is not None:
            conn.status = status

    def _on_data(self, conn: Connection, data: bytes) -> int | None:
        if conn.abort is not None:
            return 0  # abort the transfer: we are ending this connection ourselves
        conn.last_byte_at = self._clock()
        if conn.status != 200:
            room = ERROR_BODY_CAP - len(conn.error_body)
            conn.error_body += data[: max(room, 0)]
            return None
        if not self._drop_when_full and self._is_full():
            conn.paused = True
            return int(pycurl.WRITEFUNC_PAUSE)  # libcurl keeps the bytes; TCP pushes back
        self._frame(conn, data)
        return None

    def _frame(self, conn: Connection, data: bytes) -> None:
        size = len(data)
        stats, framer = self.stats, conn.framer
        conn.body_bytes += size
        stats.bytes += size
        keepalives_before = framer.keepalives
        frames = framer.feed(data)
        stats.keepalives += framer.keepalives - keepalives_before
        if not frames:
            return  # part of a message, or keep-alives only
        items: list[tuple[int, bytes]] = []
        append = items.append
        for item in frames:
            if isinstance(item, bytes):
                append((KIND_MESSAGE, item))
                if item.startswith(WATCHED_PREFIXES):
                    self._watch(conn, item)
            elif isinstance(item, Oversize):
                stats.oversize += 1
                append((KIND_OVERSIZE, item.head))
            elif isinstance(item, BadFrame):
                stats.bad_frames += 1
                append((KIND_BADFRAME, item.head))
        if not items:
            return
        conn.messages += len(items)
        if self._drop_when_full and self._is_full():
            self.stats.dropped["spool_full"] += len(items)
            return
        self.stats.received += len(items)
        now_ns = time.time_ns()
        self.last_message_ns = now_ns
        self._sink(items, conn.conn_id, conn.generation, now_ns)

    def _watch(self, conn: Connection, payload: bytes) -> None:
        """Log and count the control messages that describe the connection's health."""
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return  # the store worker dead-letters it
        if not isinstance(msg, dict):
            return
        if isinstance(body := msg.get("disconnect"), dict):
            conn.disconnect = body
            self.stats.disconnect_codes[str(body.get("code"))] += 1
            log.warning("stream_disconnect", conn=conn.conn_id, code=body.get("code"),
                        reason=str(body.get("reason", ""))[:200])
        elif isinstance(body := msg.get("warning"), dict):
            self.stats.warnings += 1
            log.warning("stream_warning", conn=conn.conn_id, code=body.get("code"),
                        percent_full=body.get("percent_full"))
        elif isinstance(body := msg.get("limit"), dict) and isinstance(body.get("track"), int):
            # `track` is cumulative per connection: add only the increase.
            increase = max(body["track"] - conn.limit_track, 0)
            conn.limit_track = max(conn.limit_track, body["track"])
            self.stats.limit_missed += increase
            log.info("stream_limit", conn=conn.conn_id, undelivered=body["track"])
        elif isinstance(errors := msg.get("errors"), list):
            self._watch_v2_errors(conn, errors)

    def _watch_v2_errors(self, conn: Connection, errors: list[Any]) -> None:
        """v2 in-stream errors; an operational-disconnect ends the connection like a disconnect."""
        for err in (e for e in errors if isinstance(e, dict)):
            title, detail = str(err.get("title", "")), str(err.get("detail", ""))[:200]
            if title == V2_OPERATIONAL_DISCONNECT:
                conn.disconnect = {"code": title, "reason": detail}
                self.stats.disconnect_codes[title] += 1
            log.warning("stream_error", conn=conn.conn_id, title=title, detail=detail,
                        disconnect_type=err.get("disconnect_type"))

    def _announce(self, conn: Connection) -> None:
        conn.announced = True
        self.state = f"connected conn={conn.conn_id} gen={conn.generation}"
        log.info("connected", conn=conn.conn_id, generation=conn.generation,
                 gzip=conn.headers.get("content-encoding") == "gzip",
                 after=round(self._clock() - conn.opened_at, 3))

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
        while True:
            ret, _ = self._multi.perform()
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                return

    def _resume_if_room(self) -> None:
        for conn in (self.active, self.pending, *self.retiring):
            if conn is not None and conn.paused and not self._is_full():
                conn.paused = False
                conn.last_byte_at = self._clock()  # the pause was ours, not the server's stall
                conn.curl.pause(pycurl.PAUSE_CONT)

    def _reap(self) -> None:
        while True:
            queued, ok, failed = self._multi.info_read()
            for curl in ok:
                self._finished(self._by_handle[id(curl)], None, "")
            for curl, errno, errmsg in failed:
                self._finished(self._by_handle[id(curl)], errno, errmsg)
            if not queued:
                return

    def _check_stalls(self, now: float) -> None:
        for old in [c for c in self.retiring if now >= c.retire_at]:
            self._retired(old, Ending.ABORTED)
        for conn in (self.active, self.pending):
            if conn is None or conn.paused or conn.abort is not None:
                continue
            if now - conn.last_byte_at >= conn.stream.read_timeout:
                log.warning("stream_stalled", conn=conn.conn_id,
                            silent_for=round(now - conn.last_byte_at, 2))
                conn.abort = Ending.STALL
                self._finished(conn, None, "stall")

    def _finished(self, conn: Connection, errno: int | None, errmsg: str) -> None:
        ending = self._classify(conn, errno)
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
        self._schedule_reconnect(conn, ending, errmsg)

    def _retired(self, conn: Connection, ending: Ending) -> None:
        """The replaced connection is done: by the server's own close, or our grace deadline."""
        self.retiring.remove(conn)
        self._end(conn, ending)
        log.info("old_connection_closed", conn=conn.conn_id, ending=ending.value,
                 messages=conn.messages, **_cut(conn))

    def _pending_failed(self, conn: Connection, ending: Ending) -> None:
        """New filters did not connect: keep streaming with the old ones, report degraded."""
        self.pending = None
        reason = self._describe(conn, ending, "")
        log.error("reload_connect_failed", conn=conn.conn_id, reason=reason)
        self.state = f"degraded: new filters not accepted ({reason}); old filters still streaming"
        if self.active is None:
            self._schedule_reconnect(conn, ending, "")

    def _schedule_reconnect(self, conn: Connection, ending: Ending, errmsg: str) -> None:
        code = conn.disconnect.get("code") if conn.disconnect else None
        wait = self.backoff.delay(
            ending, healthy=conn.healthy, retry_after=retry_after(conn.headers, time.time()),
            disconnect_code=code if isinstance(code, int) else None,
        )
        reason = self._describe(conn, ending, errmsg)
        if wait is None:
            self.next_attempt_at = None
            self.state = f"degraded: {reason}; fix the settings and reload"
            log.error("stream_rejected", conn=conn.conn_id, reason=reason,
                      action="waiting for a corrected settings file (SIGHUP)")
            return
        self.next_attempt_at = self._clock() + wait
        self.state = f"reconnecting in {wait:.1f}s ({reason})"
        log.warning("stream_ended", conn=conn.conn_id, ending=ending.value, reason=reason,
                    healthy=conn.healthy, messages=conn.messages, backoff=round(wait, 3),
                    **_cut(conn))

    def _classify(self, conn: Connection, errno: int | None) -> Ending:
        if conn.abort is not None:
            return conn.abort
        if conn.status and conn.status != 200:
            if conn.status in CONFIG_STATUSES:
                return Ending.CONFIG
            if conn.status in RATE_LIMIT_STATUSES:
                return Ending.RATE_LIMITED
            return Ending.HTTP
        if conn.disconnect is not None:
            return Ending.DISCONNECT
        if errno is None:
            return Ending.CLOSED if conn.status == 200 else Ending.NETWORK
        return Ending.NETWORK

    def _describe(self, conn: Connection, ending: Ending, errmsg: str) -> str:
        if conn.status and conn.status != 200:
            body = bytes(conn.error_body).decode("utf-8", "replace").strip()[:300]
            text = f"HTTP {conn.status}: {body}" if body else f"HTTP {conn.status}"
            if conn.status == 401:
                text += "; " + (V2_DIAGNOSE_401 if conn.stream.api == "v2" else
                                diagnose_401(conn.headers.get("date"), time.time()))
            return text
        if conn.disconnect is not None:
            return f"disconnect code {conn.disconnect.get('code')}: {conn.disconnect.get('reason')}"
        if ending is Ending.STALL:
            return f"no data for {conn.stream.read_timeout:g}s"
        return errmsg or ending.value

    def _end(self, conn: Connection, ending: Ending) -> None:
        """Remove the handle, count the ending and any message it cut."""
        if id(conn.curl) not in self._by_handle:
            return
        conn.abort = conn.abort or ending
        del self._by_handle[id(conn.curl)]
        self._multi.remove_handle(conn.curl)
        conn.curl.close()
        self.stats.endings[ending.value] += 1
        if conn.framer.pending_bytes and conn.status == 200:
            # A message cut by the connection's end is a routine loss of reconnecting, not bad
            # input: counted as dropped with the reconnect (the server resends nothing; the
            # ending's log line says a message was cut), never dead-lettered.
            conn.cut_bytes = conn.framer.pending_bytes
            self.stats.partial += 1
            self.stats.dropped[CUT_BY_DISCONNECT] += 1
        if self.active is conn and ending is not Ending.ABORTED:
            self.state = "reconnecting"


def _cut(conn: Connection) -> dict[str, Any]:
    """Log fields for a message cut by a connection's end (none if nothing was cut)."""
    if not conn.cut_bytes:
        return {}
    return {"partial_message_cut": True, "cut_bytes": conn.cut_bytes, "dropped": CUT_BY_DISCONNECT}


def schedule_from(stream: StreamSettings) -> Schedule:
    b = stream.backoff
    return Schedule(
        network_start=b.network_start, network_step=b.network_step, network_cap=b.network_cap,
        http_start=b.http_start, http_cap=b.http_cap, rate_limit_start=b.rate_limit_start,
        rate_limit_cap=b.rate_limit_cap, reconnect_delay=b.reconnect_delay,
        max_attempts_per_minute=b.max_attempts_per_minute, jitter=b.jitter,
    )


def retry_after(headers: dict[str, str], now: float) -> float | None:
    """Seconds the server asked us to wait (Retry-After, or x-rate-limit-reset epoch)."""
    value = headers.get("retry-after")
    if value:
        if value.isdigit():
            return float(value)
        try:
            return max(email.utils.parsedate_to_datetime(value).timestamp() - now, 0.0)
        except (TypeError, ValueError):
            pass
    reset = headers.get("x-rate-limit-reset")
    # The reset time matters only once the allowance is spent: v2 sends these headers on every
    # answer, including a 429 TooManyConnections that has requests left (protocol.md §7.1).
    if headers.get("x-rate-limit-remaining", "0") != "0":
        return None
    if reset and reset.isdigit():
        return max(float(reset) - now, 0.0)
    return None


def diagnose_401(date_header: str | None, now: float) -> str:
    """Explain a 401: clock skew (with the measured offset) or the credentials themselves."""
    if date_header:
        try:
            server = email.utils.parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            server = None
        if server is not None and abs(now - server) >= SKEW_THRESHOLD:
            direction = "ahead of" if now > server else "behind"
            return (f"local clock is {abs(now - server):.0f}s {direction} the server's: "
                    "fix NTP (OAuth timestamps must be within a few minutes)")
    return ("credentials rejected: check consumer key/secret and access token/secret "
            "(clock agrees with the server)")
