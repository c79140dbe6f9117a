"""The state folder: its sub-folders, whether it can be used, and creating them at start.

``inspect`` only looks (``ingestd check`` must create nothing); ``prepare`` creates the folders
once the supervisor holds the state-folder lock. Both name the path at fault: "…/typo.yaml is
not a directory" says more than the ENOTDIR of a mkdir three levels down.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ingestd.control import runstate
from ingestd.spool import generations
from ingestd.spool.format import file_at_fault, list_segments, write_atomically

# Created at start by the supervisor, so that a folder the workers could not create (spool/ by
# the stream worker, deadletter/ by the store worker) stops the start with one clear error
# instead of a crash loop (generations/ is the supervisor's own: spool.generations).
SUBDIRS = (runstate.RUN_DIR, "spool", "deadletter", generations.DIRNAME)
ACCESS = os.W_OK | os.X_OK  # create and remove entries
_EFFECTIVE = os.access in os.supports_effective_ids  # judge as the daemon's own uid
MOUNTINFO = Path("/proc/self/mountinfo")
# The state folder's format stamp: ``{"format": N}``. N names what this version writes there (spool
# record kinds 0-6, checkpoint, written mark, generations/, dead letters); a later version that
# writes something this one would misread (a new record kind, a new checkpoint) raises it, so this
# version refuses the folder instead of dead-lettering or skipping what it cannot read. Versions
# before the stamp ignore it (docs/design.md, "Upgrades and rollbacks").
FORMAT_FILE = "format"
FORMAT = 1
# Kernel file systems that hold no files of ours: root may look able to write there (access(2)
# says yes on /proc), yet nothing can be created (the audit's state_dir: /proc/ingestd).
PSEUDO_FS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs",
                       "securityfs", "pstore", "bpf", "configfs", "efivarfs", "mqueue",
                       "fusectl", "binfmt_misc", "nsfs", "autofs"})


@dataclass(frozen=True)
class Finding:
    """Why a state folder cannot be used. ``anyone``: no user could use it (a path component
    that is a file, a read-only file system), not only the user who looked."""

    reason: str
    anyone: bool


def inspect(state_dir: Path) -> Finding | None:
    """What stops ``state_dir`` (and its sub-folders) being created and written; no side effects."""
    if (kind := file_system_type(state_dir)) in PSEUDO_FS:
        return Finding(f"{state_dir} is on the kernel's {kind} file system, which holds no files",
                       anyone=True)
    existing = Path(state_dir.anchor or "/")
    for path in (*reversed(state_dir.parents), state_dir):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            finding = _writable(existing)
            return None if finding is None else Finding(
                f"{path} cannot be created: {finding.reason}", finding.anyone)
        except OSError as exc:
            return Finding(f"{path}: {exc.strerror}", exc.errno != errno.EACCES)
        if not stat.S_ISDIR(mode):
            return Finding(f"{path} is not a directory", anyone=True)
        existing = path
    for path in (state_dir, *(state_dir / name for name in SUBDIRS)):
        finding = _existing_dir(path)
        if finding is not None:
            return finding
    return _newer_format(state_dir) or _unusable_segment(state_dir / "spool")


def _newer_format(state_dir: Path) -> Finding | None:
    """The stamp of a later version (or one that is not a stamp): this version must not run the
    folder, whose spool may hold what it cannot read."""
    path = state_dir / FORMAT_FILE
    try:
        doc = json.loads(path.read_bytes())
        found = doc["format"]
        if isinstance(found, bool) or not isinstance(found, int):
            raise TypeError(found)
    except FileNotFoundError:
        return None  # a new folder, or an older version's
    except OSError as exc:
        return Finding(f"{path}: {exc.strerror}", exc.errno != errno.EACCES)
    except (ValueError, TypeError, KeyError):
        return Finding(f"{path} is not a format stamp ({{\"format\": N}}): remove it if no "
                       "later ingestd wrote it", anyone=True)
    if found <= FORMAT:
        return None
    return Finding(f"{path} says format {found}: a later ingestd wrote this folder, and this "
                   f"version reads format {FORMAT} and older. Run that version until `ingestd "
                   "status` shows an empty queue, then remove the file (docs/design.md, "
                   "\"Upgrades and rollbacks\")", anyone=True)


def _unusable_segment(spool: Path) -> Finding | None:
    """A spool segment that is no file, or one this user cannot read (a chown or a backup's
    restore gone wrong): both workers would die on it at every start; the operator can fix it
    (or move it away: its records are then counted lost)."""
    try:
        names = list_segments(spool)
    except OSError as exc:  # a folder that cannot be listed (mode 0300)
        return Finding(f"{spool}: {exc.strerror}", anyone=exc.errno != errno.EACCES)
    for path in (spool / name for name in names):
        with contextlib.suppress(FileNotFoundError):  # stored and deleted meanwhile
            if not stat.S_ISREG(os.stat(path).st_mode):
                return Finding(f"{path} is not a file", anyone=True)
            if not os.access(path, os.R_OK, effective_ids=_EFFECTIVE):
                return Finding(f"{path} is not readable by uid {os.geteuid()}", anyone=False)
    return None


def file_system_type(path: Path) -> str | None:
    """The type of the file system ``path`` is on, or would be created on (its longest mount
    point prefix in /proc/self/mountinfo, the later of two mounts on one point); None if
    unknown."""
    try:
        lines = MOUNTINFO.read_text("utf-8", "replace").splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        fields, sep, after = line.partition(" - ")
        parts = fields.split()
        if not sep or len(parts) < 5 or not after.split():
            continue
        mount = _unescape(parts[4])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, after.split()[0]
    return kind


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in a path as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _existing_dir(path: Path) -> Finding | None:
    """A folder that exists must be a writable directory; a missing one is created later."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Finding(f"{path}: {exc.strerror}", exc.errno != errno.EACCES)
    if not stat.S_ISDIR(mode):
        return Finding(f"{path} is not a directory", anyone=True)
    return _writable(path)


