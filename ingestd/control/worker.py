"""What both worker processes share: boot, logging set-up, reloads, the stop flag, and timers.

A worker (``stream_role.StreamRole``, ``store_role.StoreRole``) runs the settings in force (the
supervisor's copy; the file when started alone, see ``boot``), publishes ``run/<role>.json``
every second (the heartbeat), stops on SIGTERM, and takes commands from the supervisor on its
stdin (``pipe``; reloads are validated there already). SIGINT and SIGHUP are ignored here: on
Ctrl-C the whole process group gets SIGINT, and the supervisor must order the stop (stream
first, then store drains the spool).
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from ingestd.config.errors import EXIT_CONFIG, ConfigError
from ingestd.config.schema import Settings
from ingestd.config.settings import load_settings, load_settings_text, secret_values
from ingestd.control.pipe import (
    IN_FORCE_ENV,
    CommandReader,
    Reload,
    Reloaded,
    settings_digest,
)
from ingestd.control.runstate import status_path, write_status
from ingestd.logs import bind_process, configure_logging, reconfigure_logging, register_secret
from ingestd.spool.format import os_error_text
from ingestd.spool.watch import drain_wakeups

log = structlog.get_logger("ingestd.worker")

STATUS_INTERVAL = 1.0
BOOT_SETTINGS_WAIT = 5.0  # seconds a new worker waits for the settings in force (sent at once)


class StopFlag:
    """Set by SIGTERM; the handler only records, the loops act on it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def __bool__(self) -> bool:
        return self.event.is_set()


@dataclass
class WorkerContext:
    """What a role starts from: its settings, where they came from, and its two inputs."""

    settings: Settings
    config_path: Path
    generation: int
    stop: StopFlag
    control: CommandReader

    def reload(self, command: Reload) -> Reloaded | None:
        """The settings of ``command``, or None if they do not validate here; their ``logging``
        section is in force from here on (the role's ``reload_applied`` line included)."""
        new = reload_settings(command, self.config_path)
        if new is not None:
            reconfigure_logging(new.settings.logging)
        return new

    def orphaned(self) -> None:
        """Stop once the supervisor is gone (the control pipe is at EOF)."""
        if self.control.closed.is_set():
            self.stop.event.set()


def start_worker(config_path: Path, role: str, generation: int) -> WorkerContext | int:
    """Boot a worker process: its context, or the exit code if the settings are invalid."""
    control = CommandReader()
    booted = boot(config_path, role, control)
    if isinstance(booted, int):
        return booted
    bind_process(generation=generation)
    return WorkerContext(booted, config_path, generation, StopFlag(), control)


def boot(config_path: Path, role: str, control: CommandReader) -> Settings | int:
    """Load settings and configure logging; an exit code if the settings are invalid.

    Started by a supervisor (``IN_FORCE_ENV`` set), the worker runs the settings in force,
    whatever the file says now (``boot_in_force``); started alone, it runs the file.
    """
    if digest := os.environ.get(IN_FORCE_ENV):
        return boot_in_force(config_path, role, control, digest)
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        configure_logging(role=role, pid=os.getpid())
        log.error("settings_invalid", error=str(exc))
        return EXIT_CONFIG
    configure_worker_logging(settings, role)
    return settings


def boot_in_force(config_path: Path, role: str, control: CommandReader,
                  digest: str) -> Settings | int:
    """The settings in force: the copy the supervisor sends right after every spawn (or the
    file, if no copy came and it still holds them). The file may have been edited since the
    last reload, be invalid, or hold the same text that no longer validates (a file it names is
    gone: validation depends on the world): none of that may halt the service (exit 78), nor
    put an edit nobody reloaded into force. The supervisor validated them; here a file they
    name is not looked for (the connection reports a missing CA file, with back-off). What
    still fails (a credential that can no longer be read) exits, and the supervisor restarts
    the worker after its back-off, as after a crash."""
    sent = control.wait_reload(BOOT_SETTINGS_WAIT)
    file_text = read_text(config_path)
    text = sent.text if sent else file_text
    try:
        if text is None or settings_digest(text) != digest:
            raise ConfigError(config_path, "", "no settings in force: the supervisor sent none "
                              "and the file no longer holds them")
        settings = load_settings_text(text, config_path, check_files=False)
    except ConfigError as exc:
        configure_logging(role=role, pid=os.getpid())
        log.error("settings_invalid", error=str(exc),
                  action="exiting; the supervisor restarts this worker after its back-off")
        return EXIT_CONFIG
    configure_worker_logging(settings, role)
    judge_settings_file(config_path, sent.generation if sent else None,
                        unchanged=file_text == text)
    return settings


def judge_settings_file(config_path: Path, generation: int | None, *, unchanged: bool) -> None:
    """Warn when the file on disk is not what runs: it no longer validates (a reload of it
    would be refused, a restart would exit 78), or it holds an edit no reload applied."""
    action = "running the settings in force, validated by the supervisor"
    try:
        load_settings(config_path)
    except ConfigError as exc:
        why = " (unchanged: a file, variable or credential it names changed)" if unchanged else ""
        log.warning("settings_file_invalid", error=str(exc), file_unchanged=unchanged,
                    generation=generation, action=f"{action}; the file fails now{why}: a reload "
                    "of it is refused and a restart exits 78 until it is fixed")
        return
    if not unchanged:
        log.warning("settings_file_not_in_force", generation=generation,
                    action=f"{action} (the file was edited since the last reload)")


