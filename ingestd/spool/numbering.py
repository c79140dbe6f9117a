"""The spool's record numbers as the reader meets them: a number skipped is a record lost.

The writer numbers records one by one and names each segment after its first number, so the
records of an undamaged spool come out consecutively. Damage that leaves bytes behind (a flipped
bit, a record cut in half) is counted by the cursor as a damaged region; damage that leaves none
(a segment cut exactly at a record boundary, a segment file gone) would pass unseen. Counting the
numbers skipped counts both, and says how many records each loss took (docs/design.md, "spool/").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import structlog

from ingestd.spool.format import Record, segment_first_seq

log = structlog.get_logger("ingestd.spool.numbering")


class Numbering:
    """Counts the record numbers skipped between consecutive records read."""

    def __init__(self, stored_through: int, expected: int | None,
                 on_lost: Callable[[int, int], None] = lambda first, last: None) -> None:
        # Numbers up to this one were acknowledged as stored (the checkpoint's, even one not
        # trusted to resume from): a skip over them loses nothing. After a power loss the
        # checkpoint can be ahead of the segment's synced end; the writer then continues after
        # the checkpoint, and the records in between are already in MongoDB.
        self.stored_through = stored_through
        self.expected = expected  # the number the next record read should have (None: unknown)
        self.missing = 0  # record numbers skipped: records lost to damage
        # Told each run of numbers lost (first, last): the store worker counts them by the run that
        # received them (``sink.worker.StoreWorker.lost``).
        self.on_lost = on_lost

    def enter(self, segment: str) -> None:
        """Reading moves to ``segment`` (its name is its first record's number): the records
        between the last one read and it are gone, even at the end of the spool."""
        first = segment_first_seq(segment)
        if self.expected is not None and first > self.expected:
            self._skipped(self.expected, first, f"{segment}:0")
        self.expected = first

    def check(self, records: list[Record], start: int) -> None:
        """Follow ``records[start:]``, just read (in spool order); count and log the numbers
        they skip."""
        first, last = records[start].seq, records[-1].seq
        if first == self.expected and last - first == len(records) - start - 1:
            self.expected = last + 1  # the usual block: consecutive, two comparisons
            return
        expected = self.expected
        for record in itertools.islice(records, start, None):
            if expected is not None and record.seq > expected:
                self._skipped(expected, record.seq, f"{record.segment}:{record.offset}")
            expected = record.seq + 1
        self.expected = expected

    def _skipped(self, expected: int, found: int, where: str) -> None:
        first_lost = max(expected, self.stored_through + 1)
        lost = found - first_lost
        if lost <= 0:
            return
        self.missing += lost
        self.on_lost(first_lost, found - 1)
        log.error("spool_records_missing", count=lost, first_seq=first_lost, last_seq=found - 1,
                  resumed_at=where, effect="these records were in the spool and are gone: "
                  "never stored")
