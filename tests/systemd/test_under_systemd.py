"""The shipped unit under a real systemd (Debian 12 / systemd 252 and Debian 13 / systemd 257).

Each release gets one container, installed by the README's own lines; the tests below run in
file order against it, as an operator would: start, inspect, reload (good, then broken), query
status and metrics, survive a hang (watchdog), stop, and reconcile the collection against the
simulator's ground truth. Then the plain unit becomes instance ``ingestd@a`` of the template and
``ingestd@b`` joins it: both stream, a reload reaches only its instance, ``ingestd status`` finds
each, and each is reconciled against its own connections. Run with ``make test-systemd`` (root,
debootstrap, systemd-nspawn).
"""

from __future__ import annotations

import copy
import itertools
import os
import signal
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import yaml

from tests.support.mongo import MongoStandIn
from tests.support.wait import wait_until
from tests.systemd.deployment import CONFIG, UNIT, Deployment
from tests.systemd.instances import TRACK, Instances

pytestmark = pytest.mark.systemd

NEW_TRACK = ["ipad", "ipod", "macbook"]
STARTING_TRACK = ["ipad", "macbook", "imac"]
BACKLOG_TRACK = ["ipad", "imac", "ipod"]
LONG_STOP = 8
STOP_DROPIN = "/etc/systemd/system/ingestd.service.d/test-stop.conf"
BURST = ["kw1", "kw2", "kw3", "kw4", "kw5"]
INSTANCES = ("a", "b")
A_NEW_TRACK = ["coffee", "cocoa"]
PROCESS_SERIES = ("process_resident_memory_bytes", "process_cpu_seconds_total",
                  "process_open_fds")


def last_track(dep: Deployment) -> list[str]:
    conns = dep.connections()
    assert conns, "the simulator saw no authenticated connection"
    return list(conns[-1]["params"]["track"])


def test_unit_is_active_via_ready(deployment: Deployment) -> None:
    props = deployment.wait_active()
    unit = deployment.show("Type", "NotifyAccess", "StatusText", "WatchdogUSec")
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main", unit
    # Type=notify: "active" only after the supervisor's READY=1; STATUS= text comes from it too.
    assert unit["StatusText"], f"no STATUS= text from the daemon: {props}"
    print(f"\n[{deployment.release}] {props} watchdog={unit['WatchdogUSec']}")


def test_the_units_documentation_and_no_procps(deployment: Deployment) -> None:
    """`systemctl help ingestd` opens what Documentation= names: the README install puts it
    there. And nothing the unit runs needs procps, which a minimal Debian lacks."""
    docs = deployment.show("Documentation")["Documentation"]
    paths = [d.removeprefix("file://") for d in docs.split() if d.startswith("file://")]
    assert paths, f"no file:// documentation in {docs!r}"
    for path in paths:
        code, _ = deployment.run_in_root_shell(f"test -s {path}")
        assert code == 0, f"Documentation= names {path}, which the README install did not create"
    code, _ = deployment.run_in_root_shell("dpkg-query -W procps")
    assert code != 0, "the test root must lack procps, as a minimal install does"


def test_daemon_processes_run_as_the_dynamic_user(deployment: Deployment) -> None:
    box = deployment.box_
    cgroup = deployment.show("ControlGroup")["ControlGroup"]
    # /proc/PID/cgroup rather than cgroup.procs: the same on cgroup v1 (legacy hosts) and v2.
    pids = box.run("sh", "-c", f"grep -l ':{cgroup}$' /proc/[0-9]*/cgroup", check=False,
                   ).stdout.replace("/proc/", "").replace("/cgroup", "").split()
    assert len(pids) >= 3, f"expected supervisor + 2 workers in {cgroup}, got {pids}"
    uids = set()
    for pid in pids:
        status = box.run("cat", f"/proc/{pid}/status", check=False).stdout
        uid_line = next((ln for ln in status.splitlines() if ln.startswith("Uid:")), "")
        if uid_line:  # a process may have just exited
            uids.update(uid_line.split()[1:])
    assert uids and "0" not in uids, f"daemon uids {uids}"
    assert len(uids) == 1, f"daemon processes run as several uids: {uids}"
    uid = uids.pop()
    unit = deployment.show("UID", "DynamicUser")
    assert unit == {"UID": uid, "DynamicUser": "yes"}, f"processes run as {uid}; unit: {unit}"
    # PID 1's own registry of dynamic users (libnss-systemd/userdbctl are not in a minimal root).
    user = box.run("busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                   "org.freedesktop.systemd1.Manager", "LookupDynamicUserByUID", "u", uid,
                   check=False)
    assert user.stdout.strip() == f's "{UNIT}"', (
        f"uid {uid} does not resolve to the dynamic user: {user.stdout}{user.stderr}")


