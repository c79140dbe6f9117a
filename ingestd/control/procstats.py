"""``process_*`` metrics for the daemon as a whole, read from ``/proc/<pid>/`` files only.

prometheus_client's ``ProcessCollector`` is not used: it covers one process (the supervisor that
serves ``/metrics``) and reads the boot time from ``/proc/stat``, which the unit's
``ProcSubset=pid`` hides. Here every process of the daemon is found by walking the process tree
down from the supervisor (ppid field of ``/proc/<pid>/stat``), and named by role from
``run/supervisor.json`` (the workers' pids) and by ancestry (the store worker's child is the
encoder). Start times come from ``/proc/<pid>/stat``'s start field (clock ticks since boot) and
``CLOCK_BOOTTIME``, so no system-wide file is needed.

Only the supervisor imports this module (from the metrics listener), so prometheus_client is
imported at module level.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ingestd.control import runstate

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# "other": a descendant of the supervisor that is none of the named ones (e.g. a worker that
# has not published its pid yet).
ROLES = ("supervisor", "stream", "store", "encoder", "other")


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """One process's figures (``/proc/<pid>/stat``, ``fd/``, ``limits``)."""

    pid: int
    ppid: int
    cpu_seconds: float  # user + system time of the process itself
    reaped_cpu_seconds: float  # user + system time of its children it has waited for
    rss_bytes: int
    vm_bytes: int
    start_time: float  # Unix time
    open_fds: int
    max_fds: float  # soft RLIMIT_NOFILE (inf if unlimited)


def boot_time() -> float:
    """Unix time of boot, without ``/proc/stat``: now minus the time elapsed since boot."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def read_stat(pid: int) -> tuple[int, list[str]] | None:
    """(ppid, the fields after ``comm``) of ``/proc/<pid>/stat``; None if the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may itself hold spaces and ')': split after the last one.
    rest = text[text.rfind(")") + 2:].split()
    return int(rest[1]), rest


def read_info(pid: int, boot: float) -> ProcInfo | None:
    stat = read_stat(pid)
    if stat is None:
        return None
    ppid, f = stat  # f[0] is field 3 (state) of proc(5)
    return ProcInfo(
        pid=pid, ppid=ppid,
        cpu_seconds=(int(f[11]) + int(f[12])) / TICKS,
        reaped_cpu_seconds=(int(f[13]) + int(f[14])) / TICKS,
        rss_bytes=int(f[21]) * PAGE, vm_bytes=int(f[20]),
        start_time=round(boot + int(f[19]) / TICKS, 2),
        open_fds=_open_fds(pid), max_fds=_max_fds(pid))


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return 0


def _max_fds(pid: int) -> float:
    """The soft limit on the ``Max open files`` line of ``/proc/<pid>/limits``."""
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return math.inf if soft == "unlimited" else float(soft)
    return math.nan


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (one scan of ``/proc``; ours only under
    ``ProtectProc=invisible``)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(PROC):
            if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def assign_roles(procs: Iterable[ProcInfo], root: int,
                 workers: Mapping[str, object]) -> dict[str, list[ProcInfo]]:
    """Processes by role: the root is the supervisor, ``workers`` maps role → pid, a child of
    the store worker is its encoder."""
    by_pid = {pid: role for role, pid in workers.items() if isinstance(pid, int)}
    by_pid[root] = "supervisor"
    roles: dict[str, list[ProcInfo]] = {role: [] for role in ROLES}
    procs = list(procs)
    stores = {p.pid for p in procs if by_pid.get(p.pid) == "store"}
    for p in procs:
        role = by_pid.get(p.pid) or ("encoder" if p.ppid in stores else "other")
        roles[role if role in roles else "other"].append(p)
    return roles


def snapshot(state_dir: Path, root: int) -> dict[str, list[ProcInfo]]:
    """Every live process of the daemon whose supervisor is ``root``, by role."""
    boot = boot_time()
    procs = [info for pid in descendants(root) if (info := read_info(pid, boot)) is not None]
    sup = runstate.read_status(state_dir, "supervisor") or {}
    workers = sup.get("workers")
    return assign_roles(procs, root, workers if isinstance(workers, Mapping) else {})


# -- the collector ---------------------------------------------------------------------------------

