"""The number of the last record the writer appended, kept beside the segments.

The segments themselves cannot say that their newest one was cut short: a cut exactly at a record
boundary leaves a valid, shorter segment, and a new writer would go on numbering after its last
record, so the reader could not tell the records lost (``numbering``). With this mark a new writer
numbers on from the last record ever appended: the records a cut took are numbers the reader
skips, and counts. The mark is rewritten in place on every append and never fsynced (a ~1 µs
system call per append, not per tweet): after a process crash it is exact; after a power loss it
is at most as far as what was appended, so it never counts a record that was never written, and
the records appended after the segment's last fsync are counted when the mark outlived them.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

from ingestd.spool.checksum import crc32c

WRITTEN = "written"
_MARK = struct.Struct("<QI")  # seq, crc32c of the seq's 8 bytes


class WrittenMark:
    """The spool's ``written`` file: read once when a writer starts, then rewritten per append."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / WRITTEN
        self.previous = _read(self.path)  # the last run's mark (None: none, or unreadable)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            self._fd = -1  # a best-effort record: appends never fail for it

    def note(self, seq: int) -> None:
        """Record ``seq`` as the last record appended."""
        if self._fd >= 0:
            mark = _MARK.pack(seq, crc32c(seq.to_bytes(8, "little")))
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, mark, 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def last_written(directory: Path) -> int | None:
    """The mark in ``directory``: the number of the last record a writer appended there (None:
    none, or unreadable). Records up to it that are no longer on disk were cut off."""
    return _read(directory / WRITTEN)


def _read(path: Path) -> int | None:
    try:
        raw = path.read_bytes()[:_MARK.size]
    except OSError:
        return None
    if len(raw) < _MARK.size:
        return None
    seq, crc = _MARK.unpack(raw)
    return seq if crc32c(raw[:8]) == crc else None
