"""Run the real ``ingestd run`` process against the simulator and the Mongo stand-in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from ingestd.control import runstate
from tests.support.creds import CREDS
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until


def settings_doc(sim_url: str, mongo_uri: str, database: str, **sections: Any) -> dict[str, Any]:
    """A settings document for tests: fast back-off numbers, everything else default."""
    doc: dict[str, Any] = {
        "stream": {
            "url": sim_url, "track": ["iphone", "ipad", "ipod"], "read_timeout": 90,
            "backoff": {"network_start": 0.25, "network_step": 0.25, "network_cap": 2,
                        "http_start": 0.5, "http_cap": 4, "rate_limit_start": 1,
                        "rate_limit_cap": 4, "reconnect_delay": 0.2,
                        "max_attempts_per_minute": 60},
        },
        "auth": {k.lower().removeprefix("twitter_"): f"${{{k}}}" for k in CREDS},
        "mongo": {"uri": mongo_uri, "database": database, "collection": "tweets",
                  "timeout_ms": 10000},
        "writer": {"batch_size": 200, "flush_interval": 0.2},
        "control": {"stop_timeout": 10, "heartbeat_timeout": 10},
        "metrics": {"listen": None},
        "logging": {"level": "info", "format": "json"},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


class Daemon:
    """One ``ingestd run`` process with its own settings file and state folder."""

    def __init__(self, workdir: Path, doc: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "settings.yaml"
        self.state_dir = workdir / "state"
        doc.setdefault("state_dir", str(self.state_dir))
        self.write_settings(doc)
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # wall clock of the last start (status files older are stale)
        self.wrapper: list[str] = []  # a command the daemon runs under (setpriv …)

    def write_settings(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(CREDS)
        return env

    def start(self, extra_env: dict[str, str] | None = None) -> Daemon:
        env = self.env() | (extra_env or {})
        self.started_at = time.time()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "ingestd", "run", "--config",
                 str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        return self

    def status(self, role: str) -> dict[str, Any]:
        return runstate.read_status(self.state_dir, role) or {}  # a half-written one read again

    def counters(self, role: str) -> dict[str, Any]:
        return dict(self.status(role).get("counters", {}))

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until both workers published their status and the supervisor reported itself ready
        with those very workers: tests read ``run/supervisor.json`` right after this. The
        supervisor's status must be written since this start: a SIGKILLed daemon's files stay,
        ready with its workers, until the new one writes its own (the soak's kill proof read the
        old restart counts). (Its time, not its pid: a wrapper may stand between.)"""
        def ready() -> bool:
            self.assert_running()
            pids = {role: self.status(role).get("pid") for role in ("stream", "store")}
            supervisor = self.status("supervisor")
            return (all(pids.values()) and supervisor.get("state") == "ready"
                    and float(supervisor.get("time", 0)) >= self.started_at
                    and supervisor.get("workers") == pids)
        wait_until(ready, timeout, "both workers to publish status and the supervisor ready")

    def assert_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``sig`` and wait for exit: (exit code, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout}s:\n{self.tail()}") from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.logs().splitlines():
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                events.append(obj)
        return events

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-n:])

    def worker_pid(self, role: str) -> int:
        pid = self.status(role).get("pid")
        assert isinstance(pid, int), f"no {role} worker pid"
        return pid

    # -- helpers for control tests (tests/test_control.py) ------------------------------------

    def write_settings_atomically(self, doc: dict[str, Any] | str) -> None:
        """Replace the settings file in one rename (what an editor or config tool does)."""
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        if not isinstance(doc, str):
            self.doc = doc
        tmp = self.config.with_name(f".{self.config.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """Log events named ``event`` whose fields equal ``match``."""
        return [e for e in self.log_events() if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def wait_log(self, event: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The newest log event ``event`` with these field values, once there is one."""
        def found() -> list[dict[str, Any]]:
            self.assert_running()
            return self.events(event, **match)
        return wait_until(found, timeout, f"log event {event} {match}")[-1]

    def wait_generation(self, role: str, generation: int, timeout: float = 30.0) -> None:
        """Until ``role`` (supervisor, stream or store) publishes ``generation``."""
        wait_until(lambda: self.status(role).get("generation") == generation, timeout,
                   f"{role} at generation {generation}")

    def pids(self) -> dict[str, int]:
        """Supervisor and worker pids, from ``run/supervisor.json``."""
        assert self.proc is not None
        workers = self.status("supervisor").get("workers", {})
        return {"supervisor": self.proc.pid, **{r: p for r, p in workers.items()
                                                if isinstance(p, int)}}


def finish(daemon: Daemon, sim: SimProcess) -> None:
    """Stop the daemon (it must exit 0), then the simulator, whatever happens."""
    try:
        code, _ = daemon.stop()
        assert code == 0, daemon.tail()
    finally:
        daemon.kill()
        sim.stop()


def metrics_addr(daemon: Daemon) -> str:
    """The supervisor's /metrics address (host:port), once it has written ``run/metrics.addr``."""
    path = daemon.state_dir / "run" / "metrics.addr"

    def ready() -> str:
        daemon.assert_running()
        return path.read_text().strip() if path.exists() else ""
    return wait_until(ready, 30, "run/metrics.addr")
