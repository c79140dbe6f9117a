"""The supervisor: the main process systemd sees (``ingestd run``).

It spawns the two workers (``store`` then ``stream``), turns signals into decisions, replaces
workers that die or stop heartbeating, and speaks the systemd notify protocol. The shape is
gunicorn's arbiter: signal handlers only enqueue; one loop drains the queue, dispatches
``handle_<signal>`` by name, then reaps children, checks heartbeats, restarts dead workers and
reports. The jobs are split: ``pool.WorkerPool`` (processes, heartbeats, back-off),
``reporting.Reporter`` (notify, run/supervisor.json), ``statelock.StateDirClaim`` (lock, pid
file); this module is the loop, the signals, reload and stop.

Reload: the supervisor validates the new settings text (``mongo.uri`` in a short-lived child
interpreter when it changed: pymongo never stays resident here, see
``config.mongo_uri.check_mongo_uri_in_child``), then sends it to both workers as a ``pipe.Reload``
command on their stdin. Each generation's filters are recorded in the state folder first
(``spool.generations``: numbers unique for the folder's life, the start's after the last run's),
so that the store worker matches every record by the filters it was received under, whatever
the timing and across restarts. A worker restarted later starts with ``--start-generation N``
(the generation in force when it starts; reloads follow on its stdin) and runs the settings
in force, which the supervisor sends it right after the spawn (``send_settings_in_force``),
whatever the file holds by then. A bad config on SIGHUP never stops the service: the old
settings stay in force; nor does a file that stopped validating when a worker is replaced.
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Protocol

import structlog

from ingestd.config.errors import ConfigError
from ingestd.config.schema import Settings, StreamSettings
from ingestd.config.settings import (
    load_settings_text,
    secret_values,
    stream_start_only_changes,
    supervisor_start_only_changes,
)
from ingestd.control import notify as sd
from ingestd.control import reserve, statedir
from ingestd.control.daemonctl import config_errors, write_verdict
from ingestd.control.pipe import IN_FORCE_ENV, Reload, Stop, settings_digest
from ingestd.control.pool import (
    ROLES,
    ControlView,
    PoolHooks,
    Worker,
    WorkerCommand,
    WorkerPool,
    default_worker_command,
)
from ingestd.control.reporting import Reporter, Standing
from ingestd.control.statelock import StateDirClaim
from ingestd.logs import configure_logging, reconfigure_logging, register_secret
from ingestd.memory import trim_heap
from ingestd.source.request import filter_diff, reconnect_keys
from ingestd.spool.generations import GenerationRecord, filter_spec

log = structlog.get_logger("ingestd.control.supervisor")


class SupervisedSettings(Protocol):
    """What the supervisor needs from ``ingestd.config.schema.Settings``."""

    @property
    def state_dir(self) -> Path: ...
    @property
    def control(self) -> ControlView: ...
    @property
    def stream(self) -> object: ...  # compared across reloads


SettingsLoader = Callable[[str, Path], SupervisedSettings]


class Listener(Protocol):
    """The metrics listener, as the supervisor holds it."""

    def close(self) -> None: ...

    def publish(self) -> bool:
        """Write ``run/metrics.addr`` again if it is not this listener's; True if it did."""


ListenerFactory = Callable[[], Listener | None]


def describe_filter(old: SupervisedSettings, new: SupervisedSettings) -> dict[str, Any]:
    """Log fields for a reload: whether the stream reconnects, for which keys (``reconnect``,
    the reader's own rule: ``request.reconnect_keys`` and the credentials), and how the filter
    changed (phrases, ids, boxes)."""
    before, after = old.stream, new.stream
    if not (isinstance(before, StreamSettings) and isinstance(after, StreamSettings)):
        return {"filter_changed": before != after}  # a test's stand-in settings
    keys = reconnect_keys(before, after)
    if getattr(old, "auth", None) != getattr(new, "auth", None):
        keys.append("auth")  # the reader reconnects with new credentials too
    if not keys:
        return {"filter_changed": False}
    return {"filter_changed": True, "reconnect": keys, "filter_diff": filter_diff(before, after)}


