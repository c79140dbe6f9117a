"""The supervisor's claim on its state folder: ``run/supervisor.lock`` (flock) and
``run/supervisor.pid`` (for ``ingestd reload``). Loaded by the supervisor only."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import structlog

from ingestd.control import runstate
from ingestd.control.daemonctl import LOCKFILE, PIDFILE

log = structlog.get_logger("ingestd.control.supervisor")


class StateDirClaim:
    """One supervisor per state folder, for as long as it or any of its workers live.

    Two supervisors on one state folder would run two readers into one spool and two store
    workers acking the same checkpoint. The workers inherit the locked file (``fds``), so the
    lock also outlives a killed supervisor until its orphaned workers have drained and exited.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.lock_fd: int | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        """The descriptors the workers must inherit: the lock, once taken."""
        return () if self.lock_fd is None else (self.lock_fd,)

    def lock(self) -> bool:
        """Take ``run/supervisor.lock``; False (logged) if another holds it."""
        path = runstate.run_dir(self.state_dir) / LOCKFILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.error("state_dir_locked", state_dir=str(self.state_dir), lock=str(path),
                      holder_pid=self.pidfile_pid(),
                      reason="another ingestd supervisor, or its workers still finishing, "
                             "uses this state folder")
            return False
        self.lock_fd = fd
        return True

    def pidfile_pid(self) -> int | None:
        """The pid in ``run/supervisor.pid``, if there is a readable one."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.state_dir / runstate.RUN_DIR / PIDFILE).read_text())
        return None

    def write_pidfile(self) -> None:
        """``run/supervisor.pid``, for ``ingestd reload``."""
        path = runstate.run_dir(self.state_dir) / PIDFILE
        tmp = path.with_name(f".{PIDFILE}.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)

    def remove_pidfile(self) -> None:
        """Remove ``run/supervisor.pid`` if it is still ours."""
        if self.pidfile_pid() == os.getpid():
            with contextlib.suppress(OSError):
                (self.state_dir / runstate.RUN_DIR / PIDFILE).unlink()

    def release(self) -> None:
        """Close our copy of the lock: it is released once the last worker holding it is gone."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