def test_credentials_reach_the_daemon(deployment: Deployment) -> None:
    stored = deployment.wait_stored()
    attempts = deployment.sim.ground_truth().connections()
    refused = [c for c in attempts if c["status"] in (401, 403)]
    assert not refused, f"the simulator refused the daemon's OAuth: {refused}"
    assert deployment.connections(), "no authenticated connection"
    print(f"\n[{deployment.release}] stored {len(stored)} tweets over "
          f"{len(deployment.connections())} authenticated connection(s)")


def test_reload_with_new_keywords_applies_without_restart(deployment: Deployment) -> None:
    deployment.wait_stored()
    pid = deployment.main_pid()
    before = len(deployment.connections())
    doc = copy.deepcopy(deployment.doc)
    doc["stream"]["track"] = NEW_TRACK
    deployment.write_doc(doc)
    started = time.monotonic()
    code, output = deployment.reload()
    took = time.monotonic() - started
    assert code == 0, f"`systemctl reload {UNIT}` exited {code}:\n{output}"
    assert deployment.main_pid() == pid, "the reload restarted the daemon"
    wait_until(lambda: len(deployment.connections()) > before and
               last_track(deployment) == NEW_TRACK, 30,
               f"a new connection tracking {NEW_TRACK}")
    stored = deployment.wait_stored()
    deployment.timings["reload"] = took
    print(f"\n[{deployment.release}] reload ok in {took:.2f}s; {len(stored)} tweets stored")


def journal_cursor(dep: Deployment) -> str:
    """The journal's present end: ``--after-cursor`` then shows only what comes later."""
    out = dep.box_.run("journalctl", "-n0", "--show-cursor", "--no-pager", check=False).stdout
    return out.strip().rsplit("-- cursor: ", 1)[-1]


def catch_the_start_after_it_read_the_file(dep: Deployment) -> int:
    """``systemctl restart --no-block``, then freeze the new supervisor once it has read the
    settings file (its run/supervisor.json says ``starting``) but before ``READY=1``: the unit is
    ``activating`` for as long as it is frozen. Its pid."""
    box = dep.box_
    for _ in range(3):  # READY=1 may come before the freeze lands: a few tries
        old = dep.main_pid()
        box.systemctl("restart", "--no-block", UNIT)

        def reading_done(old: int = old) -> int:
            pid = dep.main_pid()
            status = dep.status("supervisor")
            return pid if pid not in (0, old) and status.get("pid") == pid else 0
        pid = wait_until(reading_done, 60, "the new supervisor's first status file", interval=0.02)
        box.systemctl("kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT)
        if dep.show("ActiveState")["ActiveState"] == "activating":
            return pid
        box.systemctl("kill", "--kill-whom=main", "--signal=SIGCONT", UNIT)
        dep.wait_active()
    raise AssertionError("READY=1 came before the supervisor could be frozen, three times")


def test_a_reload_while_the_unit_starts_applies_the_edited_file(deployment: Deployment) -> None:
    """`systemctl reload` while the unit is still starting (before READY=1): systemd runs no
    ExecReload= then, it merges the reload into the start job and reports success once the start
    is done. The keywords edited after the start had read the file were never applied (the stream
    kept the old ones, `systemctl reload` said nothing). The supervisor now reads the file again
    just before READY=1."""
    deployment.wait_stored()
    box = deployment.box_
    doc = copy.deepcopy(deployment.doc)
    doc["stream"]["track"] = STARTING_TRACK
    cursor = journal_cursor(deployment)
    catch_the_start_after_it_read_the_file(deployment)
    try:
        deployment.write_doc(doc)
        # --no-block: returns once systemd took the request (merged into the start job).
        box.systemctl("reload", "--no-block", UNIT)
    finally:
        box.systemctl("kill", "--kill-whom=main", "--signal=SIGCONT", UNIT)
    deployment.wait_active()
    wait_until(lambda: last_track(deployment) == STARTING_TRACK, 30,
               f"a connection tracking {STARTING_TRACK} (edited while the unit started)")
    journal = box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat",
                      f"--after-cursor={cursor}").stdout
    assert "Reloading" not in journal, "systemd ran ExecReload= during the start: docs/systemd.md"
    assert "settings_edited_during_start" in journal, journal[-3000:]
    deployment.wait_stored()
    # The restart counts against StartLimitBurst=: leave the later tests their budget.
    box.systemctl("reset-failed", UNIT)


