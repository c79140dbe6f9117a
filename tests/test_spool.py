"""Spool: round trips, crash and reopen paths, damage, disk full, and a state-machine model."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ingestd.spool.cursor import last_record
from ingestd.spool.format import (
    BODY,
    CHECKPOINT,
    HEADER_SIZE,
    KIND_BADFRAME,
    KIND_BADFRAME_SIZED,
    KIND_MESSAGE,
    KIND_OVERSIZE,
    KIND_OVERSIZE_SIZED,
    KIND_PARTIAL,
    MAGIC,
    PREFIX,
    BadFrameRecord,
    Checkpoint,
    OversizeRecord,
    Record,
    badframe_payload,
    encode_record,
    list_segments,
    oversize_payload,
    read_badframe,
    read_checkpoint,
    read_oversize,
    segment_name,
)
from ingestd.spool.reader import SpoolReader
from ingestd.spool.writer import SpoolWriteError, SpoolWriter
from ingestd.spool.written import WRITTEN, WrittenMark
from tests.support.clock import FakeClock
from tests.support.wait import wait_until

BIG = 10**9


def make_writer(
    directory: Path,
    clock: Callable[[], float] = time.monotonic,
    segment_bytes: int = 64 * 1024 * 1024,
    max_bytes: int = BIG,
    max_records: int = BIG,
) -> SpoolWriter:
    return SpoolWriter(
        directory,
        segment_bytes=segment_bytes,
        max_bytes=max_bytes,
        max_records=max_records,
        clock=clock,
    )


def drain(reader: SpoolReader, batch: int = 1000) -> list[Record]:
    out: list[Record] = []
    while chunk := reader.read(batch, BIG):
        out.extend(chunk)
    return out


def payloads(n: int, size: int = 40) -> list[bytes]:
    return [f"msg-{i:06d}-".encode().ljust(size, b"p") for i in range(n)]


def fill(writer: SpoolWriter, items: list[bytes], per_append: int = 3) -> list[int]:
    """Append ``items`` in batches; return their seqs."""
    seqs: list[int] = []
    for i in range(0, len(items), per_append):
        batch = items[i : i + per_append]
        last = writer.append([(KIND_MESSAGE, p) for p in batch], 1, 1, 123)
        seqs.extend(range(last - len(batch) + 1, last + 1))
    return seqs


# --- basic behaviour ------------------------------------------------------------------------------


def test_round_trip_all_fields(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    last = writer.append([(KIND_MESSAGE, b'{"id":1}'), (KIND_OVERSIZE, b"head")], 7, 3, 99)
    last2 = writer.append([(KIND_PARTIAL, b"")], 8, 4, 100)
    reader = SpoolReader(tmp_path)
    got = reader.read(10, BIG)
    assert [(r.seq, r.kind, r.conn_id, r.generation, r.recv_ns, r.payload) for r in got] == [
        (last - 1, KIND_MESSAGE, 7, 3, 99, b'{"id":1}'),
        (last, KIND_OVERSIZE, 7, 3, 99, b"head"),
        (last2, KIND_PARTIAL, 8, 4, 100, b""),
    ]
    assert got[0].offset == 0 and got[1].offset == got[0].end_offset
    assert got[2].end_offset == os.path.getsize(tmp_path / got[2].segment)
    assert reader.read(10, BIG) == []
    writer.close()


def test_oversize_records_carry_their_size_and_older_ones_still_read(tmp_path: Path) -> None:
    """The format change for over-size messages is compatible: a spool holding records of the
    older kind (head only) next to the newer (size, limit, head) reads both."""
    writer = make_writer(tmp_path)
    writer.append([(KIND_OVERSIZE, b"old head"),
                   (KIND_OVERSIZE_SIZED, oversize_payload(2_000_000, 1_000_000, b"new head"))],
                  1, 1, 5)
    old, new = SpoolReader(tmp_path).read(10, BIG)
    assert read_oversize(old.kind, old.payload) == OversizeRecord(None, None, b"old head")
    assert read_oversize(new.kind, new.payload) == OversizeRecord(2_000_000, 1_000_000,
                                                                  b"new head")
    writer.close()


def test_bad_frame_records_carry_size_and_reason_and_older_ones_still_read(tmp_path: Path
                                                                           ) -> None:
    """A bad length line's record holds its size and the framer's reason before its head; a
    spool holding the older kind (head only) next to it reads both."""
    writer = make_writer(tmp_path)
    head = b"9" * 1024
    writer.append([(KIND_BADFRAME, b"12x\r"),
                   (KIND_BADFRAME_SIZED, badframe_payload(1_000_002, "length line too long", head)),
                   (KIND_BADFRAME_SIZED, badframe_payload(5, "length line is not a number",
                                                          b"abc\r\n"))],
                  1, 1, 5)
    old, new, short = SpoolReader(tmp_path).read(10, BIG)
    assert (old.kind, new.kind, short.kind) == (KIND_BADFRAME, KIND_BADFRAME_SIZED,
                                                KIND_BADFRAME_SIZED)
    assert read_badframe(old.kind, old.payload) == BadFrameRecord(None, None, b"12x\r")
    assert read_badframe(new.kind, new.payload) == BadFrameRecord(1_000_002,
                                                                  "length line too long", head)
    assert read_badframe(short.kind, short.payload) == BadFrameRecord(
        5, "length line is not a number", b"abc\r\n")
    # a payload too short for what its header says is all head, never a misread size
    cut = badframe_payload(7, "length line too long", b"")[:-3]
    assert read_badframe(KIND_BADFRAME_SIZED, cut) == BadFrameRecord(None, None, cut)
    assert read_badframe(KIND_BADFRAME_SIZED, b"\x01") == BadFrameRecord(None, None, b"\x01")
    writer.close()


def test_unread_bytes_is_what_the_reader_has_still_to_read_across_segments(tmp_path: Path
                                                                           ) -> None:
    """How far behind the stream the store worker is (it decides on its encoder child by it)."""
    writer = SpoolWriter(tmp_path, segment_bytes=1000, max_bytes=BIG, max_records=BIG)
    for i in range(30):
        writer.append([(KIND_MESSAGE, b"x" * 100)], 1, 0, i)
    writer.sync()
    reader = SpoolReader(tmp_path)
    total = sum(os.path.getsize(tmp_path / n) for n in list_segments(tmp_path))
    assert len(list_segments(tmp_path)) > 2 and reader.unread_bytes() == total
    got = reader.read(12, BIG)
    remaining = total - sum(r.end_offset - r.offset for r in got)
    assert reader.unread_bytes() == remaining
    reader.read(100, BIG)
    assert reader.unread_bytes() == 0
    writer.close()


# RFC 3720 appendix B.4: CRC-32C (Castagnoli) of 32-byte blocks. A record's crc covers its 29-byte
# body and its payload, so a 3-byte payload and the right field values make each block.
RFC3720_VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize(("block", "crc"), RFC3720_VECTORS)
def test_record_crc_is_crc32c_on_the_rfc3720_vectors(tmp_path: Path, block: bytes,
                                                     crc: int) -> None:
    """The spool format's checksum is CRC-32C over a record's body and payload, on the writer's
    and the reader's paths: whatever library computes it, existing segments stay readable."""
    seq, recv_ns, conn_id, generation, kind = BODY.unpack(block[:BODY.size])
    record = encode_record(seq, kind, block[BODY.size:], conn_id, generation, recv_ns)
    assert PREFIX.unpack_from(record)[2] == crc  # the writer's path
    (tmp_path / "one.seg").write_bytes(record)
    read = last_record(tmp_path, "one.seg")  # the reader: a record failing its CRC is skipped
    assert read is not None and (read.seq, read.payload) == (seq, block[BODY.size:])
    damaged = bytearray(record)
    damaged[-1] ^= 1
    (tmp_path / "damaged.seg").write_bytes(bytes(damaged))
    assert last_record(tmp_path, "damaged.seg") is None


