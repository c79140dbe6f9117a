"""Incremental framers for the decoded stream body (docs/protocol.md §2.1–2.2).

libcurl hands the WRITEFUNCTION arbitrary slices of the body: a slice may hold several messages,
part of one, or end inside a ``\\r\\n`` or a multi-byte UTF-8 character. The framers work on bytes
only (never decode), cost O(n) whatever the slicing, and never hold more than about
``max_message_bytes`` of one message: an over-size message is skipped up to its end and reported
once as :class:`Oversize`, and a bad length line likewise as :class:`BadFrame`, so memory stays
bounded whatever the input.

    framer = LineFramer(max_message_bytes=500_000)
    for item in framer.feed(chunk):
        ...  # bytes (one message, without its \\r\\n), Oversize or BadFrame
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

HEAD_BYTES = 64 * 1024
"""How many leading bytes of an over-size message are kept for the dead-letter store (its cap on
raw bytes, ``sink.deadletter.RAW_CAP``)."""

BAD_HEAD_BYTES = 1024
"""How many leading bytes of a bad length line are kept (its line end too, if within them)."""

MAX_LENGTH_LINE = 12
"""Longest accepted ``delimited=length`` line (digits, before the line ending)."""

# The reasons of a BadFrame (the dead letter's detail quotes them).
NOT_A_NUMBER = "length line is not a number"
TOO_LONG = "length line too long"
TOO_LONG_CUT = "length line too long, cut by the body's end"

CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class Oversize:
    """A message longer than ``max_message_bytes``: skipped, never buffered whole.

    ``size`` is the message's length without its ``\\r\\n`` (LineFramer) or the declared length,
    which includes it (LengthFramer); ``head`` its first ``HEAD_BYTES`` bytes.
    """

    size: int
    head: bytes


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A ``delimited=length`` line that is not a length; the framer resynchronised after it.

    ``size`` is the line's length as skipped: through its ``\\n``, or up to the body's end (a
    body that ended inside it); ``head`` its first ``BAD_HEAD_BYTES`` bytes.
    """

    reason: str
    size: int
    head: bytes


Frame = bytes | Oversize | BadFrame


class LineFramer:
    """Splits a ``\\r\\n``-delimited body into messages; blank lines are keep-alives.

    Only the newly fed bytes (plus one byte back, for a ``\\r\\n`` split across slices) are ever
    searched, so a message arriving one byte at a time still costs O(n).
    """

    def __init__(self, max_message_bytes: int) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")
        self.max_message_bytes = max_message_bytes
        self.keepalives = 0
        self.skipped_bytes = 0  # bytes of over-size messages thrown away
        self.scanned_bytes = 0  # bytes searched for CRLF: an operation count, O(n) by design
        self._buf = bytearray()  # start of the current message (at most max + 1 bytes)
        self._skipping = False  # inside an over-size message
        self._skip_size = 0
        self._skip_head = bytearray()  # grown in place: a byte-at-a-time feed stays O(n)
        self._cr = False  # the last byte seen of the current message is b"\r"

    @property
    def pending_bytes(self) -> int:
        """Bytes of the current, incomplete message (held, or being skipped)."""
        return self._skip_size if self._skipping else len(self._buf)

    @property
    def buffered_bytes(self) -> int:
        """Bytes actually held in memory for the current message."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget any incomplete message; counters are kept."""
        self._buf.clear()
        if self._skipping:  # the skip fields are set only while skipping
            self._skipping = False
            self._skip_size = 0
            self._skip_head = bytearray()
        self._cr = False

    def cut_oversize(self) -> Oversize | None:
        """The body ended inside an over-size message: that message (its size so far), to be
        reported as over-size rather than as a cut; None if none was being skipped."""
        if not self._skipping:
            return None
        size = self._skip_size
        self.skipped_bytes += size
        item = Oversize(size, bytes(self._skip_head[:size]))
        self.reset()
        return item

    def feed(self, data: bytes) -> list[Frame]:
        """Consume one slice of the body; return the frames it completed, in order.

        Searches for ``\\n`` (``bytes.find`` of one byte is a ``memchr``; ``split(b"\\r\\n")``
        scans about three times slower) and takes it as a terminator only after a ``\\r``.
        """
        out: list[Frame] = []
        if not data:
            return out
        self.scanned_bytes += len(data)
        cut = 0  # start of the current message in data
        if self._cr and data[0] == 0x0A:  # the CRLF was split across two slices
            self._finish(out, -1)
            cut = 1
        held = self._skipping or bool(self._buf)  # the current message began in an earlier slice
        find, max_bytes = data.find, self.max_message_bytes
        nl = find(b"\n", cut)
        while nl >= 0:
            # A \n right at ``cut`` follows the previous terminator (or a held byte that is not
            # \r): it is part of the message, like any \n not preceded by \r.
            if nl > cut and data[nl - 1] == 0x0D:
                if held:
                    self._extend(data[cut : nl - 1])
                    self._finish(out, 0)
                    held = False
                elif 0 < nl - 1 - cut <= max_bytes:
                    out.append(data[cut : nl - 1])  # the usual case: a whole message in the slice
                else:
                    self._emit(out, data[cut : nl - 1])
                cut = nl + 1
            nl = find(b"\n", nl + 1)
        self._extend(data[cut:])
        return out

    def _emit(self, out: list[Frame], message: bytes) -> None:
        if not message:
            self.keepalives += 1
        elif len(message) > self.max_message_bytes:
            self.skipped_bytes += len(message)
            out.append(Oversize(len(message), message[:HEAD_BYTES]))
        else:
            out.append(message)

    def _finish(self, out: list[Frame], trim: int) -> None:
        """End the current message; ``trim`` = -1 drops the held ``\\r`` of a split CRLF."""
        if self._skipping:
            size = self._skip_size + trim
            self.skipped_bytes += size
            out.append(Oversize(size, bytes(self._skip_head[:size])))
        else:
            end = len(self._buf) + trim
            self._emit(out, bytes(self._buf[:end]))
        self.reset()

    def _extend(self, data: bytes) -> None:
        """Add bytes with no CRLF to the current message, switching to skip mode past the max."""
        if not data:
            return
        self._cr = data[-1] == 0x0D
        if self._skipping:
            if len(self._skip_head) < HEAD_BYTES:
                self._skip_head += data[: HEAD_BYTES - len(self._skip_head)]
            self._skip_size += len(data)
            return
        size = len(self._buf) + len(data)
        # A trailing \r may be the first half of the terminator: it does not count yet.
        if size - self._cr <= self.max_message_bytes:
            self._buf += data
            return
        held = len(self._buf)
        head = self._buf[:HEAD_BYTES] + data[: max(0, HEAD_BYTES - held)]
        cr = self._cr
        self.reset()
        self._skipping, self._skip_size, self._skip_head, self._cr = True, size, head, cr


