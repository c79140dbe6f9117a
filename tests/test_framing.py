"""Framers: any slicing of the body gives the same frames; memory and work stay bounded."""

from __future__ import annotations

import itertools
import random
import time

import pycurl
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.config.schema import StreamSettings
from ingestd.documents.labels import CODES_MAX, OTHER_CODE
from ingestd.source.backoff import Ending
from ingestd.source.body import BodyIntake, watch
from ingestd.source.connection import Connection
from ingestd.source.framing import (
    BAD_HEAD_BYTES,
    HEAD_BYTES,
    MAX_LENGTH_LINE,
    NOT_A_NUMBER,
    TOO_LONG,
    TOO_LONG_CUT,
    BadFrame,
    Frame,
    LengthFramer,
    LineFramer,
    Oversize,
)
from ingestd.source.stats import ReaderStats
from ingestd.spool.format import (
    KIND_BADFRAME_SIZED,
    KIND_MESSAGE,
    KIND_OVERSIZE_SIZED,
    BadFrameRecord,
    read_badframe,
)

# Text with multi-byte characters, \n, \r and control bytes, but never a CRLF inside a message.
_text = (
    st.text(alphabet=st.sampled_from('ab{}":,\n\r\\ é€😀中\x00'), min_size=1, max_size=120)
    .map(lambda t: t.encode())
    .filter(lambda b: b"\r\n" not in b and not b.endswith(b"\r"))
)
# None stands for a keep-alive blank line.
_items = st.lists(st.one_of(_text, st.none()), max_size=25)