def test_read_respects_record_and_byte_budgets(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(10, 100))
    reader = SpoolReader(tmp_path)
    assert [r.seq for r in reader.read(3, BIG)] == seqs[:3]
    assert [r.seq for r in reader.read(100, 250)] == seqs[3:6]  # stops once 250 bytes reached
    assert [r.seq for r in reader.read(100, 1)] == seqs[6:7]  # always makes progress
    assert [r.seq for r in drain(reader)] == seqs[7:]


def test_rolls_segments_and_ack_deletes_older(tmp_path: Path) -> None:
    writer = make_writer(tmp_path, segment_bytes=500)
    seqs = fill(writer, payloads(40))
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    reader = SpoolReader(tmp_path)
    got = drain(reader, 7)
    assert [r.seq for r in got] == seqs
    middle = next(r for r in got if r.segment == segments[2])
    reader.ack(middle)
    assert list_segments(tmp_path) == segments[2:]
    reader.ack(got[-1])
    assert list_segments(tmp_path) == segments[-1:]  # the newest is never deleted
    reader.ack(got[0])  # an older ack does not move the checkpoint back
    assert SpoolReader(tmp_path).read(10, BIG) == []


def test_deleted_segments_are_closed_soon(tmp_path: Path) -> None:
    """A consumed segment is unlinked at once but closed by a helper thread (its cached pages are
    freed off the store loop): no descriptor of a deleted segment may stay open."""
    writer = make_writer(tmp_path, segment_bytes=500)
    fill(writer, payloads(40))
    writer.close()
    reader = SpoolReader(tmp_path)
    got = drain(reader, 7)
    reader.ack(got[-1])
    assert list_segments(tmp_path) == [got[-1].segment]  # the folder changes at once

    def deleted_segments_open() -> list[str]:
        fds = Path("/proc/self/fd")
        names = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                names.append(os.readlink(fd))
        return [n for n in names if n.startswith(str(tmp_path)) and n.endswith("(deleted)")]

    wait_until(lambda: not deleted_segments_open(), 10, "deleted segments closed")
    reader.close()


def test_checkpoint_survives_reopen(tmp_path: Path) -> None:
    writer = make_writer(tmp_path, segment_bytes=400)
    seqs = fill(writer, payloads(30))
    reader = SpoolReader(tmp_path)
    got = reader.read(12, BIG)
    reader.ack(got[-1])
    more = reader.read(5, BIG)  # read but not acked: replayed after a restart
    reader.close()
    again = SpoolReader(tmp_path)
    assert [r.seq for r in drain(again)] == seqs[12:]
    assert more[0].seq == seqs[12]
    assert again.checkpoint_resets == 0


def test_ack_coalesces_checkpoint_writes(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = make_writer(tmp_path, segment_bytes=300)
    seqs = fill(writer, payloads(12), per_append=1)
    reader = SpoolReader(tmp_path, checkpoint_interval=0.25, clock=clock)
    got = drain(reader)
    first_segment = [r for r in got if r.segment == got[0].segment]
    reader.ack(first_segment[0])  # the first ack is written at once
    assert read_checkpoint(tmp_path) == reader.acked and reader.checkpoint_writes == 1
    clock.now = 0.1
    reader.ack(first_segment[1])  # same segment, within the interval: deferred
    assert reader.checkpoint_pending and reader.checkpoint_writes == 1
    assert read_checkpoint(tmp_path).seq == first_segment[0].seq  # type: ignore[union-attr]
    assert reader.wait_for_data(0) is False  # idle, but not due yet
    assert reader.checkpoint_pending
    clock.now = 0.3
    assert reader.wait_for_data(0) is False  # idle and due: written
    assert read_checkpoint(tmp_path) == reader.acked and not reader.checkpoint_pending
    reader.ack(first_segment[2])
    assert reader.checkpoint_pending
    later = next(r for r in got if r.segment != got[0].segment)
    reader.ack(later)  # another segment: written at once, and the consumed one released
    assert read_checkpoint(tmp_path) == reader.acked and reader.checkpoint_writes == 3
    assert got[0].segment not in list_segments(tmp_path)
    same = [r for r in got if r.segment == later.segment]
    reader.ack(same[1])
    assert reader.checkpoint_pending
    reader.close()  # a clean stop writes the pending checkpoint
    assert read_checkpoint(tmp_path).seq == same[1].seq  # type: ignore[union-attr]
    assert [r.seq for r in drain(SpoolReader(tmp_path))] == seqs[seqs.index(same[1].seq) + 1 :]


def test_before_checkpoint_runs_before_every_checkpoint_write(tmp_path: Path) -> None:
    """The store worker writes its coverage ledger in ``before_checkpoint``: it must run before
    each checkpoint reaches the disk (on an ack, when an idle wait finds one due, on close), and
    only then, so the ledger is never behind a checkpoint and not written per batch."""
    clock = FakeClock()
    writer = make_writer(tmp_path, segment_bytes=300)
    fill(writer, payloads(12), per_append=1)
    reader = SpoolReader(tmp_path, checkpoint_interval=0.25, clock=clock)
    on_disk: list[Checkpoint | None] = []  # the checkpoint on disk each time the hook ran
    reader.before_checkpoint = lambda ckpt: on_disk.append(read_checkpoint(tmp_path))
    got = drain(reader)
    first = [r for r in got if r.segment == got[0].segment]
    reader.ack(first[0])
    assert on_disk == [None] and reader.checkpoint_writes == 1  # ran before the first write
    clock.now = 0.1
    reader.ack(first[1])  # deferred: no checkpoint, no hook
    assert len(on_disk) == 1 and reader.checkpoint_pending
    clock.now = 0.3
    reader.wait_for_data(0)  # due while idle: the hook, then the checkpoint
    assert on_disk[1] == Checkpoint(first[0].seq, first[0].segment, first[0].end_offset)
    assert reader.checkpoint_writes == 2
    reader.ack(first[2])
    reader.close()
    assert len(on_disk) == 3 == reader.checkpoint_writes
    assert read_checkpoint(tmp_path).seq == first[2].seq  # type: ignore[union-attr]


def test_a_failing_before_checkpoint_leaves_the_checkpoint_where_it_was(tmp_path: Path) -> None:
    """If what must precede a checkpoint fails (the ledger's MongoDB write), the checkpoint is not
    written: a restart replays those records (duplicates), it never skips them."""
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(6), per_append=1)
    reader = SpoolReader(tmp_path, checkpoint_interval=0.0)
    got = drain(reader)
    reader.ack(got[1])
    failures = []

    def failing(ckpt: Checkpoint) -> None:
        failures.append(1)
        raise RuntimeError("ledger write failed")

    reader.before_checkpoint = failing
    with pytest.raises(RuntimeError):
        reader.ack(got[4])
    assert failures and read_checkpoint(tmp_path).seq == got[1].seq  # type: ignore[union-attr]
    reader.before_checkpoint = lambda ckpt: None
    reader.ack(got[4])  # the next ack that may write does
    assert read_checkpoint(tmp_path).seq == got[4].seq  # type: ignore[union-attr]
    assert [r.seq for r in drain(SpoolReader(tmp_path))] == seqs[5:]


def test_writer_reopen_starts_new_segment_and_continues_seq(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(5))
    first_segment = writer.segment
    writer.close()
    writer = make_writer(tmp_path)
    assert writer.next_seq == seqs[-1] + 1
    assert writer.segment == segment_name(seqs[-1] + 1) != first_segment
    more = fill(writer, payloads(3))
    assert more[0] == seqs[-1] + 1
    assert [r.seq for r in drain(SpoolReader(tmp_path))] == seqs + more


