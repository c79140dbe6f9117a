"""source.inflate: a compressed body inflated by us (zlib-ng), as servers send it."""

from __future__ import annotations

import itertools
import random
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pycurl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.config.schema import StreamSettings
from ingestd.source import inflate
from ingestd.source.backoff import Ending
from ingestd.source.body import ERROR_BODY_CAP, FULL_CHECK_BYTES, HOLD_BYTES, BodyIntake
from ingestd.source.connection import Connection
from ingestd.source.framing import LineFramer
from ingestd.source.inflate import (
    PIECE_BYTES,
    STEP_BYTES,
    BadEncoding,
    Inflater,
    body_decoder,
)
from ingestd.source.stats import ReaderStats

DATA = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"
TWEETS = [line + b"\r\n" for line in DATA.read_bytes().splitlines() if line.strip()]
# After a sync flush, bytes no deflate stream can go on with: 0xde starts a block of the reserved
# type 3 (the audit's), as 0xff does (the simulator's corrupt_gzip step).
GARBAGE = b"\xde\xad\xbe\xef" * 8


def gzip_stream(messages: list[bytes], *, finish: bool = True) -> bytes:
    """What a streaming server sends: one gzip member, a sync flush after every message."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    out = b"".join(z.compress(m) + z.flush(zlib.Z_SYNC_FLUSH) for m in messages)
    return out + (z.flush(zlib.Z_FINISH) if finish else b"")


def inflate_all(body: Inflater, wire: bytes, sizes: list[int]) -> bytes:
    out, pos = bytearray(), 0
    for size in sizes:
        for piece in body.inflate(wire[pos:pos + size]):
            out += piece
        pos += size
    assert pos == len(wire)
    return bytes(out)


@pytest.mark.parametrize("split", ["one_read", "single_bytes", "random_reads"])
def test_any_split_of_the_wire_gives_the_same_body(split: str) -> None:
    rng = random.Random(7)
    messages = [b'{"id":%d,"text":"%s"}\r\n' % (i, rng.randbytes(i % 300).hex().encode())
                for i in range(500)]
    wire = gzip_stream(messages, finish=False)  # a stream that has not ended
    assert len(wire) > 4 * STEP_BYTES  # one read is inflated in several steps
    sizes = {"one_read": [len(wire)], "single_bytes": [1] * len(wire)}.get(split)
    if sizes is None:
        sizes = []
        while sum(sizes) < len(wire):
            sizes.append(min(rng.randint(1, 5000), len(wire) - sum(sizes)))
    assert inflate_all(Inflater(31), wire, sizes) == b"".join(messages)


@pytest.mark.parametrize("pieces", [80, 3])
def test_a_compression_bomb_comes_out_in_bounded_pieces(pieces: int) -> None:
    # 80 pieces: ~20 KB on the wire, inflated in steps; 3: under one step, in one first call
    wire = gzip_stream([b"\n" * (pieces * PIECE_BYTES + 5)])
    out = list(Inflater(31).inflate(wire))
    assert (len(wire) > STEP_BYTES) == (pieces == 80)
    assert max(map(len, out)) <= PIECE_BYTES
    assert sum(map(len, out)) == pieces * PIECE_BYTES + 5


@pytest.mark.parametrize("size", [None, 1, 7])
def test_members_in_a_row_are_one_body(size: int | None) -> None:
    wire = gzip_stream([b"first\r\n"]) + gzip_stream([b"second\r\n"]) + gzip_stream([b"3\r\n"])
    sizes = [len(wire)] if size is None else [size] * (len(wire) // size) + [len(wire) % size]
    assert inflate_all(Inflater(31), wire, sizes) == b"first\r\nsecond\r\n3\r\n"


@pytest.mark.parametrize("wire", [
    b"not gzip at all",
    gzip_stream([b"ok\r\n"], finish=False) + b"\xff" * 16,  # the simulator's corrupt_gzip step
    gzip_stream([b"ok\r\n"]) + b"trailing junk",
])
def test_undecodable_bytes_raise_bad_encoding_after_what_was_readable(wire: bytes) -> None:
    out = bytearray()
    with pytest.raises(BadEncoding, match="compressed body cannot be inflated"):
        for piece in Inflater(31).inflate(wire):
            out += piece
    assert bytes(out) == (b"" if wire.startswith(b"not") else b"ok\r\n")


def inflate_until_bad(wire: bytes, sizes: list[int]) -> bytes:
    """What an inflater hands over before ``BadEncoding``, fed ``wire`` in reads of ``sizes``
    (over and over)."""
    body, out, pos = Inflater(31), bytearray(), 0
    reads = itertools.cycle(sizes)
    with pytest.raises(BadEncoding, match="compressed body cannot be inflated"):
        while pos < len(wire):
            size = next(reads)
            for piece in body.inflate(wire[pos:pos + size]):
                assert 0 < len(piece) <= PIECE_BYTES
                out += piece
            pos += size
    return bytes(out)


@pytest.mark.parametrize("reads", ["one_read", "64_KiB", "single_bytes", "members"])
def test_complete_messages_before_bad_bytes_come_out_before_bad_encoding(reads: str) -> None:
    # The audit's case: 300 tweets sync-flushed, then bytes that cannot be inflated. The call that
    # met them lost its output: the tweets it carried (up to 16 KiB of input) were never framed.
    messages = TWEETS[:300]
    wire = gzip_stream(messages, finish=False) + GARBAGE
    sizes = {"one_read": [len(wire)], "64_KiB": [64 * 1024], "single_bytes": [1]}.get(reads)
    if sizes is None:  # 17 gzip members in a row; the bad bytes in the last one
        wire = b"".join(gzip_stream(messages[i:i + 18]) for i in range(0, 288, 18))
        wire += gzip_stream(messages[288:], finish=False) + GARBAGE
        sizes = [5000]
    assert len(wire) > 2 * 64 * 1024  # more than two snapshots' worth (SNAPSHOT_BYTES)
    assert inflate_until_bad(wire, sizes) == b"".join(messages)


@pytest.mark.parametrize("size", [280, 64 * 1024])
def test_a_few_messages_and_bad_bytes_in_one_read(size: int) -> None:
    # 5 tweets + the bad bytes in the first read: the old inflater handed over nothing.
    wire = gzip_stream(TWEETS[:5], finish=False) + GARBAGE
    assert inflate_until_bad(wire, [size]) == b"".join(TWEETS[:5])


def test_bad_bytes_after_a_member_ends_start_no_new_one() -> None:
    wire = gzip_stream(TWEETS[:40]) + GARBAGE  # a trailer, then no gzip header
    assert inflate_until_bad(wire, [len(wire)]) == b"".join(TWEETS[:40])


def test_held_back_output_of_a_compression_bomb_comes_out_before_bad_bytes() -> None:
    # Output past PIECE_BYTES stays in the decompressor (with the input after it) until asked for.
    bomb = b"x" * (3 * PIECE_BYTES + 77) + b"\r\n"
    wire = gzip_stream([b"first\r\n", bomb, b"last\r\n"], finish=False) + GARBAGE
    for sizes in ([len(wire)], [1], [7]):
        assert inflate_until_bad(wire, sizes) == b"first\r\n" + bomb + b"last\r\n"


def test_no_output_after_the_bad_bytes_even_if_called_again() -> None:
    # An error body keeps being fed (its log line keeps what was readable): nothing past the
    # bad bytes may come out, however decodable the bytes after them are.
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    first = z.compress(b"one\r\n") + z.flush(zlib.Z_SYNC_FLUSH)
    then = z.compress(b"two\r\n") + z.flush(zlib.Z_SYNC_FLUSH)
    body = Inflater(31)
    assert b"".join(body.inflate(first)) == b"one\r\n"
    for data in (GARBAGE, then, then):
        with pytest.raises(BadEncoding):
            list(body.inflate(data))


@st.composite
def corrupt_bodies(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int]]:
    """Messages (tweets, and now and then a compression bomb) in one or more gzip members, the
    bad bytes right after one of their sync flushes, and reads of any sizes."""
    count, start = draw(st.integers(0, 160)), draw(st.integers(0, len(TWEETS) - 1))
    messages = [TWEETS[(start + i) % len(TWEETS)] for i in range(count)]
    for at in draw(st.lists(st.integers(0, count), max_size=2)):
        messages.insert(at, b"y" * draw(st.integers(PIECE_BYTES - 3, 2 * PIECE_BYTES)) + b"\n")
    ends = sorted(draw(st.sets(st.integers(1, max(1, len(messages))), max_size=3)))
    bounds = [0, *[e for e in ends if e < len(messages)], len(messages)]
    wire = b"".join(gzip_stream(messages[a:b], finish=b < len(messages))
                    for a, b in itertools.pairwise(bounds))
    # met at once, or 5 bytes in: a stored block whose length check fails
    wire += draw(st.sampled_from([GARBAGE, b"\xff" * 16, b"\x00\x05\x00\x00\x00" + GARBAGE]))
    sizes = draw(st.lists(st.integers(1, 3 * STEP_BYTES), min_size=1, max_size=8))
    return messages, wire, sizes


@settings(max_examples=100, deadline=None)
@given(case=corrupt_bodies(), snapshot=st.sampled_from([300, 4096, 64 * 1024]))
def test_any_body_and_any_reads_give_every_message_before_the_bad_bytes(
        case: tuple[list[bytes], bytes, list[int]], snapshot: int) -> None:
    messages, wire, sizes = case
    with pytest.MonkeyPatch.context() as patch:  # snapshots often: many replays from them
        patch.setattr(inflate, "SNAPSHOT_BYTES", snapshot, raising=False)  # (none before them)
        assert inflate_until_bad(wire, sizes) == b"".join(messages)


@pytest.mark.parametrize(("header", "wbits"), [
    ("", 0), ("identity", 0), ("gzip", 31), ("X-Gzip", 31), (" gzip ", 31), ("deflate", 15)])
def test_the_decoder_follows_content_encoding(header: str, wbits: int) -> None:
    decoder = body_decoder(header)
    if not wbits:
        assert decoder is None
        return
    assert decoder is not None
    z = zlib.compressobj(6, zlib.DEFLATED, wbits)
    assert b"".join(decoder.inflate(z.compress(b"body\r\n") + z.flush())) == b"body\r\n"


def test_an_encoding_we_did_not_ask_for_is_named() -> None:
    with pytest.raises(BadEncoding, match="Content-Encoding 'br' was not asked for"):
        body_decoder("br")


def intake_and_connection(status: int, encoding: str) -> tuple[BodyIntake, Connection, list[int]]:
    framed: list[int] = []
    intake = BodyIntake(lambda items, conn_id, generation, now_ns: framed.append(len(items)),
                        ReaderStats(), is_full=lambda: False, drop_when_full=False,
                        clock=time.monotonic)
    stream = StreamSettings(url="https://stream.twitter.com/1.1/statuses/filter.json",
                            track=("a",))
    conn = Connection(1, 0, stream, pycurl.Curl(), LineFramer(1 << 20), 0.0, 0.0, status=status,
                      headers={"content-encoding": encoding})
    return intake, conn, framed


def test_a_gzip_error_body_is_kept_inflated_for_the_log() -> None:
    # A server may gzip its 401 body like any other: the reason shown is its text, capped.
    text = b'{"errors":[{"code":32,"message":"Could not authenticate you."}]}' + b" " * 9000
    intake, conn, framed = intake_and_connection(401, "gzip")
    wire = gzip_stream([text])
    for start in range(0, len(wire), 7):
        if intake.on_data(conn, wire[start:start + 7]) == 0:
            break  # the cap is kept: the transfer ends (libcurl: a write error), no more is read
        assert len(conn.error_body) < ERROR_BODY_CAP
    assert bytes(conn.error_body) == text[:ERROR_BODY_CAP] and framed == []


def test_an_undecodable_body_aborts_the_transfer_with_its_reason() -> None:
    intake, conn, framed = intake_and_connection(200, "gzip")
    assert intake.on_data(conn, gzip_stream([b'{"id":1}\r\n'], finish=False)) is None
    assert intake.on_data(conn, b"\xff" * 16) == 0  # libcurl ends the transfer (write error)
    assert conn.abort is Ending.NETWORK
    assert conn.failure.startswith("compressed body cannot be inflated")
    intake.settle()  # the reader's pass ends
    assert framed == [1]  # the message before the bad bytes was framed
    assert intake.on_data(conn, b"more") == 0  # nothing after it is taken


def test_callbacks_are_framed_together_in_order_and_before_a_marker() -> None:
    """A pass's small callbacks are framed at once when it ends; a connection's first body
    (its coverage marker) first frames what other connections delivered before it; a piece of
    HOLD_BYTES or more is framed as it comes, after what was held."""
    calls: list[tuple[int, int]] = []  # (conn, messages) per sink call; (conn, -1): a marker
    intake = BodyIntake(lambda items, conn_id, generation, now_ns: calls.append(
                            (conn_id, len(items))), ReaderStats(), is_full=lambda: False,
                        drop_when_full=False, clock=time.monotonic,
                        on_first_body=lambda conn: (intake.settle(),
                                                    calls.append((conn.conn_id, -1))))
    stream = StreamSettings(url="https://stream.twitter.com/1.1/statuses/filter.json",
                            track=("a",))
    a, b = (Connection(n, 0, stream, pycurl.Curl(), LineFramer(1 << 20), 0.0, 0.0, status=200)
            for n in (1, 2))
    for piece in (b'{"id":1}\r\n{"id', b'":2}\r', b'\n{"id":3}\r\n'):
        assert intake.on_data(a, piece) is None
    assert calls == [(1, -1)]  # held: nothing framed during the pass
    assert intake.on_data(b, b'{"id":10}\r\n') is None
    assert intake.on_data(a, b'{"id":4}\r\n') is None
    intake.settle()
    assert calls == [(1, -1), (1, 3), (2, -1), (2, 1), (1, 1)]
    assert (a.messages, b.messages) == (4, 1)
    large = b'{"id":5,"text":"' + b"x" * HOLD_BYTES + b'"}\r\n'
    assert intake.on_data(b, b'{"id":11}\r\n') is None
    assert intake.on_data(a, large) is None
    assert calls[5:] == [(2, 1), (1, 1)]  # held first, then the large piece, in the callback


def test_a_full_spool_is_looked_at_each_pass_and_per_check_bytes_and_pushes_back() -> None:
    """The first callback of a pass asks whether the sink is full, later ones once per
    ``FULL_CHECK_BYTES``; a full sink pauses the transfer (libcurl keeps the bytes) at most that
    many body bytes late (counted as taken, after inflating), and the same bytes are taken once
    the next pass finds room."""
    looks: list[bool] = []
    full = False

    def is_full() -> bool:
        looks.append(full)
        return full

    framed: list[int] = []
    intake = BodyIntake(lambda items, conn_id, generation, now_ns: framed.append(len(items)),
                        ReaderStats(), is_full=is_full, drop_when_full=False,
                        clock=time.monotonic)
    stream = StreamSettings(url="https://stream.twitter.com/1.1/statuses/filter.json",
                            track=("a",))
    resumed: list[int] = []
    curl = cast(pycurl.Curl, SimpleNamespace(pause=resumed.append))  # not in a transfer here
    conn = Connection(1, 0, stream, curl, LineFramer(1 << 20), 0.0, 0.0, status=200)
    message = b'{"id":1,"text":"' + b"x" * 1000 + b'"}\r\n'
    per_look = -(-FULL_CHECK_BYTES // len(message))  # callbacks of a message each per look
    intake.resume_if_room([conn])
    first = 3 * per_look + per_look // 2  # the sink fills between two looks
    for _ in range(first):
        assert intake.on_data(conn, message) is None
    intake.settle()  # the pass ends
    assert len(looks) == 4 and sum(framed) == first
    full = True
    taken = 0
    while intake.on_data(conn, message) is None:
        taken += 1
    assert conn.paused and 0 < taken <= per_look  # pushed back within FULL_CHECK_BYTES
    intake.resume_if_room([conn])  # still full: stays paused, and the next pass looks again
    assert conn.paused
    full = False
    intake.resume_if_room([conn])
    # The look that found it full came after a callback's bytes were taken: libcurl is paused
    # from there (PAUSE_RECV), and the next callback's bytes were handed back (kept by libcurl).
    assert not conn.paused and resumed == [pycurl.PAUSE_RECV, pycurl.PAUSE_CONT]
    assert intake.on_data(conn, message) is None  # the kept bytes come again, and are taken
    intake.settle()
    assert sum(framed) == first + taken + 1


def test_a_gzip_bomb_of_tiny_messages_is_paused_between_pieces_and_taken_whole_later() -> None:
    """16 KiB of gzip can inflate to ~16 MB of tiny messages. The spool was looked at per
    FULL_CHECK_BYTES of compressed input, so one read of it went to the spool whole, past a full
    spool's bound by all of it (up to ~264 MB for a 256 KiB read). Now the look comes per
    FULL_CHECK_BYTES inflated, between the inflater's pieces: a full spool stops the read there,
    the rest waits with the connection (libcurl paused) and is taken, in order, once there is
    room, before libcurl hands over anything more."""
    line = b'{"id":1}\r\n'
    count = (8 << 20) // len(line)
    bomb = gzip_stream([line * count], finish=False)
    assert len(bomb) < 16 * 1024  # one read: a single look at the spool before it, formerly
    framed: list[int] = []  # body bytes of each sink call (payloads and their line ends)
    bound = [1 << 20]
    intake = BodyIntake(lambda items, conn_id, generation, now_ns: framed.append(
                            sum(len(payload) + 2 for _, payload in items)),
                        ReaderStats(), is_full=lambda: sum(framed) >= bound[0],
                        drop_when_full=False, clock=time.monotonic)
    stream = StreamSettings(url="https://stream.twitter.com/1.1/statuses/filter.json",
                            track=("a",))
    paused: list[int] = []
    curl = cast(pycurl.Curl, SimpleNamespace(pause=paused.append))  # not in a transfer here
    conn = Connection(1, 0, stream, curl, LineFramer(1 << 20), 0.0, 0.0, status=200,
                      headers={"content-encoding": "gzip"})
    intake.resume_if_room([conn])
    assert intake.on_data(conn, bomb) is None  # taken by libcurl: paused from inside instead
    intake.settle()
    past = FULL_CHECK_BYTES + inflate.PIECE_BYTES + HOLD_BYTES  # the documented overshoot
    assert conn.paused and paused == [pycurl.PAUSE_RECV]
    assert bound[0] <= sum(framed) < bound[0] + past, sum(framed)
    assert intake.on_data(conn, b"next read") == pycurl.WRITEFUNC_PAUSE  # libcurl keeps it
    intake.resume_if_room([conn])  # still full: nothing taken
    intake.settle()
    assert conn.paused and sum(framed) < bound[0] + past
    resumes = 0
    while conn.paused:  # room for 2 MB more at each pass: the held pieces, a part at a time
        bound[0] = sum(framed) + (2 << 20)
        intake.resume_if_room([conn])
        intake.settle()
        assert sum(framed) < bound[0] + past
        resumes += 1
    assert resumes == 4 and paused[-1] == pycurl.PAUSE_CONT
    assert sum(framed) == count * len(line) and conn.messages == count  # all, once