class SignalQueue:
    """SIGTERM, SIGINT, SIGHUP and SIGCHLD, queued by their handlers for the main loop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.old_handlers: dict[int, Any] = {}
        self.held: list[signal.Signals] = []  # those that came while held (``install``)

    def install(self) -> None:
        """Take the signals, and let in those ``ingestd run`` held since its first line
        (``cli.HELD_AT_START``): any that came meanwhile is queued now."""
        for sig in self.SIGNALS:
            self.old_handlers[sig] = signal.signal(sig, self.put)
        self.held = sorted(signal.sigpending() & set(self.SIGNALS))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)  # runs the handlers

    def put(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler: NO LOGGING, no work; just queue the signal for the main loop."""
        self.queue.put_nowait(sig)

    def drain(self, timeout: float) -> list[int]:
        """The signals queued within ``timeout`` seconds (waits only for the first)."""
        try:
            sigs = [self.queue.get(timeout=max(timeout, 0.0))]
        except queue.Empty:
            return []
        while True:
            try:
                sigs.append(self.queue.get_nowait())
            except queue.Empty:
                return sigs

    def restore(self) -> None:
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)


def run_files_look(text: str, default: float) -> float:
    """Seconds between looks at the pid file: ``text`` (from ``INGESTD_RUN_FILES_LOOK``) if it
    is a number of seconds between 0.1 and ``default``, else ``default``."""
    try:
        seconds = float(text)
    except ValueError:
        return default
    return seconds if 0.1 <= seconds <= default else default