def read_text(path: Path) -> str | None:
    """The file's text; None if it cannot be read (``load_settings`` then says why)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def configure_worker_logging(settings: Settings, role: str) -> None:
    lg = settings.logging
    configure_logging(lg.level, lg.format, secrets=secret_values(settings),
                      error_interval=lg.error_interval, role=role, pid=os.getpid())


def reload_settings(command: Reload, config_path: Path) -> Reloaded | None:
    """The settings of a supervisor reload command, or None if they do not validate here."""
    try:
        settings = load_settings_text(command.text, config_path)
    except ConfigError as exc:
        log.error("reload_rejected", error=str(exc))
        return None
    for value in secret_values(settings):
        register_secret(value)  # new credentials must be masked from the first line on
    bind_process(generation=command.generation)
    return Reloaded(command.generation, settings)


def wake_on_signals() -> int:
    """A pipe that the interpreter writes to when a handled signal (SIGTERM) arrives, whichever
    thread the kernel delivered it to: a wait that includes the read end ends at once (a wait
    in the main thread is otherwise resumed, or not even interrupted, by a signal)."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    return read_fd


def sleep_until_signal(wake_fd: int) -> Callable[[float], None]:
    """A sleep that ends at once when ``wake_fd`` (from ``wake_on_signals``) becomes readable:
    ``time.sleep`` would finish its time after SIGTERM, delaying the stop."""

    def sleep(seconds: float) -> None:
        ready, _, _ = select.select([wake_fd], [], [], max(0.0, seconds))
        if ready:
            drain_wakeups(wake_fd)

    return sleep


class RateMeter:
    """Events per second between two successive readings of a counter."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None
        self.rate = 0.0

    def update(self, count: int) -> float:
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            self.rate = (count - self._last[1]) / (now - self._last[0])
        self._last = (now, count)
        return self.rate


_BEAT_FD_ENV = "INGESTD_BEAT_FD"  # control.pool.BEAT_FD_ENV (not imported: supervisor-only)


class StatusPublisher:
    """Writes ``run/<role>.json`` (the heartbeat); never raises.

    A status file that cannot be written (a read-only state folder, EIO…) is a warning, folded
    by the log's rate limit, and the heartbeat goes through the beat pipe the supervisor gave
    (``control.pool.BEAT_FD_ENV``) instead, so that a worker that keeps working is not taken for
    hung. The first write that works again says so.
    """

    def __init__(self, state_dir: Path, role: str) -> None:
        self.state_dir, self.role = state_dir, role
        self.error = ""  # why the last write failed ("" when it worked)
        self.failures = 0
        try:
            self._beat_fd = int(os.environ.pop(_BEAT_FD_ENV, "-1"))
        except ValueError:
            self._beat_fd = -1

    def __call__(self, status: dict[str, Any]) -> None:
        try:
            write_status(self.state_dir, self.role, status)
        except OSError as exc:
            self.failures += 1
            self.error = os_error_text(exc, exc.filename or status_path(self.state_dir, self.role))
            log.warning("status_write_failed", error=self.error,
                        effect="status not published; heartbeat sent to the supervisor directly")
            self._beat()
            return
        if self.error:
            log.info("status_write_recovered", failures=self.failures, previous_error=self.error)
            self.error = ""

    def _beat(self) -> None:
        if self._beat_fd < 0:
            return
        try:
            os.write(self._beat_fd, b".")
        except BlockingIOError:
            pass  # the supervisor has beats enough unread
        except OSError:
            self._beat_fd = -1


class Ticker:
    """Runs ``fn`` at most every ``interval`` seconds."""

    def __init__(self, interval: float, fn: Callable[[], None]) -> None:
        self.interval, self.fn, self._next = interval, fn, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self.fn()

    def due_in(self) -> float:
        """Seconds until the next call runs ``fn`` (an idle loop sleeps that long)."""
        return max(0.0, self._next - time.monotonic())


class Role(Protocol):
    """A worker's body: ``StreamRole`` or ``StoreRole``."""

    def run(self) -> int: ...


EXIT_STATE_DIR = 75  # EX_TEMPFAIL: the folder may come back; the supervisor restarts the worker


def run_role(ctx: WorkerContext, role: str, make: Callable[[WorkerContext], Role]) -> int:
    """Build a worker's role and run it; its exit code. A start that meets a state folder it may
    not use exits ``EXIT_STATE_DIR`` naming the path (``state_dir_refused``), not a traceback."""
    try:
        body = make(ctx)
    except OSError as exc:
        if (code := state_dir_refused(exc, ctx.settings.state_dir, role)) is None:
            raise
        return code
    return body.run()


def state_dir_refused(exc: OSError, state_dir: Path, role: str) -> int | None:
    """A worker's start that met a state folder it may not use (its mode or owner changed, a
    mount over it): said as the path and the cause, not a traceback; the exit code. None if the
    error is not about a file in the state folder (the caller raises it)."""
    where = str(exc.filename or "")
    if not where.startswith(str(state_dir)):
        return None
    log.error("spool_unreadable", error=os_error_text(exc, where),
              effect=f"the {role} worker cannot start; the supervisor starts it again after its "
              "back-off", action="make the state folder readable and writable by the daemon's "
              "user again (undo the mount or permission change)")
    return EXIT_STATE_DIR