# (section, key, bad value, what the journal must say): a wrong type, which `ingestd reload`
# refuses by itself; and a credential that does not exist, which only the daemon (the holder of
# the unit's credentials) can find out.
BROKEN = {
    "wrong-type": ("writer", "batch_size", "lots", "integer"),
    "missing-credential": ("auth", "consumer_key", "${NO_SUCH_CREDENTIAL}", "is not set"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_reload_of_a_broken_file_fails_and_keeps_the_old_settings(
        deployment: Deployment, case: str) -> None:
    section, key, value, reason = BROKEN[case]
    pid = deployment.main_pid()
    conns = deployment.connections()
    old_track = last_track(deployment)
    good = copy.deepcopy(deployment.doc)
    broken = copy.deepcopy(good)
    broken[section][key] = value
    since = deployment.box_.run("date", "+@%s").stdout.strip()
    deployment.write_settings(yaml.safe_dump(broken, sort_keys=False))
    try:
        code, output = deployment.reload()
        assert code != 0, f"reload of a broken file exited 0:\n{output}"
        assert deployment.wait_active()["MainPID"] == str(pid)
        journal = deployment.box_.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat",
                                      f"--since={since}").stdout
        lines = [ln for ln in journal.splitlines() if f"{section}.{key}" in ln]
        assert lines, f"the journal does not name the key path {section}.{key}:\n{journal}"
        assert any(CONFIG in ln and reason in ln for ln in lines), (
            f"the journal does not name the file and the reason:\n{lines}")
        assert deployment.connections() == conns, "the broken file caused a reconnect"
        assert last_track(deployment) == old_track
        closed = {c.get("conn") for c in deployment.sim.ground_truth().closes()}
        assert conns[-1].get("conn") not in closed, "the stream stopped after a rejected reload"
    finally:
        deployment.write_doc(good)  # the next start must find a valid file
        # A refused reload reads degraded until a later one is applied (README "Health"):
        # apply the good file, so the next test finds the daemon ok again.
        deployment.reload()


def test_daemon_errors_reach_the_journal_at_priority_err(deployment: Deployment) -> None:
    """`journalctl -p err`, `systemctl status` and syslog forwarding go by PRIORITY=: the
    daemon's error lines (a refused reload's, here) must be at err (3), its info lines at info
    (6). Every line was at 6."""
    good = copy.deepcopy(deployment.doc)
    broken = copy.deepcopy(good)
    broken["auth"]["consumer_key"] = "${NO_SUCH_CREDENTIAL}"
    deployment.write_settings(yaml.safe_dump(broken, sort_keys=False))
    try:
        assert deployment.reload()[0] != 0
    finally:
        deployment.write_doc(good)
        assert deployment.reload()[0] == 0
    out = deployment.box_.run("journalctl", "-u", UNIT, "--no-pager", "-o", "json",
                              "--output-fields=MESSAGE,PRIORITY").stdout
    by_level: dict[str, set[str]] = {}
    for line in out.splitlines():
        entry = orjson.loads(line)
        message = entry.get("MESSAGE")
        if isinstance(message, str) and message.startswith("{"):
            level = orjson.loads(message).get("level", "?")
            by_level.setdefault(level, set()).add(str(entry.get("PRIORITY")))
    assert by_level.get("error") == {"3"}, by_level
    assert by_level.get("warning") in (None, {"4"}) and by_level.get("info") == {"6"}, by_level


def test_status_from_a_root_shell_needs_no_secrets(deployment: Deployment) -> None:
    code, output = deployment.run_in_root_shell(f"ingestd status --config {CONFIG}")
    assert code == 0, f"`ingestd status --config {CONFIG}` (root, no TWITTER_*) exited {code}:\n" \
                      f"{output}"
    assert output.startswith("ingestd: ok"), output
    assert "state dir   /var/lib/ingestd" in output, output


def test_metrics_include_process_series(deployment: Deployment) -> None:
    url = f"http://127.0.0.1:{deployment.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert "ingestd_tweets_stored_total" in samples, "not the daemon's /metrics"
    missing = [name for name in PROCESS_SERIES if name not in samples]
    assert not missing, f"/metrics has no {missing}"
    assert samples["process_resident_memory_bytes"] > 0
    assert samples["process_open_fds"] > 0


# What systemd-run cannot take for a probe, or what only the daemon's own start needs.
NOT_SANDBOX = ("Exec", "Type", "Restart", "TimeoutStopSec", "WatchdogSec", "NotifyAccess",
               "KillMode", "LoadCredential", "StateDirectory", "ConfigurationDirectory")
ENCODER_PROBE = """
import json, time
from importlib import resources
from ingestd.documents.encoder import OK, encode
from ingestd.documents.matching import Matcher
from ingestd.sink.encoder_pool import EncoderProcess, Job
data = resources.files("ingestd").joinpath("data", "real_tweets.jsonl").read_bytes()
jobs = [Job(p, time.time_ns(), 1, 1, i) for i, p in enumerate(data.splitlines()) if p.strip()]
spec = (["the", "covid vaccine"], [12], [(-180.0, -90.0, 180.0, 90.0)])
here = [encode(job, Matcher(*spec)) for job in jobs]
child = EncoderProcess()
chunks = [jobs[i:i + 150] for i in range(0, len(jobs), 150)]
for chunk in chunks:  # queued: payloads in the shared region, headers in the pipe
    child.submit(chunk, {1: spec})
there = [e for _ in chunks for e in child.result()]
child.release()
child.close()
print(json.dumps({"queues": child.queues, "same": there == here,
                  "ok": sum(e.status == OK for e in there)}))
"""


def sandbox_properties(unit_text: str) -> list[str]:
    """The [Service] settings of ``systemctl cat`` output that sandbox the daemon's processes."""
    props, section = [], ""
    for line in unit_text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif (section == "[Service]" and "=" in line and not line.startswith(("#", ";"))
              and not line.startswith(NOT_SANDBOX)):
            props.append(line)
    return props


def test_the_encoder_child_works_inside_the_units_sandbox(deployment: Deployment) -> None:
    """The store worker's encoder child shares a memfd with it (mmap, madvise) and enlarges its
    pipes. A probe does exactly that as a transient service with the unit's own sandboxing
    (DynamicUser, SystemCallFilter, MemoryDenyWriteExecute, ...): a refused call would leave the
    daemon without its second core, with only a log line to say so."""
    box = deployment.box_
    props = sandbox_properties(box.systemctl("cat", UNIT).stdout)
    assert "DynamicUser=yes" in props and any(p.startswith("SystemCallFilter=") for p in props)
    result = box.run("systemd-run", "--wait", "--pipe", "--quiet", "--service-type=exec",
                     *(f"--property={p}" for p in props),
                     "/opt/ingestd/bin/python", "-c", ENCODER_PROBE, check=False, timeout=120)
    assert result.returncode == 0, f"probe failed:\n{result.stdout}\n{result.stderr}"
    report = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert report["queues"] and report["same"] and report["ok"] > 500, report


def test_a_hung_daemon_is_restarted_by_the_watchdog(deployment: Deployment) -> None:
    deployment.wait_stored()
    before = deployment.show("MainPID", "NRestarts")
    conns = len(deployment.connections())
    # SIGSTOP freezes the supervisor: no more WATCHDOG=1 (WatchdogSec=10 via the test drop-in).
    deployment.box_.systemctl("kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT)
    started = time.monotonic()

    def restarted() -> bool:
        props = deployment.show("MainPID", "NRestarts", "ActiveState", "SubState")
        return (props["NRestarts"] != before["NRestarts"] and props["ActiveState"] == "active"
                and props["SubState"] == "running" and props["MainPID"] != before["MainPID"])
    wait_until(restarted, 90, "systemd's watchdog to restart the hung daemon", interval=0.5)
    deployment.timings["watchdog restart"] = time.monotonic() - started
    assert "Watchdog timeout" in deployment.journal(), "the restart was not the watchdog's"
    wait_until(lambda: len(deployment.connections()) > conns, 30, "the restarted daemon's stream")
    deployment.wait_stored()


def test_a_stop_timeout_above_timeoutstopsec_is_granted_by_systemd(
        deployment: Deployment, mongo_server: MongoStandIn | None) -> None:
    """`systemctl stop` during a long drain (MongoDB not answering, a backlog in the spool) with
    `control.stop_timeout` above the unit's `TimeoutStopSec=`: systemd SIGKILLed the daemon at
    TimeoutStopSec= (`State 'stop-sigterm' timed out. Killing.`, `Result=timeout`, the unit
    failed) though it would have ended in its own time. The supervisor now asks for its budget
    (`EXTEND_TIMEOUT_USEC=` with `STOPPING=1`), gives up in time and exits 0; the next start
    stores the backlog. TimeoutStopSec=4 and stop_timeout 8 stand for 30 and, say, 60."""
    if mongo_server is None or mongo_server.proc is None:
        pytest.skip("needs the MongoDB stand-in, which the test pauses")
    box = deployment.box_
    deployment.wait_active()
    deployment.wait_stored()
    doc = copy.deepcopy(deployment.doc)
    doc["stream"]["track"] = BACKLOG_TRACK  # a new connection: new tweets for the backlog
    doc["control"]["stop_timeout"] = LONG_STOP
    box.run("sh", "-c", f"cat > {STOP_DROPIN}", input="[Service]\nTimeoutStopSec=4\n")
    box.systemctl("daemon-reload")
    server = mongo_server.proc.pid
    os.kill(server, signal.SIGSTOP)  # MongoDB accepts connections and answers nothing
    try:
        received = int(deployment.counters("stream").get("received", 0))
        deployment.write_doc(doc)
        code, output = deployment.reload()
        assert code == 0, output
        wait_until(lambda: int(deployment.counters("stream").get("received", 0)) >= received + 100,
                   30, "a backlog while MongoDB does not answer")
        cursor = journal_cursor(deployment)
        started = time.monotonic()
        box.systemctl("stop", UNIT)
        took = time.monotonic() - started
        props = deployment.show("ActiveState", "Result", "ExecMainStatus")
    finally:
        os.kill(server, signal.SIGCONT)
        box.run("rm", "-f", STOP_DROPIN)
        box.systemctl("daemon-reload")
        doc["control"]["stop_timeout"] = 10
        deployment.write_doc(doc)
    journal = box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat",
                      f"--after-cursor={cursor}").stdout
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
        f"{props} after {took:.1f}s:\n{journal[-4000:]}")
    assert "store_gave_up" in journal and "'stop-sigterm' timed out" not in journal, (
        journal[-4000:])
    box.systemctl("reset-failed", UNIT)
    box.systemctl("start", UNIT)
    deployment.wait_active()
    deployment.wait_stored()  # the backlog the stop left in the spool
    print(f"\n[{deployment.release}] stop with MongoDB paused: {took:.1f}s, {props}")