def test_writer_reopen_after_torn_tail(tmp_path: Path) -> None:
    """The last append completed, then its record lost its end (a power loss before the fsync
    that outlived the ``written`` mark): its number is not given again, so the reader counts the
    record lost, not only its bytes."""
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(6))
    path = tmp_path / writer.segment
    os.close(writer._fd)  # crash: no close, no sync
    os.truncate(path, os.path.getsize(path) - 5)  # the last record is torn
    writer = make_writer(tmp_path)
    assert writer.next_seq == seqs[-1] + 1
    more = fill(writer, payloads(2))
    reader = SpoolReader(tmp_path)
    assert [r.seq for r in drain(reader)] == seqs[:-1] + more
    assert reader.corrupt_records == 1
    assert reader.corrupt_bytes == HEADER_SIZE + 40 - 5
    assert reader.missing_records == 1


def test_a_record_torn_while_being_appended_is_numbered_again(tmp_path: Path) -> None:
    """The writer died inside the write (a fatal signal can cut a large write short): the append
    never returned, so its records were never noted as written and their numbers are reused."""
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(6))
    path = tmp_path / writer.segment
    os.close(writer._fd)
    WrittenMark(tmp_path).note(seqs[-2])  # as the mark stood before the last append
    os.truncate(path, os.path.getsize(path) - 5)
    writer = make_writer(tmp_path)
    assert writer.next_seq == seqs[-1]
    more = fill(writer, payloads(2))
    reader = SpoolReader(tmp_path)
    assert [r.seq for r in drain(reader)] == seqs[:-1] + more
    assert reader.corrupt_records == 1
    assert reader.missing_records == 0


def test_the_newest_segment_cut_at_a_record_boundary_counts_its_records(tmp_path: Path) -> None:
    """Found by bench/soak corrupt: the next writer numbered on from the cut, so the records it
    took left no trace. The ``written`` mark keeps their numbers from being given again."""
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(6))
    writer.close()
    records = drain(SpoolReader(tmp_path))
    os.truncate(tmp_path / records[3].segment, records[3].offset)  # seqs[3:] gone, no torn byte
    writer = make_writer(tmp_path)
    more = fill(writer, payloads(2))
    reader = SpoolReader(tmp_path)
    assert [r.seq for r in drain(reader)] == seqs[:3] + more
    assert reader.corrupt_records == 0
    assert reader.missing_records == 3
    writer.close()
    # A mark that cannot be read is no mark: numbering goes on after the last record on disk.
    last = drain(SpoolReader(tmp_path))[-1]
    os.truncate(tmp_path / last.segment, last.offset)
    (tmp_path / WRITTEN).write_bytes(b"garbage of 12")
    assert make_writer(tmp_path).next_seq == last.seq


