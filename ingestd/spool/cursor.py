"""Reading one segment file record by record: CRC checks, and damage skipped and counted.

Used by the reader, and by the writer to find the last valid record when it starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ingestd.spool.checksum import crc32c
from ingestd.spool.format import (
    BODY,
    HEADER_SIZE,
    KIND_EVENT,
    MAGIC,
    MAX_LENGTH,
    PREFIX,
    PREFIX_SIZE,
    Record,
    list_segments,
    segment_first_seq,
)

_BLOCK = 1024 * 1024
_new_record = tuple.__new__


@dataclass(slots=True)
class Damage:
    records: int = 0  # damaged regions skipped
    bytes: int = 0


class SegmentCursor:
    """Reads one segment in blocks and parses records; damage is skipped and counted.

    Until ``sealed`` (a newer segment exists and the file was read to EOF), an incomplete record
    at the end is assumed to be still in the middle of being written, and waited for.
    """

    def __init__(self, directory: Path, name: str, offset: int, damage: Damage) -> None:
        self.name = name
        self._fd = os.open(directory / name, os.O_RDONLY)
        self._buf = b""
        self._pos = 0  # index in _buf of the next unparsed byte
        self._off = offset  # file offset of _buf[0]
        self._need = 0  # bytes the next record still needs
        self._damage = damage
        self._in_damage = False
        self.sealed = False
        self.at_end = False  # sealed and read to EOF: leftovers are damage, not a record in flight

    @property
    def position(self) -> int:
        """File offset of the next unparsed byte."""
        return self._off + self._pos

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def parseable(self) -> bool:
        """Buffered bytes that may hold a complete record (parsing stopped for the budget)."""
        return self.buffered > 0 and self._need == 0

    def file_size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        os.close(self._fd)

    def fill(self) -> int:
        """Read the next block of the file; return the number of new bytes read.

        The block starts at the first unparsed byte: the tail of the last block (a record cut by
        its end) is read again rather than kept, so no block is ever copied into a growing
        buffer (a copy costs about as much as the read itself).
        """
        kept = len(self._buf) - self._pos
        self._off += self._pos
        self._pos = 0
        self._buf = os.pread(self._fd, max(_BLOCK, self._need), self._off)
        return max(0, len(self._buf) - kept)

    def parse(self, out: list[Record], max_records: int, max_bytes: int, nbytes: int) -> int:
        """Append complete valid records to ``out`` within the budget; return bytes added."""
        buf = self._buf
        with memoryview(buf) as view:
            while len(out) < max_records and nbytes < max_bytes:
                record = self._parse_one(buf, view)
                if record is None:
                    break
                out.append(record)
                nbytes += len(record.payload)
        return nbytes

    def _parse_one(self, buf: bytes, view: memoryview) -> Record | None:
        while True:
            i = self._pos
            avail = len(buf) - i
            if avail < PREFIX_SIZE:
                if avail and self.at_end:
                    self._skip(len(buf))
                self._need = PREFIX_SIZE if avail else 0
                return None
            magic, length, crc = PREFIX.unpack_from(buf, i)
            if magic != MAGIC or not BODY.size <= length <= MAX_LENGTH:
                self._resync(buf, i + 1)
                continue
            end = i + PREFIX_SIZE + length
            if end > len(buf):
                if not self.at_end:
                    self._need = end - i
                    return None
                self._resync(buf, i + 1)
                continue
            if crc32c(view[i + PREFIX_SIZE : end]) != crc:
                self._resync(buf, i + 1)
                continue
            return self._record(buf, view, i, end)

    def _record(self, buf: bytes, view: memoryview, i: int, end: int) -> Record:
        seq, recv_ns, conn_id, generation, kind = BODY.unpack_from(buf, i + PREFIX_SIZE)
        self._pos, self._need, self._in_damage = end, 0, False
        payload = buf[i + HEADER_SIZE : end]  # bytes: the slice is the one copy
        # tuple.__new__ directly: the generated Record.__new__ is a Python-level frame per record.
        return _new_record(
            Record, (seq, kind, conn_id, generation, recv_ns, payload, self.name, self._off + i)
        )

    def _resync(self, buf: bytes, start: int) -> None:
        """Skip to the next MAGIC; keep a tail that may be a MAGIC cut by the end of the data."""
        j = buf.find(MAGIC, start)
        if j < 0:
            j = len(buf) if self.at_end else max(start, len(buf) - len(MAGIC) + 1)
        self._skip(j)

    def _skip(self, to: int) -> None:
        if not self._in_damage:
            self._damage.records += 1
            self._in_damage = True
        self._damage.bytes += to - self._pos
        self._pos, self._need = to, 0


def last_record(directory: Path, name: str) -> Record | None:
    """The last valid record in a segment (tolerating a torn tail), block by block."""
    last: Record | None = None
    for last in _segment_records(directory, name):  # noqa: B007 - the loop leaves the last
        pass
    return last


def _segment_records(directory: Path, name: str) -> Iterator[Record]:
    """Every valid record of a segment, in order (a torn tail and damage skipped)."""
    cursor = SegmentCursor(directory, name, 0, Damage())
    cursor.sealed = True
    try:
        while True:
            batch: list[Record] = []
            cursor.parse(batch, 256, MAX_LENGTH, 0)
            yield from batch
            if not batch and cursor.fill() == 0:
                if cursor.at_end:
                    return
                cursor.at_end = True
    finally:
        cursor.close()


def messages_after(directory: Path, seq: int, after_ns: int) -> int:
    """Messages (records other than coverage markers) numbered ``seq`` or later and received
    after ``after_ns``: what a stream worker spooled after the report that said its next record
    would be ``seq`` and counted what it had received by ``after_ns`` (a message held back by a
    disk error and written later keeps its earlier receive time: it was counted)."""
    names = list_segments(directory)
    # the segment holding ``seq`` is the last one named at or before it; later ones follow it
    first = max((i for i, n in enumerate(names) if segment_first_seq(n) <= seq), default=0)
    count = 0
    for name in names[first:]:
        with contextlib.suppress(FileNotFoundError):  # acked and freed meanwhile: not counted
            count += sum(1 for r in _segment_records(directory, name)
                         if r.seq >= seq and r.kind != KIND_EVENT and r.recv_ns > after_ns)
    return count


def last_seq_on_disk(directory: Path) -> int:
    """The number of the newest valid record in ``directory``'s segments (0 if none)."""
    if not directory.is_dir():
        return 0
    for name in sorted(list_segments(directory), reverse=True):
        if (directory / name).stat().st_size and (record := last_record(directory, name)):
            return record.seq
    return 0