def no_jobs(dep: Deployment) -> bool:
    return "No jobs running." in dep.box_.systemctl("list-jobs", check=False).stdout


def test_a_restart_then_a_burst_of_reloads_ends_with_the_last_file(
        deployment: Deployment) -> None:
    """What a config-management run does: `systemctl restart`, then a reload per edit, faster than
    the daemon starts. systemd folds the reloads sent during the start into the start job and the
    later ones into one pending reload; the daemon ends with the last file, reconnects only when
    the filters it runs change, and no start limit is touched (a reload is no start)."""
    deployment.wait_active()
    deployment.wait_stored()
    box = deployment.box_
    box.systemctl("reset-failed", UNIT)
    restarts = deployment.show("NRestarts")["NRestarts"]
    seen = len(deployment.connections())
    doc = copy.deepcopy(deployment.doc)
    box.systemctl("restart", "--no-block", UNIT)
    for word in BURST:
        doc["stream"]["track"] = ["ipad", word]
        deployment.write_doc(doc)
        box.systemctl("reload", "--no-block", UNIT)
    deployment.wait_active()
    wait_until(lambda: no_jobs(deployment), 60, "systemd's reload jobs to finish")
    final = ["ipad", BURST[-1]]
    wait_until(lambda: last_track(deployment) == final, 30, f"a connection tracking {final}")
    tracks = [list(c["params"]["track"]) for c in deployment.connections()[seen:]]
    assert 1 <= len(tracks) <= 2, f"one connection per filter put in force: {tracks}"
    assert all(a != b for a, b in itertools.pairwise(tracks)), f"a reconnect for nothing: {tracks}"
    props = deployment.show("ActiveState", "NRestarts", "Result")
    assert props == {"ActiveState": "active", "NRestarts": restarts, "Result": "success"}, props
    deployment.wait_stored()