def test_empty_segment_left_by_crash_is_reused(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    os.close(writer._fd)  # crashed before writing anything
    writer = make_writer(tmp_path)
    fill(writer, payloads(2))
    assert list_segments(tmp_path) == [segment_name(1)]


def test_partial_record_in_newest_segment_is_waited_for(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    fill(writer, payloads(1))
    path = tmp_path / writer.segment
    record = encode_record(2, KIND_MESSAGE, b"in flight", 1, 1, 5)
    with open(path, "ab") as f:
        f.write(record[:20])
    reader = SpoolReader(tmp_path)
    assert len(reader.read(10, BIG)) == 1
    assert reader.read(10, BIG) == []
    assert not reader.has_data()
    # The writer finishes the record and rolls before the reader looks again: not damage.
    with open(path, "ab") as f:
        f.write(record[20:])
    (tmp_path / segment_name(3)).touch()
    assert [r.payload for r in reader.read(10, BIG)] == [b"in flight"]
    assert reader.corrupt_records == 0


def test_records_across_read_blocks_arrive_whole(tmp_path: Path) -> None:
    # The reader reads 1 MiB blocks: records cut by a block's end (or longer than a block, or
    # still being written when it looks) must come back whole, in order, without damage.
    writer = make_writer(tmp_path)
    sizes = [1 + (i * 7919) % 90_000 for i in range(60)] + [2_500_000, 3, 1_048_600]
    items = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    seqs = fill(writer, items[:40], per_append=2)
    reader = SpoolReader(tmp_path)
    got = reader.read(7, BIG)
    seqs += fill(writer, items[40:], per_append=1)
    record = encode_record(seqs[-1] + 1, KIND_MESSAGE, b"x" * 300_000, 1, 1, 5)
    path = tmp_path / writer.segment
    with open(path, "ab") as f:  # a record half written when the reader gets there
        f.write(record[:150_000])
    got += drain(reader, batch=5)
    with open(path, "ab") as f:
        f.write(record[150_000:])
    got += drain(reader, batch=5)
    assert [r.seq for r in got] == [*seqs, seqs[-1] + 1]
    assert [r.payload for r in got] == [*items, b"x" * 300_000]
    assert reader.corrupt_records == 0 and reader.corrupt_bytes == 0


def test_reread_gives_back_an_unacked_record_from_its_reference(tmp_path: Path) -> None:
    # The store worker keeps a RecordRef of each batched tweet, not its payload: a dead letter
    # reads the payload back from the spool, including a record larger than a read block.
    writer = make_writer(tmp_path, segment_bytes=4096)
    items = [*payloads(30, size=300), b"y" * 2_500_000, b"z" * 10]
    fill(writer, items, per_append=2)
    reader = SpoolReader(tmp_path)
    records = drain(reader)
    assert len({r.segment for r in records}) > 1
    assert all(reader.reread(r.ref()) == r for r in records)
    wrong_seq = records[5].ref()._replace(seq=records[6].seq)
    wrong_offset = records[5].ref()._replace(offset=records[5].offset + 1)
    assert reader.reread(wrong_seq) is None and reader.reread(wrong_offset) is None
    reader.ack(records[-1])  # stored: earlier segments are deleted, and so is their copy
    assert reader.reread(records[0].ref()) is None
    assert reader.corrupt_records == 0


def test_wait_for_data(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    reader = SpoolReader(tmp_path)
    assert reader.wait_for_data(0.02) is False
    go = threading.Event()

    def produce() -> None:
        go.wait()
        writer.append([(KIND_MESSAGE, b"x")], 1, 1, 1)

    thread = threading.Thread(target=produce)
    thread.start()
    go.set()
    assert reader.wait_for_data(10.0) is True
    thread.join()
    assert [r.payload for r in reader.read(10, BIG)] == [b"x"]


def test_writer_and_reader_in_separate_processes(tmp_path: Path) -> None:
    n = 2000
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from ingestd.spool.writer import SpoolWriter
        w = SpoolWriter(Path({str(tmp_path)!r}), segment_bytes=20000, max_bytes=10**9,
                        max_records=10**9)
        for i in range(0, {n}, 4):
            w.append([(0, b"p%06d" % j) for j in range(i, i + 4)], 1, 1, 1)
        w.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    reader = SpoolReader(tmp_path)
    got: list[Record] = []
    while len(got) < n and (proc.poll() is None or reader.has_data()):
        reader.wait_for_data(0.2)
        got.extend(reader.read(100, BIG))
        if got:
            reader.ack(got[-1])
    assert proc.wait() == 0
    got.extend(drain(reader))
    assert [r.payload for r in got] == [b"p%06d" % j for j in range(n)]
    assert reader.corrupt_records == 0


# --- durability and back-pressure ---------------------------------------------------------------


def test_a_failed_fsync_after_a_write_keeps_its_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The records were written (readable) when the fsync due after them failed: the error says
    # they are kept, so the caller neither retries them (read twice) nor counts them dropped.
    clock = FakeClock()
    writer = make_writer(tmp_path, clock=clock)
    first = writer.append([(KIND_MESSAGE, b"a")], 1, 1, 1)
    clock.now = 1.0

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SpoolWriteError) as info:
        writer.append([(KIND_MESSAGE, b"b"), (KIND_MESSAGE, b"c")], 1, 1, 1)
    monkeypatch.undo()
    assert info.value.errno == errno.EIO and info.value.kept == 2
    assert writer.next_seq == first + 3
    later = writer.append([(KIND_MESSAGE, b"d")], 1, 1, 1)  # on a new segment (torn)
    assert later == first + 3
    reader = SpoolReader(tmp_path)
    assert [r.payload for r in drain(reader)] == [b"a", b"b", b"c", b"d"]
    assert reader.missing_records == reader.corrupt_records == 0


def test_fsync_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    writer = make_writer(tmp_path, clock=clock)
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    writer.append([(KIND_MESSAGE, b"a")], 1, 1, 1)
    clock.now = 0.1
    writer.append([(KIND_MESSAGE, b"b")], 1, 1, 1)
    assert synced == []
    clock.now = 0.25
    writer.append([(KIND_MESSAGE, b"c")], 1, 1, 1)
    assert synced == [writer._fd]
    clock.now = 0.5
    writer.maybe_sync()  # nothing new since: no fsync
    writer.append([(KIND_MESSAGE, b"d")], 1, 1, 1)  # 0.25 s since the last fsync
    writer.maybe_sync()
    assert len(synced) == 2


def test_backlog_and_is_full_follow_acks(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = make_writer(tmp_path, clock=clock, segment_bytes=300, max_records=10, max_bytes=BIG)
    fill(writer, payloads(9))
    records, size = writer.backlog()
    assert records == 9
    assert size == sum(os.path.getsize(tmp_path / n) for n in list_segments(tmp_path))
    assert not writer.is_full()
    fill(writer, payloads(1))
    assert writer.is_full()
    reader = SpoolReader(tmp_path)
    got = reader.read(4, BIG)
    reader.ack(got[-1])
    assert writer.is_full()  # the checkpoint is only looked at every 50 ms
    clock.now += 1
    records, size = writer.backlog()
    assert records == 6
    segment = tmp_path / got[-1].segment
    on_disk = sum(os.path.getsize(tmp_path / n) for n in list_segments(tmp_path))
    assert size == on_disk - os.path.getsize(segment) + (
        os.path.getsize(segment) - got[-1].end_offset
    )
    assert not writer.is_full()
    byte_bound = make_writer(tmp_path / "b", clock=clock, max_bytes=200)
    byte_bound.append([(KIND_MESSAGE, b"x" * 200)], 1, 1, 1)
    assert byte_bound.is_full()


def _failing_write(
    fail_on: int, short_first: bool
) -> tuple[Callable[[int, list[bytes]], int], list[int]]:
    """A fake ``os.writev`` (what the writer appends with) that fails on call ``fail_on``."""
    calls = [0]

    def fake(fd: int, bufs: list[bytes]) -> int:
        calls[0] += 1
        data = b"".join(bufs)
        if short_first and calls[0] == fail_on:
            return os.write(fd, data[: len(data) // 2])  # disk fills mid-write
        if calls[0] == fail_on + short_first:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    return fake, calls


def test_short_writes_and_more_buffers_than_iov_max(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_writer(tmp_path)
    calls: list[int] = []

    def short_writev(fd: int, bufs: list[bytes]) -> int:
        calls.append(len(bufs))
        assert len(bufs) <= 1024  # IOV_MAX
        return os.write(fd, b"".join(bufs)[:1000])  # at most 1000 bytes per call

    monkeypatch.setattr(os, "writev", short_writev)
    items = [(KIND_MESSAGE, p) for p in payloads(700, 33)]  # 1400 buffers
    last = writer.append(items, 1, 1, 1)
    assert len(calls) > 1 and calls[0] == 1024
    monkeypatch.undo()
    assert [r.payload for r in drain(SpoolReader(tmp_path))] == [p for _, p in items]
    assert last == 700 and writer.backlog()[0] == 700


def _filling_write(cut: int, before_enospc: Callable[[], None] = lambda: None,
                   ) -> Callable[[int, list[bytes]], int]:
    """A fake ``os.writev`` for a disk that fills up: the first call writes ``cut`` bytes (a
    short write), every later one fails with ENOSPC, after ``before_enospc`` (what another
    process does in that instant)."""
    calls = [0]
    real_writev = os.writev

    def fake(fd: int, bufs: list[bytes]) -> int:
        calls[0] += 1
        if calls[0] > 1:
            before_enospc()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, [b"".join(bufs)[:cut]])

    return fake


LOST = [(KIND_MESSAGE, b"lost-1"), (KIND_MESSAGE, b"lost-2")]  # what the ENOSPC tests append
RECORD = HEADER_SIZE + len(b"lost-1")  # the size of each


def append_failing(writer: SpoolWriter) -> SpoolWriteError:
    """Append ``LOST`` where the write must fail; the error it raised."""
    with pytest.raises(SpoolWriteError) as info:
        writer.append(LOST, 1, 1, 1)
    return info.value


@pytest.mark.parametrize(("cut", "kept"), [(0, 0), (RECORD // 2, 0), (RECORD, 1),
                                           (RECORD + 5, 1)])
def test_enospc_keeps_whole_records_read_once_and_leaves_no_torn_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int, kept: int
) -> None:
    # The disk fills in the middle of an append: the records that went in whole stay (counted,
    # numbered), a record cut in half is taken back, and the call says how many were kept. The
    # store worker reads as the stream worker writes, here in the very instant between the
    # short write and the ENOSPC: what it read then must not come again with the retry (the
    # CI's small-disk drill read 71 records twice: stored twice, counted twice).
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(4), per_append=2)
    segment = writer.segment
    size = os.path.getsize(tmp_path / segment)
    reader = SpoolReader(tmp_path)
    seen = drain(reader)
    monkeypatch.setattr(os, "writev", _filling_write(
        cut, lambda: seen.extend(reader.read(10, BIG))))  # the reader, in that instant
    error = append_failing(writer)
    assert error.errno == errno.ENOSPC and isinstance(error, OSError) and error.kept == kept
    assert os.path.getsize(tmp_path / segment) == size + kept * RECORD
    assert [r.payload for r in seen[len(seqs):]] == [b"lost-1"][:kept]
    # rolled at once: the full segment can be released once stored (the next one is empty)
    assert writer.segment != segment and os.path.getsize(tmp_path / writer.segment) == 0
    assert writer.backlog()[0] == len(seqs) + kept
    monkeypatch.undo()  # space is back: what was not kept is appended again
    retried = writer.append(LOST[kept:], 1, 1, 1)
    later = fill(writer, payloads(2), per_append=2)
    seen += drain(reader)
    expected = [*seqs, seqs[-1] + 1, retried, *later]
    assert [r.seq for r in seen] == expected  # each record once, in order
    assert [r.payload for r in seen][len(seqs):len(seqs) + 2] == [b"lost-1", b"lost-2"]
    reopened = SpoolReader(tmp_path)
    assert [r.seq for r in drain(reopened)] == expected
    assert reader.corrupt_records == reopened.corrupt_records == 0
    assert reader.missing_records == reopened.missing_records == 0


def test_disk_full_rolls_so_the_stored_segment_can_be_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One big segment fills the disk. Once the reader has stored all of it, its space must come
    # back even though no record can be written after it (the write needs that very space).
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(6))
    full = writer.segment
    reader = SpoolReader(tmp_path)
    records = drain(reader)
    reader.ack(records[-1])
    def disk_full(fd: int, bufs: list[bytes]) -> int:  # segments only: a checkpoint still fits
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", disk_full)
    with pytest.raises(SpoolWriteError):
        writer.append([(KIND_MESSAGE, b"held")], 1, 1, 1)
    with pytest.raises(SpoolWriteError):  # the retry goes to a new, empty segment
        writer.append([(KIND_MESSAGE, b"held")], 1, 1, 1)
    assert writer.segment != full and os.path.getsize(tmp_path / writer.segment) == 0
    assert reader.read(10, BIG) == []  # moves past the sealed, fully stored segment
    assert full not in list_segments(tmp_path), "the stored segment still holds its space"
    ckpt = read_checkpoint(tmp_path)
    assert ckpt is not None
    assert (ckpt.seq, ckpt.segment, ckpt.offset) == (seqs[-1], writer.segment, 0)
    monkeypatch.undo()  # space is back: the held message goes in and is read next
    last = writer.append([(KIND_MESSAGE, b"held")], 1, 1, 1)
    assert last == seqs[-1] + 1
    assert [r.payload for r in reader.read(10, BIG)] == [b"held"]
    assert writer.backlog() == (1, HEADER_SIZE + len(b"held"))
    reopened = SpoolReader(tmp_path)
    assert reopened.checkpoint_resets == 0
    assert [r.seq for r in drain(reopened)] == [last]


def test_unstored_segment_is_not_released_early(tmp_path: Path) -> None:
    writer = make_writer(tmp_path, segment_bytes=1)
    fill(writer, payloads(4), per_append=1)  # one record per segment
    reader = SpoolReader(tmp_path)
    records = reader.read(2, BIG)
    reader.ack(records[0])
    assert reader.read(10, BIG)  # the cursor moves on while records[1] is not stored yet
    assert records[1].segment in list_segments(tmp_path)
    reopened = SpoolReader(tmp_path)
    assert next(r.seq for r in drain(reopened)) == records[1].seq


def test_failed_undo_moves_to_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(2))
    fake, _ = _failing_write(1, True)
    monkeypatch.setattr(os, "writev", fake)

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    torn_segment = writer.segment
    with pytest.raises(SpoolWriteError):
        writer.append([(KIND_MESSAGE, b"z" * 100)], 1, 1, 1)
    monkeypatch.undo()
    later = fill(writer, payloads(1))
    assert writer.segment != torn_segment  # never append after a torn tail
    reader = SpoolReader(tmp_path)
    assert [r.seq for r in drain(reader)] == seqs + later
    assert reader.corrupt_records == 1  # the torn half-record, skipped and counted


# --- damage -------------------------------------------------------------------------------------


def _build(directory: Path, n: int, segment_bytes: int = 600) -> dict[int, Record]:
    """Write n records, then reopen the writer so every written segment is sealed."""
    writer = make_writer(directory, segment_bytes=segment_bytes)
    fill(writer, [p + MAGIC for p in payloads(n)])  # payloads holding MAGIC make resync work
    writer.close()
    make_writer(directory).close()
    records = drain(SpoolReader(directory))
    assert len(records) == n
    return {r.seq: r for r in records}


def _intact(records: dict[int, Record], damaged: dict[str, set[int]]) -> list[int]:
    """Seqs of records none of whose bytes are in ``damaged[segment]``."""
    return sorted(
        seq
        for seq, r in records.items()
        if not any(r.offset <= pos < r.end_offset for pos in damaged.get(r.segment, ()))
    )


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="spool-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_flipped_bytes_are_skipped_and_counted(scratch: Path, data: st.DataObject) -> None:
    directory = scratch / str(len(os.listdir(scratch)))
    records = _build(directory, 30)
    segments = list_segments(directory)[:-1]
    original = {name: (directory / name).read_bytes() for name in segments}
    for _ in range(data.draw(st.integers(1, 6))):
        name = data.draw(st.sampled_from(segments))
        raw = bytearray((directory / name).read_bytes())
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        (directory / name).write_bytes(raw)
    damaged: dict[str, set[int]] = {}
    for name, before in original.items():
        after = (directory / name).read_bytes()
        damaged[name] = {i for i, (x, y) in enumerate(zip(before, after, strict=True)) if x != y}
    reader = SpoolReader(directory)
    got = drain(reader, data.draw(st.integers(1, 50)))
    assert [r.seq for r in got] == _intact(records, damaged)
    assert all(r == records[r.seq] for r in got)
    assert (reader.corrupt_records >= 1) == any(damaged.values())
    lost = sum(HEADER_SIZE + len(records[s].payload) for s in set(records) - {r.seq for r in got})
    assert reader.corrupt_bytes == lost
    assert reader.missing_records == len(records) - len(got)  # each record lost, by its number


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_truncated_and_zeroed_segments(scratch: Path, data: st.DataObject) -> None:
    directory = scratch / str(len(os.listdir(scratch)))
    records = _build(directory, 30)
    name = data.draw(st.sampled_from(list_segments(directory)[:-1]))
    path = directory / name
    raw = path.read_bytes()
    start = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        path.write_bytes(raw[:start])  # truncated
    else:
        end = data.draw(st.integers(start + 1, len(raw)))
        path.write_bytes(raw[:start] + bytes(end - start) + raw[end:])  # a run of zeros
    after = path.read_bytes()
    gone = {i for i in range(len(raw)) if i >= len(after) or after[i] != raw[i]}
    reader = SpoolReader(directory)
    got = drain(reader)
    assert [r.seq for r in got] == _intact(records, {name: gone})
    # A cut exactly at a record boundary leaves no damaged bytes to count: only the numbering
    # sees what it took. Every other loss is a counted region as well.
    cut_on_boundary = len(after) in {0} | {
        r.end_offset for r in records.values() if r.segment == name
    }
    if len(got) < len(records) and not cut_on_boundary:
        assert reader.corrupt_records == 1
    assert reader.missing_records == len(records) - len(got)


def test_a_segment_cut_at_a_record_boundary_counts_the_records_it_took(tmp_path: Path) -> None:
    """No damaged byte is left to skip (found by bench/soak corrupt: counted nothing before)."""
    records = _build(tmp_path, 30)
    name = list_segments(tmp_path)[1]
    inside = sorted((r for r in records.values() if r.segment == name), key=lambda r: r.seq)
    os.truncate(tmp_path / name, inside[1].offset)  # keeps its first record only
    reader = SpoolReader(tmp_path)
    got = [r.seq for r in drain(reader)]
    assert got == [s for s in sorted(records) if s not in {r.seq for r in inside[1:]}]
    assert reader.corrupt_records == 0
    assert reader.missing_records == len(inside) - 1


def test_a_lost_segment_file_counts_its_records(tmp_path: Path) -> None:
    records = _build(tmp_path, 30)
    segments = list_segments(tmp_path)
    name = segments[len(segments) // 2]
    (tmp_path / name).unlink()
    reader = SpoolReader(tmp_path)
    got = drain(reader)
    assert reader.missing_records == sum(r.segment == name for r in records.values())
    assert len(got) + reader.missing_records == len(records)


def test_the_numbering_resumes_from_a_trusted_checkpoint(tmp_path: Path) -> None:
    """The segment right after the checkpoint's is lost: the first record read after a restart
    is the one that shows it."""
    records = _build(tmp_path, 30)
    segments = list_segments(tmp_path)
    reader = SpoolReader(tmp_path)
    first = [r for r in drain(reader) if r.segment == segments[0]]
    reader.ack(first[-1])
    reader.close()
    (tmp_path / segments[1]).unlink()
    fresh = SpoolReader(tmp_path)
    assert fresh.checkpoint_resets == 0
    drain(fresh)
    assert fresh.missing_records == sum(r.segment == segments[1] for r in records.values())


def test_stored_records_lost_with_a_power_loss_are_not_counted_missing(tmp_path: Path) -> None:
    """The checkpoint can be ahead of the segment's synced end (the reader acks what it read from
    the page cache): the writer continues after the checkpoint, and the records in between were
    stored. A restart replays from the oldest segment; the numbers it skips were stored."""
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(5))
    writer.close()
    reader = SpoolReader(tmp_path)
    got = drain(reader)
    reader.ack(got[-1])
    reader.close()
    os.truncate(tmp_path / got[-1].segment, got[2].end_offset)  # power loss took the tail
    writer = make_writer(tmp_path)
    later = fill(writer, payloads(2))
    assert later[0] == seqs[-1] + 1  # never reuses a number the checkpoint says was stored
    fresh = SpoolReader(tmp_path)
    assert [r.seq for r in drain(fresh)] == seqs[:3] + later
    assert fresh.checkpoint_resets == 1
    assert fresh.missing_records == 0


def test_deleted_or_garbage_checkpoint_replays_everything(tmp_path: Path) -> None:
    writer = make_writer(tmp_path, segment_bytes=300)
    seqs = fill(writer, payloads(20))
    reader = SpoolReader(tmp_path)
    got = reader.read(10, BIG)
    reader.ack(got[-1])
    remaining = [r.seq for r in drain(SpoolReader(tmp_path))]
    first_kept = int(list_segments(tmp_path)[0][:20])
    for damage in (
        b"{not json",
        b'{"seq": "x"}',
        b"[]",
        b'{"seq":1,"segment":"../x","offset":0}',
        b'{"seq":1e999,"segment":"00000000000000000001.seg","offset":0}',  # JSON: infinity
        None,
    ):
        if damage is None:
            (tmp_path / CHECKPOINT).unlink()
        else:
            (tmp_path / CHECKPOINT).write_bytes(damage)
        fresh = SpoolReader(tmp_path)
        replay = [r.seq for r in drain(fresh)]
        assert replay == [s for s in seqs if s >= first_kept]
        assert set(remaining) <= set(replay)
        assert fresh.checkpoint_resets == 1


def test_a_folder_in_place_of_the_checkpoint_is_what_its_error_names(tmp_path: Path) -> None:
    # (The rename's error names its source, the temp file: not what is in the way.)
    writer = make_writer(tmp_path)
    fill(writer, payloads(3))
    (tmp_path / CHECKPOINT).mkdir()
    reader = SpoolReader(tmp_path)
    reader.ack(drain(reader)[-1])
    assert reader.checkpoint_error == f"{tmp_path / CHECKPOINT}: Is a directory (EISDIR)"


def test_checkpoint_beyond_end_of_segment_replays(tmp_path: Path) -> None:
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(5))
    reader = SpoolReader(tmp_path)
    got = drain(reader)
    reader.ack(got[-1])
    os.truncate(tmp_path / got[-1].segment, got[2].end_offset)  # power loss took the tail
    fresh = SpoolReader(tmp_path)
    assert [r.seq for r in drain(fresh)] == seqs[:3]
    assert fresh.checkpoint_resets == 1


def test_checkpoint_not_ending_its_record_replays(tmp_path: Path) -> None:
    """A garbled checkpoint that still parses: moved ahead to a later record boundary with its
    seq unchanged, or into the middle of a record. Trusting it would skip unacked records
    silently (found by bench/soak corrupt); it must be reset and the spool replayed."""
    writer = make_writer(tmp_path)
    seqs = fill(writer, payloads(10))
    writer.close()
    reader = SpoolReader(tmp_path)
    got = drain(reader)
    reader.ack(got[2])
    reader.close()
    good = read_checkpoint(tmp_path)
    assert good is not None and good.seq == seqs[2]
    for offset in (got[6].end_offset, got[6].end_offset - 7, got[3].offset + 1):
        (tmp_path / CHECKPOINT).write_text(
            f'{{"seq": {good.seq}, "segment": "{good.segment}", "offset": {offset}}}')
        fresh = SpoolReader(tmp_path)
        assert [r.seq for r in drain(fresh)] == seqs, offset
        assert fresh.checkpoint_resets == 1
        fresh.close()
    # The checkpoint as written is still trusted: no replay of what was stored.
    (tmp_path / CHECKPOINT).write_text(
        f'{{"seq": {good.seq}, "segment": "{good.segment}", "offset": {good.offset}}}')
    fresh = SpoolReader(tmp_path)
    assert [r.seq for r in drain(fresh)] == seqs[3:]
    assert fresh.checkpoint_resets == 0


def test_checkpoint_at_the_start_of_a_later_segment_replays(tmp_path: Path) -> None:
    """Offset 0 is what ``_release_consumed`` writes once older segments are deleted; naming a
    segment while an older one still holds unacked records, it would skip that one."""
    writer = make_writer(tmp_path, segment_bytes=300)
    seqs = fill(writer, payloads(20))
    writer.close()
    segments = list_segments(tmp_path)
    assert len(segments) >= 3
    (tmp_path / CHECKPOINT).write_text(f'{{"seq": 0, "segment": "{segments[1]}", "offset": 0}}')
    fresh = SpoolReader(tmp_path)
    assert [r.seq for r in drain(fresh)] == seqs
    assert fresh.checkpoint_resets == 1


# --- model-based state machine --------------------------------------------------------------------


@dataclass
class ModelRecord:
    seq: int
    kind: int
    payload: bytes
    conn_id: int
    segment: str
    end: int


_payload = st.one_of(st.binary(max_size=80), st.just(MAGIC * 3), st.just(b""))


class SpoolMachine(RuleBasedStateMachine):
    """The spool against an in-memory model (after Vector's disk_v2 model test)."""

    SEGMENT_BYTES = 400
    INTERVAL = 0.25  # checkpoint coalescing; the clock moves by 0, 0.1 or 0.3 s per tick

    @initialize()
    def setup(self) -> None:
        # tmpfs when there is one: fsync is free there, and durability is not what this checks.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="spool-model-", dir=shm))
        self.clock = FakeClock()
        self.torn: dict[str, int] = {}  # segment -> bytes of the record a power loss cut short
        self.writer: SpoolWriter | None = self._new_writer()
        self.reader = self._new_reader()
        self.model: dict[int, ModelRecord] = {}
        self.sizes: dict[str, int] = {}  # segment -> bytes written (mirror)
        self.acked = 0
        self.writes_seen = 0  # reader.checkpoint_writes when last looked at
        self.written_at = -1e9  # clock time of the last checkpoint write
        self.last: int | None = 0  # seq last delivered; None: a replay may start anywhere
        self.last_record: Record | None = None
        self.torn_seqs = 0

    def teardown(self) -> None:
        if hasattr(self, "dir"):
            self.reader.close()
            if self.writer is not None:
                self.writer.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _new_writer(self) -> SpoolWriter:
        return make_writer(self.dir, clock=self.clock, segment_bytes=self.SEGMENT_BYTES)

    def _new_reader(self) -> SpoolReader:
        self.writes_seen, self.written_at = 0, -1e9  # a new reader writes its first ack at once
        reader = SpoolReader(self.dir, checkpoint_interval=self.INTERVAL, clock=self.clock)
        # The torn tails this reader will skip: from its checkpoint's segment, or on a reset from
        # the oldest segment (a checkpoint never points past a torn record's start).
        segments = list_segments(self.dir)
        start = reader.acked.segment if reader.acked else min(segments, default="")
        self.damage_ahead = {
            name: size for name, size in self.torn.items() if name >= start and name in segments
        }
        return reader

    def _saw_write(self) -> bool:
        """Whether the reader wrote a checkpoint since the last call (and note when)."""
        wrote = self.reader.checkpoint_writes > self.writes_seen
        self.writes_seen = self.reader.checkpoint_writes
        if wrote:
            self.written_at = self.clock.now
        return wrote

    @precondition(lambda self: self.writer is not None)
    @rule(
        items=st.lists(st.tuples(st.integers(0, 3), _payload), min_size=1, max_size=5),
        conn_id=st.integers(0, 2**32 - 1),
    )
    def append(self, items: list[tuple[int, bytes]], conn_id: int) -> None:
        assert self.writer is not None
        first = self.writer.next_seq
        assert all(first > seq for seq in self.model)
        rolled_from = self.writer.segment
        last = self.writer.append(items, conn_id, 1, 42)
        assert last == first + len(items) - 1
        segment = self.writer.segment
        if segment != rolled_from:
            assert self.sizes.get(rolled_from, 0) >= self.SEGMENT_BYTES
        offset = self.sizes.get(segment, 0)
        for seq, (kind, payload) in enumerate(items, start=first):
            offset += HEADER_SIZE + len(payload)
            self.model[seq] = ModelRecord(seq, kind, payload, conn_id, segment, offset)
        self.sizes[segment] = offset

    @precondition(lambda self: self.writer is not None)
    @rule(dt=st.sampled_from([0.0, 0.1, 0.3]))
    def tick_and_sync(self, dt: float) -> None:
        assert self.writer is not None
        self.clock.now += dt
        self.writer.maybe_sync()

    @rule(n=st.integers(1, 6))
    def read(self, n: int) -> None:
        for record in self.reader.read(n, BIG):
            self._check_delivery(record)
        self._saw_write()  # moving to a new segment may release the consumed one

    def _check_delivery(self, record: Record) -> None:
        expected = self.model[record.seq]
        got = (record.kind, record.payload, record.conn_id, record.segment, record.end_offset)
        assert got == (
            expected.kind,
            expected.payload,
            expected.conn_id,
            expected.segment,
            expected.end,
        )
        if self.last is None:  # replay after a reset: may start early, never skip past the ack
            after_ack = [s for s in self.model if s > self.acked]
            assert not after_ack or record.seq <= min(after_ack)
        else:
            following = [s for s in self.model if s > self.last]
            assert following and record.seq == min(following), "a valid record was skipped"
        self.last, self.last_record = record.seq, record

    @precondition(lambda self: self.last_record is not None)
    @rule()
    def ack(self) -> None:
        assert self.last_record is not None
        self._ack(self.last_record)

    @precondition(lambda self: self.writer is not None)
    @rule(
        items=st.lists(st.tuples(st.just(KIND_MESSAGE), _payload), min_size=1, max_size=6),
        n=st.integers(1, 3),
        dt=st.sampled_from([0.0, 0.1]),
    )
    def store_batches(self, items: list[tuple[int, bytes]], n: int, dt: float) -> None:
        """The store loop: a few records come in, are read n at a time and each batch is acked
        (acks close together: most are coalesced)."""
        self.append(items, 1)
        for _ in range(3):
            for record in self.reader.read(n, BIG):
                self._check_delivery(record)
            self._saw_write()
            if self.last_record is not None:
                self._ack(self.last_record)
            self.clock.now += dt

    def _ack(self, record: Record) -> None:
        before, acked_before = read_checkpoint(self.dir), self.reader.acked
        since_write = self.clock.now - self.written_at
        self.reader.ack(record)
        # Delivered records only move forward within a reader's life, so every ack is taken; after
        # a checkpoint reset it may lawfully move the checkpoint back to a replayed record.
        assert self.reader.acked is not None and self.reader.acked.seq == record.seq
        on_disk = read_checkpoint(self.dir)
        if self._saw_write():
            # Coalesced: a write within the interval only for an ack in another segment.
            assert (
                before is None
                or since_write >= self.INTERVAL
                or before.segment != record.segment
                or on_disk == Checkpoint(record.seq, self.reader.acked.segment, 0)  # released
            )
        elif self.reader.acked != acked_before:  # deferred (acking the same record is a no-op)
            assert on_disk is not None and on_disk == before
            assert on_disk.segment == self.reader.acked.segment and on_disk.seq < record.seq
            assert since_write < self.INTERVAL
            assert self.reader.checkpoint_pending
        assert (on_disk == self.reader.acked) != self.reader.checkpoint_pending
        self.acked = record.seq
        segments = list_segments(self.dir)
        kept = self.reader.acked.segment
        # The record's segment is kept, unless it was wholly stored and the reader already moved
        # on: then the checkpoint names the start of the next segment and the older one is gone.
        assert kept in segments or kept > record.segment
        assert kept == record.segment or self.reader.acked.offset == 0
        assert all(name >= min(kept, record.segment) for name in segments)

    @precondition(lambda self: self.writer is not None)
    @rule(tear=st.one_of(st.just(0), st.integers(1, 120)))
    def crash_writer(self, tear: int) -> None:
        """Process crash (tear=0: the OS keeps every byte) or power loss (tail torn)."""
        assert self.writer is not None
        os.close(self.writer._fd)
        segment, self.writer = self.writer.segment, None
        size = self.sizes.get(segment, 0)
        if tear == 0 or size == 0:
            return
        new_size = max(0, size - tear)
        os.truncate(self.dir / segment, new_size)
        self.sizes[segment] = new_size
        whole = [r.end for r in self.model.values() if r.segment == segment and r.end <= new_size]
        if new_size > max(whole, default=0):
            self.torn[segment] = new_size - max(whole, default=0)
        torn = [s for s, r in self.model.items() if r.segment == segment and r.end > new_size]
        for seq in torn:
            del self.model[seq]
        self.torn_seqs += len(torn) + 1  # + 1: a wholly torn segment's name is not reused
        self.crash_reader()  # a power loss takes the reader down too

    @precondition(lambda self: self.writer is None)
    @rule()
    def reopen_writer(self) -> None:
        self.writer = self._new_writer()

    @precondition(lambda self: self.writer is not None)
    @rule()
    def restart_writer_cleanly(self) -> None:
        assert self.writer is not None
        self.writer.close()
        self.writer = self._new_writer()

    @rule()
    def reopen_reader(self) -> None:
        """A clean stop: ``close`` writes the pending checkpoint, the restart replays nothing."""
        acked = self.reader.acked
        self.reader.close()
        assert acked is None or read_checkpoint(self.dir) == acked
        self.reader = self._new_reader()
        self.last = None if self.reader.checkpoint_resets else self.acked
        self.last_record = None

    @rule()
    def crash_reader(self) -> None:
        """The store worker dies: an ack not yet written is lost, so the restart replays from
        the last *written* checkpoint (records already stored), never from past an unacked one."""
        cursor = self.reader._cursor
        if cursor is not None:
            cursor.close()  # no flush
        on_disk = read_checkpoint(self.dir)
        assert on_disk is None or on_disk.seq <= self.acked or self.last is None
        self.reader = self._new_reader()
        if on_disk is not None and not self.reader.checkpoint_resets:
            self.acked = on_disk.seq
        self.last = None if self.reader.checkpoint_resets else self.acked
        self.last_record = None

    @rule(dt=st.sampled_from([0.0, 0.1, 0.3]))
    def idle(self, dt: float) -> None:
        """An idle store loop writes the pending checkpoint once the interval has passed."""
        self.clock.now += dt
        due = self.clock.now - self.written_at >= self.INTERVAL
        self.reader.maybe_flush()
        wrote = self._saw_write()
        assert wrote == (due and wrote) and not (due and self.reader.checkpoint_pending)

    @rule()
    def drain_all(self) -> None:
        """Everything valid is readable now: nothing stays stuck behind damage."""
        self.read(BIG)
        if self.last is not None:
            assert not [s for s in self.model if s > self.last]
        # Each torn tail behind the newest segment was skipped as one damaged region, byte-exact;
        # the newest one may still be written to, so its tail is waited for, not counted.
        newest = max(list_segments(self.dir), default="")
        skipped = [size for name, size in self.damage_ahead.items() if name < newest]
        assert (self.reader.corrupt_records, self.reader.corrupt_bytes) == (
            len(skipped),
            sum(skipped),
        )

    @precondition(lambda self: self.writer is not None)
    @rule()
    def check_backlog(self) -> None:
        assert self.writer is not None
        # Past the writer's longest wait between looks at the checkpoint (1 s far from the bounds;
        # 1.0 exactly can fall short: after 3.1 s of fake time, (3.1 + 1.0) - 3.1 < 1.0).
        self.clock.now += 1.5
        records, size = self.writer.backlog()
        ckpt = read_checkpoint(self.dir)
        sizes = {n: os.path.getsize(self.dir / n) for n in list_segments(self.dir)}
        if ckpt is None:
            assert size == sum(sizes.values())
            return
        unacked = {n: v for n, v in sizes.items() if n >= ckpt.segment}
        assert size == sum(unacked.values()) - min(ckpt.offset, unacked.get(ckpt.segment, 0))
        pending = len([s for s in self.model if s > ckpt.seq])
        # Seqs are counted, not records: torn seqs the new writer did not reuse still count.
        assert pending <= records <= pending + self.torn_seqs

    @invariant()
    def counters_consistent(self) -> None:
        if hasattr(self, "reader"):
            assert (self.reader.corrupt_records == 0) == (self.reader.corrupt_bytes == 0)

    @invariant()
    def nothing_past_the_written_checkpoint_is_deleted(self) -> None:
        """Segments go only once a checkpoint past them is on disk (a crash replays from it)."""
        if not hasattr(self, "reader"):
            return
        on_disk = read_checkpoint(self.dir)
        segments = set(list_segments(self.dir))
        floor = -1 if on_disk is None else on_disk.seq
        assert all(r.segment in segments for r in self.model.values() if r.seq > floor)


SpoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_spool_model = SpoolMachine.TestCase


# --- the stream worker's sink: one write per reader pass ----------------------------------------


def test_sink_coalesces_a_pass_into_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingestd.spool.intake import COALESCE_BYTES, SpoolIntake

    writer = make_writer(tmp_path)
    sink = SpoolIntake(writer, drop=False)
    writes: list[int] = []
    real_writev = os.writev

    def counting(fd: int, bufs: list[bytes]) -> int:
        writes.append(len(bufs))
        return real_writev(fd, bufs)

    monkeypatch.setattr(os, "writev", counting)
    sink([(KIND_MESSAGE, b"a1"), (KIND_MESSAGE, b"a2")], 1, 1, 100)
    sink([(KIND_PARTIAL, b"b1")], 2, 3, 200)  # another connection, generation and time
    assert writes == [] and writer.backlog()[0] == 0  # held back until the pass ends
    sink.flush()
    assert writes == [6]  # three records, header + payload each, one writev
    got = drain(SpoolReader(tmp_path))
    assert [(r.payload, r.kind, r.conn_id, r.generation, r.recv_ns) for r in got] == [
        (b"a1", KIND_MESSAGE, 1, 1, 100),
        (b"a2", KIND_MESSAGE, 1, 1, 100),
        (b"b1", KIND_PARTIAL, 2, 3, 200),
    ]
    sink([(KIND_MESSAGE, b"x" * COALESCE_BYTES)], 1, 1, 1)  # a full write's worth: at once
    assert len(writes) == 2 and not sink.pending


@pytest.mark.parametrize("drop", [False, True])
def test_sink_disk_error_holds_or_drops_the_whole_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop: bool
) -> None:
    from ingestd.spool.intake import SpoolIntake

    writer = make_writer(tmp_path)
    sink = SpoolIntake(writer, drop=drop)
    fake, _ = _failing_write(1, False)
    monkeypatch.setattr(os, "writev", fake)
    sink([(KIND_MESSAGE, b"a1"), (KIND_MESSAGE, b"a2")], 1, 1, 1)
    sink([(KIND_MESSAGE, b"b1")], 1, 1, 2)
    sink.flush()
    assert sink.last_error and os.path.getsize(tmp_path / writer.segment) == 0
    monkeypatch.undo()
    sink([(KIND_MESSAGE, b"c1")], 1, 1, 3)  # after the failure, same pass or the next
    sink.flush()
    if drop:
        assert sink.dropped == 3 and not sink.held
        assert [r.payload for r in drain(SpoolReader(tmp_path))] == [b"c1"]
        return
    assert sink.is_full() and sink.dropped == 0  # block: the reader pauses, nothing is lost
    sink._retry_at = 0.0
    sink.retry()
    assert not sink.held and not sink.is_full()
    assert [r.payload for r in drain(SpoolReader(tmp_path))] == [b"a1", b"a2", b"b1", b"c1"]


