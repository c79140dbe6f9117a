"""Turning a folder read-only under a running daemon, in one step.

``mount --bind D D`` then ``mount -o remount,bind,ro D`` (what util-linux 2.38 does even for
``mount --bind -o ro``) races the daemon: a file it opens for writing in between is opened on
the new bind mount, and the kernel refuses to make a mount with writers read-only (EBUSY,
"mount point is busy"). Linux's mount API (5.12+) has no such window: ``open_tree`` clones the
folder's mount detached from the tree, ``mount_setattr`` makes the clone read-only while no
process can reach it, and ``move_mount`` attaches it over the folder.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from tests.support.skips import unavailable

# The same numbers on every architecture (the syscall table is unified from 424 on).
_OPEN_TREE, _MOVE_MOUNT, _MOUNT_SETATTR = 428, 429, 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _call(libc: ctypes.CDLL, what: str, *args: object) -> int:
    done = int(libc.syscall(*args))
    if done < 0:
        err = ctypes.get_errno()
        unavailable(f"cannot {what}: {os.strerror(err)} (needs root and Linux 5.12+)")
    return done


def bind_read_only(folder: Path) -> None:
    """Mount a read-only bind of ``folder`` over itself, atomically for its users: files they
    hold open stay writable (they belong to the mount below), every later open is read-only.
    Undo with ``mount -o remount,bind,rw`` (writable again) and ``umount -l``."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = os.fsencode(folder)
    clone = _call(libc, f"clone the mount of {folder} (open_tree)", _OPEN_TREE, _AT_FDCWD,
                  path, _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)
    try:
        attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
        _call(libc, f"make the clone of {folder} read-only (mount_setattr)", _MOUNT_SETATTR,
              clone, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, ctypes.byref(attr),
              ctypes.c_size_t(ctypes.sizeof(attr)))
        _call(libc, f"attach the read-only clone over {folder} (move_mount)", _MOVE_MOUNT,
              clone, b"", _AT_FDCWD, path, _MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(clone)
