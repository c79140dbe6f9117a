"""Liveness and refused reloads in ``ingestd status``, ``--json``, ``/healthz``, ``/metrics`` and
systemd's ``STATUS=``, on real processes (a frozen supervisor or worker is SIGSTOPped).

The rule (``status.liveness``): a process whose pid is gone is not running (down, exit 3); alive
with a heartbeat at most ``LATE_AFTER`` old is ok; older is late, past the heartbeat timeout
hung (both degraded, exit 1). A worker restarted twice within the crash-loop window is
crash-looping (down) whatever its latest process does. A refused reload is degraded until a
later one is applied.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingestd.config.errors import EXIT_CONFIG
from ingestd.control import runstate, status
from tests.support.daemon import Daemon, finish, metrics_addr, settings_doc
from tests.support.notify import NotifySocket
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until
from tests.test_status_check import ingestd, write_settings

Views = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


@pytest.fixture
def running(tmp_path: Path, mongo_uri: str, mongo_database: str) -> Iterator[Daemon]:
    """A daemon streaming from the simulator, with a metrics listener; stopped (exit 0) after."""
    sim = SimProcess(tmp_path / "sim", "--rate", "50", "--keepalive", "0.5").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"},
                       control={"heartbeat_timeout": 30})
    daemon = Daemon(tmp_path / "daemon", doc)
    notify = NotifySocket()
    daemon.notify = notify  # type: ignore[attr-defined]
    daemon.start({"NOTIFY_SOCKET": notify.name})
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.status("stream").get("delivering"), 60, "a connection")
        yield daemon
        if daemon.proc is not None:  # None: the test killed it
            finish(daemon, sim)
    finally:
        notify.close()
        daemon.kill()
        sim.stop()


def views(daemon: Daemon) -> Views:
    """``ingestd status`` and ``--json`` (with its exit code as ``_code``)."""
    text = ingestd("status", "--config", str(daemon.config))
    as_json = ingestd("status", "--config", str(daemon.config), "--json")
    print("\n" + text.stdout + text.stderr)
    return text, json.loads(as_json.stdout) | {"_code": as_json.returncode}


def healthz(addr: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())


def metric(addr: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    (value,) = re.findall(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(value)


def heartbeat_older_than(daemon: Daemon, role: str, seconds: float) -> bool:
    return time.time() - float(daemon.status(role).get("time", time.time())) > seconds


def line(text: str, role: str) -> str:
    (found,) = [x for x in text.splitlines() if x.startswith(f"  {role} ")]
    return found


# -- 1: a frozen supervisor ------------------------------------------------------------------------


def test_a_frozen_supervisor_is_not_ok(running: Daemon) -> None:
    """Audit: SIGSTOP the supervisor; 40 s later status said ``ok``, exit 0, next to
    ``supervisor DOWN (last heartbeat 40s ago) ready``. Late (past 5 s) and hung (past the
    heartbeat timeout, 30 s here) are both degraded, and no metrics URL is offered."""
    daemon = running
    assert daemon.proc is not None
    pid = daemon.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: heartbeat_older_than(daemon, "supervisor", status.LATE_AFTER + 1),
                   30, "a late supervisor heartbeat")
        text, view = views(daemon)
    finally:
        os.kill(pid, signal.SIGCONT)
    reason = re.escape("supervisor not responding (last heartbeat ") + r"\d+s ago\)"
    assert text.returncode == 1 == view["_code"] == view["exit_code"], text.stdout
    assert re.match(rf"ingestd: degraded \({reason}\)\n", text.stdout), text.stdout
    assert re.fullmatch(rf"  supervisor  pid {pid} LATE \(last heartbeat \d+s ago\)  "
                        r"last state: ready  generation 1 .*", line(text.stdout, "supervisor"))
    assert "http://" not in text.stdout and view["metrics"] is None
    assert view["health"] == "degraded" and view["liveness"] == {
        "supervisor": "late", "stream": "ok", "store": "ok"}
    assert re.fullmatch(reason, view["reasons"][0])
    # Thawed, it heart-beats again and reads ok.
    wait_until(lambda: ingestd("status", "--config", str(daemon.config)).returncode == 0, 30,
               "status ok after SIGCONT")


def test_the_liveness_rule_past_the_heartbeat_timeout(tmp_path: Path) -> None:
    """Hung (past the timeout the supervisor published) reads like late: degraded, with its own
    reason; a pid that is gone is not running: down. Run files written here (this process is
    their live pid); ``time`` is set back by hand."""
    now = time.time()
    runstate.run_dir(tmp_path)
    runstate.write_status(tmp_path, "supervisor", {"state": "ready", "heartbeat_timeout": 8})
    runstate.write_status(tmp_path, "stream", {"state": "connected conn=1 gen=1"})
    runstate.write_status(tmp_path, "store", {"state": "running"})
    assert status.collect(tmp_path)["health"] == "ok"

    for role in ("supervisor", "store"):  # 9 s silent, past the published timeout (8 s)
        doc = runstate.read_status(tmp_path, role) or {}
        runstate.write_status(tmp_path, role, {**doc, "time": now - 9})
    view = status.collect(tmp_path)
    text = status.render(view)
    print("\n" + text)

    assert view["liveness"] == {"supervisor": "hung", "stream": "ok", "store": "hung"}
    assert view["health"] == "degraded" and view["exit_code"] == 1
    assert view["reasons"] == [
        "supervisor not responding (last heartbeat 9s ago)",
        "store worker hung (last heartbeat 9s ago, over control.heartbeat_timeout 8s)"]
    assert re.search(r"  store       pid \d+ HUNG \(last heartbeat 9s ago\)  last state: running",
                     text)

    doc = runstate.read_status(tmp_path, "store") or {}
    runstate.status_path(tmp_path, "store").write_bytes(
        json.dumps({**doc, "pid": _gone_pid(), "time": now - 1, "time_end": now - 1}).encode())
    view = status.collect(tmp_path)
    assert view["liveness"]["store"] == "not running" and view["health"] == "down"
    assert view["reasons"] == ["store worker not running"] and view["exit_code"] == 3
    assert "  store       not running (last heartbeat 1s ago)  last state: running" in \
        status.render(view)


def test_a_stop_or_start_in_progress_says_so_before_the_workers_down(tmp_path: Path) -> None:
    """While the store worker drains after a stop (or in a start's first second) the headline
    read "down (stream worker not running)" alone: a fault, to whoever looked. The supervisor's
    phase now comes first; health and exit code stay those of workers not running."""
    runstate.run_dir(tmp_path)
    runstate.write_status(tmp_path, "store", {"state": "draining"})
    runstate.status_path(tmp_path, "stream").write_bytes(json.dumps(
        {"role": "stream", "pid": _gone_pid(), "time": time.time() - 1, "state": "stopped"}
    ).encode())
    for phase, says in (("stopping", "supervisor stopping (workers finishing: the store worker "
                                     "drains)"), ("starting", "supervisor starting (workers "
                                                              "being started)")):
        runstate.write_status(tmp_path, "supervisor", {"state": phase, "heartbeat_timeout": 8})
        view = status.collect(tmp_path)
        assert view["reasons"] == [says, "stream worker not running"], view["reasons"]
        assert view["health"] == "down" and view["exit_code"] == 3
    runstate.write_status(tmp_path, "supervisor", {"state": "ready", "heartbeat_timeout": 8})
    assert status.collect(tmp_path)["reasons"] == ["stream worker not running"]


def test_old_files_on_a_read_only_state_folder_are_unknown_not_hung(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No status file can be rewritten (the run folder's file system says read-only): an old
    file proves nothing (the workers beat to the supervisor through its pipe), so a live
    process is ``unknown``, degraded with the reason, and counts as up in the metrics; a
    process that is gone is still not running. (The real mount: tests/test_durability_disk.py,
    the read-only drills.)"""
    from ingestd.control.collector import RunStateCollector

    now = time.time()
    runstate.run_dir(tmp_path)
    for role, state in (("supervisor", "ready"), ("stream", "connected conn=1 gen=1"),
                        ("store", "running")):
        runstate.write_status(tmp_path, role, {"state": state, "time": now - 40})

    def worker_up() -> dict[str, float]:
        family = next(f for f in RunStateCollector(tmp_path).collect()
                      if f.name == "ingestd_worker_up")
        return {s.labels["role"]: s.value for s in family.samples}

    assert set(status.collect(tmp_path)["liveness"].values()) == {"hung"}
    assert set(worker_up().values()) == {0.0}
    real = os.statvfs

    class ReadOnly:
        def __init__(self, path: object) -> None:
            self.f_flag = real(path).f_flag | os.ST_RDONLY  # type: ignore[arg-type]

    monkeypatch.setattr(status.os, "statvfs", ReadOnly)
    view = status.collect(tmp_path)
    text = status.render(view)
    print("\n" + text)
    assert view["liveness"] == dict.fromkeys(("supervisor", "stream", "store"), "unknown")
    assert view["health"] == "degraded" and view["exit_code"] == 1
    assert view["reasons"] == [
        f"status files cannot be written ({tmp_path / 'run'}: read-only file system); "
        "figures up to 40s old, liveness unknown; the logs are live"]
    assert (f"  stream      pid {os.getpid()} alive (status file not rewritable; 40s old)  "
            "last state: connected conn=1 gen=1") in text
    assert set(worker_up().values()) == {1.0}

    doc = runstate.read_status(tmp_path, "store") or {}
    runstate.status_path(tmp_path, "store").write_bytes(
        json.dumps({**doc, "pid": _gone_pid()}).encode())
    view = status.collect(tmp_path)
    assert view["liveness"]["store"] == "not running" and view["health"] == "down"


def test_a_scraper_that_hangs_up_leaves_one_log_line_and_no_traceback(running: Daemon) -> None:
    """A scrape whose client goes away (Prometheus's scrape timeout; here a reset right after
    the request) is an info line, not an error line followed by a traceback on stdout that
    breaks the JSON log (the HA audit's frozen-supervisor drill)."""
    host, port = metrics_addr(running).rsplit(":", 1)
    for path in ("/metrics", "/healthz", "/metrics"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone = ("metrics_client_gone", "metrics_request_failed")
    wait_until(lambda: sum(len(running.events(e)) for e in gone) >= 3, 30,
               "a log line for each scrape cut short")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200  # the listener still serves
    logs = running.logs()
    assert "Traceback" not in logs and not running.events("metrics_scrape_failed"), logs[-3000:]
    for line in logs.splitlines():
        json.loads(line)  # every line is JSON
    assert all(e["level"] == "info" for name in gone for e in running.events(name))


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- 2: a frozen worker below the heartbeat timeout, a crash loop, a killed supervisor -------------


def test_a_frozen_worker_below_the_heartbeat_timeout_is_late_not_down(running: Daemon) -> None:
    """Audit: SIGSTOP the store worker; 12 s later (timeout 30 s) status said ``down (store
    worker not running)``, exit 3, /healthz 503. It is alive and late: degraded, exit 1, 200,
    the same word on its own line, in --json and in ingestd_worker_up (still 1)."""
    daemon = running
    addr = metrics_addr(daemon)
    pid = daemon.worker_pid("store")
    os.kill(pid, signal.SIGSTOP)
    try:
        # 7 s: past status.LATE_AFTER (5 s) with time to spare, far below the 30 s timeout
        # (the audit looked at 12 s)
        wait_until(lambda: heartbeat_older_than(daemon, "store", 7), 30,
                   "a store heartbeat 7 s old")
        text, view = views(daemon)
        code, health = healthz(addr)
        up = metric(addr, 'ingestd_worker_up{role="store"}')
    finally:
        os.kill(pid, signal.SIGCONT)
    reason = r"store worker late \(last heartbeat [1-2]?\ds ago; replaced after 30s\)"
    assert text.returncode == 1 == view["_code"], text.stdout
    assert re.match(rf"ingestd: degraded \({reason}\)\n", text.stdout), text.stdout
    assert re.fullmatch(rf"  store       pid {pid} LATE \(last heartbeat [1-2]?\ds ago\)  "
                        r"last state: \w+.*", line(text.stdout, "store"))
    assert view["liveness"]["store"] == "late" and view["running"]["store"] is True
    assert [re.fullmatch(reason, r) is not None for r in view["reasons"]] == [True]
    assert code == 200 and health["status"] == "degraded"
    assert re.fullmatch(reason, health["reasons"][0])
    assert up == 1.0
    assert daemon.worker_pid("store") == pid  # not replaced: below the timeout


def test_a_crash_looping_worker_reads_down_between_its_restarts(running: Daemon) -> None:
    """Audit: in a crash loop the headline flipped between ``down (store worker not running)``
    and ``degraded`` from one look to the next. Two restarts within control.crash_loop_window:
    down, crash-looping, also while its latest process runs."""
    daemon = running
    for _ in range(2):
        old = daemon.worker_pid("store")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda old=old: daemon.status("store").get("pid") not in (None, old)
                   and daemon.status("supervisor").get("workers", {}).get("store")
                   == daemon.status("store").get("pid"), 30, "a new store worker")
    wait_until(lambda: (daemon.status("supervisor").get("recent_restarts") or {}).get("store")
               == 2, 10, "two restarts published")
    text, view = views(daemon)
    code, health = healthz(metrics_addr(daemon))

    reason = "store worker crash-looping (2 restarts in the last 60s)"
    assert view["liveness"]["store"] == "ok"  # its latest process runs
    assert text.returncode == 3 == view["_code"] and view["health"] == "down"
    assert text.stdout.startswith(f"ingestd: down ({reason})\n"), text.stdout
    assert view["reasons"] == [reason] and (code, health["reasons"]) == (503, [reason])


def test_a_killed_supervisor_is_not_running_and_offers_no_metrics(running: Daemon) -> None:
    """Audit: after a supervisor SIGKILL status showed ``supervisor DOWN ... ready`` and still
    listed the metrics URL."""
    daemon = running
    assert daemon.proc is not None
    daemon.kill()  # SIGKILL: no cleanup, run/metrics.addr and supervisor.json stay
    assert (daemon.state_dir / "run" / "metrics.addr").exists()
    text, view = views(daemon)
    assert text.returncode == 3 and view["health"] == "down"
    assert "supervisor not running" in view["reasons"]
    assert re.fullmatch(r"  supervisor  not running \(last heartbeat \d+s ago\)  last state: "
                        r"ready  generation 1 .*", line(text.stdout, "supervisor"))
    assert "http://" not in text.stdout and view["metrics"] is None
    # the orphaned workers stop on their own (their command pipe closed)
    wait_until(lambda: not status.collect(daemon.state_dir)["running"]["store"], 30,
               "the workers gone")
    daemon.proc = None  # nothing left for the fixture to stop


# -- 3, 4, 5: a refused reload ---------------------------------------------------------------------


def test_a_refused_reload_is_degraded_until_one_is_applied(running: Daemon) -> None:
    """An over-long track phrase, SIGHUP: refused. Audit: status exited 78 (``invalid
    settings``) while the file was bad, /healthz said ok and ``STATUS=`` kept "1 reload(s)
    rejected" after later reloads applied. Now: degraded with the reason, a line about the file,
    ingestd_config_reload_refused 1, STATUS= names the refusal; a fixed file reloaded clears all
    of it (the cumulative count stays in metrics)."""
    daemon = running
    notify: NotifySocket = daemon.notify  # type: ignore[attr-defined]
    addr = metrics_addr(daemon)
    good = dict(daemon.doc)
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["stream"]["track"] = ["x" * 61]
    daemon.write_settings_atomically(bad)
    notify.drain()
    daemon.send(signal.SIGHUP)
    daemon.wait_log("reload_failed", reload_failures=1)
    refused_status = notify.wait_for("READY=1", 10)
    text, view = views(daemon)
    code, health = healthz(addr)
    gauge, failures = (metric(addr, "ingestd_config_reload_refused"),
                       metric(addr, "ingestd_config_reload_failures_total"))

    reason = (rf"last reload refused: {re.escape(str(daemon.config))}: stream\.track\[0\]: "
              r".*; generation 1 in force")
    assert text.returncode == 1 == view["_code"], text.stdout + text.stderr
    assert re.match(rf"ingestd: degraded \({reason}\)\n", text.stdout), text.stdout
    assert re.fullmatch(rf"  settings    the file on disk is invalid, not in force: "
                        rf"{re.escape(str(daemon.config))}: stream\.track\[0\]: .*",
                        line(text.stdout, "settings"))
    assert [re.fullmatch(reason, r) is not None for r in view["reasons"]] == [True]
    assert view["settings_invalid"] and "stream.track[0]" in view["settings_invalid"][0]
    assert code == 200 and health["status"] == "degraded"
    assert (gauge, failures) == (1.0, 1.0)
    assert re.search(r"STATUS=.*last reload refused at \d\d:\d\d:\d\d UTC, generation 1 in "
                     r"force", refused_status), refused_status

    daemon.write_settings_atomically(good)
    daemon.send(signal.SIGHUP)
    daemon.wait_generation("supervisor", 2)
    applied_status = notify.wait_for("READY=1", 10)
    wait_until(lambda: daemon.status("stream").get("delivering")
               and daemon.status("stream").get("generation") == 2, 60, "generation 2 streaming")
    text, view = views(daemon)
    assert text.returncode == 0 and text.stdout.startswith("ingestd: ok\n"), text.stdout
    assert "settings_invalid" not in view and "  settings " not in text.stdout
    assert healthz(addr) == (200, {"status": "ok", "reasons": []})
    assert metric(addr, "ingestd_config_reload_refused") == 0.0
    assert metric(addr, "ingestd_config_reload_failures_total") == 1.0
    assert "refused" not in applied_status and "rejected" not in applied_status
    assert "settings gen=2" in applied_status


def test_a_settings_file_edited_to_latin1_still_finds_the_running_daemon(
        running: Daemon) -> None:
    """The ops audit: a "café" saved in Latin-1 in a track phrase made `ingestd status` look in
    the default folder next to the file (the whole file unreadable as UTF-8) and report the
    running daemon `down` (exit 3). Now the bad byte is read as U+FFFD, `state_dir` is found,
    and the daemon's own state is shown with a line about the file."""
    daemon = running
    text = daemon.config.read_text().replace("iphone", "caf\u00e9")
    assert f"state_dir: {daemon.state_dir}\n" in text  # not the default next to the file:
    daemon.config = daemon.workdir / "etc" / "settings.yaml"  # a default would find it
    daemon.config.parent.mkdir()
    daemon.config.write_bytes(text.encode("latin-1"))
    shown, view = views(daemon)
    assert shown.returncode == 0 == view["_code"], shown.stdout + shown.stderr
    assert f"  state dir   {daemon.state_dir}" in shown.stdout
    assert "not valid UTF-8" in line(shown.stdout, "settings")
    assert view["settings_invalid"] and view["health"] == "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run status as another user")