@pytest.mark.parametrize("drop", [False, True])
def test_sink_disk_error_holds_or_drops_only_what_was_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop: bool
) -> None:
    # The disk fills after a1 went in whole (and a2 in part): a1 is in the spool, the reader
    # may have read it. Only a2 and b1 are held (block) or counted dropped (drop_newest):
    # received = in the spool + dropped, each message once.
    from ingestd.spool.intake import SpoolIntake

    writer = make_writer(tmp_path)
    written_ns: list[int] = []
    sink = SpoolIntake(writer, drop=drop, on_written=written_ns.append)
    monkeypatch.setattr(os, "writev", _filling_write(HEADER_SIZE + 2 + 5))
    sink([(KIND_MESSAGE, b"a1"), (KIND_MESSAGE, b"a2")], 1, 1, 1)
    sink([(KIND_MESSAGE, b"b1")], 1, 1, 2)
    sink.flush()
    assert sink.last_error and written_ns == [1]
    assert [r.payload for r in drain(SpoolReader(tmp_path))] == [b"a1"]
    monkeypatch.undo()
    sink([(KIND_MESSAGE, b"c1")], 1, 1, 3)
    sink.flush()
    if drop:
        assert sink.dropped == 2 and not sink.held
        expected = [b"a1", b"c1"]
    else:
        assert sink.dropped == 0 and [[p for _, p in g[0]] for g in sink.held] == [
            [b"a2"], [b"b1"], [b"c1"]]
        sink._retry_at = 0.0
        sink.retry()
        assert not sink.held and written_ns[-3:] == [1, 2, 3]
        expected = [b"a1", b"a2", b"b1", b"c1"]
    reader = SpoolReader(tmp_path)
    assert [r.payload for r in drain(reader)] == expected
    assert reader.corrupt_records == reader.missing_records == 0


