"""The supervisor's worker processes: spawn, reap, heartbeats, hang kills, restart back-off and
the crash-loop bound. Loaded by the supervisor only (``supervisor.Supervisor`` owns the pool)."""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from ingestd.control import notify as sd
from ingestd.control import runstate, settled, tally
from ingestd.control.pipe import CommandWriter
from ingestd.spool.format import read_checkpoint

log = structlog.get_logger("ingestd.control.supervisor")

WorkerCommand = Callable[[str, int], list[str]]
ROLES = ("store", "stream")  # start order: the spool's consumer before its producer
# glibc's malloc, left alone, raises its mmap threshold to the largest mmapped buffer freed so far
# (up to 32 MB), so every batch-sized buffer ends up in the heap, whose holes keep the high-water of
# all of them. Fixed thresholds (setting them turns the adjustment off) keep memory bounded and
# cheap to reuse: buffers up to 8 MiB (a 1000-tweet insert message, ~4 MB, and its copy as bytes;
# the encoder child's chunks) come from the heap, and up to 16 MiB freed at a heap's top stays
# mapped. A buffer mapped on its own, or a heap trimmed after each batch, is faulted in again page
# by page for the next one: with 1.25 MiB and glibc's 128 KiB trim threshold the store worker took
# ~3 page faults per tweet, ~7 µs of kernel time, and stored ~20 % fewer tweets per second (~4 MB
# less PSS under a 10× overload; bench/LOG.md). The store worker gives its free heap back when
# it is idle after a burst (``sink.worker.TRIM_AFTER_BYTES``), the encoder child when no chunk
# came for 0.1 s.
# An operator's own value in the environment wins, key by key.
# The heartbeat's second way: a worker that cannot rewrite its status file (a read-only or full
# state folder) writes a byte to this pipe instead, so that it is not taken for hung and killed
# (a crash loop) while it keeps working. Its status file then stays as it was.
BEAT_FD_ENV = "INGESTD_BEAT_FD"
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(8 << 20),
                     "MALLOC_TRIM_THRESHOLD_": str(16 << 20)}


class ControlView(Protocol):
    """The ``control`` settings the supervisor reads."""

    @property
    def stop_timeout(self) -> float: ...
    @property
    def heartbeat_timeout(self) -> float: ...
    @property
    def crash_loop_restarts(self) -> int: ...
    @property
    def crash_loop_window(self) -> float: ...


def default_worker_command(config_path: Path, role: str, generation: int) -> list[str]:
    """``python -m ingestd worker --role ROLE --config PATH --start-generation N`` (the
    generation in force at its start; later ones come as reloads on its stdin)."""
    return [sys.executable, "-m", "ingestd", "worker", "--role", role,
            "--config", str(config_path), "--start-generation", str(generation)]


@dataclass(eq=False)
class Worker:
    """One running worker process and what the supervisor knows about it."""

    role: str
    proc: subprocess.Popen[bytes]
    generation: int
    started: float  # monotonic
    last_beat: float  # monotonic time of the last new heartbeat (spawn time until the first)
    pipe: CommandWriter
    beat_time: object = None  # the ``time`` field of the last heartbeat seen
    beat_file: object = None  # the status file's identity when it was last read (see pool)
    status: dict[str, Any] = field(default_factory=dict)
    aborted: float | None = None  # monotonic time SIGABRT was sent
    killed: bool = False
    sent: set[int] = field(default_factory=set)  # the signals the supervisor sent it
    beat_fd: int = -1  # read end of its beat pipe (``BEAT_FD_ENV``), non-blocking

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process, which may already be gone."""
        self.sent.add(sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def requested(self, status: int, stopping: bool) -> bool:
        """Whether an exit with waitpid ``status`` is one the supervisor asked for: killed by a
        signal it sent (a stop, a hang), or a clean exit during a stop."""
        if os.WIFSIGNALED(status):
            return os.WTERMSIG(status) in self.sent
        return stopping and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def describe_status(status: int) -> dict[str, Any]:
    """A waitpid status as log fields: ``exit_code`` or ``signal`` (by name)."""
    if os.WIFEXITED(status):
        return {"exit_code": os.WEXITSTATUS(status)}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return {"signal": signal.Signals(sig).name}
        except ValueError:
            return {"signal": str(sig)}
    return {"status": status}


@dataclass
class PoolHooks:
    """What the pool asks of the supervisor: its current ``control`` settings, what to do with
    a new worker (hand it the settings in force), what a crash loop means (halt), and what a
    new worker's environment adds (the digest of the settings in force, ``pipe.IN_FORCE_ENV``)."""

    control: Callable[[], ControlView]
    spawned: Callable[[Worker], None]
    crash_loop: Callable[[], None]
    env: Callable[[], dict[str, str]] = dict