def test_a_settings_file_status_cannot_read_determines_no_folder(tmp_path: Path) -> None:
    """The ops audit: `ingestd status` run by a user who may not read the settings file
    reported the default folder next to it `down` (exit 3), whatever the daemon named in the
    file was doing. Now no folder can be determined: exit 78, the file and the reason named."""
    config = tmp_path / "settings.yaml"
    write_settings(config, {"state_dir": str(tmp_path / "elsewhere")})
    config.chmod(0o600)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    done = subprocess.run([*as_nobody, sys.executable, "-m", "ingestd", "status", "--config",
                           str(config)], capture_output=True, text=True, cwd="/",
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == EXIT_CONFIG, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr == ("invalid settings (no state folder can be determined from them):\n"
                           f"{config}: cannot read file: Permission denied\n")


def test_status_with_an_invalid_file_still_finds_the_state_folder(tmp_path: Path) -> None:
    """No daemon: a YAML syntax error falls back to the default folder (next to the file), a
    readable state_dir is used as written; exit 78 only when state_dir itself is unusable."""
    config = tmp_path / "settings.yaml"
    config.write_text("stream: {track: [x\n")
    broken = ingestd("status", "--config", str(config))
    as_json = ingestd("status", "--config", str(config), "--json")
    assert broken.returncode == 3, broken.stdout + broken.stderr
    assert f"  state dir   {tmp_path / 'state'}" in broken.stdout
    assert "  settings    the file on disk is invalid, not in force: " in broken.stdout
    assert "YAML syntax error" in json.loads(as_json.stdout)["settings_invalid"][0]

    write_settings(config, {"state_dir": str(tmp_path / "elsewhere"), "stream": {"track": 3}})
    named = ingestd("status", "--config", str(config))
    assert named.returncode == 3 and f"  state dir   {tmp_path / 'elsewhere'}" in named.stdout

    write_settings(config, {"state_dir": ["not", "a", "path"]})
    unusable = ingestd("status", "--config", str(config))
    assert unusable.returncode == EXIT_CONFIG, unusable.stdout + unusable.stderr
    assert "no state folder can be determined" in unusable.stderr
