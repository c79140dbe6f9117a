"""Waiting for new spool records without polling: inotify on the spool folder.

The stream worker appends to segment files and creates new ones; each ``write`` raises an
``IN_MODIFY`` event for the folder's watch, a new segment ``IN_CREATE``. The store worker blocks on
the inotify descriptor (and on any extra descriptor it is given, e.g. the signal wake-up pipe, so
that SIGTERM ends the wait at once) instead of looking at the files every few milliseconds: an idle
store worker wakes only when it has something to do.

The watch lives as long as the reader, so an append made between "nothing to read" and the wait
still leaves an event queued: no wake-up is lost. Events about the reader's own files (the
checkpoint and its temporary copy) are ignored, and so are those about the writer's ``written``
mark: it is rewritten right after each append, and would wake the reader twice for the same
records. Without inotify (another OS, or the per-user
watch limit reached) ``wait`` falls back to polling every ``POLL_FALLBACK`` seconds.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any

import structlog

from ingestd.spool.format import CHECKPOINT, CHECKPOINT_SPARE, CHECKPOINT_TMP
from ingestd.spool.written import WRITTEN

log = structlog.get_logger("ingestd.spool.watch")

POLL_FALLBACK = 0.005  # seconds between looks at the files when inotify is not available
_OWN_FILES = frozenset({CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_SPARE, WRITTEN})


class SpoolWatch:
    """Blocks until the spool folder may hold new records, an extra descriptor is readable, or
    a timeout passes. ``wakeups`` counts the waits that ended early (tests read it)."""

    def __init__(self, directory: Path) -> None:
        self.extra_fds: list[int] = []
        self.wakeups = 0
        self._inotify: Any = _open_inotify(directory)

    @property
    def polling(self) -> bool:
        """True when inotify could not be used (the fallback)."""
        return self._inotify is None

    def wait(self, timeout: float) -> bool:
        """Return once something may have changed, or after ``timeout`` seconds: True if an
        extra descriptor (the signal wake-up pipe) ended the wait, which the caller must see
        (SIGTERM: stop waiting for records)."""
        if self._inotify is None:
            time.sleep(min(POLL_FALLBACK, max(timeout, 0.0)))
            return False
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        for fd in self.extra_fds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = {fd for fd, _ in poller.poll(left * 1000)}
            if not ready:
                return False
            woken = ready & set(self.extra_fds)
            for fd in woken:
                drain_wakeups(fd)
            if self.clear() or woken:
                self.wakeups += 1
                return bool(woken)
        return False

    def clear(self) -> bool:
        """Consume the queued events; True if one was about a file the stream worker writes."""
        if self._inotify is None:
            return True
        events = self._inotify.read(timeout=0)
        return any(event.name not in _OWN_FILES for event in events)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


def _open_inotify(directory: Path) -> Any:
    try:
        from inotify_simple import INotify, flags
    except ImportError:
        log.warning("spool_watch_polling", reason="inotify_simple is not installed")
        return None
    try:
        inotify = INotify(nonblocking=True)
    except OSError as exc:
        log.warning("spool_watch_polling", reason=f"inotify unavailable: {exc}")
        return None
    try:
        inotify.add_watch(str(directory), flags.MODIFY | flags.CREATE | flags.MOVED_TO)
    except OSError as exc:
        inotify.close()
        log.warning("spool_watch_polling", reason=f"cannot watch {directory}: {exc}")
        return None
    return inotify


def drain_wakeups(fd: int) -> None:
    """Empty a non-blocking wake-up pipe (the bytes only say "look again")."""
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass
