"""What publishing a status file costs, by how it is written. Asserts nothing.

Each worker rewrites ``run/<role>.json`` once a second (``ingestd/control/runstate.py``). On an
idle daemon those writes were most of its CPU: on ext4 (``auto_da_alloc``) a file renamed over
another has its data written back at once, an I/O to the disk for every status. This prints the
CPU of one write of a status-sized file each way, in the folder given (the state folder's file
system is the one that matters), with a pause between writes as a 1-second cadence would have
(the loop's own cost, measured alone, is taken off):

* ``replace``: a temp file renamed over the old one (how ingestd wrote them until 2026-12-06);
* ``exchange``: a temp file swapped in with ``renameat2(RENAME_EXCHANGE)``, the old one unlinked;
* ``spare``: one spare file overwritten, then swapped in;
* ``in place``: ``pwrite`` over the file (how ingestd writes them now; readers detect a read
  caught half-way, see runstate's docstring).

    .venv/bin/python bench/status_write.py [--dir /var/tmp] [--writes 300] [--pause 0.005]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RENAME_EXCHANGE = 2
AT_FDCWD = -100
STATUS = b'{"role": "stream", "time": 1}' + b" " * 1500


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Writers:
    """The four ways, on one target file in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.target, self.tmp, self.spare = (folder / "s.json", folder / ".s.json.tmp",
                                             folder / ".s.json.spare")
        self.target.write_bytes(STATUS)
        self.spare.write_bytes(STATUS)
        self.libc = ctypes.CDLL(None, use_errno=True)

    def _exchange(self, path: Path) -> None:
        if self.libc.renameat2(AT_FDCWD, bytes(path), AT_FDCWD, bytes(self.target),
                               RENAME_EXCHANGE) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(path))

    def nothing(self) -> None:
        return None

    def replace(self) -> None:
        self.tmp.write_bytes(STATUS)
        os.replace(self.tmp, self.target)

    def exchange(self) -> None:
        self.tmp.write_bytes(STATUS)
        self._exchange(self.tmp)
        os.unlink(self.tmp)

    def spare_swap(self) -> None:
        overwrite(self.spare)
        self._exchange(self.spare)

    def in_place(self) -> None:
        overwrite(self.target)


def overwrite(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, STATUS, 0)
    finally:
        os.close(fd)


def cost(write: Callable[[], None], writes: int, pause: float) -> float:
    """CPU µs per call of ``write`` with ``pause`` s after each (the pause's own cost included)."""
    start = cpu()
    for _ in range(writes):
        write()
        time.sleep(pause)
    return (cpu() - start) / writes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--pause", type=float, default=0.005)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        writers = Writers(Path(folder))
        ways = [("replace", writers.replace), ("exchange", writers.exchange),
                ("spare", writers.spare_swap), ("in place", writers.in_place)]
        loop = cost(writers.nothing, args.writes, args.pause)
        print(f"{args.writes} writes each in {folder}; the loop alone: {loop:.1f} µs a pass")
        for name, write in ways:
            each = cost(write, args.writes, args.pause) - loop
            print(f"  {name:9s} {each:7.1f} µs of CPU a write")


if __name__ == "__main__":
    main()