class Supervisor:
    """Runs the store and stream workers and keeps them healthy until told to stop."""

    STOP_ORDER = ("stream", "store")  # producer first, so the consumer can drain to the end
    SIG_NAMES: ClassVar[dict[int, str]] = {
        int(sig): signal.Signals(sig).name[3:].lower() for sig in SignalQueue.SIGNALS}

    EXIT_OK = 0
    EXIT_ERROR = 1
    EXIT_TEMPFAIL = 75  # crash loop, or a full state folder at start: systemd's Restart= takes over
    EXIT_CONFIG = 78  # invalid settings or state folder at start: restarting cannot help
    EXIT_LOCKED = 73  # another supervisor (or its workers, still finishing) uses the state folder

    # The longest sleep without a signal (SIGCHLD, SIGTERM, SIGHUP end it at once): worker
    # heartbeats are rewritten every second, so a look every second sees each one.
    LOOP_TIMEOUT = 1.0
    # Until a new worker published its first status (start-up or a restart: a second or so) it
    # looks ten times a second: READY=1, and a restarted worker's pid in run/supervisor.json,
    # follow that status file within 0.1 s, not up to 1 s later (`systemctl start` waited for
    # the next pass).
    STARTING_LOOK = 0.1
    REAP_TIMEOUT = 5.0  # for processes already sent SIGKILL
    # What a stop needs beyond stop_timeout and the reap: the stop mark, the status file, exit.
    STOP_SLACK = 5.0
    # Seconds between looks at run/supervisor.pid (one stat): a tmp cleaner may take it alone,
    # and `ingestd reload` cannot find the daemon without it. run/ removed whole is seen at once,
    # by the status write (``restore_run_files``). ``RUN_FILES_LOOK_ENV`` sets a shorter one
    # (the tests of a lost pid file: each waits for two looks).
    RUN_FILES_LOOK = 10.0
    RUN_FILES_LOOK_ENV = "INGESTD_RUN_FILES_LOOK"

    def __init__(
        self,
        config_path: Path,
        settings: SupervisedSettings,
        worker_command: WorkerCommand | None = None,
        *,
        loader: SettingsLoader = load_settings_text,
        text: str | None = None,
        listener: ListenerFactory | None = None,
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        # The state folder is fixed at boot: moving it under running workers would split the spool.
        self.state_dir = settings.state_dir
        self.loader = loader
        self.signals = SignalQueue()
        self.claim = StateDirClaim(self.state_dir)
        hooks = PoolHooks(control=lambda: self.settings.control,
                          spawned=self.send_settings_in_force,
                          crash_loop=lambda: self.halt(self.EXIT_TEMPFAIL, "crash loop"),
                          env=self.in_force_env)
        self.pool = WorkerPool(
            worker_command or functools.partial(default_worker_command, config_path),
            self.state_dir, hooks)
        self.standing = Standing()
        self.generations = GenerationRecord(self.state_dir)
        self.reporter = Reporter(self.standing, self.pool, self.state_dir, self.LOOP_TIMEOUT)
        self.reporter.on_new_file = self.restore_run_files
        self.run_files_due = 0.0  # monotonic time of the next look at the pid file
        self.run_files_look = run_files_look(os.environ.get(self.RUN_FILES_LOOK_ENV, ""),
                                             self.RUN_FILES_LOOK)
        self.run_files_failed = False  # the last restore failed (logged once until one works)
        self.escalated = False
        self.exit_code: int | None = None
        # The settings text in force (validated at start or by the last good reload).
        self.settings_text = text
        self.start_listener = listener  # started once the state folder is ours
        self.listener: Listener | None = None
        self.spool_at_start = 0  # the spool's last record at start (record_start_generation)
        # What the running processes started with: a start-only key is judged against these,
        # not against the previous file (a reverted change needs no restart). The stream
        # worker's are taken again whenever it is (re)started.
        self.started_with = settings
        self.stream_started_with = settings

    # -- main loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until a stop; returns the process exit code."""
        refused = self.claim_state_dir()
        if refused is not None:
            return refused
        self.pool.inherited_fds = self.claim.fds
        self.keep_reserve()
        if self.start_listener is not None:
            self.listener = self.start_listener()
        try:
            self.pool.replay_through = self.spool_at_start
            self.reporter.write_status()  # no counts carried yet: the last run's are gone
            self.take_held_signals()
            self.spawn_workers()
            # Start-up's garbage (the settings' YAML, imports) leaves free pages in the heap that
            # the supervisor, idle from now on, would keep for good (~0.6 MB).
            trim_heap()
            while self.exit_code is None:
                self.wait_for_signals()
                if self.exit_code is None:
                    self.supervise()
            return self.exit_code
        except Exception:
            # Last resort, as in gunicorn: a bug here must not leave workers running unsupervised.
            log.exception("supervisor_failed")
            if not self.standing.stopping:
                self.stop("internal error")
            self.kill_workers()
            return self.EXIT_ERROR
        finally:
            self.cleanup()

    def claim_state_dir(self) -> int | None:
        """Lock the state folder, create its sub-folders and write the pid file; the exit code
        if the folder is another supervisor's or cannot be used.

        First of all: a refused second supervisor must leave the running one's files in run/
        untouched and bind no port (its metrics.addr would replace the running one's).
        """
        try:
            if not self.claim.lock():
                return self.EXIT_LOCKED
            statedir.prepare(self.state_dir)
            self.use_reserve_if_short()
            self.record_start_generation()
            # Before the pid file: `ingestd reload` may send SIGHUP as soon as it exists.
            self.signals.install()
            self.claim.write_pidfile()
        except OSError as exc:
            return self.unusable_state_dir(statedir.explain(self.state_dir, exc))
        except statedir.StateDirUnusable as exc:
            return self.unusable_state_dir(exc)
        return None

    def use_reserve_if_short(self) -> None:
        """A start onto a full disk writes into the reserve's space (``control/reserve.py``):
        the spool's backlog, whose storing frees the disk, could not be stored otherwise."""
        free = reserve.release_if_short(self.state_dir)
        if free is not None:
            log.warning("state_dir_reserve_used", state_dir=str(self.state_dir), free=free,
                        reserve=reserve.BYTES, effect="this start writes into the space the "
                        "reserve held; it is set aside again once "
                        f"{reserve.MAKE_WHEN_FREE} bytes are free")

    def keep_reserve(self) -> None:
        """Set the reserve aside if it is missing and space allows (logged when made). A state
        folder that cannot be looked into (made unreadable under the daemon) ended the supervisor
        here; the workers report it (``spool_unreadable``), and the next look tries again."""
        try:
            made = reserve.replenish(self.state_dir)
        except OSError:
            return
        if made:
            log.info("state_dir_reserve_made", path=str(reserve.path(self.state_dir)),
                     bytes=reserve.BYTES)

    def take_held_signals(self) -> None:
        """Act on a stop or reload sent while the daemon was starting, before any worker runs:
        a stop starts none, and a reload reads the file again, so the workers start with the
        file as the operator left it (the start may have read it before their edit)."""
        if self.signals.held:
            log.info("signals_during_startup", signals=[s.name for s in self.signals.held],
                     action="acted on now, before the workers start")
        for sig in self.signals.drain(0.0):
            self.dispatch(sig)
            if self.exit_code is not None:
                return

    def catch_up_before_ready(self) -> None:
        """Read the settings file again just before ``READY=1``; an edit made since the start
        read it is applied as a reload would apply it (or refused, with the reasons).

        systemd does not run ``ExecReload=`` for a ``systemctl reload`` sent while the unit is
        still starting: it merges the reload into the start job and answers success once
        ``READY=1`` comes. The operator's edit, made after this start had read the file, was
        never applied and nothing said so (the stream kept the old keywords)."""
        if self.settings_text is None:
            return
        try:
            text: str | None = read_config_text(self.config_path)
        except ConfigError:
            text = None  # unreadable now: the reload below says why
        if text == self.settings_text:
            return
        log.info("settings_edited_during_start", file=str(self.config_path),
                 action="read again before READY=1 and applied as a reload (systemd runs no "
                        "ExecReload= for a reload sent while the unit starts)")
        self.reload()

    def record_start_generation(self) -> None:
        """Number this start's generation after the last run's and record its filters before
        any worker runs (``OSError``: the folder cannot be used)."""
        # Read once, before any worker runs: also the store workers' replay boundary (``run``).
        # Unknown (0): nothing to compare (the stop's mark is removed all the same).
        self.spool_at_start = last_seq = spool_last_seq(self.state_dir)
        appended = self.generations.supersede_if_appended(last_seq)
        if appended is not None:
            log.warning("generations_superseded", first_seq=appended[0], last_seq=appended[1],
                        effect="records appended after this version's last stop (an older "
                        "ingestd ran here) and every older one are matched by this start's "
                        "filters, counted as matched_fallback before_record")
        generation = self.generations.next_generation()
        self.generations.record(generation, filter_spec(self.settings.stream))
        self.standing.generation = self.standing.start_generation = generation
        log.info("generation_recorded", generation=generation)

    def unusable_state_dir(self, unusable: statedir.StateDirUnusable) -> int:
        """Undo the claim, say once which setting and path are at fault, and the exit code:
        78 (the unit does not restart: only the operator can fix the folder or the setting),
        but 75 for a full file system, which frees up by itself: 78 would keep the daemon, and
        the backlog whose storing frees the spool's space, down for good."""
        self.signals.restore()
        self.claim.release()
        error = ConfigError(self.config_path, "state_dir",
                            f"{self.state_dir} cannot be used: {unusable.reason}")
        if unusable.full:
            log.error("state_dir_full", error=str(error), file=str(self.config_path),
                      key="state_dir", state_dir=str(self.state_dir), reason=unusable.reason,
                      action="free space on its file system; systemd's Restart= tries again")
            return self.EXIT_TEMPFAIL
        log.error("state_dir_unusable", error=str(error), file=str(self.config_path),
                  key="state_dir", state_dir=str(self.state_dir), reason=unusable.reason)
        return self.EXIT_CONFIG

    def supervise(self) -> None:
        """One pass after the signals: reap, check heartbeats, restart, report."""
        for worker, status in self.pool.reap(self.standing.stopping):
            self.handle_exit(worker, status)
            if self.exit_code is not None:
                return
        control = self.settings.control
        self.pool.replace_hung(control.heartbeat_timeout)
        self.pool.spawn_due(self.standing.generation)
        self.pool.flush_pipes()
        self.count_refused_rules()
        if not self.standing.ready and self.reporter.workers_up():
            self.catch_up_before_ready()
        self.reporter.report(control.heartbeat_timeout)
        self.look_at_pidfile()

    def look_at_pidfile(self) -> None:
        """Every ``RUN_FILES_LOOK`` s: is the pid file still the one written (one stat)? And
        is the reserve there (a stat; a statvfs when it is not)?"""
        now = time.monotonic()
        if now < self.run_files_due:
            return
        self.run_files_due = now + self.run_files_look
        if not self.claim.pidfile_intact():
            self.restore_run_files()
        self.keep_reserve()

    def restore_run_files(self) -> None:
        """Write again what ``run/`` lost of the files written once at start: the pid file
        (``ingestd reload`` finds the daemon by it, ``status`` the folder), the lock file
        (``check --online`` sees a running stream by its flock) and ``metrics.addr`` (the
        metrics URL ``status`` shows). The status files come back by themselves."""
        try:
            restored = self.claim.restore()
            if self.listener is not None and self.listener.publish():
                restored.append("metrics.addr")
        except OSError as exc:
            if not self.run_files_failed:
                log.warning("run_files_restore_failed", error=str(exc),
                            effect="ingestd reload needs --pid until run/ is writable")
            self.run_files_failed = True
            return
        self.run_files_failed = False
        self.pool.inherited_fds = self.claim.fds  # a new lock file: the next worker holds it
        if restored:
            log.warning("run_files_restored", files=restored,
                        reason="removed or replaced while the daemon ran (by hand, or a tmp "
                               "cleaner); the state folder's lock stayed held throughout")

    def count_refused_rules(self) -> None:
        """v2: the endpoint judges stream.rules only after the stream worker adopted a reload;
        a refusal makes that reload a failed one (the counter behind IngestdReloadFailed). The
        generation stays applied; its rules are the previous ones. The start generation's are no
        reload, and a restarted worker's second refusal of a generation is counted once."""
        worker = self.pool.workers.get("stream")
        rules = worker.status.get("rules") if worker is not None else None
        refused = rules.get("refused_generation") if isinstance(rules, dict) else None
        standing = self.standing
        if not isinstance(refused, int) or refused <= max(standing.start_generation,
                                                         standing.rules_refused):
            return
        standing.rules_refused = refused
        standing.reload_failures += 1
        standing.reload_refused(f"the endpoint refused the stream.rules of generation {refused}"
                                f" (previous rules in force): {rules.get('error', '')}"
                                if isinstance(rules, dict) else "stream.rules refused", refused)
        log.error("reload_failed", generation=refused, key="stream.rules",
                  error=str(rules.get("error", "")) if isinstance(rules, dict) else "",
                  reload_failures=standing.reload_failures,
                  action="the endpoint refused the new stream.rules; the previous rules stay in "
                         "force")

    def wait_for_signals(self) -> None:
        """Block until a signal or the next timer is due, then dispatch every queued signal."""
        for sig in self.signals.drain(self.next_timeout()):
            self.dispatch(sig)
            if self.exit_code is not None:
                return

    def dispatch(self, sig: int) -> None:
        """Call ``handle_<name>`` for ``sig``."""
        handler = getattr(self, f"handle_{self.SIG_NAMES.get(sig, '')}", None)
        if handler is None:
            log.warning("signal_ignored", signal=sig)
            return
        handler()

    def next_timeout(self) -> float:
        """Seconds until the loop has something to do without a signal."""
        look = self.STARTING_LOOK if self.reporter.awaiting_first_status() else self.LOOP_TIMEOUT
        due = [time.monotonic() + look, *self.pool.restart_at.values()]
        if self.reporter.watchdog is not None:
            due.append(self.reporter.watchdog_due)
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
        for role in ROLES:
            if role not in self.pool.workers and self.exit_code is None:
                self.pool.spawn(role, self.standing.generation)

    def in_force_env(self) -> dict[str, str]:
        """A new worker's note of the settings in force: it waits for them (``send_settings_in_
        force``) instead of running a file that no longer holds them."""
        if self.settings_text is None:
            return {}
        return {IN_FORCE_ENV: settings_digest(self.settings_text)}

    def send_settings_in_force(self, worker: Worker) -> None:
        """Hand a new worker the settings in force, whatever the file holds now.

        The file may have been edited since the last reload (valid or not), or still hold the
        same text that no longer validates (a file it names is gone: validation depends on the
        world). A new worker must run what the others run, and must not exit 78 (halting the
        whole service) over the file's state: it knows the settings in force by their digest
        (``in_force_env``) and waits for this copy before it connects or writes anything, so an
        edit nobody reloaded never takes effect.
        """
        if self.settings_text is None:
            return
        if worker.role == "stream":
            self.stream_started_with = self.settings  # what it runs, whatever the file says
        worker.pipe.send(Reload(self.standing.generation, self.settings_text))

    def handle_exit(self, worker: Worker, status: int) -> None:
        """Restart an exited worker after its back-off (the crash-loop bound applies). An exit
        78 too: it runs the settings the supervisor validated, so what failed depends on the
        world (a credential gone), which may come back; a restart of the daemon that still
        finds it broken exits 78 at its start."""
        self.pool.schedule_restart(worker.role, ran_for=time.monotonic() - worker.started)

    # -- reload --------------------------------------------------------------------------------

    def reload(self) -> None:
        """Validate the settings file again; if good, send it to the workers as a new generation."""
        standing = self.standing
        if standing.ready:
            sd.notify(sd.reloading_message())
        standing.reloads += 1
        try:
            text = read_config_text(self.config_path)
            settings = self.loader(text, self.config_path)
        except ConfigError as exc:
            # str(ConfigError) is "file: key.path: reason" and never holds a secret value.
            self.refuse_reload(str(exc), config_errors(exc), file=exc.file, key=exc.key_path)
        except Exception as exc:  # a loader bug must not take the running daemon down
            log.error("reload_check_crashed", exc_info=True)
            reason = (f"{self.config_path}: the settings check failed unexpectedly "
                      f"({type(exc).__name__}); see reload_check_crashed in the log")
            self.refuse_reload(reason, [reason], file=str(self.config_path))
        else:
            if (problem := self.new_state_dir_problem(settings)) is not None:
                self.refuse_reload(problem, [problem], key="state_dir")
            else:
                self.adopt(settings, text)
        if standing.ready:
            # Also after a failure: the old settings are still in force and the service is ready.
            sd.notify(f"READY=1\nSTATUS={self.reporter.refresh_status()}")

    def adopt(self, settings: SupervisedSettings, text: str) -> None:
        standing = self.standing
        try:
            changes = self.apply_reload(settings, text)
        except OSError as exc:
            # The new generation's filters could not be recorded: its records could not be
            # matched by them, so the old settings stay in force.
            reason = (f"{self.generations.directory}: cannot record generation "
                      f"{standing.generation + 1}: {exc.strerror or type(exc).__name__}")
            self.refuse_reload(reason, [reason], key="state_dir")
        else:
            write_verdict(self.state_dir, standing.reloads, standing.generation, changes=changes)

    def refuse_reload(self, reason: str, errors: list[str], **where: str | None) -> None:
        """Keep the settings in force: say why (log, status, the verdict ``reload`` waits for)."""
        standing = self.standing
        standing.reload_failures += 1
        standing.reload_refused(reason, standing.generation)
        log.error("reload_failed", error=reason, **where,
                  reload_failures=standing.reload_failures, generation=standing.generation,
                  action=f"keeping the settings of generation {standing.generation}")
        write_verdict(self.state_dir, standing.reloads, standing.generation, errors=errors)

    def new_state_dir_problem(self, settings: SupervisedSettings) -> str | None:
        """Why a new ``state_dir`` could not be used at the next start (as ``check`` says), if
        so: refused now, not found at the restart it waits for."""
        new = settings.state_dir
        if new == self.state_dir or (found := statedir.inspect(new)) is None or not found.anyone:
            return None
        return f"{self.config_path}: state_dir: {new} cannot be used: {found.reason}"

    def apply_reload(self, settings: SupervisedSettings, text: str) -> dict[str, Any]:
        """Adopt ``settings`` and send the validated ``text`` to every running worker; returns
        how the filter changed. The new generation's filters are recorded first (``OSError``:
        nothing changed)."""
        generation = self.standing.generation + 1
        self.generations.record(generation, filter_spec(settings.stream))
        old, self.settings, self.settings_text = self.settings, settings, text
        if isinstance(settings, Settings):  # before the lines below: they are the new level's
            for secret in secret_values(settings):
                register_secret(secret)  # new credentials masked here too, as in the workers
            reconfigure_logging(settings.logging)
        self.standing.generation = generation
        self.standing.refused = None  # the latest attempt is applied: nothing refused now
        for worker in self.pool.workers.values():
            worker.pipe.send(Reload(generation, text))
        changes = describe_filter(old, settings)
        if later := self.start_only_changes(settings):
            changes["restart_needed"] = later
            log.warning("reload_needs_restart", keys=later, generation=generation,
                        reason="these settings are read at start only: systemctl restart")
        log.info("reload_applied", generation=generation, **changes)
        return changes

    def start_only_changes(self, new: SupervisedSettings) -> list[str]:
        """Start-only keys whose new value differs from the one the running processes use."""
        sup, stream = self.started_with, self.stream_started_with
        if not (isinstance(new, Settings) and isinstance(sup, Settings)
                and isinstance(stream, Settings)):
            return []
        return supervisor_start_only_changes(sup, new) + stream_start_only_changes(stream, new)

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
        self.standing.stopping = True
        budget = self.settings.control.stop_timeout
        # Ask systemd for the whole stop: a stop_timeout above TimeoutStopSec= (a long drain
        # chosen on purpose) was cut by systemd's SIGKILL, the unit failed with 'timeout'.
        sd.notify(f"STOPPING=1\n"
                  f"{sd.extend_timeout_message(budget + self.REAP_TIMEOUT + self.STOP_SLACK)}")
        deadline = time.monotonic() + budget
        log.info("stopping", reason=reason, stop_timeout=budget)
        for role in self.STOP_ORDER:
            worker = self.pool.workers.get(role)
            if worker is not None and not self.escalated:
                # What is left of the budget, so the store worker's drain ends before our
                # deadline even when the stream worker took part of it.
                worker.pipe.send(Stop(deadline - time.monotonic()))
                worker.signal(signal.SIGTERM)
                self.wait_worker(worker, deadline)
        killed = self.kill_workers()
        self.note_stop()
        code = self.EXIT_ERROR if killed else self.EXIT_OK
        log.info("stopped", reason=reason, killed=killed, escalated=self.escalated)
        return code

    def note_stop(self) -> None:
        """Every worker gone: the spool's last record, for the next start to tell whether
        another program appended meanwhile (``GenerationRecord.supersede_if_appended``)."""
        if self.pool.workers:
            return  # one could not be reaped: it may still append
        try:
            self.generations.note_stop(read_spool_last_seq(self.state_dir))
        except OSError as exc:
            log.warning("stop_mark_failed", error=str(exc),
                        effect="the next start cannot tell whether an older ingestd ran here")

    def wait_worker(self, worker: Worker, deadline: float) -> None:
        """Wait for ``worker`` to exit until ``deadline``; a second TERM/INT cuts the wait short."""
        while self.pool.workers.get(worker.role) is worker and not self.escalated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for sig in self.signals.drain(min(self.LOOP_TIMEOUT, remaining)):
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.warning("stop_escalated", signal=signal.Signals(sig).name)
                    self.escalated = True
                elif sig == signal.SIGHUP:
                    self.refuse_reload_while_stopping()
            self.pool.reap(stopping=True)
            self.reporter.write_status()  # a draining supervisor still heart-beats

    def refuse_reload_while_stopping(self) -> None:
        """A SIGHUP during the stop's drain (``ingestd reload`` from a shell: systemd itself
        refuses to reload a stopping unit) is answered at once. It went unanswered: ``ingestd
        reload`` waited until the daemon had exited, then said it gave no verdict "within 30s"."""
        standing = self.standing
        standing.reloads += 1
        reason = (f"{self.config_path}: not reloaded: the daemon is stopping (the next start "
                  "reads the file)")
        log.warning("reload_ignored", reason="stopping", generation=standing.generation,
                    action="the next start reads the settings file")
        write_verdict(self.state_dir, standing.reloads, standing.generation, errors=[reason])

    def kill_workers(self) -> list[str]:
        """SIGKILL every worker still running and reap them; the roles that had to be killed."""
        killed = self.pool.kill_all()
        deadline = time.monotonic() + self.REAP_TIMEOUT
        while self.pool.workers and time.monotonic() < deadline:
            self.signals.drain(0.05)
            self.pool.reap(stopping=True)
        return killed

    def cleanup(self) -> None:
        """Remove our pid file, publish the final state, restore the signal handlers."""
        self.claim.remove_pidfile()
        self.standing.stopped = True
        self.reporter.write_status()
        self.signals.restore()
        if self.listener is not None:
            self.listener.close()  # while the lock is ours: its metrics.addr is ours too
        self.claim.release()


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
    except Exception:  # a bug in a check: one JSON line with its traceback, as for a reload
        configure_logging(role="supervisor", pid=os.getpid())
        log.error("settings_check_crashed", file=str(config_path), exc_info=True)
        return Supervisor.EXIT_CONFIG  # the same file fails the same way: no restart storm
    configure_supervisor_logging(settings)
    # Imported here, not at module level: tests build a Supervisor without the metrics listener.
    from ingestd.control.metrics import start_metrics_server

    return Supervisor(config_path, settings, text=text,
                      listener=lambda: start_metrics_server(settings)).run()


def read_spool_last_seq(state_dir: Path) -> int:
    """The number of the spool's last record appended (``OSError`` if it cannot be read)."""
    from ingestd.spool.cursor import last_seq_on_disk
    from ingestd.spool.written import last_written

    return max(last_seq_on_disk(state_dir / "spool"), last_written(state_dir / "spool") or 0)


def spool_last_seq(state_dir: Path) -> int:
    """The spool's last record before any worker starts: the records a store worker reads (or
    finds lost to damage) up to it were received by an earlier daemon run (``replayed``); 0 if it
    cannot be read. The last one appended, if the spool's ``written`` mark says so: the records
    cut off the end of the newest segment were received by an earlier run too, and a new writer
    numbers on after the mark."""
    try:
        return read_spool_last_seq(state_dir)
    except OSError as exc:
        log.warning("spool_replay_unknown", error=str(exc),
                    effect="records left by an earlier run are not counted as replayed")
        return 0


def configure_supervisor_logging(settings: Settings) -> None:
    """The same logging set-up as the workers', tagged ``role=supervisor``."""
    lg = settings.logging
    configure_logging(lg.level, lg.format, secrets=secret_values(settings),
                      error_interval=lg.error_interval, role="supervisor", pid=os.getpid())
