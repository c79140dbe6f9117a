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
from typing import Literal, NamedTuple, get_args

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
CHECKPOINT_INTERVAL = 0.25  # seconds: at most one checkpoint write per interval within a segment
_CHECKPOINT_SETTLE_NS = 1_000_000_000  # mtimes are coarse: re-read a file changed this recently
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# Why a message never reached the spool: the spool was at its bound or writing to it failed
# (only with ``when_full: drop_newest``), or the connection ended in the middle of it (the
# reader counts it with the reconnect). The one list (metrics start each at 0).
DropReason = Literal["spool_full", "disk_error", "cut_by_disconnect"]
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)

Group = tuple[Sequence[tuple[int, bytes]], int, int, int]
"""What ``SpoolWriter.append_many`` takes: ((kind, payload) items, conn_id, generation, recv_ns)."""


class SpoolWriteError(OSError):
    """A write or fsync failed (ENOSPC, EIO…); nothing torn was left behind. ``errno`` is kept."""


class Record(NamedTuple):
    """One record read back from the spool; ``offset`` is where it starts in ``segment``.

    A named tuple, not a frozen dataclass: one is made per record read, and a frozen dataclass's
    ``__init__`` costs one ``object.__setattr__`` per field.
    """

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


_new_record = tuple.__new__


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
        # tuple.__new__ directly: the generated Record.__new__ is a Python-level frame per record.
        return _new_record(
            Record, (seq, kind, conn_id, generation, recv_ns, payload, self.name, self._off + i)
        )

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
        # Bytes written per segment not yet known to be wholly acknowledged, and their sum, kept
        # as running totals: ``is_full`` runs on every libcurl write callback.
        self._sizes = {n: (self.directory / n).stat().st_size for n in list_segments(directory)}
        self._total = sum(self._sizes.values())
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
        self._first_seq = self._oldest_seq()

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
        """Write ``items`` ((kind, payload) pairs) with one ``writev()``; return the last seq.

        Raises SpoolWriteError (nothing of this call left on disk) if the write fails.
        """
        return self.append_many(((items, conn_id, generation, recv_ns),))

    def append_many(self, groups: Sequence[Group]) -> int:
        """``append`` for several (items, conn_id, generation, recv_ns) groups with one write;
        return the last seq. Fewer, larger writes: a write syscall costs ~12 µs here, plus the
        copy."""
        bufs: list[bytes] = []
        seq = self._next_seq
        for items, conn_id, generation, recv_ns in groups:
            seq = _encode(bufs, seq, items, conn_id, generation, recv_ns)
        if seq == self._next_seq:
            return seq - 1
        if self._torn or self._roll_wanted or self._size >= self.segment_bytes:
            self._roll()
        nbytes = sum(map(len, bufs))
        self._write(bufs, nbytes)
        self._next_seq = seq
        self._size += nbytes
        self._total += nbytes
        self._sizes[self._name] = self._size
        self._dirty = True
        self.maybe_sync()
        return seq - 1

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
        """(records, bytes) appended but not yet acknowledged by the reader.

        O(1): running totals, and the checkpoint looked at every ``_CHECKPOINT_POLL`` s at most
        (a stale checkpoint only overstates the backlog, so a full spool is never missed).
        """
        if self._clock() - self._ckpt_checked >= _CHECKPOINT_POLL:
            self._poll_checkpoint()
        ckpt = self._ckpt
        if ckpt is None:
            return max(0, self._next_seq - self._first_seq), self._total
        # An offset past the end of its segment (power loss took the tail) counts as its end.
        size = self._total - min(ckpt.offset, self._sizes.get(ckpt.segment, 0))
        return max(0, self._next_seq - 1 - ckpt.seq), max(0, size)

    def is_full(self) -> bool:
        records, size = self.backlog()
        return records >= self.max_records or size >= self.max_bytes

    def _write(self, bufs: list[bytes], nbytes: int) -> None:
        """Write all of ``bufs`` (``nbytes`` in all), or undo the part written and raise."""
        try:
            written = os.writev(self._fd, bufs[:_IOV_MAX])
            if written != nbytes:  # more than IOV_MAX buffers, or a short write
                _write_rest(self._fd, bufs, written)
        except OSError as exc:
            self._undo()
            if exc.errno in _DISK_FULL and self._size > 0:
                self._roll_wanted = True
            raise SpoolWriteError(exc.errno, f"spool write failed: {exc.strerror}") from exc

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
        self._total -= self._sizes.get(self._name, 0)  # an empty leftover of the same name
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

    def _oldest_seq(self) -> int:
        return min((int(n[:20]) for n in self._sizes), default=self._next_seq)

    def _poll_checkpoint(self) -> None:
        """Re-read the checkpoint if it changed; forget the segments it says are wholly acked."""
        self._ckpt_checked = self._clock()
        try:
            st = os.stat(self.directory / CHECKPOINT)
        except FileNotFoundError:
            self._ckpt, self._ckpt_key = None, None
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        settled = time.time_ns() - st.st_mtime_ns > _CHECKPOINT_SETTLE_NS
        if key == self._ckpt_key and settled:
            return
        self._ckpt, self._ckpt_key = read_checkpoint(self.directory), key
        if self._ckpt is not None:
            acked = [n for n in self._sizes if n < self._ckpt.segment]
            for name in acked:  # the reader deletes these
                self._total -= self._sizes.pop(name)
            if acked:
                self._first_seq = self._oldest_seq()


