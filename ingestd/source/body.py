"""From libcurl's write callback to the sink: frame a connection's body, count, push back.

The reader never parses tweets: it frames bytes and hands them to the sink (the stream worker's
spool writer), where the store worker picks them up. Only the control messages that describe the
connection's health are looked into (``watch``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import orjson
import pycurl
import structlog

from ingestd.documents.labels import LIMIT_TRACK_MAX, code_key
from ingestd.source.backoff import Ending
from ingestd.source.connection import Connection
from ingestd.source.framing import BadFrame, Frame, LengthFramer, Oversize
from ingestd.source.inflate import BadEncoding
from ingestd.source.stats import ReaderStats
from ingestd.spool.format import (
    KIND_BADFRAME_SIZED,
    KIND_MESSAGE,
    KIND_OVERSIZE_SIZED,
    badframe_payload,
    oversize_payload,
)

log = structlog.get_logger("ingestd.source.body")

ERROR_BODY_CAP = 4096
# The spool's fullness is looked at on the first callback of each reader pass and then once per
# this many body bytes taken, counted after inflating: a paced stream's callbacks are a message or
# two each, and a look per callback cost ~1 µs per tweet. Counted before inflating, a full spool
# was passed by all that one 256 KiB read inflates to: ~264 MB for a gzip body of tiny messages
# (deflate inflates up to ~1032x). Now the look also comes between the inflater's pieces (at most
# ``inflate.PIECE_BYTES``), so after a look that found room at most this plus one piece is taken.
FULL_CHECK_BYTES = 16 * 1024
# A paced stream comes a chunk (a message or two) per callback. Each callback's body bytes are
# decoded at once (a bad one ends the transfer there), but held until the reader's pass ends
# (``settle``) or this many are held, and framed together: a callback at a time, the framing, the
# spool intake's call and the look at the spool cost ~1.2 µs per tweet more than 16 KiB at a time
# (bench/LOG.md). A fast stream's pieces are larger than this and go through as they come.
HOLD_BYTES = 16 * 1024
# Control messages the reader itself must understand (connection endings, health figures).
# v2: a line of only ``errors`` is an in-stream error such as operational-disconnect (§7.4).
WATCHED_PREFIXES = (b'{"disconnect"', b'{"warning"', b'{"limit"', b'{"errors"')
V2_OPERATIONAL_DISCONNECT = "operational-disconnect"
SHOWN_CHARS = 200  # of a control message's text field, in the log and the status

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
        self._unchecked = FULL_CHECK_BYTES  # body bytes taken since the last look at is_full
        self._held: list[bytes] = []  # body pieces not framed yet, in the order they came
        self._held_by: list[Connection] = []  # the connection of each
        self._mixed = False  # the held pieces are of more than one connection
        self._held_bytes = 0
        self.last_message_ns = 0  # wall clock of the last framed message (metrics)
        self.chunks = 0  # libcurl callbacks with bytes (a read moved something)

    def on_data(self, conn: Connection, data: bytes) -> int | None:
        """libcurl's WRITEFUNCTION (must not raise: it would surface as a generic error)."""
        if conn.abort is not None:
            return 0  # abort the transfer: we are ending this connection ourselves
        self.chunks += 1
        if conn.status != 200:
            # Text for the log only: read up to its cap, and not kept alive by its bytes (the
            # stall timer gives it read_timeout from the attempt), so a body without end is
            # given up and the answer refused as its status says.
            return self._keep_error_body(conn, data)
        conn.last_byte_at = self._clock()
        # Paused with output held (``_take``): the rest of libcurl's read waits with it.
        if conn.paused or (self._unchecked >= FULL_CHECK_BYTES and not self._drop_when_full
                           and self._look_full()):
            conn.paused = True
            return int(pycurl.WRITEFUNC_PAUSE)  # libcurl keeps the bytes; TCP pushes back
        if not conn.marked:
            conn.marked = True
            self._on_first_body(conn)  # settles what is held: it goes before the marker
        try:
            self._take(conn, iter(conn.decoded(data)))
        except BadEncoding as exc:  # what came before it is framed; the rest cannot be read
            self._undecodable(conn, exc)
            return 0
        return None

    def _take(self, conn: Connection, pieces: Iterator[bytes]) -> None:
        """Hold ``pieces`` (a read inflated), looking at the spool between them: a full one
        leaves the rest, not inflated yet, with ``conn`` (``_leave``)."""
        for piece in pieces:
            self._hold(conn, piece)
            self._unchecked += len(piece)
            if self._unchecked >= FULL_CHECK_BYTES and not self._drop_when_full \
                    and self._look_full():
                self._leave(conn, pieces)
                return

    @staticmethod
    def _leave(conn: Connection, pieces: Iterator[bytes]) -> None:
        """A full spool stops a read between its pieces: the rest waits with ``conn``
        (``held_pieces``, taken by ``resume_if_room``) and the transfer is paused."""
        conn.held_pieces, conn.paused = pieces, True
        # libcurl took the read: a pause returned now would hand it over again. Paused from
        # here, libcurl reads no more (nor the body's end); what is left of its read comes to
        # on_data, which answers WRITEFUNC_PAUSE while ``conn.paused``.
        conn.curl.pause(pycurl.PAUSE_RECV)

    @staticmethod
    def _undecodable(conn: Connection, exc: BadEncoding) -> None:
        log.warning("stream_body_undecodable", conn=conn.conn_id, reason=str(exc))
        conn.failure = str(exc)
        conn.abort = Ending.NETWORK

    def _hold(self, conn: Connection, piece: bytes) -> None:
        """Hold a small piece of body until ``settle``; frame a large one as it comes."""
        if len(piece) >= HOLD_BYTES:
            self.settle()  # what came before it, first
            self._frame(conn, piece)
            return
        if self._held_by and self._held_by[-1] is not conn:
            self._mixed = True
        self._held.append(piece)
        self._held_by.append(conn)
        self._held_bytes += len(piece)
        if self._held_bytes >= HOLD_BYTES:
            self.settle()

    def settle(self) -> None:
        """Frame the body bytes held, in the order they came: the reader calls this at the end
        of each pass and before anything it writes to the spool itself (a coverage marker)."""
        if not self._held:
            return
        held, by, mixed = self._held, self._held_by, self._mixed
        self._held, self._held_by, self._mixed, self._held_bytes = [], [], False, 0
        if not mixed:  # the usual case: one connection
            self._frame(by[0], held[0] if len(held) == 1 else b"".join(held))
            return
        for _, run in itertools.groupby(zip(by, held, strict=True), key=_connection_of):
            items = list(run)  # consecutive pieces of one connection: framed at once
            self._frame(items[0][0], b"".join(piece for _, piece in items))

    @staticmethod
    def _keep_error_body(conn: Connection, data: bytes) -> int | None:
        """Keep the first ``ERROR_BODY_CAP`` bytes of an error response, for its log line;
        0 (end the transfer) once they are kept."""
        try:
            for piece in conn.decoded(data):
                room = ERROR_BODY_CAP - len(conn.error_body)
                if room <= 0:
                    break
                conn.error_body += piece[:room]
        except BadEncoding:
            pass  # keep what was readable: the status says enough
        return 0 if len(conn.error_body) >= ERROR_BODY_CAP else None

    def _look_full(self) -> bool:
        """Whether to push back: the sink is full (looked at per ``FULL_CHECK_BYTES`` taken)."""
        self._unchecked = 0
        return self._is_full()

    def resume_if_room(self, conns: Iterable[Connection | None]) -> list[Connection]:
        """A pass begins: resume paused transfers if the sink has room, their held pieces
        first; the pass's first callback looks at the sink again. Returns the connections whose
        held pieces turned out undecodable: the caller ends them (no callback will)."""
        failed: list[Connection] = []
        for conn in conns:
            if conn is not None and conn.paused and (self._drop_when_full or not self._is_full()):
                if conn.held_pieces is not None and not self._take_held(conn, failed):
                    continue  # full again (or failed): still paused
                conn.paused = False
                conn.last_byte_at = self._clock()  # the pause was ours, not the server's stall
                conn.curl.pause(pycurl.PAUSE_CONT)
        self._unchecked = FULL_CHECK_BYTES
        return failed

    def stop_pushing_back(self) -> None:
        """The stop's drain: what TCP holds back would be discarded unread by our close, so a
        full sink no longer pauses a transfer; what it has no room for is counted as dropped
        (``spool_full``), as under ``when_full: drop_newest``, and paused transfers resume."""
        self._drop_when_full = True

    def _take_held(self, conn: Connection, failed: list[Connection]) -> bool:
        """Take the pieces a full spool left with ``conn``; whether all of them were taken."""
        pieces, conn.held_pieces = conn.held_pieces, None
        if pieces is None:
            return True
        self._unchecked, conn.paused = 0, False  # the caller just looked: room
        try:
            self._take(conn, pieces)  # may leave the rest with conn again
        except BadEncoding as exc:
            self._undecodable(conn, exc)
            conn.paused = True  # ended by the caller; until then, libcurl stays paused
            failed.append(conn)
            return False
        return conn.held_pieces is None

    def _frame(self, conn: Connection, data: bytes) -> None:
        size = len(data)
        stats, framer = self._stats, conn.framer
        conn.body_bytes += size
        stats.bytes += size
        keepalives_before = framer.keepalives
        frames = framer.feed(data)
        stats.keepalives += framer.keepalives - keepalives_before
        if frames:  # else part of a message, or keep-alives only
            self._spool(conn, frames)

    def end(self, conn: Connection) -> None:
        """``conn``'s body ends: what is held is framed, and an over-size message or a bad
        length line it cut short goes to the spool as such (dead-lettered with its head and its
        size so far), not counted as a cut."""
        self.settle()
        if conn.status != 200:
            return
        framer = conn.framer
        item: Frame | None = framer.cut_oversize()
        if item is None and isinstance(framer, LengthFramer):
            item = framer.cut_bad_line()
        if item is not None:
            self._spool(conn, [item])

    def _spool(self, conn: Connection, frames: list[Frame]) -> None:
        stats, framer = self._stats, conn.framer
        items: list[tuple[int, bytes]] = []
        append = items.append
        for item in frames:
            if isinstance(item, bytes):
                append((KIND_MESSAGE, item))
                if item.startswith(WATCHED_PREFIXES):
                    watch(conn, item, stats)
            elif isinstance(item, Oversize):
                stats.oversize += 1  # its real size travels with it, for the dead letter
                append((KIND_OVERSIZE_SIZED, oversize_payload(item.size, framer.max_message_bytes,
                                                              item.head)))
            elif isinstance(item, BadFrame):
                stats.bad_frames += 1  # its size and the framer's reason travel with it too
                append((KIND_BADFRAME_SIZED, badframe_payload(item.size, item.reason, item.head)))
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


