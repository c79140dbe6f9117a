"""What the supervisor tells the outside: READY/STATUS/WATCHDOG to systemd (``notify``) and
``run/supervisor.json`` (read by ``ingestd status`` and the metrics collector). Loaded by the
supervisor only."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ingestd.control import notify as sd
from ingestd.control import runstate, tally
from ingestd.control.pool import ROLES, WorkerPool

log = structlog.get_logger("ingestd.control.supervisor")


@dataclass
class Standing:
    """The supervisor's own facts that the reports show; the supervisor updates them."""

    generation: int = 1
    # This start's first generation: numbered on from the last run's in the state folder
    # (``spool.generations``); the later ones are reloads.
    start_generation: int = 1
    reloads: int = 0  # SIGHUPs handled: the sequence number of run/reload.json
    reload_failures: int = 0
    rules_refused: int = 0  # v2: the newest generation whose refused rules were counted above
    # While the latest reload attempt was refused: {"at": wall time, "reason", "generation" in
    # force}; None once a later one is applied (the cumulative count is reload_failures).
    refused: dict[str, Any] | None = None
    ready: bool = False
    stopping: bool = False
    stopped: bool = False

    def reload_refused(self, reason: str, generation: int) -> None:
        """The latest reload attempt was refused; ``generation`` stays in force."""
        self.refused = {"at": time.time(), "reason": one_line(reason, 300),
                        "generation": generation}

    def phase(self) -> str:
        """starting → ready → stopping → stopped."""
        if self.stopped:
            return "stopped"
        return "stopping" if self.stopping else "ready" if self.ready else "starting"