def record_at(directory: Path, name: str, offset: int, seq: int) -> Record | None:
    """The valid record numbered ``seq`` that starts at ``offset`` in segment ``name``; None if
    the segment is gone or holds something else there (damage is skipped, not counted)."""
    try:
        cursor = SegmentCursor(directory, name, offset, Damage())
    except OSError:
        return None
    found: list[Record] = []
    try:
        while True:  # a block, or more if the record is larger (``fill`` reads what it needs)
            cursor.parse(found, 1, MAX_LENGTH, 0)
            if found or not cursor.fill():
                break
    except OSError:
        return None
    finally:
        cursor.close()
    return found[0] if found and found[0].seq == seq and found[0].offset == offset else None


def ends_record(directory: Path, name: str, offset: int, seq: int) -> bool:
    """Whether a valid record numbered ``seq`` ends exactly at ``offset`` in segment ``name``
    (reads the segment up to there; damage on the way is skipped, not counted)."""
    cursor = SegmentCursor(directory, name, 0, Damage())
    cursor.sealed = True
    try:
        while True:
            batch: list[Record] = []
            cursor.parse(batch, 256, MAX_LENGTH, 0)
            for record in batch:
                if record.end_offset >= offset:
                    return record.end_offset == offset and record.seq == seq
            if not batch and cursor.fill() == 0:
                if cursor.at_end:
                    return False
                cursor.at_end = True
    finally:
        cursor.close()