def test_restarts_by_hand_count_against_the_start_limit(deployment: Deployment) -> None:
    """StartLimitBurst=5 in StartLimitIntervalSec=600 counts every start, an operator's too: the
    sixth `systemctl restart` within 10 minutes stops the daemon, then its start is refused and
    the daemon stays down until `systemctl reset-failed` (docs/systemd.md)."""
    deployment.wait_active()
    box = deployment.box_
    box.systemctl("reset-failed", UNIT)  # the count so far is the earlier tests'
    done = 0
    while (refused := box.systemctl("restart", UNIT, check=False)).returncode == 0:
        done += 1
        assert done <= 5, "a sixth start within StartLimitIntervalSec= was not refused"
        # Each restart's connection sends its burst at once: the next stop waits for it to be
        # stored. A stop mid-burst loses what the endpoint wrote after the stop's last read of
        # the socket (the coverage ledger's `stopped` gap starts at the last message received):
        # the shared deployment's reconciliation could never hold again (CI fresh-162, debian12).
        deployment.wait_stored()
    assert done == 5 and "too often" in refused.stderr, (done, refused.stderr)
    props = deployment.show("ActiveState", "Result", "MainPID")
    assert props == {"ActiveState": "failed", "Result": "start-limit-hit", "MainPID": "0"}, props
    box.systemctl("reset-failed", UNIT)
    box.systemctl("start", UNIT)
    deployment.wait_active()
    deployment.wait_stored()


