"""From libcurl's write callback to the sink: frame a connection's body, count, push back.

The reader never parses tweets: it frames bytes and hands them to the sink (the stream worker's
spool writer), where the store worker picks them up. Only the control messages that describe the
connection's health are looked into (``watch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
import pycurl
import structlog

from ingestd.source.backoff import Ending
from ingestd.source.connection import Connection
from ingestd.source.framing import BadFrame, Oversize
from ingestd.source.inflate import BadEncoding
from ingestd.source.stats import ReaderStats
from ingestd.spool.format import KIND_BADFRAME, KIND_MESSAGE, KIND_OVERSIZE

log = structlog.get_logger("ingestd.source.body")

ERROR_BODY_CAP = 4096
# Control messages the reader itself must understand (connection endings, health figures).
# v2: a line of only ``errors`` is an in-stream error such as operational-disconnect (§7.4).
WATCHED_PREFIXES = (b'{"disconnect"', b'{"warning"', b'{"limit"', b'{"errors"')
V2_OPERATIONAL_DISCONNECT = "operational-disconnect"

# (items as (kind, payload), conn_id, generation, wall clock in ns)
Sink = Callable[[Sequence[tuple[int, bytes]], int, int, int], None]


class BodyIntake:
    """Frames each connection's body into the sink; pauses a transfer while the sink is full."""

    def __init__(self, sink: Sink, stats: ReaderStats, *, is_full: Callable[[], bool],
                 drop_when_full: bool, clock: Callable[[], float],
                 on_first_body: Callable[[Connection], None] = lambda conn: None) -> None:
        self._sink, self._stats = sink, stats
        self._on_first_body = on_first_body  # the coverage marker: before the first message
        self._is_full, self._drop_when_full = is_full, drop_when_full
        self._clock = clock
        self.last_message_ns = 0  # wall clock of the last framed message (metrics)

    def on_data(self, conn: Connection, data: bytes) -> int | None:
        """libcurl's WRITEFUNCTION (must not raise: it would surface as a generic error)."""
        if conn.abort is not None:
            return 0  # abort the transfer: we are ending this connection ourselves
        conn.last_byte_at = self._clock()
        if conn.status != 200:
            self._keep_error_body(conn, data)
            return None
        if not self._drop_when_full and self._is_full():
            conn.paused = True
            return int(pycurl.WRITEFUNC_PAUSE)  # libcurl keeps the bytes; TCP pushes back
        if not conn.marked:
            conn.marked = True
            self._on_first_body(conn)
        try:
            for piece in conn.decoded(data):
                self._frame(conn, piece)
        except BadEncoding as exc:  # what came before it was framed; the rest cannot be read
            log.warning("stream_body_undecodable", conn=conn.conn_id, reason=str(exc))
            conn.failure = str(exc)
            conn.abort = Ending.NETWORK
            return 0
        return None

    @staticmethod
    def _keep_error_body(conn: Connection, data: bytes) -> None:
        """The first ``ERROR_BODY_CAP`` bytes of an error response, for its log line."""
        try:
            for piece in conn.decoded(data):
                room = ERROR_BODY_CAP - len(conn.error_body)
                if room <= 0:
                    return
                conn.error_body += piece[:room]
        except BadEncoding:
            pass  # keep what was readable: the status says enough

    def resume_if_room(self, conns: Iterable[Connection | None]) -> None:
        for conn in conns:
            if conn is not None and conn.paused and not self._is_full():
                conn.paused = False
                conn.last_byte_at = self._clock()  # the pause was ours, not the server's stall
                conn.curl.pause(pycurl.PAUSE_CONT)

    def _frame(self, conn: Connection, data: bytes) -> None:
        size = len(data)
        stats, framer = self._stats, conn.framer
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
                    watch(conn, item, stats)
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
            stats.dropped["spool_full"] += len(items)
            return
        stats.received += len(items)
        now_ns = time.time_ns()
        self.last_message_ns = now_ns
        self._sink(items, conn.conn_id, conn.generation, now_ns)


def watch(conn: Connection, payload: bytes, stats: ReaderStats) -> None:
    """Log and count the control messages that describe the connection's health."""
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return  # the store worker dead-letters it
    if not isinstance(msg, dict):
        return
    if isinstance(body := msg.get("disconnect"), dict):
        conn.disconnect = body
        stats.disconnect_codes[str(body.get("code"))] += 1
        log.warning("stream_disconnect", conn=conn.conn_id, code=body.get("code"),
                    reason=str(body.get("reason", ""))[:200])
    elif isinstance(body := msg.get("warning"), dict):
        stats.warnings += 1
        log.warning("stream_warning", conn=conn.conn_id, code=body.get("code"),
                    percent_full=body.get("percent_full"))
    elif isinstance(body := msg.get("limit"), dict) and isinstance(body.get("track"), int):
        # `track` is cumulative per connection: add only the increase.
        increase = max(body["track"] - conn.limit_track, 0)
        conn.limit_track = max(conn.limit_track, body["track"])
        stats.limit_missed += increase
        log.info("stream_limit", conn=conn.conn_id, undelivered=body["track"])
    elif isinstance(errors := msg.get("errors"), list):
        _watch_v2_errors(conn, errors, stats)


def _watch_v2_errors(conn: Connection, errors: list[Any], stats: ReaderStats) -> None:
    """v2 in-stream errors; an operational-disconnect ends the connection like a disconnect."""
    for err in (e for e in errors if isinstance(e, dict)):
        title, detail = str(err.get("title", "")), str(err.get("detail", ""))[:200]
        if title == V2_OPERATIONAL_DISCONNECT:
            conn.disconnect = {"code": title, "reason": detail}
            stats.disconnect_codes[title] += 1
        log.warning("stream_error", conn=conn.conn_id, title=title, detail=detail,
                    disconnect_type=err.get("disconnect_type"))

