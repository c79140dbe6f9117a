"""The supervisor's claim on its state folder: ``run/supervisor.lock`` (flock) and
``run/supervisor.pid`` (for ``ingestd reload``). Loaded by the supervisor only.

Both files are written once, at start, in a folder whose files look disposable: ``run/`` removed
by hand, or a tmp cleaner that ages files (systemd-tmpfiles), takes them while the daemon runs.
The folder's own flock still refuses a second daemon, but ``ingestd reload`` finds no pid and
``check --online`` no lock; ``restore`` writes them again (the supervisor calls it when its status
file had to be written anew, and every ``Supervisor.RUN_FILES_LOOK`` seconds: one stat).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import structlog

from ingestd.control import runstate
from ingestd.control.daemonctl import LOCKFILE, PIDFILE
from ingestd.spool.format import writing_for

log = structlog.get_logger("ingestd.control.supervisor")


class StateDirClaim:
    """One supervisor per state folder, for as long as it or any of its workers live.

    Two supervisors on one state folder would run two readers into one spool and two store
    workers acking the same checkpoint. The workers inherit the locked file (``fds``), so the
    lock also outlives a killed supervisor until its orphaned workers have drained and exited.
    The state folder itself is locked too: a lock file deleted by hand (taken for a stale one)
    would let the next supervisor lock a new file of that name and share the spool.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.lock_fd: int | None = None
        self.folder_fd: int | None = None
        # The pid file as written (inode, mtime, size); None before it is, and once removed.
        self.pidfile_written: tuple[int, int, int] | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        """The descriptors the workers must inherit: the locks, once taken."""
        return tuple(fd for fd in (self.lock_fd, self.folder_fd) if fd is not None)

    def lock(self) -> bool:
        """Take ``run/supervisor.lock`` and the folder's lock; False (logged) if another holds
        either."""
        path = runstate.run_dir(self.state_dir) / LOCKFILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        folder = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _lock_folder(folder)
        except OSError:
            os.close(fd)
            os.close(folder)
            log.error("state_dir_locked", state_dir=str(self.state_dir), lock=str(path),
                      holder_pid=self.pidfile_pid(),
                      reason="another ingestd supervisor, or its workers still finishing, "
                             "uses this state folder")
            return False
        self.lock_fd, self.folder_fd = fd, folder
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
        with writing_for(path, tmp):
            tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
        self.pidfile_written = _identity(path)

    def pidfile_intact(self) -> bool:
        """Whether ``run/supervisor.pid`` is still the file written (one stat; True before it
        was written and after it was removed at the stop: nothing to restore then)."""
        if self.pidfile_written is None:
            return True
        return _identity(self.state_dir / runstate.RUN_DIR / PIDFILE) == self.pidfile_written

    def restore(self) -> list[str]:
        """Write again what ``run/`` lost of the claim: the pid file if it is gone or was
        replaced, the lock file (locked anew) if it is gone. The names of the files written
        (``OSError`` if one cannot be)."""
        restored = []
        if not self.pidfile_intact():
            self.write_pidfile()
            restored.append(PIDFILE)
        if self.relock():
            restored.append(LOCKFILE)
        return restored

    def relock(self) -> bool:
        """Lock a new ``run/supervisor.lock`` if ours is gone from the folder (True if so).

        The held descriptor of a deleted file locks nothing a newcomer can see. A new file is
        locked only if free: a second supervisor may hold it for the moment the folder's lock
        takes to refuse it; the next look locks it then. The workers keep the old one."""
        if self.lock_fd is None:
            return False
        path = runstate.run_dir(self.state_dir) / LOCKFILE
        held = os.fstat(self.lock_fd)
        with contextlib.suppress(FileNotFoundError):
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return False
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.close(self.lock_fd)
        self.lock_fd = fd
        return True

    def remove_pidfile(self) -> None:
        """Remove ``run/supervisor.pid`` if it is still ours."""
        self.pidfile_written = None  # stopping: not to be restored
        if self.pidfile_pid() == os.getpid():
            with contextlib.suppress(OSError):
                (self.state_dir / runstate.RUN_DIR / PIDFILE).unlink()

    def release(self) -> None:
        """Close our copy of the lock: it is released once the last worker holding it is gone."""
        for fd in self.fds:
            os.close(fd)
        self.lock_fd = self.folder_fd = None


def _identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of ``path``: another write changes one of them; None if gone."""
    try:
        st = os.stat(path)
    except OSError:  # gone, or run/ unreadable: written again (restore says if that fails)
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _lock_folder(fd: int) -> None:
    """flock the state folder (``BlockingIOError`` if another holds it). A file system that
    cannot flock a folder (NFS takes flock as a POSIX lock, which needs a writable file) leaves
    the lock file's alone, as before."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as exc:
        log.debug("state_dir_folder_lock_unsupported", error=str(exc))