def test_stop_is_clean_and_fast(deployment: Deployment) -> None:
    deployment.wait_active()
    deployment.wait_stored()
    started = time.monotonic()
    deployment.box_.systemctl("stop", UNIT)
    took = deployment.timings["stop"] = time.monotonic() - started
    props = deployment.show("ActiveState", "Result", "ExecMainStatus")
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success", props
    assert props["ExecMainStatus"] == "0", props
    assert took < 15, f"stop took {took:.1f}s (control.stop_timeout is 10 s)"
    print(f"\n[{deployment.release}] stop {took:.2f}s {props}")


def test_every_delivered_tweet_is_stored_exactly_once(deployment: Deployment) -> None:
    assert deployment.show("ActiveState")["ActiveState"] != "active", "runs after the stop test"
    truth = deployment.sim.ground_truth()
    delivered, deleted = set(truth.tweet_ids()), set(truth.deleted_ids())
    ids = deployment.stored_ids()
    assert len(ids) == len(set(ids)), "a tweet was stored twice"
    assert set(ids) == delivered - deleted, (
        f"stored ≠ delivered − deleted: missing {sorted(delivered - deleted - set(ids))[:20]}, "
        f"extra {sorted(set(ids) - (delivered - deleted))[:20]}")
    assert delivered & deleted, "the scenario should exercise deletes of stored tweets"
    print(f"\n[{deployment.release}] delivered={len(delivered)} deleted={len(delivered & deleted)}"
          f" stored={len(ids)} connections={len(deployment.connections())}")


# -- a full disk at start (README "State"): the tmpfs stands in for a state folder's file system.
# These run after the reconciliation above and leave the unit stopped and its folder as it was.

PRIVATE_STATE = "/var/lib/private/ingestd"


def journal_since(dep: Deployment, since: str, *args: str) -> str:
    return dep.box_.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", f"--since={since}",
                        *args, check=False).stdout


def fill_a_small_state_disk(dep: Deployment) -> None:
    """A fresh 4 MiB tmpfs over the unit's (stopped) state folder, filled to its last block by
    another writer: no reserve of the daemon's in it."""
    box = dep.box_
    box.run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", PRIVATE_STATE)
    box.sh(f"dd if=/dev/zero of={PRIVATE_STATE}/filler bs=64k 2>/dev/null || true")
    free = box.run("stat", "-f", "-c", "%a", PRIVATE_STATE).stdout.strip()
    assert free == "0", f"{free} blocks still free on the tmpfs"


def unmount_state_disk(dep: Deployment) -> None:
    dep.box_.systemctl("stop", UNIT, check=False)
    dep.box_.run("umount", PRIVATE_STATE, check=False)


def await_failed_start(dep: Deployment, since: str, restarts: int) -> dict[str, str]:
    """Until systemd scheduled ``restarts`` restarts after a start that exited 75."""
    def scheduled() -> dict[str, str]:
        props = dep.show("NRestarts", "ExecMainStatus", "ActiveState", "Result")
        return props if int(props["NRestarts"]) >= restarts else {}
    props = wait_until(scheduled, 90, f"{restarts} restart(s) scheduled by systemd", interval=0.3)
    journal = journal_since(dep, since)
    assert "Scheduled restart job" in journal, journal[-3000:]
    full = [ln for ln in journal.splitlines() if '"state_dir_full"' in ln]
    assert full, f"no state_dir_full line:\n{journal[-3000:]}"
    reason = orjson.loads(full[-1])["reason"]
    assert reason.startswith("/var/lib/ingestd/") and reason.endswith(
        ": No space left on device"), reason
    # From the journal: ExecMainStatus is reset as soon as the next start runs.
    assert "status=75/TEMPFAIL" in journal, journal[-3000:]
    return props


def test_a_start_onto_a_full_state_disk_is_retried_and_runs_once_space_returns(
        deployment: Deployment) -> None:
    """Exit 75, not 78: systemd schedules restarts (every RestartSec=5), and once space is
    freed within the start limit's burst the next one runs by itself."""
    box = deployment.box_
    box.systemctl("stop", UNIT)  # stopped already after the reconciliation (unless run alone)
    since = box.run("date", "+@%s").stdout.strip()
    fill_a_small_state_disk(deployment)
    try:
        started = box.systemctl("start", UNIT, check=False)
        assert started.returncode != 0, "the start onto a full disk succeeded"
        await_failed_start(deployment, since, restarts=1)
        box.run("rm", f"{PRIVATE_STATE}/filler")
        deployment.wait_active(timeout=30)  # the next restart: no operator needed
        assert int(deployment.show("NRestarts")["NRestarts"]) < 5, "not within the burst"
        deployment.wait_stored()
    finally:
        unmount_state_disk(deployment)