def _encode(
    out: list[bytes],
    seq: int,
    items: Sequence[tuple[int, bytes]],
    conn_id: int,
    generation: int,
    recv_ns: int,
) -> int:
    """Append each record's header and payload to ``out`` (no copy of the payload); next seq."""
    pack_body, pack_prefix = _BODY.pack, _PREFIX.pack
    for kind, payload in items:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"spool payload of {len(payload)} bytes > {MAX_PAYLOAD}")
        body = pack_body(seq, recv_ns, conn_id, generation, kind)
        crc = crc32c(payload, crc32c(body))
        out.append(pack_prefix(MAGIC, _BODY.size + len(payload), crc) + body)
        out.append(payload)
        seq += 1
    return seq


def _write_rest(fd: int, bufs: list[bytes], written: int) -> None:
    """Finish a ``writev`` that wrote only ``written`` bytes of ``bufs``, IOV_MAX at a time."""
    views = [memoryview(b) for b in bufs]
    i = 0
    while True:
        while i < len(views) and written >= len(views[i]):
            written -= len(views[i])
            i += 1
        if i == len(views):
            return
        views[i] = views[i][written:]
        written = os.writev(fd, views[i : i + _IOV_MAX])
        if written <= 0:
            raise OSError(errno.EIO, "write returned 0")


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
    """Reads records in order (store worker side) and checkpoints what has been stored.

    Checkpoint writes are coalesced: within one segment at most one per ``checkpoint_interval``
    seconds (each costs two fsyncs, during which the store loop stalls); an ack in a new segment
    is always written at once, so that consumed segments are released promptly. ``flush`` (also
    called by ``close`` and, once due, while waiting for data) writes the pending one. A crash
    loses at most the acks of the last interval: the restart replays records that were already
    stored (the store worker counts them as duplicates by ``_id``), and never skips an unacked
    record, so the delivery guarantee is unchanged.
    """

    def __init__(
        self,
        directory: Path,
        *,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._damage = _Damage()
        self.checkpoint_resets = 0
        self.checkpoint_writes = 0
        self._cursor: _SegmentCursor | None = None
        self._acked: Checkpoint | None = None
        self._written: Checkpoint | None = None  # the checkpoint on disk, as far as we know
        self._written_at = -float("inf")
        self._interval = checkpoint_interval
        self._clock = clock
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
        """Everything up to and including ``record`` is stored: checkpoint and clean up.

        The checkpoint may be written later (see the class docstring); segments are deleted only
        once a checkpoint past them is on disk.
        """
        ckpt = Checkpoint(record.seq, record.segment, record.end_offset)
        if self._acked and (ckpt.segment, ckpt.offset) <= (self._acked.segment, self._acked.offset):
            return
        written = self._written
        if (
            written is None
            or written.segment != ckpt.segment
            or self._clock() - self._written_at >= self._interval
        ):
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
        with contextlib.suppress(OSError):  # still pending: ``flush`` or the next ack retries
            self._write_checkpoint(ckpt)

    @property
    def checkpoint_pending(self) -> bool:
        """An ack not yet written to disk (a crash now would replay already-stored records)."""
        return self._acked is not None and self._acked != self._written

    def flush(self) -> None:
        """Write the pending checkpoint, if any (raises OSError if that fails)."""
        if self._acked is not None and self._acked != self._written:
            self._write_checkpoint(self._acked)

    def maybe_flush(self) -> None:
        """Write the pending checkpoint once it is due (idle ticks: no ack comes to do it), so
        the writer's backlog, and a full spool, follow what was stored."""
        if self.checkpoint_pending and self._clock() - self._written_at >= self._interval:
            with contextlib.suppress(OSError):  # retried on the next call, or by flush/close
                self.flush()

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
            self.maybe_flush()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll, left))
        return True

    def close(self) -> None:
        """Write the pending checkpoint (raises OSError if that fails) and close the segment."""
        try:
            self.flush()
        finally:
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
                self._cursor, self._acked, self._written = cursor, ckpt, ckpt
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
        self._written, self._written_at = ckpt, self._clock()
        self.checkpoint_writes += 1

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