def unsettled_effect(checkpoint_seq: int, read_seq: object) -> str:
    """What carrying a store worker's last report instead of its counts at the checkpoint does
    to the reconciliation, by where the checkpoint stands against the report."""
    if isinstance(read_seq, int) and checkpoint_seq > read_seq:
        return ("its last report is carried instead; the records after it up to the checkpoint "
                "were counted by no report: the reconciliation stays short of them")
    return ("its last report is carried instead; its successor counts again what it reads of "
            "the records before the report: the reconciliation stays over by them")


class WorkerPool:
    """The running workers by role, and when the missing ones start again."""

    KILL_GRACE = 2.0  # SIGABRT → SIGKILL for a hung worker
    BACKOFF_START = 1.0
    BACKOFF_MAX = 30.0
    HEALTHY_AFTER = 60.0  # a worker that ran this long resets its back-off
    # The supervisor looks at least every LOOP_TIMEOUT (1 s): a longer gap between two looks
    # means it could not run either (SIGSTOP, a frozen cgroup, a paused VM).
    SUSPENDED_AFTER = 2.0

    def __init__(self, command: WorkerCommand, state_dir: Path, hooks: PoolHooks) -> None:
        self.command, self.state_dir, self.hooks = command, state_dir, hooks
        self.workers: dict[str, Worker] = {}
        self.restart_at: dict[str, float] = {}
        self.backoff = dict.fromkeys(ROLES, self.BACKOFF_START)
        self.restarts = dict.fromkeys(ROLES, 0)
        # (monotonic time, role) of each worker exit that asked for a restart: the crash loop
        # counts both roles together, within control.crash_loop_window.
        self.restart_times: collections.deque[tuple[float, str]] = collections.deque()
        # role → monotonic times of its restarts within the crash-loop window (status: a role
        # restarted repeatedly is crash-looping, even while its latest process runs)
        self.role_restarts: dict[str, collections.deque[float]] = {
            role: collections.deque() for role in ROLES}
        self.role_beats: dict[str, float] = {}  # monotonic time of each role's last heartbeat
        self.last_look: float | None = None  # monotonic time of the last heartbeat check
        self.status_reads = 0  # worker status files read and parsed (tests count them)
        self.inherited_fds: tuple[int, ...] = ()  # the state-folder lock (see StateDirClaim)
        # Each role's reaped workers' last counts (``tally``), published in run/supervisor.json.
        self.carried = {role: tally.Carried() for role in ROLES}
        # The last spool record when the daemon started: store workers count the records up to
        # it as replayed (see ``tally.REPLAY_ENV``); set by the supervisor before the first spawn.
        self.replay_through = 0

    # -- starting ------------------------------------------------------------------------------

    def spawn(self, role: str, generation: int) -> None:
        """Start the ``role`` worker with ``generation``."""
        self.restart_at.pop(role, None)
        beat_read, beat_write = os.pipe()
        os.set_blocking(beat_read, False)
        os.set_blocking(beat_write, False)
        try:
            proc = subprocess.Popen(self.command(role, generation), stdin=subprocess.PIPE,
                                    close_fds=True, start_new_session=False,
                                    env=worker_env() | self.role_env(role) | self.hooks.env()
                                    | {BEAT_FD_ENV: str(beat_write)},
                                    pass_fds=(*self.inherited_fds, beat_write))
        except OSError as exc:
            os.close(beat_read)
            log.error("worker_spawn_failed", role=role, error=str(exc))
            self.schedule_restart(role, ran_for=0.0)
            return
        finally:
            os.close(beat_write)
        now = time.monotonic()
        worker = self.workers[role] = Worker(role, proc, generation, now, now,
                                             CommandWriter(proc.stdin), beat_fd=beat_read)
        log.info("worker_started", role=role, pid=proc.pid, generation=generation)
        self.hooks.spawned(worker)

    def role_env(self, role: str) -> dict[str, str]:
        """A store worker's replay boundary: the spool's last record at the daemon's start, and
        the last one an earlier store worker of this run counted as read."""
        if role != "store":
            return {}
        return {tally.REPLAY_ENV: f"{self.replay_through}:{self.carried['store'].read_seq}"}

    def spawn_due(self, generation: int) -> None:
        """Start workers whose restart time has come."""
        now = time.monotonic()
        for role in ROLES:
            due = self.restart_at.get(role)
            if due is not None and due <= now and role not in self.workers:
                self.spawn(role, generation)

    def schedule_restart(self, role: str, ran_for: float) -> None:
        """Restart ``role`` after its back-off, unless this is one restart too many (crash loop)."""
        now = time.monotonic()
        control = self.hooks.control()
        self.restart_times.append((now, role))
        while self.restart_times[0][0] < now - control.crash_loop_window:
            self.restart_times.popleft()
        if len(self.restart_times) > control.crash_loop_restarts:
            # The count is of both workers together: say so, by role, and whose exit tipped it
            # (the line's own `role` is the supervisor's).
            by_role = collections.Counter(r for _, r in self.restart_times)
            log.error("crash_loop", exits=len(self.restart_times),
                      exits_by_role={r: by_role[r] for r in ROLES if by_role[r]},
                      last_exit=role, limit=control.crash_loop_restarts,
                      window=control.crash_loop_window)
            self.hooks.crash_loop()
            return
        if ran_for >= self.HEALTHY_AFTER:
            self.backoff[role] = self.BACKOFF_START
        delay = self.backoff[role]
        self.backoff[role] = min(delay * 2, self.BACKOFF_MAX)
        self.restart_at[role] = now + delay
        self.restarts[role] += 1
        self.role_restarts.setdefault(role, collections.deque()).append(now)
        # Only a worker that died or hung outside a stop is restarted.
        log.warning("worker_restart_scheduled", role=role, delay=delay,
                    restarts=self.restarts[role])

    def recent_restarts(self, window: float) -> dict[str, int]:
        """Restarts of each role in the last ``window`` seconds."""
        now = time.monotonic()
        for times in self.role_restarts.values():
            while times and times[0] < now - window:
                times.popleft()
        return {role: len(times) for role, times in self.role_restarts.items()}

    # -- ending --------------------------------------------------------------------------------

    def reap(self, stopping: bool) -> list[tuple[Worker, int]]:
        """Collect every exited child (``waitpid(-1, WNOHANG)`` loop); the workers among them."""
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = next((w for w in self.workers.values() if w.pid == pid), None)
            if worker is None:
                continue  # not ours (we may be PID 1 in a container): reaped, nothing more
            # Tell Popen the status we consumed, so it never waits for the pid again.
            worker.proc.returncode = os.waitstatus_to_exitcode(status)
            worker.pipe.close()
            close_beat(worker)
            del self.workers[worker.role]
            # Its last published counts go on counting in the run's totals (``tally``).
            self.carry(worker.role, pid)
            # An exit nobody asked for (a crash, the OOM killer) is what operators filter for.
            requested = worker.requested(status, stopping)
            report = log.info if requested else log.warning
            report("worker_exited", role=worker.role, pid=pid, stopping=stopping,
                   requested=requested, ran_for=round(time.monotonic() - worker.started, 3),
                   **describe_status(status))
            exited.append((worker, status))
        return exited

    def carry(self, role: str, pid: int) -> None:
        """Add a reaped worker's last published counts to the run's, and for a stream worker
        the messages it spooled after that report (read back from the spool); for a store
        worker its counts at the checkpoint its successor resumes from (``settled``)."""
        doc = runstate.read_status(self.state_dir, role)
        if role == "store":
            self.carried[role].carry(role, pid, doc, settled=self.settled_counts(pid, doc))
            return
        after = 0
        if role == "stream" and doc is not None and doc.get("pid") == pid:
            try:
                after = tally.unreported_received(self.state_dir / "spool", doc)
            except OSError as exc:
                log.warning("worker_counts_unrecovered", role=role, pid=pid, error=str(exc),
                            effect="messages spooled after its last report are not counted as "
                                   "received: the reconciliation is off by them")
            if after:
                log.info("worker_counts_recovered", role=role, pid=pid, received=after,
                         reason="spooled after its last report")
        self.carried[role].carry(role, pid, doc, received_after=after)

    def settled_counts(self, pid: int, doc: Mapping[str, Any] | None
                       ) -> tuple[int, settled.Counts] | None:
        """Store worker ``pid``'s counts at the spool checkpoint on disk, if it left them."""
        if doc is None or doc.get("pid") != pid:
            return None
        ckpt = read_checkpoint(self.state_dir / "spool")
        seq = ckpt.seq if ckpt is not None else 0
        counts = settled.read_settled(self.state_dir, pid, seq, doc.get("proc"))
        if counts is None:
            read_seq = tally.section(doc, "counters").get("read_seq")
            log.warning("worker_counts_unsettled", role="store", pid=pid, checkpoint_seq=seq,
                        reported_read_seq=read_seq, effect=unsettled_effect(seq, read_seq))
            return None
        reported = tally.section(doc, "counters").get("records_read")
        if reported != counts.get("records_read"):  # its successor reads some records again
            log.info("worker_counts_settled", role="store", pid=pid, checkpoint_seq=seq,
                     records_read=counts.get("records_read"), reported_read=reported)
        return seq, counts

    def kill_all(self) -> list[str]:
        """SIGKILL every worker still running; the roles that had to be killed."""
        for worker in self.workers.values():
            log.warning("worker_killed", role=worker.role, pid=worker.pid)
            worker.signal(signal.SIGKILL)
        return sorted(self.workers)

    # -- heartbeats ----------------------------------------------------------------------------

    def replace_hung(self, timeout: float) -> None:
        """Replace hung workers: SIGABRT on a stale heartbeat, SIGKILL ``KILL_GRACE`` later."""
        now = time.monotonic()
        self._discount_suspension(now)
        for worker in list(self.workers.values()):
            if worker.aborted is not None:
                if not worker.killed and now - worker.aborted >= self.KILL_GRACE:
                    log.warning("worker_killed", role=worker.role, pid=worker.pid)
                    worker.signal(signal.SIGKILL)
                    worker.killed = True
                continue
            self.observe_heartbeat(worker, now)
            if now - worker.last_beat > timeout:
                log.error("worker_hung", role=worker.role, pid=worker.pid,
                          silent_for=round(now - worker.last_beat, 3),
                          state=worker.status.get("state"))
                worker.signal(signal.SIGABRT)
                worker.aborted = now

    def _discount_suspension(self, now: float) -> None:
        """Time the supervisor itself could not run does not count against the workers: the
        whole service was frozen (SIGSTOP, a paused VM), not a worker hung. Without this, the
        first look after a 30 s freeze would abort every worker before it could beat again."""
        gap = now - self.last_look if self.last_look is not None else 0.0
        self.last_look = now
        if gap <= self.SUSPENDED_AFTER:
            return
        log.warning("supervisor_suspended", gap=round(gap, 3),
                    effect="heartbeat deadlines moved on by the gap")
        for worker in self.workers.values():
            worker.last_beat += gap
        for role in self.role_beats:
            self.role_beats[role] += gap

    def observe_heartbeat(self, worker: Worker, now: float) -> None:
        """Note a new heartbeat if the worker rewrote its status file since the last look, or
        wrote to its beat pipe (it could not write the file)."""
        if beat_pipe_written(worker):
            worker.last_beat = now
            self.role_beats[worker.role] = now
        # The file is rewritten in place on every write (runstate): unchanged inode, mtime and
        # size, nothing new to parse (~2 of 3 looks while a worker beats every second).
        identity = runstate.status_identity(self.state_dir, worker.role)
        if identity is not None and identity == worker.beat_file:
            return
        worker.beat_file = identity
        self.status_reads += 1
        status = runstate.read_status(self.state_dir, worker.role)
        # A file left by the previous process of this role (another pid) is not a heartbeat.
        if status is None or status.get("pid") != worker.pid:
            return
        if status.get("time") != worker.beat_time:
            worker.beat_time = status.get("time")
            worker.last_beat = now
            worker.status = status
            self.role_beats[worker.role] = now

    def all_fresh(self, now: float, timeout: float) -> bool:
        """Whether every role has heartbeaten within ``timeout`` seconds."""
        return all(now - self.role_beats.get(r, -math.inf) <= timeout for r in ROLES)

    def flush_pipes(self) -> None:
        """Write what each worker's pipe now takes of the commands queued for it."""
        for worker in self.workers.values():
            worker.pipe.flush()


def beat_pipe_written(worker: Worker) -> bool:
    """Whether the worker wrote to its beat pipe since the last look (what it wrote is read)."""
    beat = False
    while worker.beat_fd >= 0:
        try:
            data = os.read(worker.beat_fd, 4096)
        except BlockingIOError:
            break
        except OSError:
            close_beat(worker)
            break
        if not data:  # the worker is gone
            close_beat(worker)
            break
        beat = True
    return beat


def close_beat(worker: Worker) -> None:
    if worker.beat_fd >= 0:
        os.close(worker.beat_fd)
        worker.beat_fd = -1


def worker_env() -> dict[str, str]:
    """Our environment without the notify variables (only the main PID talks to systemd), with
    the workers' malloc setting (``WORKER_MALLOC_ENV``) unless the environment has its own."""
    env = {k: v for k, v in os.environ.items() if k not in sd.NOTIFY_ENV}
    return WORKER_MALLOC_ENV | env
