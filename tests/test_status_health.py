"""What ``ingestd status`` (and ``/healthz``) says, on real processes: a stream that cannot
deliver is degraded, a stopped daemon's queue is the spool's, and a reader that leaves early
(``ingestd status | head -1``) changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ingestd.control import runstate, status
from ingestd.spool.format import read_checkpoint
from tests.support.daemon import Daemon, finish, metrics_addr, settings_doc
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until
from tests.test_status_check import _base_env, ingestd, write_settings

# -- a reader that leaves early ----------------------------------------------------------------


def closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with its stdout a pipe whose reading end is already closed: every write
    meets EPIPE (``| head -1`` after the first line, without the race)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "ingestd", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, env=_base_env())
    finally:
        os.close(write_end)


@pytest.mark.parametrize(("args", "code"), [
    (("status",), 3), (("status", "--json"), 3), (("check",), 0), (("coverage",), 0),
    (("--help",), 0),
])
def test_a_closed_stdout_keeps_the_exit_code_and_prints_no_traceback(
        tmp_path: Path, mongo_uri: str, args: tuple[str, ...], code: int) -> None:
    config = write_settings(tmp_path / "settings.yaml", settings_doc(
        "http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, "unused"))
    if args != ("--help",):
        args = (*args, "--config", str(config))
    expected = ingestd(*args)
    closed = closed_stdout(*args)

    assert expected.returncode == code, expected.stdout + expected.stderr
    assert expected.stdout  # something was printed (and met the closed pipe below)
    assert closed.returncode == code, closed.stderr
    assert "Traceback" not in closed.stderr and "BrokenPipe" not in closed.stderr, closed.stderr


# -- a stopped daemon's queue --------------------------------------------------------------------


def test_status_after_a_drained_stop_shows_what_the_spool_holds(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The stream worker stops first and writes its last status then; the store worker drains
    after it. With batches held back (30 s) every record read is unacknowledged when the stream
    worker writes that status: its figure is the whole intake, the spool's is nothing."""
    sim = SimProcess(tmp_path / "sim", "--rate", "400", "--keepalive", "0.5",
                     "--seed", "11").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database,
                       writer={"batch_size": 100_000, "flush_interval": 30})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("stream").get("received", 0) >= 100, 60,
                   "100 messages received")
        code, _ = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    (stopped,) = daemon.events("store_worker_stopped")
    text = ingestd("status", "--config", str(daemon.config))
    as_json = ingestd("status", "--config", str(daemon.config), "--json")
    last_word = daemon.status("stream")["spool"]
    checkpoint = read_checkpoint(daemon.state_dir / "spool")
    print("\n" + text.stdout)

    assert code == 0 and stopped["drained"] is True
    assert last_word["records"] > 0, "the stream worker's figure predates the drain"
    # Durability: the last checkpoint covers every record the stream worker appended.
    assert checkpoint is not None and checkpoint.seq == last_word["next_seq"] - 1
    assert text.returncode == 3 and text.stdout.startswith("ingestd: down")
    assert "  queue       0 records / 0.0 MB waiting in the spool (bound " in text.stdout
    assert json.loads(as_json.stdout)["queue"] == {
        "records": 0, "bytes": 0, "max_records": last_word["max_records"],
        "max_bytes": last_word["max_bytes"], "when_full": "block", "full_since": None}


# -- a stream that cannot deliver ------------------------------------------------------------------


def healthz(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    addr = metrics_addr(daemon)
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())


def views(daemon: Daemon) -> tuple[subprocess.CompletedProcess[str], dict[str, Any],
                                   tuple[int, dict[str, Any]]]:
    """``status``, ``status --json`` and ``/healthz``, one after the other."""
    text = ingestd("status", "--config", str(daemon.config))
    as_json = ingestd("status", "--config", str(daemon.config), "--json")
    return text, json.loads(as_json.stdout) | {"_code": as_json.returncode}, healthz(daemon)


def same(reason: str) -> str:
    """``reason`` without its attempt count, which moves on between two looks."""
    return re.sub(r"\(\d+ attempts", "(N attempts", reason)


def refused(daemon: Daemon, attempts: int) -> bool:
    daemon.assert_running()
    return int((daemon.status("stream").get("refused") or {}).get("attempts", 0)) >= attempts