def _connection_of(item: tuple[Connection, bytes]) -> int:
    return id(item[0])


def watch(conn: Connection, payload: bytes, stats: ReaderStats) -> None:
    """Log and count the control messages that describe the connection's health."""
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return  # the store worker dead-letters it
    if not isinstance(msg, dict):
        return
    if isinstance(body := msg.get("disconnect"), dict):
        # Only its scalars are kept: what the reader logs, counts and describes it by.
        code, reason = shown(body.get("code")), shown(body.get("reason", ""))
        conn.disconnect = {"code": code, "reason": reason}
        if conn.switched_out:  # the endpoint ends the old connection of our filter switch
            log.info("stream_disconnect", conn=conn.conn_id, code=code, reason=reason,
                     planned="filter switch")
            return
        codes = stats.disconnect_codes
        codes[code_key(codes, str(code))] += 1
        log.warning("stream_disconnect", conn=conn.conn_id, code=code, reason=reason)
    elif isinstance(body := msg.get("warning"), dict):
        stats.warnings += 1
        log.warning("stream_warning", conn=conn.conn_id, code=shown(body.get("code")),
                    percent_full=shown(body.get("percent_full")))
    elif isinstance(body := msg.get("limit"), dict) and type(track := body.get("track")) is int \
            and 0 <= track <= LIMIT_TRACK_MAX:  # else not counted here, dead-lettered by W
        # `track` is cumulative per connection: add only the increase.
        increase = max(track - conn.limit_track, 0)
        conn.limit_track = max(conn.limit_track, track)
        stats.limit_missed += increase
        # Folded per connection (logging.error_interval): a limited stream sends one every few
        # seconds, and the count is cumulative, so the line that is printed says it all.
        log.info("stream_limit", conn=conn.conn_id, undelivered=track,
                 rate_key=f"conn {conn.conn_id}")
    elif isinstance(errors := msg.get("errors"), list):
        _watch_v2_errors(conn, errors, stats)


def shown(value: object) -> str | int | float | bool | None:
    """A control message's field as the reader logs, counts and describes it: a scalar as sent
    (a string cut to ``SHOWN_CHARS``), anything else by its type only. The server's JSON may
    nest ~1000 deep, past what ``str()`` (RecursionError) or a log line can render."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:SHOWN_CHARS]
    return f"<{type(value).__name__}>"


def _watch_v2_errors(conn: Connection, errors: list[Any], stats: ReaderStats) -> None:
    """v2 in-stream errors; an operational-disconnect ends the connection like a disconnect."""
    for err in (e for e in errors if isinstance(e, dict)):
        title, detail = str(shown(err.get("title", ""))), str(shown(err.get("detail", "")))
        if title == V2_OPERATIONAL_DISCONNECT:
            conn.disconnect = {"code": title, "reason": detail}
            stats.disconnect_codes[code_key(stats.disconnect_codes, title)] += 1
        log.warning("stream_error", conn=conn.conn_id, title=title, detail=detail,
                    disconnect_type=shown(err.get("disconnect_type")))
