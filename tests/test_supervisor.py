"""The supervisor as a real process with real signals, driving fake workers (tests/support).

Each test starts ``tests/support/supervisor_launcher.py`` (the real ``Supervisor``, fake worker
command, small settings schema), then observes three things: the supervisor's JSON log lines, the
fake workers' shared event log (``state/fake/events.jsonl``, in time order) and the datagrams on a
real ``NOTIFY_SOCKET``. Waits poll a condition with a deadline; nothing sleeps a guessed amount.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import yaml

from ingestd.control import runstate
from ingestd.control.daemonctl import Verdict, read_verdict, supervisor_pid
from tests.support.notify import NotifySocket, kinds
from tests.support.wait import wait_until

LAUNCHER = Path(__file__).parent / "support" / "supervisor_launcher.py"
ROOT = Path(__file__).resolve().parents[1]


class Run:
    """One supervisor process under test, with its settings file and state folder."""

    def __init__(self, tmp: Path, control: dict[str, Any], env: dict[str, str]) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "settings.yaml"
        self.state_dir = tmp / "state"
        self.log_path = tmp / "supervisor.log"
        self.doc: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "control": {"stop_timeout": 10, "heartbeat_timeout": 30, **control},
            "stream": {"track": ["alpha"]},
        }
        self.write_config(self.doc)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(LAUNCHER), str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def write_config(self, doc: dict[str, Any] | str) -> str:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)
        return text

    def logs(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The supervisor's log events (optionally only ``event`` with these field values)."""
        found = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # e.g. a Python traceback from a worker
            if event is None or (doc.get("event") == event
                                 and all(doc.get(k) == v for k, v in match.items())):
                found.append(doc)
        return found

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The fake workers' events, in time order."""
        path = self.state_dir / "fake" / "events.jsonl"
        if not path.exists():
            return []
        docs = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        return [d for d in docs if (event is None or d["event"] == event)
                and all(d.get(k) == v for k, v in match.items())]

    def supervisor_status(self) -> dict[str, Any]:
        return runstate.read_status(self.state_dir, "supervisor") or {}

    def worker_pid(self, role: str) -> int | None:
        pid = self.supervisor_status().get("workers", {}).get(role)
        return pid if isinstance(pid, int) else None

    def wait_ready(self) -> None:
        wait_until(lambda: self.logs("ready"), 10, "supervisor ready")

    def wait_log(self, event: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
        return wait_until(lambda: self.logs(event, **match), timeout, f"log {event} {match}")[-1]

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Kill whatever is left (supervisor and its workers) after a test."""
        pids = [self.pid]
        for path in (self.state_dir / "fake").glob("*.pids"):
            pids += [int(p) for p in path.read_text().split()]
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE and self.is_ours(proc):
                    proc.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=10)

    def is_ours(self, proc: psutil.Process) -> bool:
        return any(str(LAUNCHER.parent) in part for part in proc.cmdline())


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    runs: list[Run] = []

    def start(control: dict[str, Any] | None = None, **env: str) -> Run:
        run = Run(tmp_path / f"run{len(runs)}", control or {}, env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


# -- stop ---------------------------------------------------------------------------------------


def test_sigterm_stops_stream_before_store_and_exits_0(start: Any) -> None:
    run = start({"stop_timeout": 10}, FAKE_STORE_DRAIN="0.5")
    run.wait_ready()
    began = time.monotonic()
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait_exit(timeout=12) == 0
    assert time.monotonic() - began < 10  # within stop_timeout
    order = [(e["role"], e["event"]) for e in run.events() if e["event"] in ("term", "exit")]
    # The producer is gone before the consumer is even asked to stop (and then drains).
    assert order == [("stream", "term"), ("stream", "exit"), ("store", "term"), ("store", "exit")]
    assert run.logs("stopped", killed=[])
    # Exits the supervisor asked for are routine: info, not a warning to page on.
    exits = run.logs("worker_exited")
    assert [(e["role"], e["level"], e["requested"]) for e in exits] == [
        ("stream", "info", True), ("store", "info", True)], exits
    assert not (run.state_dir / "run" / "supervisor.pid").exists()
    assert run.supervisor_status()["state"] == "stopped"


def test_worker_outliving_stop_timeout_is_killed_and_exit_is_1(start: Any) -> None:
    run = start({"stop_timeout": 1.5}, FAKE_STORE_IGNORE_TERM="1")
    run.wait_ready()
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait_exit(timeout=10) == 1
    assert run.logs("stopped", killed=["store"])
    assert run.logs("worker_exited", role="store", signal="SIGKILL")
    assert run.events("exit", role="stream")  # the stream worker still stopped cleanly first


def test_second_signal_during_stop_escalates_to_sigkill(start: Any) -> None:
    run = start({"stop_timeout": 60}, FAKE_STREAM_IGNORE_TERM="1")
    run.wait_ready()
    os.kill(run.pid, signal.SIGTERM)
    run.wait_log("stopping")
    os.kill(run.pid, signal.SIGINT)
    assert run.wait_exit(timeout=10) == 1  # far below the 60 s budget
    assert run.logs("stopped", escalated=True)
    assert not run.events("term", role="store")  # escalation skips the graceful store stop


# -- supervision --------------------------------------------------------------------------------


def test_killed_worker_is_restarted_and_supervisor_stays_up(start: Any) -> None:
    run = start()
    run.wait_ready()
    old = run.worker_pid("stream")
    assert old is not None
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (p := run.worker_pid("stream")) not in (None, old) and p, 10,
                     "a new stream worker")
    # A death nobody asked for reaches a warning-level filter (the runbook's journal lines).
    assert run.logs("worker_exited", role="stream", pid=old, signal="SIGKILL", level="warning",
                    requested=False)
    assert run.logs("worker_restart_scheduled", role="stream", level="warning")
    assert run.proc.poll() is None
    wait_until(lambda: (runstate.read_status(run.state_dir, "stream") or {}).get("pid") == new,
               10, "the new worker's heartbeat")
    assert run.supervisor_status()["restarts"] == {"store": 0, "stream": 1}


@pytest.mark.parametrize(("ignore_abrt", "death"), [("", "SIGABRT"), ("1", "SIGKILL")])
def test_hung_worker_is_aborted_then_killed_and_replaced(start: Any, ignore_abrt: str,
                                                         death: str) -> None:
    run = start({"heartbeat_timeout": 1.5}, FAKE_STREAM_HANG_AFTER="0.5", FAKE_STREAM_TIMES="1",
                FAKE_STREAM_IGNORE_ABRT=ignore_abrt)
    run.wait_ready()
    hung = run.wait_log("worker_hung", role="stream")
    run.wait_log("worker_exited", role="stream", pid=hung["pid"], signal=death)
    # The hang itself is the error; the kill that ended it was the supervisor's own.
    assert hung["level"] == "error"
    assert run.logs("worker_exited", role="stream", signal=death, level="info", requested=True)
    assert bool(run.logs("worker_killed", role="stream")) == (death == "SIGKILL")
    wait_until(lambda: run.events("started", role="stream", incarnation=2), 10, "a replacement")
    assert run.proc.poll() is None


def test_worker_that_never_beats_is_replaced_and_then_ready(start: Any) -> None:
    run = start({"heartbeat_timeout": 1.5}, FAKE_STREAM_HANG_AFTER="0", FAKE_STREAM_TIMES="1")
    hung = run.wait_log("worker_hung", role="stream")
    run.wait_log("worker_exited", role="stream", pid=hung["pid"], signal="SIGABRT")
    run.wait_ready()  # READY=1 only once the replacement has published its status
    assert len(run.events("started", role="stream")) == 2


def test_a_frozen_service_is_not_taken_for_hung_workers(start: Any) -> None:
    # The whole service frozen (SIGSTOP, a paused VM) for longer than the heartbeat timeout: on
    # waking, the supervisor's first look must not abort workers that could not beat either.
    run = start({"heartbeat_timeout": 3})
    run.wait_ready()
    workers = {role: run.worker_pid(role) for role in ("stream", "store")}
    pids = [run.pid, *(p for p in workers.values() if p is not None)]
    assert len(pids) == 3
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(5.0)  # the freeze's length is the scenario (longer than the timeout)
        os.kill(run.pid, signal.SIGCONT)  # the supervisor first: it looks before any new beat
        gap = run.wait_log("supervisor_suspended")["gap"]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert gap >= 5.0
    beats = {role: (runstate.read_status(run.state_dir, role) or {}).get("progress", 0)
             for role in workers}
    wait_until(lambda: all((runstate.read_status(run.state_dir, role) or {}).get("progress", 0)
                           > beats[role] for role in workers), 10, "both workers beating again")
    looks = run.supervisor_status().get("time")
    wait_until(lambda: run.supervisor_status().get("time") != looks, 10, "a later look")
    assert not run.logs("worker_hung")
    assert {role: run.worker_pid(role) for role in workers} == workers
    assert len(run.events("started")) == 2


def test_crash_loop_stops_the_other_worker_and_exits_75(start: Any) -> None:
    run = start({"crash_loop_restarts": 2, "crash_loop_window": 60},
                FAKE_STREAM_CRASH_AFTER="0.1", FAKE_STREAM_EXIT_CODE="3")
    assert run.wait_exit(timeout=30) == 75
    (loop,) = run.logs("crash_loop")
    assert (loop["exits"], loop["exits_by_role"], loop["last_exit"]) == (3, {"stream": 3},
                                                                         "stream")
    crashes = run.logs("worker_exited", role="stream", exit_code=3)
    assert len(crashes) == 3 and all(e["level"] == "warning" for e in crashes), crashes
    assert len(run.events("started", role="stream")) == 3  # the first run and 2 restarts
    assert run.events("exit", role="store")  # stopped gracefully, not killed


def test_crash_loop_line_counts_both_workers_and_says_so_by_role(start: Any) -> None:
    # Both workers crash: the limit is on their exits together, and the line says how many of
    # each (not the sum under one role's name); they match the workers' own crash lines.
    run = start({"crash_loop_restarts": 4, "crash_loop_window": 60},
                FAKE_STREAM_CRASH_AFTER="0.1", FAKE_STORE_CRASH_AFTER="0.1")
    assert run.wait_exit(timeout=30) == 75
    (loop,) = run.logs("crash_loop")
    crashed = {role: len(run.logs("worker_exited", role=role, exit_code=3))
               for role in ("stream", "store")}
    by_role = loop["exits_by_role"]
    assert loop["exits"] == sum(by_role.values()) == 5 and loop["limit"] == 4
    assert set(by_role) == {"stream", "store"}, loop
    assert all(by_role[role] <= crashed[role] for role in by_role), (loop, crashed)
    assert loop["last_exit"] in by_role and loop.get("role", "supervisor") == "supervisor"


def test_a_workers_exit_78_is_restarted_like_any_other_exit(start: Any) -> None:
    """A worker runs the settings the supervisor validated, so its exit 78 (they no longer load
    there: a credential gone) may pass: it is restarted after its back-off, within the
    crash-loop bound. It used to halt the daemon with 78, which systemd leaves down."""
    run = start(FAKE_STORE_CRASH_AFTER="0", FAKE_STORE_EXIT_CODE="78", FAKE_STORE_TIMES="1")
    wait_until(lambda: run.events("started", role="store", incarnation=2), 15, "a new store")
    run.wait_ready()
    assert run.proc.poll() is None
    assert run.wait_log("worker_exited", role="store", exit_code=78)["requested"] is False
    assert run.wait_log("worker_restart_scheduled", role="store")["delay"] == 1.0
    assert not run.logs("stopping")


def test_workers_do_not_inherit_the_notify_environment(start: Any,
                                                      notify_socket: NotifySocket) -> None:
    run = start(NOTIFY_SOCKET=notify_socket.name, WATCHDOG_USEC="10000000")
    run.wait_ready()
    assert [e["notify_env"] for e in run.events("started")] == [[], []]


# -- reload -------------------------------------------------------------------------------------


def test_sighup_with_valid_config_reloads_both_workers(start: Any) -> None:
    run = start()
    run.wait_ready()
    text = run.write_config({**run.doc, "stream": {"track": ["alpha", "beta"]}})
    os.kill(run.pid, signal.SIGHUP)
    digest = hashlib.sha256(text.encode()).hexdigest()
    wait_until(lambda: len(run.events("reload")) == 2, 10, "both workers reloaded")
    reloads = run.events("reload", generation=2, sha256=digest)
    assert sorted(e["role"] for e in reloads) == ["store", "stream"]
    assert run.logs("reload_applied", generation=2, filter_changed=True)
    wait_until(lambda: run.supervisor_status().get("generation") == 2, 10, "generation 2")


def test_sighup_with_broken_yaml_keeps_old_config(start: Any) -> None:
    run = start()
    run.wait_ready()
    run.write_config("control: [unclosed\n")
    os.kill(run.pid, signal.SIGHUP)
    failed = run.wait_log("reload_failed")
    assert failed["reload_failures"] == 1 and "settings.yaml" in failed["error"]
    wait_until(lambda: run.supervisor_status().get("reload_failures") == 1, 10, "failure count")
    assert not run.events("reload")
    assert run.proc.poll() is None
    assert run.supervisor_status()["generation"] == 1
    # Still fully functional: the next good reload is generation 2.
    run.write_config(run.doc)
    os.kill(run.pid, signal.SIGHUP)
    run.wait_log("reload_applied", generation=2)


def test_hundred_reloads_leak_no_fds_or_memory(start: Any) -> None:
    run = start()
    run.wait_ready()
    proc = psutil.Process(run.pid)

    def reload_once(n: int) -> None:
        track = ["alpha"] if n % 2 else ["beta"]
        run.write_config({**run.doc, "stream": {"track": track}} if n % 3 else "bad: [")
        expected = (run.supervisor_status().get("generation"),
                    run.supervisor_status().get("reload_failures"))
        os.kill(run.pid, signal.SIGHUP)
        wait_until(lambda: (run.supervisor_status().get("generation"),
                            run.supervisor_status().get("reload_failures")) != expected,
                   10, f"reload {n}")

    for n in range(20):  # warm-up: imports, caches, allocator arenas
        reload_once(n)
    fds, rss = proc.num_fds(), proc.memory_info().rss
    for n in range(20, 120):
        reload_once(n)
    assert proc.num_fds() == fds
    assert proc.memory_info().rss - rss < 2 * 1024 * 1024
    assert run.proc.poll() is None


def test_reload_verdicts_are_published_for_the_reload_command(start: Any) -> None:
    """Each SIGHUP gets one numbered verdict in run/reload.json: what ``ingestd reload`` (the
    unit's ExecReload) waits for, because under systemd only the daemon can read the secrets."""
    run = start()
    run.wait_ready()
    assert supervisor_pid(run.state_dir) == run.pid
    os.kill(run.pid, signal.SIGHUP)
    first = wait_until(lambda: read_verdict(run.state_dir), 10, "the first verdict")
    run.write_config({**run.doc, "stream": {"track": ["beta"]}})
    os.kill(run.pid, signal.SIGHUP)
    second = wait_until(lambda: (v := read_verdict(run.state_dir)) and v.seq == 2 and v, 10,
                        "the second verdict")
    run.write_config("stream: [")
    os.kill(run.pid, signal.SIGHUP)
    third = wait_until(lambda: (v := read_verdict(run.state_dir)) and v.seq == 3 and v, 10,
                       "the third verdict")

    assert first == Verdict(run.pid, 1, 2, True, (), {"filter_changed": False})
    assert second.applied and second.generation == 3
    assert second.changes["filter_changed"] is True  # the launcher's schema has no diff
    assert not third.applied and third.generation == 3
    assert len(third.errors) == 1 and third.errors[0].startswith(f"{run.config}: ")
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait_exit(timeout=12) == 0
    assert supervisor_pid(run.state_dir) is None  # pid file removed on exit


def test_a_pid_reused_after_the_pid_file_is_not_the_supervisor(tmp_path: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        pidfile = runstate.run_dir(tmp_path) / "supervisor.pid"
        pidfile.write_text(f"{bystander.pid}\n")
        old = time.time() - 3600  # the pid file predates the process now holding that pid
        os.utime(pidfile, (old, old))
        assert supervisor_pid(tmp_path) is None  # so ``ingestd reload`` sends it no SIGHUP
        os.utime(pidfile)
        assert supervisor_pid(tmp_path) == bystander.pid
    finally:
        bystander.kill()
        bystander.wait()


def supervisor_json(state_dir: Path, pid: object, proc: object, **fields: object) -> None:
    """``run/supervisor.json`` as a supervisor writes it, with ``pid`` and ``proc`` as given."""
    now = time.time()
    doc = {"role": "supervisor", "pid": pid, "proc": proc, "state": "ready", "time": now,
           **fields, "time_end": now}
    (runstate.run_dir(state_dir) / "supervisor.json").write_bytes(orjson.dumps(doc))


def test_a_missing_pid_file_is_made_up_for_by_the_verified_status_file(tmp_path: Path) -> None:
    # A tmp cleaner took run/supervisor.pid: `ingestd reload` said "no running daemon" (exit 3)
    # until the supervisor's next look wrote it back (up to 10 s).
    bystander = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        pid = bystander.pid
        supervisor_json(tmp_path, pid, f"{pid}-{time.time_ns()}")
        assert supervisor_pid(tmp_path) == pid
        # the pid file of a process gone, or a pid that signals a group: the status file's
        (tmp_path / "run" / "supervisor.pid").write_text("-1\n")
        assert supervisor_pid(tmp_path) == pid
        # never a pid the kernel handed out again: its process started after the token
        supervisor_json(tmp_path, pid, f"{pid}-{time.time_ns() - 3600 * 10**9}")
        assert supervisor_pid(tmp_path) is None
        supervisor_json(tmp_path, pid, f"{pid}-{time.time_ns()}", state="stopped")
        assert supervisor_pid(tmp_path) is None
        for bad_pid, proc in ((pid, f"{pid + 1}-{time.time_ns()}"), (pid, None), (pid, 7),
                              (str(pid), f"{pid}-{time.time_ns()}"), (True, "1-1"),
                              (-1, f"-1-{time.time_ns()}"), (pid, f"{pid}-١٢٣"),
                              (pid, f"{pid}-")):
            supervisor_json(tmp_path, bad_pid, proc)
            assert supervisor_pid(tmp_path) is None, (bad_pid, proc)
        (tmp_path / "run" / "supervisor.json").write_bytes(b'{"role": "supervisor", "pid": ')
        assert supervisor_pid(tmp_path) is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("text", ["-1", "0"])
def test_a_pid_file_naming_a_process_group_is_no_supervisor(tmp_path: Path, text: str) -> None:
    # kill(-1, SIGHUP) signals every process root may signal, kill(0, …) the caller's group:
    # `ingestd reload` took either as a live supervisor and hung up the whole machine.
    (runstate.run_dir(tmp_path) / "supervisor.pid").write_text(f"{text}\n")
    assert supervisor_pid(tmp_path) is None


# -- systemd notify -----------------------------------------------------------------------------


def test_notify_messages_arrive_in_order(start: Any, notify_socket: NotifySocket) -> None:
    run = start(NOTIFY_SOCKET=notify_socket.name)
    ready = notify_socket.wait_for("READY=1")
    assert "\nSTATUS=connected; " in ready and "; settings gen=1" in ready
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    os.kill(run.pid, signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING=1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = dict(line.split("=", 1) for line in reloading.split("\n"))
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    notify_socket.wait_for("READY=1")
    run.write_config("{{ broken")
    os.kill(run.pid, signal.SIGHUP)
    notify_socket.wait_for("RELOADING=1")
    notify_socket.wait_for("READY=1")  # a failed reload leaves the service ready (old config)
    os.kill(run.pid, signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1")
    assert run.wait_exit(timeout=12) == 0
    notify_socket.drain()
    assert kinds(notify_socket.received) == [
        "READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_the_stop_asks_systemd_for_its_whole_budget(start: Any,
                                                   notify_socket: NotifySocket) -> None:
    """STOPPING=1 carries EXTEND_TIMEOUT_USEC= for stop_timeout plus the reap and the exit: a
    stop_timeout above the unit's TimeoutStopSec= is not cut by systemd's SIGKILL
    (tests/systemd: test_a_stop_timeout_above_timeoutstopsec_is_granted_by_systemd)."""
    run = start({"stop_timeout": 42}, NOTIFY_SOCKET=notify_socket.name)
    notify_socket.wait_for("READY=1")
    os.kill(run.pid, signal.SIGTERM)
    stopping = notify_socket.wait_for("STOPPING=1")
    assert run.wait_exit(timeout=12) == 0
    fields = dict(line.split("=", 1) for line in stopping.split("\n"))
    assert int(fields["EXTEND_TIMEOUT_USEC"]) == (42 + 5 + 5) * 1_000_000, stopping


def test_watchdog_pauses_while_a_worker_hangs(start: Any, notify_socket: NotifySocket) -> None:
    run = start({"heartbeat_timeout": 1.5}, NOTIFY_SOCKET=notify_socket.name,
                WATCHDOG_USEC="400000", FAKE_STREAM_HANG_AFTER="2", FAKE_STREAM_TIMES="1",
                FAKE_STREAM_IGNORE_ABRT="1")
    notify_socket.wait_for("READY=1")
    notify_socket.wait_for("WATCHDOG=1")
    hung = run.wait_log("worker_hung", role="stream")
    notify_socket.drain()  # sent before the hang was detected
    run.wait_log("worker_exited", role="stream", pid=hung["pid"])
    # From the hang decision until the hung worker is gone (SIGABRT ignored, SIGKILL after 2 s),
    # the supervisor is alive and looping, yet it must not tell systemd all is well.
    assert "WATCHDOG=1" not in notify_socket.drain()
    wait_until(lambda: run.events("started", role="stream", incarnation=2), 10, "a replacement")
    notify_socket.wait_for("WATCHDOG=1")  # fresh heartbeats again: keep-alives resume


def test_a_settings_check_that_crashes_refuses_the_reload_and_the_daemon_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-audit: a stream.url with an unclosed IPv6 bracket made the loader raise a plain
    ValueError, which killed the supervisor at a SIGHUP (an outage). That URL is a settings error
    now; any other bug of the loader refuses the reload and keeps the settings in force."""
    from ingestd.config.settings import load_settings_text
    from ingestd.control.supervisor import Supervisor
    from tests.support.creds import CREDS
    from tests.support.daemon import settings_doc

    for name, value in CREDS.items():
        monkeypatch.setenv(name, value)

    config = tmp_path / "settings.yaml"
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", "mongodb://127.0.0.1:9",
                       "twitter")
    doc["state_dir"] = str(tmp_path / "state")
    text = yaml.safe_dump(doc)
    config.write_text(text)

    def loader(raw: str, path: Path) -> Any:
        if raw != text:
            raise RuntimeError("a loader bug")
        return load_settings_text(raw, path)

    sup = Supervisor(config, load_settings_text(text, config), text=text, loader=loader)
    config.write_text(text + "\n# edited\n")
    sup.reload()
    assert sup.standing.reload_failures == 1 and sup.standing.generation == 1, sup.standing
    assert sup.settings_text == text
    config.write_text(text.replace("http://127.0.0.1:9/", "http://[::1/"))
    sup.loader = load_settings_text
    sup.reload()  # a settings error now, not a ValueError out of urlsplit
    assert sup.standing.reload_failures == 2 and sup.standing.generation == 1


def test_a_settings_check_that_crashes_at_start_is_logged_and_exits_78(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings audit: a loader bug at start left a bare traceback and exit 1, where the
    same bug at a reload is one logged line (``reload_check_crashed``). Now one JSON line with
    its traceback, and 78: the same file would fail the same way at every restart."""
    import io
    import threading

    import structlog

    from ingestd.control import supervisor

    def crash(text: str, path: Path) -> Any:
        raise RuntimeError("a loader bug")

    out, configure = io.StringIO(), supervisor.configure_logging
    monkeypatch.setattr(supervisor, "configure_logging",
                        lambda *a, **kw: configure(*a, stream=out, **kw))
    monkeypatch.setattr(supervisor, "load_settings_text", crash)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # configure_logging replaces both
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    config = tmp_path / "settings.yaml"
    config.write_text("state_dir: x\n")
    try:
        assert supervisor.run_supervisor(config) == 78
    finally:
        structlog.reset_defaults()
    (line,) = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert line["event"] == "settings_check_crashed" and line["role"] == "supervisor", line
    assert line["file"] == str(config) and "a loader bug" in str(line["exception"]), line