def test_a_full_state_disk_past_the_start_limit_needs_reset_failed(
        deployment: Deployment) -> None:
    """Still full after StartLimitBurst=5 starts (~25 s): the unit is failed and stays so once
    space is back; `systemctl start` alone is refused ("repeated too quickly") within
    StartLimitIntervalSec, `systemctl reset-failed` then `start` runs it (README "State")."""
    box = deployment.box_
    box.systemctl("stop", UNIT)  # stopped already by the test before (unless run alone)
    since = box.run("date", "+@%s").stdout.strip()
    fill_a_small_state_disk(deployment)
    try:
        box.systemctl("reset-failed", UNIT, check=False)  # the previous test's starts count too
        box.systemctl("start", UNIT, check=False)
        await_failed_start(deployment, since, restarts=1)
        # The automatic restart past the limit ends with Result=exit-code (252 and 257).
        wait_until(lambda: "Start request repeated too quickly" in journal_since(
            deployment, since), 120, "systemd's start limit", interval=0.5)
        failed = deployment.show("ActiveState", "Result", "NRestarts")
        assert failed["ActiveState"] == "failed" and failed["NRestarts"] == "5", failed
        box.run("rm", f"{PRIVATE_STATE}/filler")
        refused = box.systemctl("start", UNIT, check=False)
        assert refused.returncode != 0, "a start past the start limit was not refused"
        # Result= keeps the last exit's (exit-code) on 252 and 257: the journal says why.
        assert journal_since(deployment, since).count("Start request repeated too quickly") >= 2
        box.systemctl("reset-failed", UNIT)
        box.systemctl("start", UNIT)
        deployment.wait_active()
        deployment.wait_stored()
        print(f"\n[{deployment.release}] start limit hit after {failed['NRestarts']} restarts")
    finally:
        unmount_state_disk(deployment)


def test_a_restart_onto_a_state_disk_full_since_it_ran_uses_the_reserve(
        deployment: Deployment) -> None:
    """The daemon ran on the disk (its reserve set aside), then the disk filled to the last
    block: `systemctl restart` runs at once, on the reserve's space, with no exit 75."""
    box = deployment.box_
    box.systemctl("stop", UNIT)  # stopped already by the test before (unless run alone)
    box.run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", PRIVATE_STATE)
    try:
        box.systemctl("reset-failed", UNIT, check=False)
        box.systemctl("start", UNIT)
        deployment.wait_active()
        assert box.run("test", "-s", f"{PRIVATE_STATE}/run/space.reserve", check=False
                       ).returncode == 0, "no reserve set aside at start"
        box.systemctl("stop", UNIT)
        box.sh(f"dd if=/dev/zero of={PRIVATE_STATE}/filler bs=4k 2>/dev/null || true")
        assert box.run("stat", "-f", "-c", "%a", PRIVATE_STATE).stdout.strip() == "0"
        since = box.run("date", "+@%s").stdout.strip()
        restarts = deployment.show("NRestarts")["NRestarts"]
        box.systemctl("start", UNIT)
        deployment.wait_active()
        journal = journal_since(deployment, since)
        assert "state_dir_reserve_used" in journal and "state_dir_full" not in journal, journal
        assert deployment.show("NRestarts")["NRestarts"] == restarts
    finally:
        unmount_state_disk(deployment)


# -- several streams per host: ingestd@.service (tests/systemd/instances.py) ------------------
# These run last: the `instances` fixture turns the stopped plain unit into instance a and adds
# instance b with the README's lines ("Outgrowing one machine").


