"""The spool's writing side (stream worker): append records, bound the backlog, roll segments.

The writer never appends after a possibly torn tail: each ``SpoolWriter`` starts a new segment.
A process crash loses nothing already written (the OS has it); a power failure loses at most
``fsync_interval``. Records are numbered on from the last one ever appended (``written``), never
from the last one found on disk, so the reader counts the records a damaged spool lost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NoReturn, get_args

import structlog

from ingestd.spool.cursor import last_record
from ingestd.spool.format import (
    BUFFERS_PER_RECORD,
    CHECKPOINT,
    FIRST_SEQ,
    Checkpoint,
    Record,
    encode_records,
    fsync_dir,
    list_segments,
    os_error_text,
    read_checkpoint,
    segment_first_seq,
    segment_name,
)
from ingestd.spool.written import WrittenMark

log = structlog.get_logger("ingestd.spool.writer")

_CHECKPOINT_POLL = 0.05  # seconds between checkpoint stats in the writer near the spool's bounds
# ... and far from them (under half of both): the store worker rewrites the checkpoint about every
# second, so a look every 0.05 s re-read it ~10 times a second on a slow stream.
_CHECKPOINT_POLL_FAR = 1.0
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
    """A write or fsync failed (ENOSPC, EIO…); nothing torn was left behind. ``errno`` is kept.

    ``kept`` is how many of the call's records (its first ones) are in the spool all the same,
    numbered and readable as if appended: only the others are to be held or dropped.
    """

    kept = 0


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
        self.checkpoint_reads = 0  # checkpoint files read (tests count them)
        self.read_error = ""  # why the checkpoint could not be looked at ("" once it can)
        self.read_failures = 0  # episodes in which it could not
        # The previous run's last record (coverage markers: did it stop cleanly, and when).
        self.last_record = self._recover_last_record()
        self._mark = WrittenMark(self.directory)
        self._next_seq = self._recover_next_seq()
        self._fd = -1
        self._torn = False  # a failed write could not be undone: start a new segment
        # The disk filled up: the next append starts a new segment, so that the reader can
        # release this one (and its space) once everything in it is stored.
        self._roll_wanted = False
        self._dirty = False
        self._last_sync = clock()
        self._name, self._size = segment_name(self._next_seq), 0
        try:
            self._open_segment()
        except SpoolWriteError as exc:
            # A full disk or a read-only state folder at start: the first append tries again,
            # and its failure follows ``when_full`` (spool.intake), as any later one does.
            log.error("spool_write_failed", error=f"{exc.filename}: {os.strerror(exc.errno or 0)}",
                      errno=errno.errorcode.get(exc.errno or 0, ""),
                      effect="retried at the first append")
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

        Raises SpoolWriteError if the write fails; its ``kept`` says how many records went in.
        """
        return self.append_many(((items, conn_id, generation, recv_ns),))

    def append_many(self, groups: Sequence[Group]) -> int:
        """``append`` for several (items, conn_id, generation, recv_ns) groups with one write;
        return the last seq. Fewer, larger writes: a write syscall costs ~12 µs here, plus the
        copy. Raises SpoolWriteError, whose ``kept`` says how many records went in."""
        bufs: list[bytes] = []
        seq = self._next_seq
        for items, conn_id, generation, recv_ns in groups:
            seq = encode_records(bufs, seq, items, conn_id, generation, recv_ns)
        if seq == self._next_seq:
            return seq - 1
        if self._torn or self._roll_wanted or self._size >= self.segment_bytes:
            self._roll()
        nbytes = sum(map(len, bufs))
        self._write(bufs, nbytes)
        self._commit(seq - self._next_seq, nbytes)
        try:
            self.maybe_sync()
        except SpoolWriteError as exc:
            exc.kept = len(bufs) // BUFFERS_PER_RECORD  # written, readable: not to be retried
            raise
        return seq - 1

    def _commit(self, records: int, nbytes: int) -> None:
        """Count ``records`` (``nbytes``) just written as appended."""
        self._next_seq += records
        self._mark.note(self._next_seq - 1)
        self._size += nbytes
        self._total += nbytes
        self._sizes[self._name] = self._size
        self._dirty = True

    def probe(self, room: int) -> bool:
        """Whether an append of ``room`` bytes should go in now: the segment is open (opening a
        new one if a failure left none) and the file system is writable with ``room`` bytes
        free. For ``when_full: drop_newest``, which holds nothing to retry: the stream's state
        says the disk is failing until a write or this look says it is not."""
        if self._torn or self._fd < 0:
            try:
                self._roll()
            except SpoolWriteError:
                return False
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return False
        return not st.f_flag & os.ST_RDONLY and st.f_bavail * st.f_frsize >= room

    def sync_due_in(self) -> float:
        """Seconds until ``maybe_sync`` has an fsync to do (infinite when nothing is unsynced)."""
        if not self._dirty:
            return float("inf")
        return max(0.0, self._last_sync + self.fsync_interval - self._clock())

    def maybe_sync(self) -> None:
        """fsync if ``fsync_interval`` has passed since the last one (call on idle ticks too)."""
        if self._dirty and self._clock() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._torn = True  # after a failed fsync the page cache cannot be trusted
            raise SpoolWriteError(exc.errno, f"spool fsync failed: {exc.strerror}",
                                  str(self.directory / self._name)) from exc
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
            self._mark.close()

    @property
    def acked_seq(self) -> int:
        """The last seq the reader acknowledged, as of the last look at the checkpoint."""
        return self._ckpt.seq if self._ckpt is not None else self._first_seq - 1

    def backlog(self) -> tuple[int, int]:
        """(records, bytes) appended but not yet acknowledged by the reader.

        O(1): running totals, and the checkpoint looked at every ``_CHECKPOINT_POLL`` s at most
        near the bounds, every ``_CHECKPOINT_POLL_FAR`` s under half of them (a stale checkpoint
        only overstates the backlog, so a full spool is never missed, and the backlog seen only
        grows until the next look: over half, looks come every ``_CHECKPOINT_POLL`` s again).
        """
        records, size = self._backlog()
        near = 2 * records >= self.max_records or 2 * size >= self.max_bytes
        if self._clock() - self._ckpt_checked >= (_CHECKPOINT_POLL if near
                                                  else _CHECKPOINT_POLL_FAR):
            self._poll_checkpoint()
            records, size = self._backlog()
        return records, size

    def _backlog(self) -> tuple[int, int]:
        """``backlog`` as of the last look at the checkpoint."""
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
        """Write all of ``bufs`` (``nbytes`` in all), or keep the whole records written, undo
        the rest and raise (see ``_fail``)."""
        written = 0
        try:
            written = os.writev(self._fd, bufs[:_IOV_MAX])
            while written != nbytes:  # more than IOV_MAX buffers, or a short write
                written += _write_more(self._fd, bufs, written)
        except OSError as exc:
            self._fail(exc, bufs, written)

    def _fail(self, exc: OSError, bufs: list[bytes], written: int) -> NoReturn:
        """A write stopped after ``written`` bytes: keep its whole records, cut off the rest.

        Whole records stay (``SpoolWriteError.kept``): the reader may have read them already, in
        the instant before this runs, and a record read must not come again with its retry (it
        was stored twice, counted twice; with ``drop_newest``, stored and counted dropped)."""
        where = str(self.directory / self._name)
        records, whole = _whole_records(bufs, written)
        if whole != written:
            self._undo(self._size + whole)
        self._commit(records, whole)
        if exc.errno in _DISK_FULL and self._size > 0 and not self._torn:
            # Roll now: an empty segment needs no data block, and once it exists the reader
            # can pass this one and delete it as soon as it is stored, which gives the space
            # back for the retries. (If the new one cannot be opened, the next append tries.)
            self._roll_wanted = True
            with contextlib.suppress(SpoolWriteError):
                self._roll()
        error = SpoolWriteError(exc.errno, f"spool write failed: {exc.strerror}", where)
        error.kept = records
        raise error from exc

    def _undo(self, size: int) -> None:
        """Cut the segment back to ``size`` (a record boundary) so no torn record remains."""
        try:
            os.ftruncate(self._fd, size)
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
            fsync_dir(self.directory)
        except OSError as exc:
            self._fd, self._torn = -1, True  # retry the roll on the next append
            raise SpoolWriteError(exc.errno, f"spool segment open failed: {exc.strerror}",
                                  str(path)) from exc
        self._size = 0
        self._total -= self._sizes.get(self._name, 0)  # an empty leftover of the same name
        self._sizes[self._name] = 0
        self._torn = self._roll_wanted = False

    def _recover_next_seq(self) -> int:
        """First seq after everything on disk (the newest segment's last valid record) and after
        the last record ever appended: a number is never given twice, even to replace a record
        that damage took."""
        floor = FIRST_SEQ if self._ckpt is None else self._ckpt.seq + 1
        if self._mark.previous is not None:
            floor = max(floor, self._mark.previous + 1)
        if not self._sizes:
            return floor
        newest = max(self._sizes)
        first = segment_first_seq(newest)
        last = self.last_record
        if last is None or last.segment != newest:
            # empty: its name is unused; all damaged: never reuse its name
            return max(floor, first + (self._sizes[newest] > 0),
                       last.seq + 1 if last is not None else 0)
        return max(floor, first, last.seq + 1)

    def _recover_last_record(self) -> Record | None:
        """The newest valid record on disk, looking back past empty or damaged segments."""
        for name in sorted(self._sizes, reverse=True):
            if self._sizes[name] and (record := last_record(self.directory, name)) is not None:
                return record
        return None

    def _oldest_seq(self) -> int:
        return min((segment_first_seq(n) for n in self._sizes), default=self._next_seq)

    def _unreadable(self, exc: OSError) -> None:
        """Report, once per episode, a spool folder this worker can no longer look into: a
        PermissionError here killed the stream worker with a traceback."""
        if self.read_error:
            return
        self.read_failures += 1
        self.read_error = os_error_text(
            exc, exc.filename or self.directory / CHECKPOINT)
        log.error("spool_unreadable", error=self.read_error,
                  effect="the store worker's progress cannot be seen: the backlog counts from "
                  "the last checkpoint seen; appends go on while the disk takes them",
                  action="make the state folder readable and writable by the daemon's user "
                  "again (undo the mount or permission change)")

    def _poll_checkpoint(self) -> None:
        """Re-read the checkpoint if it changed; forget the segments it says are wholly acked."""
        self._ckpt_checked = self._clock()
        try:
            st = os.stat(self.directory / CHECKPOINT)
        except FileNotFoundError:
            self._ckpt, self._ckpt_key = None, None
            return
        except OSError as exc:  # the folder made unreadable under the daemon (a mount over it)
            self._unreadable(exc)
            return  # the last checkpoint seen: the backlog is overstated, never understated
        if self.read_error:
            log.info("spool_readable_again", previous_error=self.read_error)
            self.read_error = ""
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        settled = time.time_ns() - st.st_mtime_ns > _CHECKPOINT_SETTLE_NS
        if key == self._ckpt_key and settled:
            return
        self._ckpt = read_checkpoint(self.directory)
        # one caught in the middle of an in-place rewrite (a full disk) is read again next time
        self._ckpt_key = key if self._ckpt is not None else None
        self.checkpoint_reads += 1
        if self._ckpt is not None:
            acked = [n for n in self._sizes if n < self._ckpt.segment]
            for name in acked:  # the reader deletes these
                self._total -= self._sizes.pop(name)
            if acked:
                self._first_seq = self._oldest_seq()


def _write_more(fd: int, bufs: list[bytes], written: int) -> int:
    """One more ``writev`` of ``bufs`` past their first ``written`` bytes (IOV_MAX buffers at
    most); the bytes it wrote."""
    i = 0
    while written >= len(bufs[i]):
        written -= len(bufs[i])
        i += 1
    n = os.writev(fd, [memoryview(bufs[i])[written:], *bufs[i + 1 : i + _IOV_MAX]])
    if n <= 0:
        raise OSError(errno.EIO, "write returned 0")
    return n


def _whole_records(bufs: list[bytes], written: int) -> tuple[int, int]:
    """(records, bytes) of the whole records in the first ``written`` bytes of ``bufs``."""
    records = size = 0
    for i in range(0, len(bufs), BUFFERS_PER_RECORD):
        record = sum(map(len, bufs[i : i + BUFFERS_PER_RECORD]))
        if size + record > written:
            break
        records, size = records + 1, size + record
    return records, size
