"""The stream worker's way into the spool: coalesced appends, disk errors, the when_full policy.

``SpoolIntake`` is the reader's message callback (``source.stream_reader.StreamReader``);
loaded by the stream worker only (``control.stream_role``).
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
RESUME_AFTER = 2.0  # s with room below the bound that end a full spool's episode (see check_bound)
COALESCE_BYTES = 64 * 1024  # spool write size to aim at (see SpoolIntake)
PROBE_ROOM = 4 * COALESCE_BYTES  # free bytes that make a failing spool look writable again


def describe(exc: SpoolWriteError) -> str:
    """One line naming the file and the errno: "spool write failed: <path>: <strerror> (EROFS)"."""
    code = exc.errno or 0
    where = f"{exc.filename}: " if exc.filename else ""
    return (f"spool write failed: {where}{os.strerror(code)} "
            f"({errno.errorcode.get(code, 'unknown')})")


def split_kept(groups: list[Group], kept: int) -> tuple[list[Group], list[Group]]:
    """``groups`` split after their first ``kept`` messages: (what a failed write still put in
    the spool, what it did not: to hold or drop). A group may be cut in two."""
    for i, (items, conn, gen, ns) in enumerate(groups):
        if kept < len(items):
            head = [*groups[:i], (items[:kept], conn, gen, ns)] if kept else groups[:i]
            return head, [(items[kept:], conn, gen, ns), *groups[i + 1:]]
        kept -= len(items)
    return groups, []


class SpoolIntake:
    """Appends framed messages to the spool; on a disk error holds them and blocks the reader.

    The messages of one reader pass (several libcurl callbacks) are written together, with one
    ``writev`` per ``COALESCE_BYTES`` or so: a write syscall costs ~12 µs here, plus the copy.
    The reader calls ``flush`` at the end of every pass, before it waits for the socket again, so
    nothing is kept back across a wait; the spool's bounds may be passed by one coalesced write.

    With ``when_full: block`` nothing is dropped: the held messages are retried every second and,
    while any are held, the reader pauses its connections (TCP pushes back on the endpoint).
    With ``drop_newest`` they are dropped and counted with the reason.

    The spool's bound (``spool.max_records``/``max_bytes``) is looked at through ``is_full``: the
    reader's look before it takes more (``block``: it pauses), or before it spools a pass's
    messages (``drop_newest``: it drops them), and the worker loop's (``check_bound``). The
    first look that finds it full logs one ``spool_full`` warning (the bound, the policy); once
    it has had room for ``RESUME_AFTER`` s, one ``spool_intake_resumed`` line says how long it was
    full (``full_seconds``, first to last look); ``full_since`` is in the status meanwhile.
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
        self.full_since: float | None = None  # wall clock the spool was found full at
        self._full_at = self._last_full_at = 0.0  # monotonic: the first and last look full

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
                      else "block", kept=exc.kept)
            written, rest = split_kept(groups, exc.kept)
            if written:
                self.on_written(written[-1][3])
            self._hold_or_drop(rest)
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
            written, self.held[:1] = split_kept(self.held[:1], exc.kept)
            if written:
                self.on_written(written[-1][3])
            self.last_error = describe(exc)
            self._retry_at = time.monotonic() + HELD_RETRY_INTERVAL
            return
        self.last_error = ""
        log.info("spool_write_recovered")

    def give_up_held(self) -> int:
        """At the stop: write the held messages if the disk takes them now, else count them as
        ``disk_error`` drops (logged). They were counted as received and lived in memory only:
        dropping them silently left ``received`` above what reached the spool, with nothing to
        say which or how many. Returns how many were dropped."""
        self._retry_at = 0.0
        self.retry()
        lost = sum(len(group[0]) for group in self.held)
        if lost:
            self.held = []
            self.dropped += lost
            log.error("spool_held_dropped", messages=lost, error=self.last_error,
                      effect="received but never spooled (the disk stayed full until the "
                      "stop): counted as dropped disk_error")
        return lost

    def is_full(self) -> bool:
        return self.check_bound() or bool(self.held)

    def check_bound(self) -> bool:
        """Whether the spool is at its bound; logs when it first is, and when it has had room
        for ``RESUME_AFTER`` s (the worker loop calls this every pass: at the bound a fast
        stream pauses and resumes many times a second, one episode in the log)."""
        full = self.spool.is_full()
        now = time.monotonic()
        if full:
            if self.full_since is None:
                self._full_changed(True, now)
            self._last_full_at = now
        elif self.full_since is not None and now - self._last_full_at >= RESUME_AFTER:
            self._full_changed(False, now)
        return full

    @property
    def policy(self) -> str:
        return "drop_newest" if self.drop else "block"

    def _full_changed(self, full: bool, now: float) -> None:
        spool = self.spool
        if full:
            self.full_since, self._full_at = time.time(), now
            records, nbytes = spool.backlog()
            log.warning("spool_full", policy=self.policy, records=records, bytes=nbytes,
                        max_records=spool.max_records, max_bytes=spool.max_bytes,
                        effect="newest messages dropped (counted)" if self.drop else
                        "intake paused: the endpoint is held back until the store worker "
                        "drains the spool")
            return
        self.full_since = None
        # From the first look that found it full to the last (the room since is RESUME_AFTER).
        log.info("spool_intake_resumed", policy=self.policy,
                 full_seconds=round(self._last_full_at - self._full_at, 3))