def metrics_samples(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_two_instances_stream_side_by_side(instances: Instances) -> None:
    props = {}
    for name in INSTANCES:
        instances.wait_active(name)
        props[name] = instances.show(name, "MainPID", "UID", "StatusText", "DynamicUser")
    assert props["a"]["MainPID"] != props["b"]["MainPID"], props
    # Each instance is its own dynamic user (User=ingestd-%i): neither can read the other's
    # state or secrets.
    assert props["a"]["UID"] != props["b"]["UID"] and "0" not in (props["a"]["UID"],
                                                                  props["b"]["UID"]), props
    for name in INSTANCES:
        user = instances.box.run(
            "busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager", "LookupDynamicUserByUID", "u",
            props[name]["UID"], check=False).stdout.strip()
        assert user == f's "ingestd-{name}"', user
        # StateDirectory=ingestd/%i with DynamicUser=: /var/lib/ingestd/NAME links to the
        # private folder, which is what `ingestd status` (below) reads from a root shell.
        link = Path(instances.box.root) / "var/lib/ingestd" / name
        assert link.is_symlink() and link.resolve() == instances.state_dir(name).resolve(), link
    for name in INSTANCES:
        stored = instances.wait_stored(name)
        conns = instances.connections(name)
        assert conns and all(list(c["params"]["track"]) == TRACK[name] for c in conns), conns
        assert (instances.state_dir(name) / "run" / "stream.json").is_file(), (
            f"ingestd@{name} keeps no state in /var/lib/ingestd/{name}")
        print(f"\n[{instances.dep.release}] ingestd@{name}: {len(stored)} tweets stored over "
              f"{len(conns)} connection(s)")
    attempts = instances.sim.ground_truth().connections()
    refused = [c for c in attempts if c["status"] != 200]
    assert not refused, f"the simulator refused an instance (credentials per instance?): {refused}"
    closes = instances.sim.ground_truth().closes()
    assert not [c for c in closes if "7" in str(c.get("reason", ""))], (
        f"an instance was logged out by the other (one account each?): {closes}")


def test_reload_of_one_instance_applies_only_to_it(instances: Instances) -> None:
    pids = {name: instances.show(name, "MainPID")["MainPID"] for name in INSTANCES}
    b_conns = instances.connections("b")
    a_before = len(instances.connections("a"))
    # Generations are numbered on across the runs of a state folder: compare with the ones before.
    before = {name: metrics_samples(instances.members[name].metrics_port)
              ["ingestd_config_generation"] for name in INSTANCES}
    doc = copy.deepcopy(instances.members["a"].doc)
    doc["stream"]["track"] = A_NEW_TRACK
    instances.write_doc("a", doc)
    result = instances.box.systemctl("reload", "ingestd@a", check=False)
    assert result.returncode == 0, f"`systemctl reload ingestd@a`:\n{result.stdout}{result.stderr}"
    wait_until(lambda: len(instances.connections("a")) > a_before and
               list(instances.connections("a")[-1]["params"]["track"]) == A_NEW_TRACK, 30,
               f"ingestd@a reconnecting with {A_NEW_TRACK}")
    assert {name: instances.show(name, "MainPID")["MainPID"] for name in INSTANCES} == pids
    assert instances.connections("b") == b_conns, "reloading a reconnected b"
    closed = {c.get("conn") for c in instances.sim.ground_truth().closes()}
    assert b_conns[-1]["conn"] not in closed, "b's stream stopped when a reloaded"
    generations = {name: metrics_samples(instances.members[name].metrics_port)
                   ["ingestd_config_generation"] for name in INSTANCES}
    assert generations == {"a": before["a"] + 1, "b": before["b"]}, (before, generations)
    instances.wait_stored("a")


def test_status_and_reload_of_each_instance_from_a_root_shell(instances: Instances) -> None:
    for name in INSTANCES:
        member = instances.members[name]
        code, output = instances.root_shell(f"ingestd status --config {member.config}")
        assert code == 0, f"`ingestd status --config {member.config}` exited {code}:\n{output}"
        assert output.startswith("ingestd: ok"), output
        assert f"state dir   /var/lib/ingestd/{name}" in output, output
        assert f"http://127.0.0.1:{member.metrics_port}/metrics" in output, output
    # `ingestd reload --config` from a root shell finds its instance the same way (no --pid).
    before = {name: int(metrics_samples(instances.members[name].metrics_port)
                        ["ingestd_config_generation"]) for name in INSTANCES}
    code, output = instances.root_shell("ingestd reload --config /etc/ingestd/b.yaml")
    assert code == 0 and f"reload applied: generation {before['b'] + 1}" in output, \
        f"exit {code}:\n{output}"
    assert metrics_samples(instances.members["a"].metrics_port)["ingestd_config_generation"] \
        == before["a"], "reloading b changed a's generation"


def test_instances_stop_and_store_every_delivered_tweet_once(instances: Instances) -> None:
    for name in INSTANCES:
        instances.wait_stored(name)
    instances.box.systemctl("stop", *(f"ingestd@{name}" for name in INSTANCES))
    for name in INSTANCES:
        props = instances.show(name, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success",
                         "ExecMainStatus": "0"}, props
    for name in INSTANCES:
        want, ids = instances.expected(name), instances.stored_ids(name)
        assert len(ids) == len(set(ids)), f"ingestd@{name} stored a tweet twice"
        assert want and set(ids) == want, (
            f"ingestd@{name}: stored ≠ delivered − deleted on its connections: missing "
            f"{sorted(want - set(ids))[:20]}, extra {sorted(set(ids) - want)[:20]}")
        print(f"\n[{instances.dep.release}] ingestd@{name}: delivered−deleted={len(want)} "
              f"stored={len(ids)} connections={len(instances.connections(name))}")
