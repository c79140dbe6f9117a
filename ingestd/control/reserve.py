"""The state folder's reserve: space set aside, while there is some, for a start onto a full disk.

A start writes a few files (the pid file, the generation's filters) before any worker runs. When
the spool itself filled the disk (MongoDB down, ``when_full: block``) only the daemon can give
that space back, by storing its backlog, and it cannot start to do so: every start exited 75
(``state_dir_full``), systemd gave up after ``StartLimitBurst``, and the backlog stayed on disk.
So ``run/space.reserve`` (``BYTES``) is kept while space allows, and removed by a start that
finds the file system short of it: the start runs, the store worker drains, the space returns.
Loaded by the supervisor only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ingestd.control import runstate
from ingestd.spool.format import write_atomically

NAME = "space.reserve"
# Far more than a start writes (the pid file, one generation file of a few KiB, directory blocks).
BYTES = 256 * 1024
# Made again only with this much free, so the reserve never takes the spool's last free blocks.
MAKE_WHEN_FREE = 4 * BYTES


def path(state_dir: Path) -> Path:
    return runstate.run_dir(state_dir) / NAME


def free_bytes(state_dir: Path) -> int | None:
    """What the daemon's (unprivileged) user may still write there; None if it cannot be told."""
    try:
        st = os.statvfs(state_dir)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def release_if_short(state_dir: Path) -> int | None:
    """Before the start's first write: remove the reserve if the file system has less than
    ``BYTES`` free; the bytes free before, if it was removed (else None)."""
    free = free_bytes(state_dir)
    if free is None or free >= BYTES:
        return None
    try:
        path(state_dir).unlink()
    except OSError:  # none was made (a disk full before the first start), or run/ is gone
        return None
    return free


def replenish(state_dir: Path) -> bool:
    """Make the reserve if it is missing and ``MAKE_WHEN_FREE`` is free; True if made. Any
    error leaves no partial file (the next look tries again)."""
    target = path(state_dir)
    if target.exists():
        return False
    free = free_bytes(state_dir)
    if free is None or free < MAKE_WHEN_FREE:
        return False
    try:
        # Random bytes: a compressing or deduplicating file system must store every block.
        write_atomically(target, os.urandom(BYTES))
    except OSError:
        with contextlib.suppress(OSError):  # a failed rename leaves the temp file
            target.with_name(f".{NAME}.tmp").unlink()
        return False
    return True
