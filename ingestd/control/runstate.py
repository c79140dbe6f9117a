"""Run-state files: how workers tell the supervisor (and `ingestd status`) what they are doing.

Each worker rewrites ``<state_dir>/run/<role>.json`` at least once a second. The file doubles as the
heartbeat: a worker whose loop hangs stops rewriting it, and the supervisor replaces the worker.
Writes are atomic (temp file + rename) so a reader never sees half a file.

A full disk must not stop the heartbeat (the supervisor would kill healthy workers): files are
padded with spaces to a multiple of ``PAD`` bytes, so when the temp file cannot be written the new
status overwrites the old one in place, needing no new blocks. That write is not atomic; a reader
that catches it half-way gets None once and reads the next one.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import orjson

from ingestd.logs import scrub_strings

RUN_DIR = "run"
PAD = 4096
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})



def utc_text(when: object) -> str:
    """A wall-clock time (s) as UTC ISO text for status lines: absolute, so that they read the
    same from one look to the next; "?" when unknown."""
    if not isinstance(when, int | float) or isinstance(when, bool) or not when:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))

def run_dir(state_dir: Path) -> Path:
    path = state_dir / RUN_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def status_path(state_dir: Path, role: str) -> Path:
    return state_dir / RUN_DIR / f"{role}.json"


def write_status(state_dir: Path, role: str, status: dict[str, Any]) -> None:
    """Publish ``status`` (plus pid, role and wall-clock time) for ``role``, secrets masked as
    in the log: ``status``, ``/healthz`` and systemd's STATUS= show its reasons."""
    doc = {"role": role, "pid": os.getpid(), "time": time.time(), **scrub_strings(status)}
    data = orjson.dumps(doc)
    data += b" " * (-len(data) % PAD)  # JSON allows trailing white space
    target = status_path(state_dir, role)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        tmp.unlink(missing_ok=True)
        overwrite_in_place(target, data)


def overwrite_in_place(target: Path, data: bytes) -> bool:
    """Rewrite ``target`` within its current size (a full disk has no blocks for a new file);
    False if it could not (no such file yet, or ``data`` is longer)."""
    try:
        fd = os.open(target, os.O_WRONLY)
    except FileNotFoundError:
        return False  # nothing to overwrite yet; the next write after space returns creates it
    try:
        size = os.fstat(fd).st_size
        if len(data) > size:
            return False
        os.pwrite(fd, data.ljust(size), 0)
        return True
    finally:
        os.close(fd)


def status_identity(state_dir: Path, role: str) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of ``role``'s status file, None if it is missing: every write
    replaces the file (a new inode), so an unchanged identity means an unchanged status."""
    try:
        st = os.stat(status_path(state_dir, role))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_status(state_dir: Path, role: str) -> dict[str, Any] | None:
    """The last status ``role`` published, or None if there is none (or it is unreadable)."""
    try:
        data = orjson.loads(status_path(state_dir, role).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
