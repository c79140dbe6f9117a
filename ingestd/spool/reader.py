"""The spool's reading side (store worker): records in order, acks, checkpoints, cleanup.

Every record's CRC is checked; damage is skipped by scanning for the next record that validates,
and counted (``corrupt_records``, ``corrupt_bytes``), never fatal. Record numbers skipped are
counted too (``missing_records``): damage that leaves no bytes to skip loses records all the same.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from ingestd.spool.cursor import Damage, SegmentCursor, ends_record, record_at
from ingestd.spool.format import (
    CHECKPOINT,
    FIRST_SEQ,
    Checkpoint,
    Record,
    RecordRef,
    file_at_fault,
    list_segments,
    os_error_text,
    read_checkpoint,
    reserve_checkpoint,
    segment_first_seq,
    write_checkpoint,
)
from ingestd.spool.numbering import Numbering
from ingestd.spool.watch import SpoolWatch

log = structlog.get_logger("ingestd.spool.reader")

CHECKPOINT_INTERVAL = 0.25  # seconds: at most one checkpoint write per interval within a segment


class SpoolUnreadable(OSError):
    """The spool folder cannot be listed (its permissions changed, a mount over it): ``read``
    waits where it was, and reads on once it can (``SpoolReader.read_error`` says why)."""


class SpoolReader:
    """Reads records in order (store worker side) and checkpoints what has been stored.

    Checkpoint writes are coalesced: within one segment at most one per ``checkpoint_interval``
    seconds (each costs two fsyncs, during which the store loop stalls); an ack in a new segment
    is always written at once, so that consumed segments are released promptly. ``flush`` (also
    called by ``close`` and, once due, while waiting for data) writes the pending one. A crash
    loses at most the acks of the last interval: the restart replays records that were already
    stored (the store worker counts them as duplicates by ``_id``), and never skips an unacked
    record, so the delivery guarantee is unchanged.

    A checkpoint that cannot be written (a full disk past ``write_checkpoint``'s in-place
    fallback, a read-only file system, EIO) never stops the reader: the ack stays pending and is
    retried by the next ack and on idle ticks, ``checkpoint_error`` says why (the store worker's
    status is degraded meanwhile), and the segments behind it are kept until one is written.
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
        self._damage = Damage()
        self.checkpoint_resets = 0
        self.checkpoint_writes = 0
        self._cursor: SegmentCursor | None = None
        self._acked: Checkpoint | None = None
        self._written: Checkpoint | None = None  # the checkpoint on disk, as far as we know
        self._written_at = -float("inf")
        self.checkpoint_error = ""  # why the last checkpoint write failed ("" once one works)
        self.checkpoint_failures = 0  # checkpoint writes that failed
        self.read_error = ""  # why the spool folder could not be read ("" once it can)
        self.read_failures = 0  # episodes in which it could not be read
        self._listed: list[str] = []  # the segments at the last good look (for figures only)
        self._interval = checkpoint_interval
        self._clock = clock
        # Runs before each checkpoint write, with the checkpoint: what must be durable before
        # the records it passes are (the store worker writes its coverage ledger, and its counts
        # at that checkpoint, here). An exception leaves the checkpoint unwritten: the next start
        # replays, it never skips.
        self.before_checkpoint: Callable[[Checkpoint], None] = lambda ckpt: None
        self._acked_cleaned: str | None = None  # segment whose predecessors were deleted
        self._last_read: Record | None = None  # newest record ``read`` returned
        # Told each run of record numbers found lost (first, last), as ``read`` meets it, before
        # the record after it is returned (the store worker counts them: ``missing_records``
        # counts them all, also those an earlier reader of the same spool counted already).
        self.on_missing: Callable[[int, int], None] = lambda first, last: None
        self._numbering = Numbering(FIRST_SEQ - 1, None, self._lost)  # set by ``_start``
        self.watch = SpoolWatch(self.directory)
        self._start()

    @property
    def corrupt_records(self) -> int:
        """Damaged regions skipped (one per run of bad bytes between valid records)."""
        return self._damage.records

    @property
    def corrupt_bytes(self) -> int:
        return self._damage.bytes

    @property
    def missing_records(self) -> int:
        """Record numbers skipped: records lost to damage, whether or not it left bytes."""
        return self._numbering.missing

    @property
    def acked(self) -> Checkpoint | None:
        return self._acked

    @property
    def written(self) -> Checkpoint | None:
        """The checkpoint on disk, as far as this reader knows (None: none it wrote or trusts)."""
        return self._written

    def read(self, max_records: int = 1000, max_bytes: int = 16 * 1024 * 1024) -> list[Record]:
        """The complete, valid records available now (non-blocking), at most ``max_records``.

        ``max_bytes`` bounds the payload bytes returned; one record is returned even if larger.
        """
        out: list[Record] = []
        nbytes = 0
        try:
            while len(out) < max_records and nbytes < max_bytes:
                cursor = self._cursor or self._open_first()
                if cursor is None:
                    break
                before = len(out)
                nbytes = cursor.parse(out, max_records, max_bytes, nbytes)
                if len(out) > before:
                    # before any _advance: it must know what was read, and the numbering too
                    self._numbering.check(out, before)
                    self._last_read = out[-1]
                    continue
                if cursor.fill():
                    continue
                if not self._at_eof(cursor):
                    break
        except SpoolUnreadable:
            pass  # what was read is returned; the next call starts where this one stopped
        return out

    def _segments(self) -> list[str]:
        """``list_segments``, raising ``SpoolUnreadable`` (reported once per episode) if the
        folder cannot be listed: a state folder made unreadable under the daemon killed the
        worker with a PermissionError traceback."""
        try:
            names = list_segments(self.directory)
        except OSError as exc:
            if not self.read_error:
                self.read_failures += 1
                self.read_error = os_error_text(exc, exc.filename or self.directory)
                log.error("spool_unreadable", error=self.read_error,
                          effect="storing waits where it was; the stream worker's spool keeps "
                          "what arrives meanwhile (spool.when_full if it cannot write either)",
                          action="make the state folder readable and writable by the daemon's "
                          "user again (undo the mount or permission change): reading resumes "
                          "by itself")
            raise SpoolUnreadable(exc.errno, exc.strerror, exc.filename) from exc
        if self.read_error:
            log.info("spool_readable_again", previous_error=self.read_error)
            self.read_error = ""
        self._listed = names
        return names

    def _listed_or_last(self) -> list[str]:
        """The segments now, or at the last good look if the folder cannot be read (figures)."""
        try:
            return self._segments()
        except SpoolUnreadable:
            return self._listed

    def reread(self, ref: RecordRef) -> Record | None:
        """The record ``ref`` names, read back from its segment (a tweet's payload for its dead
        letter: the store worker keeps only a ``RecordRef`` of each tweet once it is encoded).
        A record not acked yet is still on disk; None if it cannot be read back intact."""
        return record_at(self.directory, ref.segment, ref.offset, ref.seq)

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
            self._try_write(ckpt)  # if it fails, pending: the next ack or an idle tick retries
        self._acked = ckpt
        self._clean_behind_written()
        self._release_consumed()

    def _clean_behind_written(self) -> None:
        """Delete the segments before the checkpoint on disk, once per segment it reaches.

        Also after a checkpoint written late (``maybe_flush``: the one that could not be written
        before, a folder in its place): a quiet stream brings no ack to free what it passes.
        """
        written = self._written
        if written is not None and self._acked_cleaned != written.segment \
                and self._delete_before(written.segment):
            self._acked_cleaned = written.segment

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
        if not self._delete_before(cursor.name, release_now=True):
            return
        self._acked_cleaned = cursor.name
        ckpt = Checkpoint(acked.seq, cursor.name, 0)
        self._acked = ckpt
        self._try_write(ckpt)  # if it fails, still pending: ``flush`` or the next ack retries

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
        if self.checkpoint_pending and self._clock() - self._written_at >= self._interval \
                and self._acked is not None and self._try_write(self._acked):
            self._clean_behind_written()  # else retried on the next call, or by close

    def has_data(self) -> bool:
        """True if ``read`` may return something now (new bytes or a new segment)."""
        cursor = self._cursor or self._open_first()
        if cursor is None:
            return False
        if cursor.parseable or cursor.file_size() > cursor.position + cursor.buffered:
            return True
        newest = self._listed_or_last()
        return bool(newest) and newest[-1] > cursor.name

    def unread_bytes(self) -> int:
        """Bytes of the spool not read yet (records and their framing): how far behind the
        stream this reader is. A few system calls: for a decision per batch, not per record."""
        cursor = self._cursor
        ahead = 0 if cursor is None else max(0, cursor.file_size() - cursor.position)
        return ahead + sum(_size_or_zero(self.directory / n) for n in self._listed_or_last()
                           if cursor is None or n > cursor.name)

    def unacked(self) -> tuple[int, int]:
        """(seq, bytes): the checkpoint on disk and the spool's bytes after it, what the next
        start would replay. The store worker publishes them: it writes the last checkpoint at a
        stop, after the stream worker's last word on the queue (``status.queue``)."""
        ckpt = self._written
        if ckpt is None:
            return 0, sum(_size_or_zero(self.directory / n) for n in self._listed_or_last())
        after = sum(_size_or_zero(self.directory / n) for n in self._listed_or_last()
                    if n >= ckpt.segment)
        return ckpt.seq, max(0, after - ckpt.offset)

    def wait_for_data(self, timeout: float) -> bool:
        """Return True as soon as data may be readable, False after ``timeout`` seconds, or at
        once when the watch's wake-up pipe is written (a signal: SIGTERM must end the wait, not
        the next heartbeat up to a second later).

        Sleeps on the spool folder's inotify events (``SpoolWatch``), waking early only to write
        a checkpoint that falls due meanwhile.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.watch.clear()  # what came before this look is seen by has_data
            if self.has_data():
                return True
            self.maybe_flush()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.checkpoint_pending:
                left = min(left, max(0.0, self._written_at + self._interval - self._clock()))
            if self.watch.wait(left):
                return self.has_data()

    def close(self) -> None:
        """Write the pending checkpoint (raises OSError if that fails) and close the segment."""
        try:
            self.flush()
        finally:
            self.watch.close()
            if self._cursor is not None:
                self._cursor.close()
                self._cursor = None

    def _start(self) -> None:
        """Open at the checkpoint, or replay from the oldest segment if it cannot be used."""
        reserve_checkpoint(self.directory)
        ckpt = read_checkpoint(self.directory)
        if ckpt is not None and self._trusted(ckpt):
            self._cursor = SegmentCursor(self.directory, ckpt.segment, ckpt.offset, self._damage)
            self._acked = self._written = ckpt
            self._numbering = Numbering(ckpt.seq, ckpt.seq + 1, self._lost)
            return
        if ckpt is not None:  # not trusted to resume from, but its number was stored
            self._numbering = Numbering(ckpt.seq, None, self._lost)
        segments = list_segments(self.directory)
        # A missing checkpoint is normal on a fresh spool; with acked segments gone it is damage.
        gone = bool(segments) and segment_first_seq(segments[0]) > FIRST_SEQ
        if (self.directory / CHECKPOINT).exists() or gone:
            self.checkpoint_resets += 1

    def _trusted(self, ckpt: Checkpoint) -> bool:
        """A checkpoint is used only if it is consistent: a valid record with its seq ends
        exactly at its offset, or (offset 0, written by ``_release_consumed``) its segment is the
        oldest. Any other (garbled) one could skip unacked records or start inside one; replaying
        from the oldest segment instead only repeats records already stored."""
        if ckpt.offset > _size_or_zero(self.directory / ckpt.segment):
            return False
        if ckpt.offset == 0:
            return list_segments(self.directory)[:1] == [ckpt.segment]
        try:
            return ends_record(self.directory, ckpt.segment, ckpt.offset, ckpt.seq)
        except FileNotFoundError:
            return False

    def _lost(self, first: int, last: int) -> None:
        self.on_missing(first, last)

    def _open_first(self) -> SegmentCursor | None:
        segments = self._segments()
        if not segments:
            return None
        self._cursor = SegmentCursor(self.directory, segments[0], 0, self._damage)
        self._numbering.enter(segments[0])
        return self._cursor

    def _at_eof(self, cursor: SegmentCursor) -> bool:
        """At the end of the file for now: seal or move on. False means wait for the writer."""
        if cursor.at_end:
            return self._advance(cursor)
        if not cursor.sealed:
            if not any(n > cursor.name for n in self._segments()):
                return False  # the newest segment: an incomplete record may be in flight
            cursor.sealed = True  # re-read to EOF first: the writer may have finished it
            return True
        cursor.at_end = True
        return True

    def _advance(self, cursor: SegmentCursor) -> bool:
        later = [n for n in self._segments() if n > cursor.name]
        cursor.close()
        self._cursor = None
        if not later:  # deleted from under us: start again from whatever exists
            return True
        self._cursor = SegmentCursor(self.directory, later[0], 0, self._damage)
        self._numbering.enter(later[0])
        self._release_consumed()
        return True

    def _write_checkpoint(self, ckpt: Checkpoint) -> None:
        self.before_checkpoint(ckpt)
        try:
            write_checkpoint(self.directory, ckpt)
        except OSError as exc:
            self._written_at = self._clock()  # retried an interval later, not on every record
            self.checkpoint_failures += 1
            where = file_at_fault(exc) or self.directory / CHECKPOINT
            self.checkpoint_error = os_error_text(exc, where)
            log.error("spool_checkpoint_write_failed", error=self.checkpoint_error,
                      effect="the checkpoint stays pending and is retried; stored segments are "
                      "kept until it is written")
            raise
        self._written, self._written_at = ckpt, self._clock()
        self.checkpoint_writes += 1
        if self.checkpoint_error:
            log.info("spool_checkpoint_write_recovered", failures=self.checkpoint_failures,
                     previous_error=self.checkpoint_error)
            self.checkpoint_error = ""

    def _try_write(self, ckpt: Checkpoint) -> bool:
        """``_write_checkpoint``; False (reported) instead of OSError if it failed."""
        try:
            self._write_checkpoint(ckpt)
        except OSError:
            return False
        return True

    def _delete_before(self, segment: str, release_now: bool = False) -> bool:
        """Delete the segments before ``segment`` (never the newest). Their cached pages are freed
        on a ``spool-release`` thread, or before returning with ``release_now`` (a full disk
        needs the space at once). False if one could not be deleted (a read-only file system:
        a later ack tries again)."""
        try:
            segments = self._segments()
        except SpoolUnreadable:
            return False  # a later ack tries again
        newest = segments[-1] if segments else segment
        held: list[int] = []
        try:
            for name in segments:
                if name < segment and name != newest:
                    with contextlib.suppress(FileNotFoundError):
                        held.append(_unlink_held(self.directory / name))
        except OSError as exc:
            log.error("spool_segment_delete_failed", path=exc.filename, error=exc.strerror,
                      errno=errno.errorcode.get(exc.errno or 0, ""))
            return False
        finally:
            if release_now or not held:
                _close_all(held)
            else:
                threading.Thread(target=_close_all, args=(held,), name="spool-release",
                                 daemon=True).start()
        return True


def _unlink_held(path: Path) -> int:
    """Delete ``path`` from the folder now, holding it open: its pages are freed at the last close.

    Freeing a 64 MB segment's cached pages took ~20 ms of the store loop in a burst (in the
    unlink); with the file held open the unlink returns at once and the ``spool-release`` thread
    (``_close_all``) pays for the pages. The folder is the same as with a plain unlink.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _size_or_zero(path: Path) -> int:
    """The file's size; 0 if it is gone or cannot be looked at (a figure, never fatal)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