def one_line(text: str, limit: int = 160) -> str:
    """``text`` safe for one notify field: no newlines, bounded length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Reporter:
    """Sends the notify messages and writes ``run/supervisor.json``, each when it is due."""

    RATE_WINDOW = 5.0
    STATUS_INTERVAL = 1.0  # run/supervisor.json
    STATUS_EVERY = 5.0  # STATUS= for counter-only changes

    def __init__(self, standing: Standing, pool: WorkerPool, state_dir: Path,
                 loop_timeout: float) -> None:
        self.standing, self.pool, self.state_dir = standing, pool, state_dir
        self.loop_timeout = loop_timeout  # the supervisor's longest sleep
        self.status_line = ""
        self.status_sent: tuple[float, tuple[str, ...]] = (0.0, ())
        self.rate = 0.0
        self.rate_sample: tuple[float, int] | None = None
        self.watchdog = sd.watchdog_interval()
        self.watchdog_due = 0.0
        self.written: tuple[float, dict[str, Any]] = (0.0, {})
        self.heartbeat_timeout: float | None = None  # control.heartbeat_timeout in force
        # Called when run/supervisor.json had to be written anew: run/ (or the file) was removed
        # by hand, and the files written once at start (the pid file) may be gone with it.
        self.on_new_file: Callable[[], None] = lambda: None

    def report(self, heartbeat_timeout: float) -> None:
        """Tell systemd and ``ingestd status`` where we are."""
        self.heartbeat_timeout = heartbeat_timeout
        self.update_rate()
        self.notify_ready()
        self.notify_status()
        self.notify_watchdog(heartbeat_timeout)
        self.write_status()

    FIRST_STATUS_WAIT = 10.0  # s after a spawn: past it (a folder gone read-only) no hurry

    def awaiting_first_status(self) -> bool:
        """A worker spawned less than ``FIRST_STATUS_WAIT`` s ago (at start-up, or restarted)
        has still to publish its first status file."""
        now = time.monotonic()
        return any(w.beat_time is None and now - w.started < self.FIRST_STATUS_WAIT
                   for w in self.pool.workers.values())

    def workers_up(self) -> bool:
        """Both workers have published their first status file: ``READY=1`` is due."""
        workers = self.pool.workers
        return all(workers.get(r) is not None and workers[r].beat_time is not None
                   for r in ROLES)

    def notify_ready(self) -> None:
        """``READY=1`` once both workers have published their first status file."""
        if self.standing.ready or not self.workers_up():
            return
        self.standing.ready = True
        sd.notify(f"READY=1\nSTATUS={self.refresh_status()}")
        log.info("ready", generation=self.standing.generation, status=self.status_line)

    def notify_status(self) -> None:
        """``STATUS=`` when a state changes; counter-only changes at most every ``STATUS_EVERY``.

        The counters move all the time; each STATUS= is a D-Bus property change in systemd.
        """
        now, key = time.monotonic(), self.status_key()
        if not self.standing.ready or self.summary() == self.status_line:
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
        return (self.role_state("stream"), self.role_state("store"),
                str(self.standing.generation), self.refused_text())

    def notify_watchdog(self, heartbeat_timeout: float) -> None:
        """``WATCHDOG=1`` every half period, only while every worker's heartbeat is fresh.

        The supervisor's own loop being alive proves little; a hung worker that the supervisor
        fails to replace must let systemd's watchdog act.
        """
        now = time.monotonic()
        if self.watchdog is None or now < self.watchdog_due:
            return
        if self.pool.all_fresh(now, heartbeat_timeout):
            sd.notify("WATCHDOG=1")
            self.watchdog_due = now + self.watchdog / 2
        else:
            # Look again on the next pass, not in a busy loop.
            self.watchdog_due = now + min(self.watchdog / 2, self.loop_timeout)

    def update_rate(self) -> None:
        """Tweets stored per second over the last ``RATE_WINDOW`` seconds."""
        now, stored = time.monotonic(), self.stored()
        if self.rate_sample is None:
            self.rate_sample = (now, stored)
        elif now - self.rate_sample[0] >= self.RATE_WINDOW:
            then, before = self.rate_sample
            self.rate = max(stored - before, 0) / (now - then)
            self.rate_sample = (now, stored)

    def stored(self) -> int:
        """Tweets stored in this daemon run: the store worker's and its predecessors'."""
        worker = self.pool.workers.get("store")
        counters = worker.status.get("counters") if worker else None
        value = counters.get("stored", 0) if isinstance(counters, dict) else 0
        carried = self.pool.carried["store"].counters.get("stored", 0)
        return (value if isinstance(value, int) else 0) + (
            carried if isinstance(carried, int) else 0)

    def summary(self) -> str:
        """One line for ``STATUS=``; trouble first, then where the stream is and what it does.

        E.g. ``connected conn=3 gen=2; 1234 stored; 812.5 tweets/s; settings gen=2``. The
        stream worker's state names the connection and the generation of the filters it was
        opened with; ``settings gen`` is the newest applied settings (an unchanged-filter or
        writer-only reload moves it without a reconnect).
        """
        parts = [self.role_state("stream"), f"{self.stored()} stored",
                 f"{self.rate:.1f} tweets/s", f"settings gen={self.standing.generation}"]
        store_state = self.role_state("store")
        if store_state.startswith("degraded") or "restarting" in store_state:
            parts.insert(0, store_state)
        if refused := self.refused_text():
            parts.append(refused)
        return one_line("; ".join(parts), 200)

    def refused_text(self) -> str:
        """``last reload refused at HH:MM:SS UTC, generation N in force`` while the latest
        reload attempt was refused, else empty: STATUS= says the present (the count of
        refused reloads is in the metrics)."""
        refused = self.standing.refused
        if not refused:
            return ""
        at = time.strftime("%H:%M:%S", time.gmtime(refused["at"]))
        return f"last reload refused at {at} UTC, generation {refused['generation']} in force"

    def role_state(self, role: str) -> str:
        worker = self.pool.workers.get(role)
        if worker is None:
            return f"{role} worker restarting"
        return one_line(str(worker.status.get("state", "starting")))

    def write_status(self) -> None:
        """Publish ``run/supervisor.json`` when it changes, and at least every second."""
        window = self.pool.hooks.control().crash_loop_window
        doc = {
            "state": self.standing.phase(),
            "generation": self.standing.generation,
            "reload_failures": self.standing.reload_failures,
            "reload_refused": self.standing.refused,
            "restarts": dict(self.pool.restarts),
            "workers": {role: w.pid for role, w in self.pool.workers.items()},
            "status": self.status_line,
            # what ``ingestd status`` judges the processes by (status.liveness)
            "heartbeat_timeout": self.heartbeat_timeout,
            "crash_loop_window": window,
            "recent_restarts": self.pool.recent_restarts(window),
            tally.CARRIED_KEY: {role: c.as_dict() for role, c in self.pool.carried.items()},
        }
        now = time.monotonic()
        if doc != self.written[1] or now - self.written[0] >= self.STATUS_INTERVAL:
            anew = False
            with contextlib.suppress(OSError):
                anew = runstate.write_status(self.state_dir, "supervisor", doc)
            self.written = (now, doc)
            if anew:
                self.on_new_file()