@given(data=st.binary(max_size=5000), seed=st.integers(0, 2**32 - 1))
def test_the_spool_checksum_is_the_crc32c_librarys(data: bytes, seed: int) -> None:
    """``spool.checksum`` loads the library's C extension without its package ``__init__``: the
    same function, chained the same way, over bytes and memoryviews."""
    import crc32c as library

    from ingestd.spool import checksum

    assert checksum.crc32c(data) == library.crc32c(data)
    assert checksum.crc32c(memoryview(data), seed) == library.crc32c(data, seed)


@pytest.mark.parametrize("extension", ["missing", "wrong", "broken"])
def test_the_spool_checksum_falls_back_to_the_package(monkeypatch: pytest.MonkeyPatch,
                                                      extension: str) -> None:
    """Where the library's layout changed (no extension module where it was), or the function
    found fails the check value, the package's own import is used."""
    import types

    import crc32c as library

    from ingestd.spool import checksum

    def found() -> types.ModuleType | None:
        if extension == "broken":
            raise ImportError("moved")
        module = types.ModuleType("crc32c._crc32c")
        module.crc32c = lambda data, value=0: 0  # type: ignore[attr-defined]
        return None if extension == "missing" else module

    monkeypatch.setattr(checksum, "_extension", found)
    assert checksum._load() is library.crc32c


