"""Write-ahead spool: the bounded, crash-safe queue between the stream and store workers.

The two workers are separate processes that share only the spool directory::

    <dir>/<first_seq:020d>.seg   append-only segments of records
    <dir>/checkpoint             {"seq": N, "segment": "<name>", "offset": O}: stored up to here

Record layout (little-endian)::

    MAGIC(4) length u32  crc32c u32 | seq u64  recv_ns u64  conn_id u32  generation u32  kind u8
                                    | payload
    `length` counts and `crc32c` covers everything after the crc field.

The writer never appends after a possibly torn tail: each ``SpoolWriter`` starts a new segment.
The reader checks every record's CRC; damage is skipped by scanning for the next record that
validates, and counted (``corrupt_records``, ``corrupt_bytes``), never fatal. A process crash
loses nothing already written (the OS has it); a power failure loses at most ``fsync_interval``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

KIND_MESSAGE = 0
KIND_OVERSIZE = 1
KIND_BADFRAME = 2
KIND_PARTIAL = 3

MAGIC = b"\xa5IR\x5a"
_PREFIX = struct.Struct("<4sII")  # magic, length, crc
_BODY = struct.Struct("<QQIIB")  # seq, recv_ns, conn_id, generation, kind
PREFIX_SIZE = _PREFIX.size
HEADER_SIZE = _PREFIX.size + _BODY.size
MAX_PAYLOAD = 64 * 1024 * 1024
_MAX_LENGTH = _BODY.size + MAX_PAYLOAD

CHECKPOINT = "checkpoint"
FIRST_SEQ = 1
_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")
_BLOCK = 1024 * 1024
_CHECKPOINT_POLL = 0.05  # seconds between checkpoint stats in the writer
_CHECKPOINT_SETTLE_NS = 1_000_000_000  # mtimes are coarse: re-read a file changed this recently
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class SpoolWriteError(OSError):
    """A write or fsync failed (ENOSPC, EIO…); nothing torn was left behind. ``errno`` is kept."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record read back from the spool; ``offset`` is where it starts in ``segment``."""

    seq: int
    kind: int
    conn_id: int
    generation: int
    recv_ns: int
    payload: bytes
    segment: str
    offset: int

    @property
    def end_offset(self) -> int:
        """Offset just past this record: where the checkpoint points once it is stored."""
        return self.offset + HEADER_SIZE + len(self.payload)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    segment: str
    offset: int


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def list_segments(directory: Path) -> list[str]:
    """Segment names, oldest first (zero-padded names sort numerically)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _SEGMENT_RE.match(n))


def read_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint, or None if it is missing or unreadable."""
    try:
        doc = json.loads((directory / CHECKPOINT).read_bytes())
        ckpt = Checkpoint(int(doc["seq"]), str(doc["segment"]), int(doc["offset"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    valid = _SEGMENT_RE.match(ckpt.segment) and ckpt.offset >= 0 and ckpt.seq >= 0
    return ckpt if valid else None


def encode_record(
    seq: int, kind: int, payload: bytes, conn_id: int, generation: int, recv_ns: int
) -> bytes:
    """One record's bytes (used by the writer and by tests that craft damage)."""
    body = _BODY.pack(seq, recv_ns, conn_id, generation, kind)
    crc = crc32c(payload, crc32c(body))
    return _PREFIX.pack(MAGIC, len(body) + len(payload), crc) + body + payload


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Damage:
    records: int = 0  # damaged regions skipped
    bytes: int = 0


class _SegmentCursor:
    """Reads one segment in blocks and parses records; damage is skipped and counted.

    Until ``sealed`` (a newer segment exists and the file was read to EOF), an incomplete record
    at the end is assumed to be still in the middle of being written, and waited for.
    """

    def __init__(self, directory: Path, name: str, offset: int, damage: _Damage) -> None:
        self.name = name
        self._fd = os.open(directory / name, os.O_RDONLY)
        self._buf = bytearray()
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
        """Read the next block of the file; return the number of bytes read."""
        del self._buf[: self._pos]  # O(1) amortised for a bytearray prefix
        self._off += self._pos
        self._pos = 0
        want = max(_BLOCK, self._need - len(self._buf))
        block = os.pread(self._fd, want, self._off + len(self._buf))
        self._buf += block
        return len(block)

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

    def _parse_one(self, buf: bytearray, view: memoryview) -> Record | None:
        while True:
            i = self._pos
            avail = len(buf) - i
            if avail < PREFIX_SIZE:
                if avail and self.at_end:
                    self._skip(len(buf))
                self._need = PREFIX_SIZE if avail else 0
                return None
            magic, length, crc = _PREFIX.unpack_from(buf, i)
            if magic != MAGIC or not _BODY.size <= length <= _MAX_LENGTH:
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

    def _record(self, buf: bytearray, view: memoryview, i: int, end: int) -> Record:
        seq, recv_ns, conn_id, generation, kind = _BODY.unpack_from(buf, i + PREFIX_SIZE)
        self._pos, self._need, self._in_damage = end, 0, False
        payload = bytes(view[i + HEADER_SIZE : end])
        return Record(seq, kind, conn_id, generation, recv_ns, payload, self.name, self._off + i)

    def _resync(self, buf: bytearray, start: int) -> None:
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


class SpoolWriter:
    """Appends records to the spool (stream worker side). Not thread-safe; one per directory."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        max_bytes: int,
        max_records: int,
        fsync_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.fsync_interval = fsync_interval
        self._clock = clock
        self._sizes = {n: (self.directory / n).stat().st_size for n in list_segments(directory)}
        self._ckpt: Checkpoint | None = read_checkpoint(self.directory)
        self._ckpt_key: tuple[int, int, int] | None = None
        self._ckpt_checked = -float("inf")
        self._next_seq = self._recover_next_seq()
        self._fd = -1
        self._torn = False  # a failed write could not be undone: start a new segment
        # The disk filled up: the next append starts a new segment, so that the reader can
        # release this one (and its space) once everything in it is stored.
        self._roll_wanted = False
        self._dirty = False
        self._last_sync = clock()
        self._open_segment()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def segment(self) -> str:
        """Name of the segment being appended to."""
        return self._name

    def append(
        self, items: Sequence[tuple[int, bytes]], conn_id: int, generation: int, recv_ns: int
    ) -> int:
        """Write ``items`` ((kind, payload) pairs) with one ``write()``; return the last seq.

        Raises SpoolWriteError (nothing of this call left on disk) if the write fails.
        """
        if not items:
            return self._next_seq - 1
        if self._torn or self._roll_wanted or self._size >= self.segment_bytes:
            self._roll()
        data = self._encode(items, conn_id, generation, recv_ns)
        self._write(data)
        self._next_seq += len(items)
        self._size += len(data)
        self._sizes[self._name] = self._size
        self._dirty = True
        self.maybe_sync()
        return self._next_seq - 1

    def maybe_sync(self) -> None:
        """fsync if ``fsync_interval`` has passed since the last one (call on idle ticks too)."""
        if self._dirty and self._clock() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._torn = True  # after a failed fsync the page cache cannot be trusted
            raise SpoolWriteError(exc.errno, f"spool fsync failed: {exc.strerror}") from exc
        self._dirty = False
        self._last_sync = self._clock()

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1

    def backlog(self) -> tuple[int, int]:
        """(records, bytes) appended but not yet acknowledged by the reader."""
        ckpt = self._checkpoint()
        if ckpt is None:
            first = min((int(n[:20]) for n in self._sizes), default=self._next_seq)
            return max(0, self._next_seq - first), sum(self._sizes.values())
        for name in [n for n in self._sizes if n < ckpt.segment]:
            del self._sizes[name]  # wholly acknowledged: the reader deletes these
        # An offset past the end of its segment (power loss took the tail) counts as its end.
        size = sum(self._sizes.values()) - min(ckpt.offset, self._sizes.get(ckpt.segment, 0))
        return max(0, self._next_seq - 1 - ckpt.seq), max(0, size)

    def is_full(self) -> bool:
        records, size = self.backlog()
        return records >= self.max_records or size >= self.max_bytes

    def _encode(
        self, items: Sequence[tuple[int, bytes]], conn_id: int, generation: int, recv_ns: int
    ) -> bytearray:
        data = bytearray()
        seq = self._next_seq
        for kind, payload in items:
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"spool payload of {len(payload)} bytes > {MAX_PAYLOAD}")
            body = _BODY.pack(seq, recv_ns, conn_id, generation, kind)
            data += _PREFIX.pack(MAGIC, len(body) + len(payload), crc32c(payload, crc32c(body)))
            data += body
            data += payload
            seq += 1
        return data

    def _write(self, data: bytearray) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                view = view[written:]
        except OSError as exc:
            self._undo()
            if exc.errno in _DISK_FULL and self._size > 0:
                self._roll_wanted = True
            raise SpoolWriteError(exc.errno, f"spool write failed: {exc.strerror}") from exc
        finally:
            view.release()

    def _undo(self) -> None:
        """Cut the segment back to before the failed append so no torn record remains."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._torn = True

    def _roll(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(SpoolWriteError):
                self.sync()  # if it fails, a new segment is exactly what is called for
            os.close(self._fd)
            self._fd = -1
        self._open_segment()

    def _open_segment(self) -> None:
        self._name = segment_name(self._next_seq)
        path = self.directory / self._name
        # The name can only exist as an empty segment left by a writer that never wrote: reuse
        # it (a reader may already hold it open), there is no tail to be torn.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags, 0o600)
            if os.fstat(self._fd).st_size:
                os.close(self._fd)
                raise OSError(errno.EEXIST, f"segment {self._name} is not empty")
            _fsync_dir(self.directory)
        except OSError as exc:
            self._fd, self._torn = -1, True  # retry the roll on the next append
            raise SpoolWriteError(exc.errno, f"spool segment open failed: {exc.strerror}") from exc
        self._size = 0
        self._sizes[self._name] = 0
        self._torn = self._roll_wanted = False

    def _recover_next_seq(self) -> int:
        """First seq after everything on disk: the newest segment's last valid record."""
        floor = FIRST_SEQ if self._ckpt is None else self._ckpt.seq + 1
        if not self._sizes:
            return floor
        newest = max(self._sizes)
        first = int(newest[:20])
        last = _last_seq(self.directory, newest)
        if last is None:  # empty: its name is unused; all damaged: never reuse its name
            return max(floor, first + (self._sizes[newest] > 0))
        return max(floor, first, last + 1)

    def _checkpoint(self) -> Checkpoint | None:
        now = self._clock()
        if now - self._ckpt_checked < _CHECKPOINT_POLL:
            return self._ckpt
        self._ckpt_checked = now
        try:
            st = os.stat(self.directory / CHECKPOINT)
        except FileNotFoundError:
            self._ckpt, self._ckpt_key = None, None
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        settled = time.time_ns() - st.st_mtime_ns > _CHECKPOINT_SETTLE_NS
        if key != self._ckpt_key or not settled:
            self._ckpt, self._ckpt_key = read_checkpoint(self.directory), key
        return self._ckpt


def _last_seq(directory: Path, name: str) -> int | None:
    """Seq of the last valid record in a segment (tolerating a torn tail), block by block."""
    cursor = _SegmentCursor(directory, name, 0, _Damage())
    cursor.sealed = True
    last: int | None = None
    try:
        while True:
            batch: list[Record] = []
            cursor.parse(batch, 256, _MAX_LENGTH, 0)
            if batch:
                last = batch[-1].seq
            elif cursor.fill() == 0:
                if cursor.at_end:
                    return last
                cursor.at_end = True
    finally:
        cursor.close()


class SpoolReader:
    """Reads records in order (store worker side) and checkpoints what has been stored."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._damage = _Damage()
        self.checkpoint_resets = 0
        self._cursor: _SegmentCursor | None = None
        self._acked: Checkpoint | None = None
        self._acked_cleaned: str | None = None  # segment whose predecessors were deleted
        self._last_read: Record | None = None  # newest record ``read`` returned
        self._start()

    @property
    def corrupt_records(self) -> int:
        """Damaged regions skipped (one per run of bad bytes between valid records)."""
        return self._damage.records

    @property
    def corrupt_bytes(self) -> int:
        return self._damage.bytes

    @property
    def position(self) -> tuple[str, int] | None:
        """(segment, offset) of the next byte to parse, or None before any segment exists."""
        cursor = self._cursor
        return None if cursor is None else (cursor.name, cursor.position)

    @property
    def acked(self) -> Checkpoint | None:
        return self._acked

    def lag_bytes(self) -> int:
        """Bytes on disk not yet returned by ``read`` (an estimate; for status)."""
        cursor = self._cursor
        if cursor is None:
            return 0
        later = [n for n in list_segments(self.directory) if n > cursor.name]
        sizes = sum(_size_or_zero(self.directory / n) for n in later)
        return cursor.file_size() - cursor.position + sizes

    def read(self, max_records: int = 1000, max_bytes: int = 16 * 1024 * 1024) -> list[Record]:
        """The complete, valid records available now (non-blocking), at most ``max_records``.

        ``max_bytes`` bounds the payload bytes returned; one record is returned even if larger.
        """
        out: list[Record] = []
        nbytes = 0
        while len(out) < max_records and nbytes < max_bytes:
            cursor = self._cursor or self._open_first()
            if cursor is None:
                break
            before = len(out)
            nbytes = cursor.parse(out, max_records, max_bytes, nbytes)
            if len(out) > before:
                self._last_read = out[-1]  # before any _advance: it must know what was read
                continue
            if cursor.fill():
                continue
            if not self._at_eof(cursor):
                break
        return out

    def ack(self, record: Record) -> None:
        """Everything up to and including ``record`` is stored: checkpoint and clean up."""
        ckpt = Checkpoint(record.seq, record.segment, record.end_offset)
        if self._acked and (ckpt.segment, ckpt.offset) <= (self._acked.segment, self._acked.offset):
            return
        self._write_checkpoint(ckpt)
        self._acked = ckpt
        if self._acked_cleaned != ckpt.segment:
            self._delete_before(ckpt.segment)
            self._acked_cleaned = ckpt.segment
        self._release_consumed()

    def _release_consumed(self) -> None:
        """Checkpoint at the start of the cursor's segment once everything read before it is acked.

        Otherwise a segment is deleted only when a record of a later one is acked; on a full disk
        the writer cannot append that record until this segment's space is given back.
        """
        acked, cursor, last = self._acked, self._cursor, self._last_read
        if acked is None or cursor is None or cursor.name <= acked.segment:
            return
        if last is not None and last.seq > acked.seq:
            # Records were read past the checkpoint and are not stored yet. (Compare seqs, not
            # offsets: the next record starts exactly where the acked one ends.)
            return
        # Delete first: on a full disk the new checkpoint may not fit, and a checkpoint naming a
        # deleted segment is safe (the next start replays from the oldest segment, all unacked).
        self._delete_before(cursor.name)
        self._acked_cleaned = cursor.name
        ckpt = Checkpoint(acked.seq, cursor.name, 0)
        self._acked = ckpt
        with contextlib.suppress(OSError):
            self._write_checkpoint(ckpt)

    def has_data(self) -> bool:
        """True if ``read`` may return something now (new bytes or a new segment)."""
        cursor = self._cursor or self._open_first()
        if cursor is None:
            return False
        if cursor.parseable or cursor.file_size() > cursor.position + cursor.buffered:
            return True
        newest = list_segments(self.directory)
        return bool(newest) and newest[-1] > cursor.name

    def wait_for_data(self, timeout: float, poll: float = 0.005) -> bool:
        """Return True as soon as data may be readable, False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.has_data():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll, left))
        return True

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None

    def _start(self) -> None:
        """Open at the checkpoint, or replay from the oldest segment if it cannot be used."""
        ckpt = read_checkpoint(self.directory)
        if ckpt is not None and ckpt.offset <= _size_or_zero(self.directory / ckpt.segment):
            try:
                cursor = _SegmentCursor(self.directory, ckpt.segment, ckpt.offset, self._damage)
            except FileNotFoundError:
                pass
            else:
                self._cursor, self._acked = cursor, ckpt
                return
        segments = list_segments(self.directory)
        # A missing checkpoint is normal on a fresh spool; with acked segments gone it is damage.
        gone = bool(segments) and int(segments[0][:20]) > FIRST_SEQ
        if (self.directory / CHECKPOINT).exists() or gone:
            self.checkpoint_resets += 1

    def _open_first(self) -> _SegmentCursor | None:
        segments = list_segments(self.directory)
        if not segments:
            return None
        self._cursor = _SegmentCursor(self.directory, segments[0], 0, self._damage)
        return self._cursor

    def _at_eof(self, cursor: _SegmentCursor) -> bool:
        """At the end of the file for now: seal or move on. False means wait for the writer."""
        if cursor.at_end:
            return self._advance(cursor)
        if not cursor.sealed:
            if not any(n > cursor.name for n in list_segments(self.directory)):
                return False  # the newest segment: an incomplete record may be in flight
            cursor.sealed = True  # re-read to EOF first: the writer may have finished it
            return True
        cursor.at_end = True
        return True

    def _advance(self, cursor: _SegmentCursor) -> bool:
        later = [n for n in list_segments(self.directory) if n > cursor.name]
        cursor.close()
        self._cursor = None
        if not later:  # deleted from under us: start again from whatever exists
            return True
        self._cursor = _SegmentCursor(self.directory, later[0], 0, self._damage)
        self._release_consumed()
        return True

    def _write_checkpoint(self, ckpt: Checkpoint) -> None:
        doc = {"seq": ckpt.seq, "segment": ckpt.segment, "offset": ckpt.offset}
        tmp = self.directory / f".{CHECKPOINT}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / CHECKPOINT)
        _fsync_dir(self.directory)

    def _delete_before(self, segment: str) -> None:
        segments = list_segments(self.directory)
        newest = segments[-1] if segments else segment
        for name in segments:
            if name < segment and name != newest:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / name).unlink()


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
