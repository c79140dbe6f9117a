"""The supervisor: the main process systemd sees (``ingestd run``).

It spawns the two workers (``store`` then ``stream``), turns signals into decisions, replaces
workers that die or stop heartbeating, and speaks the systemd notify protocol. The shape is
gunicorn's arbiter: signal handlers only enqueue; one loop drains the queue, dispatches
``handle_<signal>`` by name, then reaps children, checks heartbeats, restarts dead workers and
reports.

Reload: the supervisor validates the new settings text (``mongo.uri`` in a short-lived child
interpreter when it changed: pymongo never stays resident here, see
``settings.check_mongo_uri_in_child``), then sends it to both workers as a JSON line on their
stdin (``{"cmd": "reload", "generation": N, "text": ...}``). A worker restarted later starts
with ``--generation N`` and re-reads the config file itself (already validated, unless it was
edited again since: then the worker exits 78 and the supervisor halts with 78).
A bad config on SIGHUP never stops the service: the old settings stay in force.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import math
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, ClassVar, Protocol

import orjson
import structlog

from ingestd.config.errors import ConfigError
from ingestd.config.schema import Settings, StreamSettings
from ingestd.config.settings import load_settings_text, secret_values, start_only_changes
from ingestd.control import notify as sd
from ingestd.control import runstate
from ingestd.control.daemonctl import PIDFILE, config_errors, write_verdict
from ingestd.logs import configure_logging
from ingestd.source.request import filter_diff, filter_key

log = structlog.get_logger("ingestd.control.supervisor")

WorkerCommand = Callable[[str, int], list[str]]
LOCKFILE = "supervisor.lock"


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


class SupervisedSettings(Protocol):
    """What the supervisor needs from ``ingestd.config.schema.Settings``."""

    @property
    def state_dir(self) -> Path: ...
    @property
    def control(self) -> ControlView: ...
    @property
    def stream(self) -> object: ...  # compared across reloads


SettingsLoader = Callable[[str, Path], SupervisedSettings]


def default_worker_command(config_path: Path, role: str, generation: int) -> list[str]:
    """``python -m ingestd worker --role ROLE --config PATH --generation N``."""
    return [sys.executable, "-m", "ingestd", "worker", "--role", role,
            "--config", str(config_path), "--generation", str(generation)]


class ControlChannel:
    """JSON-line commands to one worker's stdin, written without ever blocking the supervisor.

    A reload command carries the whole config, so only the newest unsent one matters: a command
    still waiting behind a slow reader is replaced, and a worker that never reads (hung) cannot
    make the supervisor block or buffer without bound.
    """

    def __init__(self, stream: IO[bytes] | None) -> None:
        self.stream = stream
        self.writing = b""  # the line being written, maybe partly
        self.waiting = b""  # the next line, replaced by newer ones
        if stream is not None:
            os.set_blocking(stream.fileno(), False)

    def send(self, command: dict[str, Any]) -> None:
        """Queue ``command`` (replacing any not yet started) and write what the pipe takes."""
        line = orjson.dumps(command) + b"\n"
        if self.writing:
            self.waiting = line
        else:
            self.writing = line
        self.flush()

    def flush(self) -> None:
        """Write as much of the queued lines as the pipe accepts now."""
        while self.writing and self.stream is not None:
            try:
                sent = os.write(self.stream.fileno(), self.writing)
            except BlockingIOError:
                return
            except OSError:
                # BrokenPipe: the worker is exiting; its replacement re-reads the config file.
                self.close()
                return
            self.writing = self.writing[sent:]
            if not self.writing:
                self.writing, self.waiting = self.waiting, b""

    def close(self) -> None:
        """Drop anything queued and close the pipe."""
        self.writing = self.waiting = b""
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            self.stream = None


@dataclass(eq=False)
class Worker:
    """One running worker process and what the supervisor knows about it."""

    role: str
    proc: subprocess.Popen[bytes]
    generation: int
    started: float  # monotonic
    last_beat: float  # monotonic time of the last new heartbeat (spawn time until the first)
    channel: ControlChannel
    beat_time: object = None  # the ``time`` field of the last heartbeat seen
    status: dict[str, Any] = field(default_factory=dict)
    aborted: float | None = None  # monotonic time SIGABRT was sent
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


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


def describe_filter(old: SupervisedSettings, new: SupervisedSettings) -> dict[str, Any]:
    """Log fields for a reload: whether the stream filter changed, and how (phrases, ids, boxes)."""
    before, after = old.stream, new.stream
    if not (isinstance(before, StreamSettings) and isinstance(after, StreamSettings)):
        return {"filter_changed": before != after}  # a test's stand-in settings
    if filter_key(before) == filter_key(after):
        return {"filter_changed": False}
    return {"filter_changed": True, "filter_diff": filter_diff(before, after)}


def one_line(text: str, limit: int = 160) -> str:
    """``text`` safe for one notify field: no newlines, bounded length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Supervisor:
    """Runs the store and stream workers and keeps them healthy until told to stop."""

    ROLES = ("store", "stream")  # start order: the spool's consumer before its producer
    STOP_ORDER = ("stream", "store")  # producer first, so the consumer can drain to the end
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
    SIG_NAMES: ClassVar[dict[int, str]] = {
        int(sig): signal.Signals(sig).name[3:].lower() for sig in SIGNALS}
    NOTIFY_ENV = sd.NOTIFY_ENV

    EXIT_OK = 0
    EXIT_ERROR = 1
    EXIT_TEMPFAIL = 75  # crash loop: systemd's Restart= and StartLimit take over
    EXIT_CONFIG = 78  # a worker could not load its settings: restarting cannot help
    EXIT_LOCKED = 73  # another supervisor (or its workers, still finishing) uses the state folder

    LOOP_TIMEOUT = 0.5
    KILL_GRACE = 2.0  # SIGABRT → SIGKILL for a hung worker
    REAP_TIMEOUT = 5.0  # for processes already sent SIGKILL
    BACKOFF_START = 1.0
    BACKOFF_MAX = 30.0
    HEALTHY_AFTER = 60.0  # a worker that ran this long resets its back-off
    RATE_WINDOW = 5.0
    STATUS_INTERVAL = 1.0  # run/supervisor.json
    STATUS_EVERY = 5.0  # STATUS= for counter-only changes

    def __init__(
        self,
        config_path: Path,
        settings: SupervisedSettings,
        worker_command: WorkerCommand | None = None,
        *,
        loader: SettingsLoader = load_settings_text,
        text: str | None = None,
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        # The state folder is fixed at boot: moving it under running workers would split the spool.
        self.state_dir = settings.state_dir
        self.worker_command = worker_command or functools.partial(
            default_worker_command, config_path)
        self.loader = loader
        self.sig_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.old_handlers: dict[int, Any] = {}
        self.workers: dict[str, Worker] = {}
        self.restart_at: dict[str, float] = {}
        self.backoff = dict.fromkeys(self.ROLES, self.BACKOFF_START)
        self.restarts = dict.fromkeys(self.ROLES, 0)
        self.restart_times: collections.deque[float] = collections.deque()
        self.role_beats: dict[str, float] = {}
        self.generation = 1
        self.reloads = 0  # SIGHUPs handled: the sequence number of run/reload.json
        self.reload_failures = 0
        self.ready = False
        self.stopping = False
        self.stopped = False
        self.escalated = False
        self.exit_code: int | None = None
        self.status_line = ""
        self.status_sent: tuple[float, tuple[str, ...]] = (0.0, ())
        self.rate = 0.0
        self.rate_sample: tuple[float, int] | None = None
        self.watchdog = sd.watchdog_interval()
        self.watchdog_due = 0.0
        self.written: tuple[float, dict[str, Any]] = (0.0, {})
        self.lock_fd: int | None = None
        # The settings text in force (validated at start or by the last good reload).
        self.settings_text = text

    # -- main loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until a stop; returns the process exit code."""
        # Before anything that writes to run/: a refused second supervisor must leave the
        # running one's pid file and status untouched.
        if not self.lock_state_dir():
            return self.EXIT_LOCKED
        try:
            self.install_signals()
            self.write_pidfile()
            self.spawn_workers()
            while self.exit_code is None:
                self.wait_for_signals()
                if self.exit_code is None:
                    self.supervise()
            return self.exit_code
        except Exception:
            # Last resort, as in gunicorn: a bug here must not leave workers running unsupervised.
            log.exception("supervisor_failed")
            if not self.stopping:
                self.stop("internal error")
            self.kill_workers()
            return self.EXIT_ERROR
        finally:
            self.cleanup()

    def supervise(self) -> None:
        """One pass after the signals: reap, check heartbeats, restart, report."""
        for worker, status in self.reap_workers():
            self.handle_exit(worker, status)
            if self.exit_code is not None:
                return
        self.murder_workers()
        self.manage_workers()
        for worker in self.workers.values():
            worker.channel.flush()
        self.report()

    def lock_state_dir(self) -> bool:
        """Take ``run/supervisor.lock`` (flock) for as long as we or any of our workers live.

        Two supervisors on one state folder would run two readers into one spool and two store
        workers acking the same checkpoint. The workers inherit the locked file, so the lock
        also outlives a killed supervisor until its orphaned workers have drained and exited.
        """
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

    def install_signals(self) -> None:
        """Route SIGTERM, SIGINT, SIGHUP and SIGCHLD to the queue."""
        for sig in self.SIGNALS:
            self.old_handlers[sig] = signal.signal(sig, self.queue_signal)

    def queue_signal(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler: NO LOGGING, no work; just queue the signal for the main loop."""
        self.sig_queue.put_nowait(sig)

    def wait_for_signals(self) -> None:
        """Block until a signal or the next timer is due, then dispatch every queued signal."""
        for sig in self.drain_signals(self.next_timeout()):
            self.dispatch(sig)
            if self.exit_code is not None:
                return

    def drain_signals(self, timeout: float) -> list[int]:
        """The signals queued within ``timeout`` seconds (waits only for the first)."""
        try:
            sigs = [self.sig_queue.get(timeout=max(timeout, 0.0))]
        except queue.Empty:
            return []
        while True:
            try:
                sigs.append(self.sig_queue.get_nowait())
            except queue.Empty:
                return sigs

    def dispatch(self, sig: int) -> None:
        """Call ``handle_<name>`` for ``sig``."""
        handler = getattr(self, f"handle_{self.SIG_NAMES.get(sig, '')}", None)
        if handler is None:
            log.warning("signal_ignored", signal=sig)
            return
        handler()

    def next_timeout(self) -> float:
        """Seconds until the loop has something to do without a signal."""
        due = [time.monotonic() + self.LOOP_TIMEOUT, *self.restart_at.values()]
        if self.watchdog is not None:
            due.append(self.watchdog_due)
        return min(due) - time.monotonic()

    # -- signal handlers -----------------------------------------------------------------------

    def handle_term(self) -> None:
        """SIGTERM: graceful stop (systemd ``stop``)."""
        self.exit_code = self.stop("SIGTERM")

    def handle_int(self) -> None:
        """SIGINT: graceful stop as well (Ctrl-C in a terminal)."""
        self.exit_code = self.stop("SIGINT")

    def handle_hup(self) -> None:
        """SIGHUP: reload the settings file."""
        self.reload()

    def handle_chld(self) -> None:
        """SIGCHLD: nothing here; the pass after every batch of signals reaps."""

    # -- workers -------------------------------------------------------------------------------

    def spawn_workers(self) -> None:
        """Start every role that is not running, in ``ROLES`` order."""
        for role in self.ROLES:
            if role not in self.workers and self.exit_code is None:
                self.spawn_worker(role)

    def spawn_worker(self, role: str) -> None:
        """Start the ``role`` worker with the current generation."""
        self.restart_at.pop(role, None)
        command = self.worker_command(role, self.generation)
        try:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, close_fds=True,
                                    start_new_session=False, env=self.worker_env(),
                                    pass_fds=self.inherited_fds())
        except OSError as exc:
            log.error("worker_spawn_failed", role=role, error=str(exc))
            self.schedule_restart(role, ran_for=0.0)
            return
        now = time.monotonic()
        channel = ControlChannel(proc.stdin)
        self.workers[role] = Worker(role, proc, self.generation, now, now, channel)
        log.info("worker_started", role=role, pid=proc.pid, generation=self.generation)
        self.send_settings_in_force(self.workers[role])

    def send_settings_in_force(self, worker: Worker) -> None:
        """Hand a new worker the settings in force if the file no longer holds them.

        The file may have been edited since the last reload (and be invalid, or valid but not
        yet reloaded). A replacement worker must run what the others run, and must not exit 78
        (halting the whole service) over an edit that a SIGHUP would have rejected.
        """
        if self.settings_text is None:
            return
        try:
            unchanged = read_config_text(self.config_path) == self.settings_text
        except ConfigError:
            unchanged = False
        if not unchanged:
            worker.channel.send({"cmd": "reload", "generation": self.generation,
                                 "text": self.settings_text})

    def inherited_fds(self) -> tuple[int, ...]:
        """The state-folder lock: held by the workers too, so orphans keep others out."""
        return () if self.lock_fd is None else (self.lock_fd,)

    def worker_env(self) -> dict[str, str]:
        """Our environment without the notify variables: only the main PID talks to systemd."""
        return {k: v for k, v in os.environ.items() if k not in self.NOTIFY_ENV}

    def reap_workers(self) -> list[tuple[Worker, int]]:
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
            worker.channel.close()
            del self.workers[worker.role]
            log.info("worker_exited", role=worker.role, pid=pid, stopping=self.stopping,
                     ran_for=round(time.monotonic() - worker.started, 3), **describe_status(status))
            exited.append((worker, status))
        return exited

    def handle_exit(self, worker: Worker, status: int) -> None:
        """Decide what a worker's exit means: restart with back-off, or halt on a config error."""
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == self.EXIT_CONFIG:
            # gunicorn's APP_LOAD_ERROR: the settings file is unusable, a restart storm cannot help.
            self.halt(self.EXIT_CONFIG, f"{worker.role} worker: invalid settings")
            return
        self.schedule_restart(worker.role, ran_for=time.monotonic() - worker.started)

    def schedule_restart(self, role: str, ran_for: float) -> None:
        """Restart ``role`` after its back-off, unless this is one restart too many (crash loop)."""
        now = time.monotonic()
        control = self.settings.control
        self.restart_times.append(now)
        while self.restart_times[0] < now - control.crash_loop_window:
            self.restart_times.popleft()
        if len(self.restart_times) > control.crash_loop_restarts:
            log.error("crash_loop", role=role, restarts=len(self.restart_times),
                      window=control.crash_loop_window)
            self.halt(self.EXIT_TEMPFAIL, "crash loop")
            return
        if ran_for >= self.HEALTHY_AFTER:
            self.backoff[role] = self.BACKOFF_START
        delay = self.backoff[role]
        self.backoff[role] = min(delay * 2, self.BACKOFF_MAX)
        self.restart_at[role] = now + delay
        self.restarts[role] += 1
        log.info("worker_restart_scheduled", role=role, delay=delay, restarts=self.restarts[role])

    def manage_workers(self) -> None:
        """Start workers whose restart time has come."""
        now = time.monotonic()
        for role in self.ROLES:
            due = self.restart_at.get(role)
            if due is not None and due <= now and role not in self.workers:
                self.spawn_worker(role)

    def murder_workers(self) -> None:
        """Replace hung workers: SIGABRT on a stale heartbeat, SIGKILL ``KILL_GRACE`` later."""
        now = time.monotonic()
        timeout = self.settings.control.heartbeat_timeout
        for worker in list(self.workers.values()):
            if worker.aborted is not None:
                if not worker.killed and now - worker.aborted >= self.KILL_GRACE:
                    log.warning("worker_killed", role=worker.role, pid=worker.pid)
                    self.signal_worker(worker, signal.SIGKILL)
                    worker.killed = True
                continue
            self.observe_heartbeat(worker, now)
            if now - worker.last_beat > timeout:
                log.error("worker_hung", role=worker.role, pid=worker.pid,
                          silent_for=round(now - worker.last_beat, 3),
                          state=worker.status.get("state"))
                self.signal_worker(worker, signal.SIGABRT)
                worker.aborted = now

    def observe_heartbeat(self, worker: Worker, now: float) -> None:
        """Note a new heartbeat if the worker rewrote its status file since the last look."""
        status = runstate.read_status(self.state_dir, worker.role)
        # A file left by the previous process of this role (another pid) is not a heartbeat.
        if status is None or status.get("pid") != worker.pid:
            return
        if status.get("time") != worker.beat_time:
            worker.beat_time = status.get("time")
            worker.last_beat = now
            worker.status = status
            self.role_beats[worker.role] = now

    def signal_worker(self, worker: Worker, sig: int) -> None:
        """Send ``sig`` to a worker that may already be gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    # -- reload --------------------------------------------------------------------------------

    def reload(self) -> None:
        """Validate the settings file again; if good, send it to the workers as a new generation."""
        if self.ready:
            sd.notify(sd.reloading_message())
        self.reloads += 1
        try:
            text = read_config_text(self.config_path)
            settings = self.loader(text, self.config_path)
        except ConfigError as exc:
            # str(ConfigError) is "file: key.path: reason" and never holds a secret value.
            self.reload_failures += 1
            log.error("reload_failed", error=str(exc), file=exc.file, key=exc.key_path,
                      reload_failures=self.reload_failures, generation=self.generation,
                      action=f"keeping the settings of generation {self.generation}")
            write_verdict(self.state_dir, self.reloads, self.generation,
                          errors=config_errors(exc))
        else:
            changes = self.apply_reload(settings, text)
            write_verdict(self.state_dir, self.reloads, self.generation, changes=changes)
        if self.ready:
            # Also after a failure: the old settings are still in force and the service is ready.
            sd.notify(f"READY=1\nSTATUS={self.refresh_status()}")

    def apply_reload(self, settings: SupervisedSettings, text: str) -> dict[str, Any]:
        """Adopt ``settings`` and send the validated ``text`` to every running worker; returns
        how the filter changed."""
        old, self.settings, self.settings_text = self.settings, settings, text
        self.generation += 1
        command = {"cmd": "reload", "generation": self.generation, "text": text}
        for worker in self.workers.values():
            worker.channel.send(command)
        changes = describe_filter(old, settings)
        if (isinstance(old, Settings) and isinstance(settings, Settings)
                and (later := start_only_changes(old, settings))):
            changes["restart_needed"] = later
            log.warning("reload_needs_restart", keys=later, generation=self.generation,
                        reason="these settings are read at start only: systemctl restart")
        log.info("reload_applied", generation=self.generation, **changes)
        return changes

    # -- stop ----------------------------------------------------------------------------------

    def halt(self, code: int, reason: str) -> None:
        """Stop the remaining workers gracefully and exit with ``code``."""
        self.stop(reason)
        self.exit_code = code

    def stop(self, reason: str) -> int:
        """Stop the stream worker, then the store worker, within ``stop_timeout``.

        Returns 0 if every worker left on its own, 1 if one had to be killed (nothing is lost
        then either: the spool is durable, the next start drains it).
        """
        self.stopping = True
        sd.notify("STOPPING=1")
        budget = self.settings.control.stop_timeout
        deadline = time.monotonic() + budget
        log.info("stopping", reason=reason, stop_timeout=budget)
        for role in self.STOP_ORDER:
            worker = self.workers.get(role)
            if worker is not None and not self.escalated:
                # What is left of the budget, so the store worker's drain ends before our
                # deadline even when the stream worker took part of it.
                worker.channel.send({"cmd": "stop", "budget": deadline - time.monotonic()})
                self.signal_worker(worker, signal.SIGTERM)
                self.wait_worker(worker, deadline)
        killed = self.kill_workers()
        code = self.EXIT_ERROR if killed else self.EXIT_OK
        log.info("stopped", reason=reason, killed=killed, escalated=self.escalated)
        return code

    def wait_worker(self, worker: Worker, deadline: float) -> None:
        """Wait for ``worker`` to exit until ``deadline``; a second TERM/INT cuts the wait short."""
        while self.workers.get(worker.role) is worker and not self.escalated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for sig in self.drain_signals(min(self.LOOP_TIMEOUT, remaining)):
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.warning("stop_escalated", signal=signal.Signals(sig).name)
                    self.escalated = True
            self.reap_workers()

    def kill_workers(self) -> list[str]:
        """SIGKILL every worker still running and reap them; the roles that had to be killed."""
        killed = sorted(self.workers)
        for worker in self.workers.values():
            log.warning("worker_killed", role=worker.role, pid=worker.pid)
            self.signal_worker(worker, signal.SIGKILL)
        deadline = time.monotonic() + self.REAP_TIMEOUT
        while self.workers and time.monotonic() < deadline:
            self.drain_signals(0.05)
            self.reap_workers()
        return killed

    # -- reporting -----------------------------------------------------------------------------

    def report(self) -> None:
        """Tell systemd and ``ingestd status`` where we are."""
        self.update_rate()
        self.notify_ready()
        self.notify_status()
        self.notify_watchdog()
        self.write_status()

    def notify_ready(self) -> None:
        """``READY=1`` once both workers have published their first status file."""
        if self.ready or any(self.workers.get(r) is None or self.workers[r].beat_time is None
                             for r in self.ROLES):
            return
        self.ready = True
        sd.notify(f"READY=1\nSTATUS={self.refresh_status()}")
        log.info("ready", generation=self.generation, status=self.status_line)

    def notify_status(self) -> None:
        """``STATUS=`` when a state changes; counter-only changes at most every ``STATUS_EVERY``.

        The counters move all the time; each STATUS= is a D-Bus property change in systemd.
        """
        now, key = time.monotonic(), self.status_key()
        if not self.ready or self.summary() == self.status_line:
            return
        if key != self.status_sent[1] or now - self.status_sent[0] >= self.STATUS_EVERY:
            sd.notify(f"STATUS={self.refresh_status()}")

    def refresh_status(self) -> str:
        """Recompute the summary, note it as sent, and return it."""
        self.status_line = self.summary()
        self.status_sent = (time.monotonic(), self.status_key())
        return self.status_line

    def status_key(self) -> tuple[str, ...]:
        """The parts of the summary that are not counters."""
        return (self.role_state("stream"), self.role_state("store"), str(self.generation),
                str(self.reload_failures))

    def notify_watchdog(self) -> None:
        """``WATCHDOG=1`` every half period, only while every worker's heartbeat is fresh.

        The supervisor's own loop being alive proves little; a hung worker that the supervisor
        fails to replace must let systemd's watchdog act.
        """
        now = time.monotonic()
        if self.watchdog is None or now < self.watchdog_due:
            return
        timeout = self.settings.control.heartbeat_timeout
        if all(now - self.role_beats.get(r, -math.inf) <= timeout for r in self.ROLES):
            sd.notify("WATCHDOG=1")
            self.watchdog_due = now + self.watchdog / 2
        else:
            # Look again on the next pass, not in a busy loop.
            self.watchdog_due = now + min(self.watchdog / 2, self.LOOP_TIMEOUT)

    def update_rate(self) -> None:
        """Tweets stored per second over the last ``RATE_WINDOW`` seconds."""
        now, stored = time.monotonic(), self.stored()
        if self.rate_sample is None:
            self.rate_sample = (now, stored)
        elif now - self.rate_sample[0] >= self.RATE_WINDOW:
            then, before = self.rate_sample
            # A restarted store worker starts its counters again from zero.
            self.rate = max(stored - before, 0) / (now - then)
            self.rate_sample = (now, stored)

    def stored(self) -> int:
        worker = self.workers.get("store")
        counters = worker.status.get("counters") if worker else None
        value = counters.get("stored", 0) if isinstance(counters, dict) else 0
        return value if isinstance(value, int) else 0

    def summary(self) -> str:
        """One line for ``STATUS=``; trouble first, then where the stream is and what it does.

        E.g. ``connected conn=3 gen=2; 1234 stored; 812.5 tweets/s; settings gen=2``. The
        stream worker's state names the connection and the generation of the filters it was
        opened with; ``settings gen`` is the newest applied settings (an unchanged-filter or
        writer-only reload moves it without a reconnect).
        """
        parts = [self.role_state("stream"), f"{self.stored()} stored",
                 f"{self.rate:.1f} tweets/s", f"settings gen={self.generation}"]
        store_state = self.role_state("store")
        if store_state.startswith("degraded") or "restarting" in store_state:
            parts.insert(0, store_state)
        if self.reload_failures:
            parts.append(f"{self.reload_failures} reload(s) rejected, old settings in force")
        return one_line("; ".join(parts), 200)

    def role_state(self, role: str) -> str:
        worker = self.workers.get(role)
        if worker is None:
            return f"{role} worker restarting"
        return one_line(str(worker.status.get("state", "starting")))

    def phase(self) -> str:
        """starting → ready → stopping → stopped."""
        if self.stopped:
            return "stopped"
        return "stopping" if self.stopping else "ready" if self.ready else "starting"

    def write_status(self) -> None:
        """Publish ``run/supervisor.json`` when it changes, and at least every second."""
        doc = {
            "state": self.phase(),
            "generation": self.generation,
            "reload_failures": self.reload_failures,
            "restarts": dict(self.restarts),
            "workers": {role: w.pid for role, w in self.workers.items()},
            "status": self.status_line,
        }
        now = time.monotonic()
        if doc != self.written[1] or now - self.written[0] >= self.STATUS_INTERVAL:
            with contextlib.suppress(OSError):
                runstate.write_status(self.state_dir, "supervisor", doc)
            self.written = (now, doc)

    # -- pid file and clean-up -----------------------------------------------------------------

    def write_pidfile(self) -> None:
        """``run/supervisor.pid``, for ``ingestd reload``."""
        path = runstate.run_dir(self.state_dir) / PIDFILE
        tmp = path.with_name(f".{PIDFILE}.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)

    def cleanup(self) -> None:
        """Remove our pid file, publish the final state, restore the signal handlers."""
        path = self.state_dir / runstate.RUN_DIR / PIDFILE
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text()) == os.getpid():
                path.unlink()
        self.stopped = True
        self.write_status()
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)
        if self.lock_fd is not None:
            # Our copy only: the lock is released once the last worker holding it is gone too.
            os.close(self.lock_fd)
            self.lock_fd = None


def read_config_text(path: Path) -> str:
    """The settings file's text; a file that cannot be read is a ``ConfigError`` too."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not valid UTF-8 (byte offset {exc.start})") from None
    except OSError as exc:
        reason = f"cannot read file: {exc.strerror or type(exc).__name__}"
        raise ConfigError(path, "", reason) from None


def run_supervisor(config_path: Path) -> int:
    """``ingestd run``: load the settings, then supervise the workers; the process exit code."""
    try:
        # The text, not only the settings: workers restarted later get this validated copy.
        text = read_config_text(config_path)
        settings = load_settings_text(text, config_path)
    except ConfigError as exc:
        configure_logging(role="supervisor", pid=os.getpid())
        log.error("settings_invalid", error=str(exc))
        return Supervisor.EXIT_CONFIG
    configure_supervisor_logging(settings)
    # -- metrics listener (issue #6): serves /metrics and /healthz from the run-state files.
    from ingestd.control.metrics import start_metrics_server

    metrics = start_metrics_server(settings)
    try:
        return Supervisor(config_path, settings, text=text).run()
    finally:
        if metrics is not None:
            metrics.close()
    # -- end metrics listener


def configure_supervisor_logging(settings: Settings) -> None:
    """The same logging set-up as the workers', tagged ``role=supervisor``."""
    lg = settings.logging
    configure_logging(lg.level, lg.format, secrets=secret_values(settings),
                      error_interval=lg.error_interval, role="supervisor", pid=os.getpid())