TOTAL_HELP = {
    "cpu": "User and system CPU time of every ingestd process (supervisor, workers, encoder "
           "child), including processes that exited and were reaped, in seconds.",
    "rss": "Resident memory of every ingestd process, summed (pages shared between them are "
           "counted once per process), in bytes.",
    "vm": "Virtual memory size of every ingestd process, summed, in bytes.",
    "fds": "Open file descriptors of every ingestd process, summed.",
    "max_fds": "Open-file limit (soft RLIMIT_NOFILE) of one ingestd process: the lowest among "
               "them. Each process has its own limit: compare with ingestd_process_open_fds.",
    "start": "Start time of the daemon (its supervisor process), in seconds since the epoch.",
}


class ProcessCollector:
    """``process_*`` for the daemon as a whole and ``ingestd_process_*{role}`` per role.

    A prometheus_client ``Collector`` by duck typing (the registry only calls ``collect``).
    """

    def __init__(self, state_dir: Path, root: int | None = None) -> None:
        self.state_dir = state_dir
        self.root = os.getpid() if root is None else root

    def collect(self) -> Iterator[Metric]:
        roles = snapshot(self.state_dir, self.root)
        yield from self._totals([p for procs in roles.values() for p in procs])
        yield from self._per_role(roles)

    def _totals(self, procs: list[ProcInfo]) -> Iterable[Metric]:
        cpu = sum(p.cpu_seconds + p.reaped_cpu_seconds for p in procs)
        yield CounterMetricFamily("process_cpu_seconds_total", TOTAL_HELP["cpu"], value=cpu)
        for name, key, value in (
            ("process_resident_memory_bytes", "rss", sum(p.rss_bytes for p in procs)),
            ("process_virtual_memory_bytes", "vm", sum(p.vm_bytes for p in procs)),
            ("process_open_fds", "fds", sum(p.open_fds for p in procs)),
            ("process_max_fds", "max_fds", min((p.max_fds for p in procs), default=math.nan)),
            ("process_start_time_seconds", "start",
             min((p.start_time for p in procs if p.pid == self.root), default=math.nan)),
        ):
            yield GaugeMetricFamily(name, TOTAL_HELP[key], value=value)

    def _per_role(self, roles: Mapping[str, list[ProcInfo]]) -> Iterable[Metric]:
        count = GaugeMetricFamily("ingestd_processes", "Live ingestd processes, by role.",
                                  labels=["role"])
        cpu = CounterMetricFamily("ingestd_process_cpu_seconds_total", "User and system CPU "
                                  "time of the role's live processes (reset when one is "
                                  "replaced), in seconds.", labels=["role"])
        gauges: list[tuple[GaugeMetricFamily, Callable[[ProcInfo], float]]] = [
            (GaugeMetricFamily("ingestd_process_resident_memory_bytes",
                               "Resident memory of the role's processes, in bytes.",
                               labels=["role"]), lambda p: float(p.rss_bytes)),
            (GaugeMetricFamily("ingestd_process_virtual_memory_bytes",
                               "Virtual memory size of the role's processes, in bytes.",
                               labels=["role"]), lambda p: float(p.vm_bytes)),
            (GaugeMetricFamily("ingestd_process_open_fds",
                               "Open file descriptors of the role's processes.",
                               labels=["role"]), lambda p: float(p.open_fds)),
        ]
        max_fds = GaugeMetricFamily("ingestd_process_max_fds", "Open-file limit (soft "
                                    "RLIMIT_NOFILE) of the role's process.", labels=["role"])
        start = GaugeMetricFamily("ingestd_process_start_time_seconds", "Start time of the "
                                  "role's (oldest) process, in seconds since the epoch.",
                                  labels=["role"])
        for role, procs in roles.items():
            count.add_metric([role], len(procs))
            if not procs:
                continue  # no process: no figures (ingestd_processes says 0)
            cpu.add_metric([role], sum(p.cpu_seconds for p in procs))
            for family, get in gauges:
                family.add_metric([role], sum(get(p) for p in procs))
            max_fds.add_metric([role], min(p.max_fds for p in procs))
            start.add_metric([role], min(p.start_time for p in procs))
        yield count
        yield cpu
        yield from (family for family, _ in gauges)
        yield max_fds
        yield start
