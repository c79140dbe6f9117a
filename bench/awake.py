"""Keep this machine's vCPUs from halting while a measurement runs: a diagnostic, never a goal's
figure.

On the benchmark machine (a Firecracker VM whose kernel runs the haltpoll cpuidle driver with
``haltpoll.guest_halt_poll_ns=0``: ``/proc/cmdline``) an idle vCPU halts at once, and its physical
core serves the host's other work until the vCPU wakes. A worker that sleeps between slices of
tweets then finds its caches cold at each wake-up, and at a steady rate the daemon sleeps most of
the time (bench/LOG.md, "The steady state's excess: the vCPUs halting").

``kept_awake`` runs one ``SCHED_IDLE`` busy loop pinned to each CPU. Such a task runs only when
nothing else wants its CPU (its weight is 3 against a normal task's 1024), so the vCPU never
idles while the measured processes lose next to nothing. The loops' CPU is theirs, not the
daemon's: the benchmarks count the daemon's processes only. A figure taken this way says what the
same code costs on a machine whose idle cores stay its own; it is never reported as a goal met.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# The loop checks its parent now and then: a benchmark that dies leaves no spinner behind.
_SPIN = """
import os, sys
cpu, parent = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, {cpu})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


@contextlib.contextmanager
def kept_awake(enabled: bool = True) -> Iterator[list[int]]:
    """While the block runs, a ``SCHED_IDLE`` busy loop on each CPU this process may use (said
    on stdout, next to the figures it affects); the loops' pids (none when not ``enabled``)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if enabled:
            for cpu in sorted(os.sched_getaffinity(0)):
                procs.append(subprocess.Popen([sys.executable, "-c", _SPIN, str(cpu),
                                               str(os.getpid())]))
            print(f"vCPUs kept awake: a SCHED_IDLE busy loop on each of {len(procs)} CPUs "
                  "(not counted: not the measured processes')", flush=True)
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