def _writable(path: Path) -> Finding | None:
    if os.access(path, ACCESS, effective_ids=_EFFECTIVE):
        return None
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return Finding(f"{path} is on a read-only file system", anyone=True)
    uid = os.geteuid()
    # Root can write anywhere else: what stops root stops every user.
    return Finding(f"{path} is not writable by uid {uid}", anyone=uid == 0)


# A file system out of space (or the daemon's user out of quota): it passes, unlike a setting.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class StateDirUnusable(Exception):
    """The state folder cannot be created or written: ``reason`` names the path at fault.
    ``full``: only because its file system has no space left, which frees up by itself (the
    spool's stored segments are deleted, a log rotates), unlike a setting."""

    def __init__(self, state_dir: Path, reason: str, *, full: bool = False) -> None:
        super().__init__(reason)
        self.state_dir = state_dir
        self.reason = reason
        self.full = full


def explain(state_dir: Path, exc: OSError) -> StateDirUnusable:
    """``exc`` (from creating or writing in ``state_dir``) as a reason naming the culprit."""
    finding = inspect(state_dir)
    if finding is not None:
        return StateDirUnusable(state_dir, finding.reason)
    where = file_at_fault(exc) or state_dir
    return StateDirUnusable(state_dir, f"{where}: {exc.strerror or type(exc).__name__}",
                            full=exc.errno in NO_SPACE)


def prepare(state_dir: Path) -> None:
    """Create the state folder's sub-folders; ``StateDirUnusable`` if one cannot be used."""
    try:
        for name in SUBDIRS:
            path = state_dir / name
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, ACCESS, effective_ids=_EFFECTIVE):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    except OSError as exc:
        raise explain(state_dir, exc) from None
    if (finding := _newer_format(state_dir) or _unusable_segment(state_dir / "spool")):
        raise StateDirUnusable(state_dir, finding.reason)
    try:
        _stamp(state_dir)
    except OSError as exc:
        raise explain(state_dir, exc) from None


def _stamp(state_dir: Path) -> None:
    """Write this version's format stamp, whole or not at all (once: it stays while it says so)."""
    path = state_dir / FORMAT_FILE
    data = json.dumps({"format": FORMAT}).encode() + b"\n"
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return
    write_atomically(path, data)