def test_credentials_refused_on_every_attempt_is_degraded(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The audit's case: a wrong consumer secret, 401 on every attempt. Before: ``ok``."""
    sim = SimProcess(tmp_path / "sim", "--rate", "50", "--keepalive", "0.5").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"})
    daemon = Daemon(tmp_path / "daemon", doc).start(
        {"TWITTER_CONSUMER_SECRET": "not-the-right-secret"})
    try:
        daemon.wait_ready()
        wait_until(lambda: refused(daemon, 2), 60, "two refused attempts")
        text, view, (code, health) = views(daemon)
        assert daemon.counters("stream").get("received", 0) == 0
    finally:
        finish(daemon, sim)
    print("\n" + text.stdout)

    (reason,) = view["reasons"]
    assert re.fullmatch(r"stream: every attempt refused since \S+Z \(\d+ attempts, none "
                        r"accepted\): HTTP 401: .*credentials rejected: check consumer key.*",
                        reason), reason
    assert text.returncode == 1
    assert same(text.stdout).startswith(f"ingestd: degraded ({same(reason)})")
    assert re.search(r"stream +pid \d+ up +reconnecting in [\d.]+s \(HTTP 401", text.stdout)
    assert view["health"] == "degraded" and view["_code"] == 1 == view["exit_code"]
    assert code == 200 and health["status"] == "degraded"
    assert [same(r) for r in health["reasons"]] == [same(reason)]


def test_rate_limited_is_degraded_until_a_connection_is_accepted(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """420 twice (2.5 s apart), then the endpoint accepts: degraded, then ok again (the views
    of the first back-off take well under its 5 s)."""
    sim = SimProcess(tmp_path / "sim", "--rate", "50", "--keepalive", "0.5",
                     script=[[{"status": 420, "body": "Enhance your calm"}]] * 2).start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"})
    doc["stream"]["backoff"].update(rate_limit_start=2.5, rate_limit_cap=2.5)
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        wait_until(lambda: refused(daemon, 1), 60, "a refused attempt")
        during = views(daemon)
        wait_until(lambda: daemon.status("stream").get("delivering"), 60, "a connection")
        after = views(daemon)
    finally:
        finish(daemon, sim)

    text, view, (code, health) = during
    (reason,) = view["reasons"]
    assert "HTTP 420: Enhance your calm" in reason and text.returncode == 1
    assert view["health"] == "degraded" and health["status"] == "degraded"
    assert [same(r) for r in health["reasons"]] == [same(reason)]
    text, view, (code, health) = after
    assert text.returncode == 0 and text.stdout.startswith("ingestd: ok"), text.stdout
    assert view["health"] == "ok" and (code, health) == (200, {"status": "ok", "reasons": []})


def test_no_connection_past_the_grace_is_degraded(tmp_path: Path, mongo_uri: str,
                                                   mongo_database: str) -> None:
    """Network errors only (nothing listens): ok within the grace, degraded past it."""
    with socket.socket() as placeholder:  # a free port that refuses connections
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    url = f"http://127.0.0.1:{port}/1.1/statuses/filter.json"
    doc = settings_doc(url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    grace = 2 * doc["stream"]["backoff"]["network_cap"]
    try:
        daemon.wait_ready()
        stream = daemon.status("stream")
        assert stream["outage_grace"] == grace and stream["refused"] is None
        since = float(stream["unconnected_since"])
        wait_until(lambda: float(daemon.status("stream").get("time", 0)) > since + grace + 1,
                   60, "a heartbeat past the grace")
        text, view, (code, health) = views(daemon)
        attempts = daemon.counters("stream")["attempts"]
    finally:
        daemon.stop()
        daemon.kill()
    print("\n" + text.stdout)

    (reason,) = view["reasons"]
    assert re.fullmatch(rf"stream: no connection since \S+Z \(grace {grace:g}s\): "
                        r"reconnecting in .*connect.*", reason), reason
    assert text.returncode == 1 and view["health"] == "degraded" and attempts >= 3
    assert code == 200 and health["status"] == "degraded"


@pytest.mark.parametrize(("fields", "health"), [
    ({"unconnected_since": -3.0}, "ok"),  # a reconnect within the grace
    ({"unconnected_since": -5.0}, "degraded"),
    ({"unconnected_since": None}, "ok"),
    ({"refused": {"status": 503, "reason": "HTTP 503", "since": -1.0, "attempts": 1}},
     "degraded"),
    ({"unconnected_since": -500.0, "ha": {"mode": "standby", "role": "standby"}}, "ok"),
    ({"unconnected_since": -5.0, "ha": {"mode": "standby", "role": "active"}}, "degraded"),
    ({"unconnected_since": -5.0, "state": "degraded: HTTP 406: x; fix the settings and reload"},
     "degraded"),  # one reason, the state's
])
def test_the_health_rule(tmp_path: Path, fields: dict[str, Any], health: str) -> None:
    """``status.collect`` on run files written here (this process is their live pid); times
    in ``fields`` are relative to now."""
    now = time.time()
    stream = {"state": "reconnecting in 1.0s (x)", "outage_grace": 4.0}
    for key, value in fields.items():
        if key == "refused":
            value = {**value, "since": now + value["since"]}
        stream[key] = now + value if isinstance(value, float) else value
    runstate.run_dir(tmp_path)
    runstate.write_status(tmp_path, "supervisor", {"state": "ready"})
    runstate.write_status(tmp_path, "stream", stream)
    runstate.write_status(tmp_path, "store", {"state": "running"})
    view = status.collect(tmp_path)
    assert view["health"] == health and len(view["reasons"]) == (health == "degraded")
