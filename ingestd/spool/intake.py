"""The stream worker's way into the spool: coalesced appends, disk errors, the when_full policy.

``SpoolIntake`` is the reader's message callback (``source.connection.Reader``); loaded by the
stream worker only (``control.stream_role``).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Sequence

import structlog

from ingestd.spool.writer import Group, SpoolWriteError, SpoolWriter

log = structlog.get_logger("ingestd.worker")

HELD_RETRY_INTERVAL = 1.0
COALESCE_BYTES = 64 * 1024  # spool write size to aim at (see SpoolIntake)
PROBE_ROOM = 4 * COALESCE_BYTES  # free bytes that make a failing spool look writable again


def describe(exc: SpoolWriteError) -> str:
    """One line naming the file and the errno: "spool write failed: <path>: <strerror> (EROFS)"."""
    code = exc.errno or 0
    where = f"{exc.filename}: " if exc.filename else ""
    return (f"spool write failed: {where}{os.strerror(code)} "
            f"({errno.errorcode.get(code, 'unknown')})")


class SpoolIntake:
    """Appends framed messages to the spool; on a disk error holds them and blocks the reader.

    The messages of one reader pass (several libcurl callbacks) are written together, with one
    ``writev`` per ``COALESCE_BYTES`` or so: a write syscall costs ~12 µs here, plus the copy.
    The reader calls ``flush`` at the end of every pass, before it waits for the socket again, so
    nothing is kept back across a wait; the spool's bounds may be passed by one coalesced write.

    With ``when_full: block`` nothing is dropped: the held messages are retried every second and,
    while any are held, the reader pauses its connections (TCP pushes back on the endpoint).
    With ``drop_newest`` they are dropped and counted with the reason.
    """

    def __init__(self, spool: SpoolWriter, *, drop: bool,
                 on_written: Callable[[int], None] = lambda recv_ns: None) -> None:
        self.spool, self.drop = spool, drop
        self.on_written = on_written  # receive time of the newest group written (gap markers)
        self.held: list[Group] = []
        self.pending: list[Group] = []  # this pass's messages, not written yet
        self.dropped = 0
        self.last_error = ""
        self._pending_bytes = 0
        self._retry_at = 0.0

    def __call__(self, items: Sequence[tuple[int, bytes]], conn: int, gen: int, ns: int) -> None:
        if self.held:
            self._hold_or_drop([(items, conn, gen, ns)])
            return
        self.pending.append((items, conn, gen, ns))
        for _, payload in items:
            self._pending_bytes += len(payload)
        if self._pending_bytes >= COALESCE_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write this pass's messages (one write); on a disk error hold or drop them."""
        if not self.pending:
            return
        groups, self.pending, self._pending_bytes = self.pending, [], 0
        try:
            self.spool.append_many(groups)
        except SpoolWriteError as exc:
            self.last_error = describe(exc)
            log.error("spool_write_failed", error=self.last_error, policy="drop" if self.drop
                      else "block")
            self._hold_or_drop(groups)
            return
        self.on_written(groups[-1][3])
        if self.last_error:  # drop_newest holds nothing: the first good append is the recovery
            self.last_error = ""
            log.info("spool_write_recovered", dropped=self.dropped)

    def _hold_or_drop(self, groups: list[Group]) -> None:
        if self.drop:
            self.dropped += sum(len(group[0]) for group in groups)
        else:
            self.held.extend(groups)
        self._retry_at = time.monotonic() + HELD_RETRY_INTERVAL

    def retry(self) -> None:
        """Write held messages once the disk takes them again (called from the worker loop).

        With ``drop_newest`` nothing is held: after a failure the spool is probed instead, so that
        the state clears once the disk would take writes, even if no message comes to show it."""
        if time.monotonic() < self._retry_at:
            return
        if not self.held:
            if self.drop and self.last_error:
                self._retry_at = time.monotonic() + HELD_RETRY_INTERVAL
                if self.spool.probe(PROBE_ROOM):
                    self.last_error = ""
                    log.info("spool_write_recovered", dropped=self.dropped, probed=True)
            return
        try:
            while self.held:
                self.spool.append(*self.held[0])
                self.on_written(self.held.pop(0)[3])
        except SpoolWriteError as exc:
            self.last_error = describe(exc)
            self._retry_at = time.monotonic() + HELD_RETRY_INTERVAL
            return
        self.last_error = ""
        log.info("spool_write_recovered")

    def is_full(self) -> bool:
        return bool(self.held) or self.spool.is_full()