class _LenState(Enum):
    LINE = auto()  # reading a length line (or keep-alive blank lines)
    PAYLOAD = auto()  # buffering the N bytes of a message
    SKIP = auto()  # skipping the N bytes of an over-size message
    DISCARD = auto()  # skipping the rest of a bad length line


class LengthFramer:
    """Frames ``delimited=length`` bodies: ``<N>\\r\\n`` then N bytes ending with ``\\r\\n``.

    A bad length line yields one :class:`BadFrame`, with its size, once its end is found (one
    too long for a length is skipped to there, only its head kept); the framer resynchronises at
    the next line. A payload that does not end with ``\\r\\n`` (a miscounted length) is still
    returned whole, so nothing is lost, and counted in ``length_mismatches``.
    """

    def __init__(self, max_message_bytes: int) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")
        self.max_message_bytes = max_message_bytes
        self.keepalives = 0
        self.skipped_bytes = 0  # bytes of over-size payloads and bad lines thrown away
        self.length_mismatches = 0
        self._state = _LenState.LINE
        self._line = bytearray()  # partial length line (bounded by MAX_LENGTH_LINE + 1)
        self._buf = bytearray()  # partial payload
        self._need = 0  # declared payload length
        self._left = 0  # SKIP: payload bytes still to skip
        self._head = bytearray()  # SKIP: first HEAD_BYTES of the payload; DISCARD: of the line
        self._bad_size = 0  # DISCARD: bytes of the bad line so far
        self._frame_bytes = 0  # bytes of the current frame's length line

    @property
    def pending_bytes(self) -> int:
        """Bytes of the current, incomplete frame (its length line included)."""
        if self._state is _LenState.PAYLOAD:
            return self._frame_bytes + len(self._buf)
        if self._state is _LenState.SKIP:
            return self._frame_bytes + self._need - self._left
        return len(self._line.strip())

    @property
    def buffered_bytes(self) -> int:
        """Bytes actually held in memory for the current frame."""
        return len(self._line) + len(self._buf) + len(self._head)

    def reset(self) -> None:
        """Forget any incomplete frame; counters are kept."""
        self._state = _LenState.LINE
        self._line.clear()
        self._buf.clear()
        self._head.clear()
        self._need = self._left = self._frame_bytes = self._bad_size = 0

    def cut_oversize(self) -> Oversize | None:
        """The body ended inside an over-size payload: it (its declared size), to be reported as
        over-size rather than as a cut, as its length line already said; None if none was."""
        if self._state is not _LenState.SKIP:
            return None
        self.skipped_bytes += self._need - self._left
        item = Oversize(self._need, bytes(self._head))
        self.reset()
        return item

    def cut_bad_line(self) -> BadFrame | None:
        """The body ended inside a length line found too long: it (its size so far), to be
        reported as a bad frame rather than lost; None if none was being skipped."""
        if self._state is not _LenState.DISCARD:
            return None
        item = BadFrame(TOO_LONG_CUT, self._bad_size, bytes(self._head))
        self.reset()
        return item

    def feed(self, data: bytes) -> list[Frame]:
        """Consume one slice of the body; return the frames it completed, in order."""
        out: list[Frame] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._state is _LenState.LINE:
                pos = self._feed_line(data, pos, out)
            elif self._state is _LenState.PAYLOAD:
                pos = self._feed_payload(data, pos, out)
            elif self._state is _LenState.SKIP:
                pos = self._feed_skip(data, pos, out)
            else:
                pos = self._feed_discard(data, pos, out)
        return out

    def _feed_line(self, data: bytes, pos: int, out: list[Frame]) -> int:
        # Search no further than a valid line could reach, so garbage costs O(line limit).
        room = MAX_LENGTH_LINE + 1 - len(self._line)  # +1 for an optional \r
        nl = data.find(b"\n", pos, pos + room + 1)
        if nl < 0:
            if len(data) - pos <= room:
                self._line += data[pos:]
                return len(data)
            # Too long for a length: skipped to its end, which reports it (``_feed_discard``).
            self._state, self._bad_size = _LenState.DISCARD, len(self._line)
            self._head += self._line
            self.skipped_bytes += len(self._line)
            self._line.clear()
            return pos
        line = bytes(self._line) + data[pos:nl]
        self._line.clear()
        self._on_line(line, out)
        return nl + 1

    def _on_line(self, line: bytes, out: list[Frame]) -> None:
        digits = line[:-1] if line.endswith(b"\r") else line
        if not digits:
            self.keepalives += 1
        elif not digits.isdigit() or len(digits) > MAX_LENGTH_LINE:
            whole = line + b"\n"  # at most MAX_LENGTH_LINE + 2 bytes: the search's bound
            self.skipped_bytes += len(whole)
            out.append(BadFrame(NOT_A_NUMBER, len(whole), whole))
        else:
            self._start_payload(int(digits), len(line) + 1)

    def _start_payload(self, size: int, line_bytes: int) -> None:
        if size == 0:  # an empty frame carries nothing: treat it like a blank line
            self.keepalives += 1
            return
        self._need, self._frame_bytes = size, line_bytes
        if size - len(CRLF) > self.max_message_bytes:
            self._state, self._left = _LenState.SKIP, size
        else:
            self._state = _LenState.PAYLOAD

    def _feed_payload(self, data: bytes, pos: int, out: list[Frame]) -> int:
        want = self._need - len(self._buf)
        if not self._buf and len(data) - pos >= want:  # fast path: whole payload in this slice
            self._emit(data[pos : pos + want], out)
            return pos + want
        take = data[pos : pos + want]
        self._buf += take
        if len(self._buf) == self._need:
            self._emit(bytes(self._buf), out)
        return pos + len(take)

    def _emit(self, payload: bytes, out: list[Frame]) -> None:
        if payload.endswith(CRLF):
            payload = payload[:-2]
        elif payload:
            self.length_mismatches += 1
        if payload:
            out.append(payload)
        else:
            self.keepalives += 1
        self.reset()

    def _feed_skip(self, data: bytes, pos: int, out: list[Frame]) -> int:
        take = min(self._left, len(data) - pos)
        if len(self._head) < HEAD_BYTES:
            self._head += data[pos : pos + min(take, HEAD_BYTES - len(self._head))]
        self._left -= take
        if self._left == 0:
            self.skipped_bytes += self._need
            out.append(Oversize(self._need, bytes(self._head)))
            self.reset()
        return pos + take

    def _feed_discard(self, data: bytes, pos: int, out: list[Frame]) -> int:
        nl = data.find(b"\n", pos)
        stop = len(data) if nl < 0 else nl + 1
        room = BAD_HEAD_BYTES - len(self._head)
        if room > 0:
            self._head += data[pos : min(stop, pos + room)]
        self.skipped_bytes += stop - pos
        self._bad_size += stop - pos
        if nl >= 0:
            out.append(BadFrame(TOO_LONG, self._bad_size, bytes(self._head)))
            self.reset()
        return stop