def test_messages_after_counts_what_a_killed_stream_worker_never_reported(tmp_path: Path) -> None:
    """``messages_after``: records from ``seq`` on, received after the report's time; a coverage
    marker is not a message, and a message held back by a disk error and written after the
    report keeps its earlier receive time (it was counted). Across segment rolls."""
    from ingestd.spool.cursor import messages_after
    from ingestd.spool.format import KIND_BADFRAME, KIND_EVENT

    spool = SpoolWriter(tmp_path, segment_bytes=200, max_bytes=BIG, max_records=BIG)
    for ns in (10, 20, 30):  # reported: seqs 1-3, before the report at ns 35
        spool.append([(KIND_MESSAGE, b"m%d" % ns * 20)], 1, 1, ns)
    next_seq = spool.next_seq
    spool.append([(KIND_MESSAGE, b"held" * 20)], 1, 1, 33)  # held at the report, written after
    spool.append([(KIND_EVENT, b"{}")], 1, 1, 40)  # a coverage marker
    spool.append([(KIND_MESSAGE, b"a" * 80), (KIND_BADFRAME, b"b" * 80)], 1, 1, 50)
    spool.append([(KIND_MESSAGE, b"c" * 80)], 2, 1, 60)
    spool.close()
    assert len(list_segments(tmp_path)) > 2  # the records span rolled segments
    assert messages_after(tmp_path, next_seq, 35) == 3
    assert messages_after(tmp_path, next_seq, 55) == 1
    assert messages_after(tmp_path, spool.next_seq, 0) == 0
    assert messages_after(tmp_path, 1, 0) == 8 - 1  # everything but the marker