def chunked(wire: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``wire`` at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    return [wire[a:b] for a, b in itertools.pairwise(points)]


def feed_all(framer: LineFramer | LengthFramer, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out


def line_wire(items: list[bytes | None]) -> bytes:
    return b"".join((item or b"") + b"\r\n" for item in items)


def expected_line_frames(items: list[bytes | None], max_bytes: int) -> list[Frame]:
    return [
        item if len(item) <= max_bytes else Oversize(len(item), item[:HEAD_BYTES])
        for item in items
        if item is not None
    ]


@settings(max_examples=300)
@given(
    items=_items,
    cuts=st.lists(st.integers(0, 10_000), max_size=40),
    max_bytes=st.sampled_from([1, 30, 10**6]),
)
def test_line_framer_any_chunking(
    items: list[bytes | None], cuts: list[int], max_bytes: int
) -> None:
    framer = LineFramer(max_bytes)
    out = feed_all(framer, chunked(line_wire(items), cuts))
    assert out == expected_line_frames(items, max_bytes)
    assert framer.keepalives == items.count(None)
    assert framer.pending_bytes == 0


@settings(max_examples=50)
@given(items=_items)
def test_line_framer_one_byte_chunks(items: list[bytes | None]) -> None:
    wire = line_wire(items)
    framer = LineFramer(10**6)
    out = feed_all(framer, [wire[i : i + 1] for i in range(len(wire))])
    assert out == expected_line_frames(items, 10**6)
    assert framer.keepalives == items.count(None)


def test_line_framer_several_messages_in_one_chunk() -> None:
    """The seed tutorial read one message per chunk and lost the rest."""
    framer = LineFramer(1000)
    out = framer.feed(b'{"id":1}\r\n{"id":2}\r\n\r\n{"id":3}\r\n{"id":')
    assert out == [b'{"id":1}', b'{"id":2}', b'{"id":3}']
    assert framer.keepalives == 1
    assert framer.pending_bytes == len(b'{"id":')
    assert framer.feed(b"4}\r\n") == [b'{"id":4}']


def test_line_framer_never_splits_on_bare_newline() -> None:
    framer = LineFramer(1000)
    assert framer.feed(b'{"t":"a\nb"}\n{"u":1}\r') == []
    assert framer.feed(b"\n") == [b'{"t":"a\nb"}\n{"u":1}']


def test_line_framer_split_inside_utf8_and_crlf() -> None:
    message = "naïve 😀 tweet".encode()
    wire = message + b"\r\n"
    cut = message.index("😀".encode()) + 2  # inside the 4-byte character
    framer = LineFramer(1000)
    assert framer.feed(wire[:cut]) == []
    assert framer.feed(wire[cut:-1]) == []  # ends with the \r of the CRLF
    assert framer.pending_bytes == len(message) + 1
    assert framer.feed(wire[-1:]) == [message]


def test_line_framer_oversize_bounded_memory() -> None:
    """A 5 MB line in random slices is skipped while holding at most max + 1 bytes."""
    max_bytes = 64 * 1024
    rng = random.Random(7)
    line = bytes(rng.getrandbits(8) for _ in range(4096)).replace(b"\r", b"r") * 1280
    wire = b"before\r\n" + line + b"\r\nafter\r\n"
    framer = LineFramer(max_bytes)
    out: list[Frame] = []
    pos = 0
    while pos < len(wire):
        step = rng.randint(1, 300_000)
        out.extend(framer.feed(wire[pos : pos + step]))
        pos += step
        assert framer.buffered_bytes <= max_bytes + 1
    assert out == [b"before", Oversize(len(line), line[:HEAD_BYTES]), b"after"]
    assert framer.skipped_bytes == len(line)


def test_line_framer_oversize_message_ending_in_cr_split() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"0123456789\r") == []
    assert framer.pending_bytes == 11
    assert framer.feed(b"\nok\r\n") == [Oversize(10, b"0123456789"), b"ok"]


def test_line_framer_exact_max_is_accepted() -> None:
    framer = LineFramer(5)
    assert framer.feed(b"12345\r") == []
    assert framer.feed(b"\n123456\r\n") == [b"12345", Oversize(6, b"123456")]


class _NoScanBuffer(bytearray):
    """A message buffer that fails the test if the framer searches it."""

    def _fail(self, *args: object) -> None:
        raise AssertionError("the held buffer was rescanned")

    find = rfind = index = split = count = __contains__ = _fail  # type: ignore[assignment]


def test_line_framer_linear_in_one_byte_chunks() -> None:
    """A message fed a byte at a time is searched once: work counted, buffer never rescanned."""
    size = 200_000
    framer = LineFramer(size)
    framer._buf = _NoScanBuffer()
    wire = b"x" * size + b"\r\n"
    out: list[Frame] = []
    for i in range(len(wire)):
        out.extend(framer.feed(wire[i : i + 1]))
    assert out == [b"x" * size]
    assert framer.scanned_bytes == len(wire)


def test_line_framer_reset_drops_partial() -> None:
    framer = LineFramer(100)
    framer.feed(b"partial")
    framer.reset()
    assert framer.pending_bytes == 0
    assert framer.feed(b"next\r\n") == [b"next"]


# --- LengthFramer -------------------------------------------------------------------------------

_payloads = st.lists(
    st.tuples(
        st.binary(min_size=1, max_size=150),  # any bytes, CRLF included
        st.integers(0, 2),  # keep-alives before the length line
        st.booleans(),  # "\n" instead of "\r\n" after the length
    ),
    max_size=20,
)


def length_wire(frames: list[tuple[bytes, int, bool]]) -> bytes:
    out = bytearray()
    for payload, keepalives, bare_lf in frames:
        out += b"\r\n" * keepalives
        out += str(len(payload) + 2).encode() + (b"\n" if bare_lf else b"\r\n")
        out += payload + b"\r\n"
    return bytes(out)


@settings(max_examples=300)
@given(
    frames=_payloads,
    cuts=st.lists(st.integers(0, 10_000), max_size=40),
    max_bytes=st.sampled_from([1, 40, 10**6]),
)
def test_length_framer_any_chunking(
    frames: list[tuple[bytes, int, bool]], cuts: list[int], max_bytes: int
) -> None:
    framer = LengthFramer(max_bytes)
    out = feed_all(framer, chunked(length_wire(frames), cuts))
    expected: list[Frame] = [
        p if len(p) <= max_bytes else Oversize(len(p) + 2, (p + b"\r\n")[:HEAD_BYTES])
        for p, _, _ in frames
    ]
    assert out == expected
    assert framer.keepalives == sum(k for _, k, _ in frames)
    assert framer.pending_bytes == 0
    assert framer.length_mismatches == 0


@settings(max_examples=50)
@given(frames=_payloads)
def test_length_framer_one_byte_chunks(frames: list[tuple[bytes, int, bool]]) -> None:
    wire = length_wire(frames)
    framer = LengthFramer(10**6)
    out = feed_all(framer, [wire[i : i + 1] for i in range(len(wire))])
    assert out == [p for p, _, _ in frames]


def test_length_framer_bad_line_resynchronises() -> None:
    framer = LengthFramer(1000)
    good = b"7\r\nhello\r\n"
    out = framer.feed(b"abc\r\n" + good + b"-5\r\n" + good)
    assert out == [
        BadFrame(NOT_A_NUMBER, 5, b"abc\r\n"),  # the whole line, its line end included
        b"hello",
        BadFrame(NOT_A_NUMBER, 4, b"-5\r\n"),
        b"hello",
    ]
    assert framer.skipped_bytes == len(b"abc\r\n-5\r\n")


def test_length_framer_long_garbage_line_bounded() -> None:
    """A JSON line where a length was expected: one BadFrame, bounded memory, then recovery.
    Only the line's head is held while it is skipped; it is reported at its end, with its size."""
    framer = LengthFramer(1000)
    garbage = b'{"text":"' + b"y" * 2_000_000 + b'"}\r\n'
    out: list[Frame] = []
    for i in range(0, len(garbage), 4096):
        out.extend(framer.feed(garbage[i : i + 4096]))
        assert framer.buffered_bytes <= BAD_HEAD_BYTES
    out.extend(framer.feed(b"4\r\nok\r\n"))
    assert out == [BadFrame(TOO_LONG, len(garbage), garbage[:BAD_HEAD_BYTES]), b"ok"]
    assert framer.skipped_bytes == len(garbage)


def test_length_framer_too_many_digits_is_bad() -> None:
    framer = LengthFramer(1000)
    digits = b"9" * (MAX_LENGTH_LINE + 1)
    out = framer.feed(digits + b"\n4\r\nok\r\n")
    assert out == [BadFrame(NOT_A_NUMBER, len(digits) + 1, digits + b"\n"), b"ok"]


# ---------------------------------------------------------------- a bad length line's real size
# (the input audit's L3: reported at once with a head of the slice it was found in, so it was
# dead-lettered as 1 KiB, complete, whatever its size)


def test_a_long_bad_length_line_is_reported_once_at_its_end_with_its_size() -> None:
    """A line of a million digits: reported when its line end comes, every byte of it counted
    across the slices, only its head held meanwhile; the frames around it come out in order."""
    bad = b"9" * 1_000_000 + b"\r\n"
    before = b"8\r\nbefore\r\n"
    wire = before + bad + b"4\r\nok\r\n7\r\nafter\r\n"
    framer = LengthFramer(1000)
    out: list[Frame] = []
    rng = random.Random(7)
    pos = 0
    while pos < len(wire):
        step = rng.randint(1, 70_000)
        out.extend(framer.feed(wire[pos : pos + step]))
        pos += step
        assert framer.buffered_bytes <= BAD_HEAD_BYTES
        if pos < len(before) + len(bad):  # its line end not fed yet: nothing said of it
            assert out in ([], [b"before"])
    assert out == [b"before", BadFrame(TOO_LONG, len(bad), bad[:BAD_HEAD_BYTES]), b"ok",
                   b"after"]
    assert framer.skipped_bytes == len(bad)
    assert framer.pending_bytes == 0 and framer.cut_bad_line() is None


def test_a_bad_length_line_fed_one_byte_at_a_time() -> None:
    """Its head is its first BAD_HEAD_BYTES whatever the slicing, not what one slice held (a
    byte at a time gave 14 bytes), and its size is every byte; the next lines frame as usual."""
    bad = b'{"text":"' + b"y" * 3000 + b'"}\r\n'
    wire = b"5\r\nabc\r\n" + bad + b"-1\r\n4\r\nok\r\n"
    framer = LengthFramer(1000)
    out: list[Frame] = []
    for i in range(len(wire)):
        out.extend(framer.feed(wire[i : i + 1]))
        assert framer.buffered_bytes <= BAD_HEAD_BYTES
    assert out == [b"abc", BadFrame(TOO_LONG, len(bad), bad[:BAD_HEAD_BYTES]),
                   BadFrame(NOT_A_NUMBER, 4, b"-1\r\n"), b"ok"]
    assert framer.skipped_bytes == len(bad) + 4


@settings(max_examples=200)
@given(
    length=st.integers(MAX_LENGTH_LINE + 2, 3 * BAD_HEAD_BYTES),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_a_bad_length_line_any_chunking(length: int, crlf: bool, cuts: list[int]) -> None:
    bad = b"x" * length + (b"\r\n" if crlf else b"\n")
    wire = b"5\r\nabc\r\n" + bad + b"4\r\nok\r\n"
    framer = LengthFramer(1000)
    assert feed_all(framer, chunked(wire, cuts)) == [
        b"abc", BadFrame(TOO_LONG, len(bad), bad[:BAD_HEAD_BYTES]), b"ok"]
    assert framer.skipped_bytes == len(bad) and framer.pending_bytes == 0


def test_a_body_ending_inside_a_bad_length_line_reports_it_with_its_size_so_far() -> None:
    framer = LengthFramer(1024)
    assert framer.feed(b"4\r\nok\r\n" + b"x" * 3000) == [b"ok"]
    assert framer.feed(b"x" * 2000) == []
    assert framer.cut_oversize() is None  # no over-size message: a bad line
    assert framer.cut_bad_line() == BadFrame(TOO_LONG_CUT, 5000, b"x" * BAD_HEAD_BYTES)
    assert framer.skipped_bytes == 5000
    assert framer.pending_bytes == 0 and framer.cut_bad_line() is None  # reset: reported once
    assert framer.feed(b"4\r\nok\r\n") == [b"ok"]  # the next body frames from its start
    # a length line not known bad yet is a partial frame (a cut), not a bad one
    assert framer.feed(b"12") == [] and framer.cut_bad_line() is None
    assert framer.pending_bytes == 2


def test_length_framer_oversize_skips_without_buffering() -> None:
    max_bytes = 10_000
    payload = bytes(range(256)) * 20_000  # ~5 MB
    wire = str(len(payload) + 2).encode() + b"\r\n" + payload + b"\r\n4\r\nok\r\n"
    framer = LengthFramer(max_bytes)
    rng = random.Random(3)
    out: list[Frame] = []
    pos = 0
    while pos < len(wire):
        step = rng.randint(1, 200_000)
        out.extend(framer.feed(wire[pos : pos + step]))
        pos += step
        assert framer.buffered_bytes <= max_bytes + 2 + HEAD_BYTES + MAX_LENGTH_LINE + 1
    assert out == [Oversize(len(payload) + 2, payload[:HEAD_BYTES]), b"ok"]


def test_length_framer_pending_and_mismatch() -> None:
    framer = LengthFramer(1000)
    assert framer.feed(b"12\r\nhalf") == []
    assert framer.pending_bytes == 4 + 4
    framer.reset()
    assert framer.pending_bytes == 0
    # A miscounted length: the payload is kept (not lost) and the mismatch counted.
    assert framer.feed(b"3\r\nabc") == [b"abc"]
    assert framer.length_mismatches == 1


def test_length_framer_empty_frames_are_keepalives() -> None:
    framer = LengthFramer(1000)
    assert framer.feed(b"\r\n\n0\r\n2\r\n\r\n") == []
    assert framer.keepalives == 4


# ---------------------------------------------------------------- a body ending inside an
# over-size message (the input audit: counted as a routine cut, not as over-size)


def test_a_body_ending_inside_an_over_size_message_reports_it_as_over_size() -> None:
    line = LineFramer(1024)
    assert line.feed(b'{"id":1}\r\n' + b"x" * 3000) == [b'{"id":1}']
    assert line.cut_oversize() == Oversize(3000, b"x" * 3000)  # its head: all of it here
    assert line.pending_bytes == 0 and line.cut_oversize() is None  # reset: nothing left to cut
    assert line.feed(b'{"id":2}\r\n') == [b'{"id":2}']
    # a partial message under the limit is no over-size message: it stays a cut
    assert line.feed(b'{"id":3') == [] and line.cut_oversize() is None
    assert line.pending_bytes == 7
    # length framing: the length line already said how large (the audit: a 2,000,000 length
    # swallowed the next messages and the loss was reported as one routine cut)
    length = LengthFramer(1024)
    assert length.feed(b"2000000\r\n" + b"y" * 500) == []
    assert length.cut_oversize() == Oversize(2_000_000, b"y" * 500)
    assert length.skipped_bytes == 500 and length.pending_bytes == 0
    assert length.feed(b"4\r\nok\r\n") == [b"ok"] and length.cut_oversize() is None


def intake_on(framer: LengthFramer | LineFramer
              ) -> tuple[BodyIntake, Connection, ReaderStats, list[tuple[int, bytes]]]:
    """A body intake spooling into a list, and a connection answered 200 that frames with
    ``framer``."""
    spooled: list[tuple[int, bytes]] = []
    stats = ReaderStats()
    intake = BodyIntake(lambda items, conn_id, generation, now_ns: spooled.extend(items),
                        stats, is_full=lambda: False, drop_when_full=False,
                        clock=time.monotonic)
    stream = StreamSettings(url="https://stream.twitter.com/1.1/statuses/filter.json",
                            track=("a",))
    conn = Connection(1, 0, stream, pycurl.Curl(), framer, 0.0, 0.0, status=200)
    return intake, conn, stats, spooled


def test_the_intake_spools_a_cut_over_size_message_as_over_size_not_as_a_cut() -> None:
    intake, conn, stats, spooled = intake_on(LengthFramer(1024))
    assert intake.on_data(conn, b"9\r\n{\"id\":1}\r\n99999\r\n" + b"z" * 2000) is None
    intake.end(conn)  # the connection closes inside the over-size payload
    conn.close(Ending.NETWORK)
    assert [kind for kind, _ in spooled] == [KIND_MESSAGE, KIND_OVERSIZE_SIZED]
    assert conn.cut_bytes == 0 and conn.cut_fields() == {}  # not a cut
    assert stats.oversize == 1 and stats.received == 2


def test_a_limit_count_no_stream_can_have_is_not_added_to_the_missed_count() -> None:
    # The re-audit: 2^64-1 in a limit notice reached the stream worker's status file, which
    # cannot hold it (the worker crashed writing it); the store worker dead-letters the notice.
    intake, conn, stats, _ = intake_on(LineFramer(1 << 20))
    for count in (7, 18446744073709551615, 9007199254740992, -3, 12):
        intake.on_data(conn, b'{"limit":{"track":%d}}\r\n' % count)
        intake.settle()
    assert stats.limit_missed == 12 and conn.limit_track == 12


def test_the_intake_spools_bad_length_lines_with_their_size_and_reason() -> None:
    """Each bad length line is spooled once, in stream order, with the size the framer counted
    and its reason; one the body's end cuts is spooled too (not counted as a routine cut)."""
    intake, conn, stats, spooled = intake_on(LengthFramer(1024))
    long_line = b"1" * 1_000_000 + b"\r\n"
    body = (b'9\r\n{"id":1}\r\n' + long_line + b'abc\r\n9\r\n{"id":2}\r\n'
            + b"2" * 5000)
    assert intake.on_data(conn, body) is None
    intake.end(conn)  # the connection closes inside the second long line
    conn.close(Ending.NETWORK)
    assert [kind for kind, _ in spooled] == [KIND_MESSAGE, KIND_BADFRAME_SIZED,
                                             KIND_BADFRAME_SIZED, KIND_MESSAGE,
                                             KIND_BADFRAME_SIZED]
    assert [read_badframe(kind, payload) for kind, payload in spooled
            if kind == KIND_BADFRAME_SIZED] == [
        BadFrameRecord(len(long_line), TOO_LONG, long_line[:BAD_HEAD_BYTES]),
        BadFrameRecord(5, NOT_A_NUMBER, b"abc\r\n"),
        BadFrameRecord(5000, TOO_LONG_CUT, b"2" * BAD_HEAD_BYTES),
    ]
    assert stats.bad_frames == 3 and conn.cut_bytes == 0


def test_distinct_disconnect_codes_beyond_the_cap_are_counted_as_other() -> None:
    """A server sending ever new codes must not grow the status file without bound."""
    _, conn, stats, _ = intake_on(LineFramer(1024))
    codes = [*range(CODES_MAX + 20), 5]
    for code in codes:
        watch(conn, b'{"disconnect":{"code":%d,"reason":"r"}}' % code, stats)
    counts = stats.disconnect_codes
    assert len(counts) == CODES_MAX + 1 and counts[OTHER_CODE] == 20
    assert counts["5"] == 2 and sum(counts.values()) == len(codes)
