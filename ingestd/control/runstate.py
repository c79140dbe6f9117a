"""Run-state files: how workers tell the supervisor (and `ingestd status`) what they are doing.

Each worker rewrites ``<state_dir>/run/<role>.json`` at least once a second. The file doubles as the
heartbeat: a worker whose loop hangs stops rewriting it, and the supervisor replaces the worker.

A status overwrites the file in place: files are padded with spaces to a multiple of ``PAD``
bytes, so the next status nearly always fits. That costs ~40 µs, where a temp file renamed over
the old one cost ~400 µs of CPU, because ext4 starts writing back a file renamed over another
(``auto_da_alloc``): three such writes a second were a quarter of the idle daemon's CPU
(bench/LOG.md, "Status files rewritten in place"). It needs no new blocks either, so a full disk
does not stop the heartbeat (the supervisor would kill healthy workers). An in-place write is not
atomic: the status ends with ``time_end``, equal to its ``time``, and a reader that catches a
write half-way (the two differ, or the JSON is cut) reads again. A new file, or a status that
outgrew it, is written to a temp file and renamed (atomic).
"""

from __future__ import annotations

import errno
import functools
import os
import time
from pathlib import Path
from typing import Any

import orjson

from ingestd.logs import scrub_strings

RUN_DIR = "run"
PAD = 4096
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_TRIES = 3  # reads of a status caught half-way through an in-place write


def utc_text(when: object) -> str:
    """A wall-clock time (s) as UTC ISO text for status lines: absolute, so that they read the
    same from one look to the next; "?" when unknown."""
    if not isinstance(when, int | float) or isinstance(when, bool) or not when:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def process_token() -> str:
    """This process among all that had its pid: the kernel hands a pid out again once its
    counter wraps, and a supervisor that runs for months restarts workers on reused pids."""
    return _token_of(os.getpid())


@functools.cache
def _token_of(pid: int) -> str:
    return f"{pid}-{time.time_ns()}"  # per pid: a forked child gets its own


def run_dir(state_dir: Path) -> Path:
    path = state_dir / RUN_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def status_path(state_dir: Path, role: str) -> Path:
    return state_dir / RUN_DIR / f"{role}.json"


def write_status(state_dir: Path, role: str, status: dict[str, Any]) -> bool:
    """Publish ``status`` (plus pid, ``proc`` (``process_token``), role and wall-clock time) for
    ``role``, secrets masked as in the log: ``status``, ``/healthz`` and systemd's STATUS= show
    its reasons. True if the file was written anew rather than in place: it was gone (``run/``
    or the file removed by hand, or a first write) or the status outgrew it. The supervisor then
    looks at the other files of ``run/``: the one moment that costs nothing extra to notice."""
    doc = {"role": role, "pid": os.getpid(), "proc": process_token(), "time": time.time(),
           **scrub_strings(status)}
    doc.pop("time_end", None)  # (a status read back and written again carries one)
    doc["time_end"] = doc["time"]  # last: a reader mid-write sees it differ from ``time``
    data = orjson.dumps(doc)
    data += b" " * (-len(data) % PAD)  # JSON allows trailing white space
    target = status_path(state_dir, role)
    if overwrite_in_place(target, data):
        return False
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        try:
            tmp.write_bytes(data)
        except FileNotFoundError:  # run/ removed by hand (its files look disposable): anew
            (state_dir / RUN_DIR).mkdir(exist_ok=True)
            tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        tmp.unlink(missing_ok=True)
        overwrite_in_place(target, data)
    return True


def overwrite_in_place(target: Path, data: bytes) -> bool:
    """Rewrite ``target`` within its current size (a full disk has no blocks for a new file);
    False if it could not (no such file yet, or ``data`` is longer)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
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
    changes its modification time (or replaces the file: a new inode), so an unchanged identity
    means an unchanged status."""
    try:
        st = os.stat(status_path(state_dir, role))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_status(state_dir: Path, role: str) -> dict[str, Any] | None:
    """The last status ``role`` published, or None if there is none (or it is unreadable). One
    caught half-way through an in-place write is read again."""
    path = status_path(state_dir, role)
    for _ in range(READ_TRIES):
        try:
            data = orjson.loads(path.read_bytes())
        except OSError:
            return None
        except orjson.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            return None
        if data.get("time_end", data.get("time")) == data.get("time"):
            return data
    return None
