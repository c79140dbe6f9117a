"""Standby pairs and redundant streams (``ha.mode``) on real daemons, one simulator, one MongoDB.

Each scenario is reconciled against the simulator's ground truth: which connections were open
when (never two at once in standby mode, no code-7 logout of the active), and every tweet it
delivered to either instance stored exactly once. Control messages are off (``--control-every
0``): no delete can take a delivered tweet out of the comparison. Each connection carries at most
``--max-tweets`` tweets, so the scenario goes quiet before it is reconciled: a tweet delivered
into a socket after the ground truth was read could otherwise be stored before the collection
was read, and a SIGKILLed process loses what its kernel had received but it had not read.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pymongo
import pytest
import yaml
from pymongo.uri_parser import parse_uri

from ingestd.config.errors import ConfigErrors
from ingestd.config.settings import load_settings, load_settings_text
from ingestd.control.collector import RunStateCollector
from ingestd.control.lease import (
    WATCH_INTERVAL,
    LeaseElector,
    LeaseKeeper,
    Takeover,
    margin,
    renew_interval,
)
from ingestd.control.lease_gate import StandbyGate
from ingestd.control.runstate import RUN_DIR, status_path, write_status
from ingestd.control.status import collect, render
from ingestd.sink.coverage import instance_name
from tests.support.creds import CREDS
from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import stored_ids
from tests.support.mongo_proxy import FIND_AND_MODIFY, MongoProxy
from tests.support.prometheus import ALERT_RULES, Prometheus, find_binary, free_port
from tests.support.simulator import GroundTruthLog, SimProcess
from tests.support.wait import wait_until
from tests.test_control import operator_cli
from tests.test_counts import reconciliation

LEASE = 3.0  # seconds: small, so takeovers are quick; the renewals stay well inside it
PER_CONN = 600  # tweets per connection (--max-tweets)
FIRST_BACKOFF = 0.25  # settings_doc's network_start: the delay a takeover may add at most
BOOT = 90.0  # seconds a daemon may take to start: six engineers share two cores
FREEZE = 30.0  # seconds the SIGSTOP scenario keeps the active frozen (the figure)


def ha_doc(sim: SimProcess, uri: str, db: str, mode: str) -> dict[str, Any]:
    return settings_doc(sim.url, uri, db, ha={"mode": mode, "lease_seconds": LEASE})


def sim_for(tmp_path: Path, *args: str, per_conn: int = PER_CONN,
            rate: int = 150) -> SimProcess:
    return SimProcess(tmp_path / "sim", "--rate", str(rate), "--max-tweets", str(per_conn),
                      "--control-every", "0", "--keepalive", "1", "--seed", "13", *args).start()


def ha_view(daemon: Daemon) -> dict[str, Any]:
    return dict(daemon.status("stream").get("ha") or {})


def wait_role(daemon: Daemon, role: str, timeout: float = 60.0) -> dict[str, Any]:
    def reached() -> dict[str, Any]:
        daemon.assert_running()
        view = ha_view(daemon)
        return view if view.get("role") == role else {}
    return wait_until(reached, timeout, f"{daemon.workdir.name} {role}")


def signal_all(daemon: Daemon, sig: int) -> None:
    """``sig`` to the supervisor and both workers: the whole instance, as a host failure is
    (they share the test's process group, so the group cannot be signalled)."""
    pids = daemon.pids()
    for role in ("stream", "store", "supervisor"):
        os.kill(pids[role], sig)


def open_intervals(truth: GroundTruthLog) -> list[tuple[int, float, float]]:
    """(conn, opened, closed) of every stream the simulator served (200); inf if still open."""
    closes = {e["conn"]: float(e["t"]) for e in truth.closes()}
    return sorted((e["conn"], float(e["t"]), closes.get(e["conn"], float("inf")))
                  for e in truth.connections() if e["status"] == 200)


def assert_never_two_at_once(truth: GroundTruthLog) -> None:
    spans = sorted(open_intervals(truth), key=lambda span: span[1])
    for (a, _, a_closed), (b, b_opened, _) in itertools.pairwise(spans):
        assert a_closed <= b_opened, f"connections {a} and {b} were open at the same time"
    assert not truth.control("disconnect"), "an instance was logged out (code 7)"


def delivered_per_conn(truth: GroundTruthLog) -> dict[int, int]:
    counts: dict[int, int] = {}
    for e in truth.of("tweet"):
        counts[e["conn"]] = counts.get(e["conn"], 0) + 1
    return counts


def wait_all_stored(uri: str, db: str, sim: SimProcess, conns: int,
                    per_conn: int = PER_CONN) -> None:
    """Until the last ``conns`` connections delivered their tweets and MongoDB holds every one
    (stopping a daemon while its connection still delivers would lose what is in its socket)."""
    def done() -> bool:
        truth = sim.ground_truth()
        counts = delivered_per_conn(truth)  # the last ``conns`` connections must be complete
        if [counts[c] for c in sorted(counts)[-conns:]] != [per_conn] * conns:
            return False
        return set(stored_ids(uri, db)) >= set(truth.tweet_ids())
    wait_until(done, 120, f"{conns} connections delivered and everything stored", interval=0.5)


def reconcile(uri: str, db: str, sim: SimProcess) -> tuple[list[int], set[int]]:
    truth = sim.ground_truth()
    ids = stored_ids(uri, db)
    delivered = set(truth.tweet_ids())
    assert len(ids) == len(set(ids)), "a tweet was stored twice"
    assert set(ids) == delivered, (len(set(ids) - delivered), len(delivered - set(ids)))
    return ids, delivered


def kill_all(sim: SimProcess, *daemons: Daemon | None) -> None:
    """Whatever happened: every daemon killed (if started), then the simulator stopped."""
    for daemon in daemons:
        if daemon is not None:
            daemon.kill()
    sim.stop()


def stop_all(*daemons: Daemon) -> None:
    for daemon in daemons:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                code, _ = daemon.stop()
                assert code == 0, daemon.tail()
        finally:
            daemon.kill()


def lease_docs(uri: str, db: str) -> list[dict[str, Any]]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=10000)
    try:
        return list(client[db].leases.find({}))
    finally:
        client.close()


def start_together(tmp_path: Path, sim: SimProcess, uri: str, db: str) -> tuple[Daemon, Daemon]:
    """Both start at once; one wins the lease: (the active, the standby)."""
    pair = [Daemon(tmp_path / n, ha_doc(sim, uri, db, "standby")).start() for n in "ab"]
    try:
        for daemon in pair:
            daemon.wait_ready(BOOT)
        active = wait_until(lambda: [d for d in pair if ha_view(d).get("role") == "active"],
                            30, "one instance active")
        assert len(active) == 1, "two instances active at once"
        standby = next(d for d in pair if d is not active[0])
        wait_until(lambda: ha_view(standby).get("holder") == ha_view(active[0])["instance"],
                   30, "the standby sees the active's lease")
    except BaseException:
        for daemon in pair:
            daemon.kill()
        raise
    return active[0], standby


def start_pair(tmp_path: Path, sim: SimProcess, uri: str, db: str,
               uri_a: str | None = None) -> tuple[Daemon, Daemon]:
    """A starts first and becomes active; B then starts and stands by behind A."""
    a = Daemon(tmp_path / "a", ha_doc(sim, uri_a or uri, db, "standby")).start()
    b = Daemon(tmp_path / "b", ha_doc(sim, uri, db, "standby"))
    try:
        a.wait_ready(BOOT)
        active = wait_role(a, "active")
        b.start().wait_ready(BOOT)
        standby = wait_role(b, "standby")
        wait_until(lambda: ha_view(b).get("holder") == active["instance"], 30,
                   "B sees A's lease")
    except BaseException:
        a.kill()
        b.kill()
        raise
    assert standby["instance"] != active["instance"]
    return a, b


# ---------------------------------------------------------------- standby


def test_standby_sigkill_the_active_standby_takes_over_nothing_lost(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = sim_for(tmp_path, rate=300)  # 2 s a connection: the kill comes once A read them all
    a = b = None
    try:
        a, b = start_pair(tmp_path, sim, mongo_uri, mongo_database)
        # A's connection delivered all its tweets and A read them: a SIGKILL then loses nothing
        # in A's kernel buffers (TCP cannot give those back), only A's unstored spool backlog.
        wait_until(lambda: a.counters("stream").get("received", 0) >= PER_CONN, 60,
                   "A received its connection's tweets")
        assert b.counters("stream").get("attempts") == 0, "the standby opened a connection"
        (labels, _), lease = ha_active(a.state_dir), ha_view(a)["lease"]
        assert labels == {"mode": "standby", "lease": lease} and lease.startswith("stream:")
        assert [ha_active(d.state_dir) for d in (a, b)] == [(labels, 1.0), (labels, 0.0)]
        # No connection by design: the standby is not degraded for it (the grace is moot).
        assert b.status("stream")["unconnected_since"] is None
        assert collect(b.state_dir)["health"] == "ok"
        killed_at = time.time()
        signal_all(a, signal.SIGKILL)
        a.proc.wait(10)  # type: ignore[union-attr]
        view = wait_role(b, "active", timeout=60)
        # A's run file still says active; its metrics (were A's listener up) would not: the pair
        # the alerts sum by lease has one active instance.
        assert [ha_active(d.state_dir) for d in (a, b)] == [(labels, 0.0), (labels, 1.0)]
        assert view["takeovers"] == 1
        takeover = b.wait_log("ha_takeover")
        assert takeover["previous_holder"] == ha_view(a)["instance"]
        assert takeover["lease_age"] >= LEASE  # never before A's lease could have expired
        # A returns: it stands by behind B, drains its own spool, and never connects.
        a.start()
        a.wait_ready(BOOT)
        wait_until(lambda: ha_view(a).get("holder") == view["instance"], 60,
                   "the returning A sees B's lease")  # its first lease read may take a while
        wait_all_stored(mongo_uri, mongo_database, sim, conns=2)
        assert ha_view(a)["role"] == "standby"
        assert a.counters("stream").get("attempts") == 0, "the returning instance connected"
        wait_until(lambda: [g for g in takeover_gaps(mongo_uri, mongo_database) if g["end"]], 60,
                   "B's ledger closed the takeover gap")
        stop_all(a, b)
    finally:
        kill_all(sim, a, b)
    truth = sim.ground_truth()
    assert_never_two_at_once(truth)
    spans = open_intervals(truth)
    assert len(spans) == 2, spans  # A's, then B's: nobody else ever connected
    delay = spans[1][1] - killed_at
    bound = LEASE + 2 * renew_interval(LEASE) + FIRST_BACKOFF + 2.0  # + scheduling on 2 cores
    print(f"\n[figure] standby takeover after SIGKILL: B streaming {delay:.2f}s after the kill "
          f"(lease {LEASE}s + first back-off {FIRST_BACKOFF}s = {LEASE + FIRST_BACKOFF:.2f}s; "
          f"asserted bound with scheduling slack {bound:.2f}s)")
    assert delay <= bound
    ids, delivered = reconcile(mongo_uri, mongo_database, sim)
    print(f"[figure] delivered {len(delivered)} (2 connections), stored {len(ids)}, no duplicate")
    # The ledger: one takeover gap, from A's last delivered tweet to B's first, ±1 s.
    (gap,) = takeover_gaps(mongo_uri, mongo_database)
    last_a = float(truth.of("tweet", spans[0][0])[-1]["t"])
    first_b = float(truth.of("tweet", spans[1][0])[0]["t"])
    start, end = gap["start"].timestamp(), gap["end"].timestamp()
    print(f"[figure] takeover gap {end - start:.2f}s: start {start - last_a:+.3f}s, "
          f"end {end - first_b:+.3f}s against the ground truth")
    assert gap["instance"] != "" and gap["detail"]["from"] == takeover["previous_holder"]
    assert abs(start - last_a) <= 1.0 and abs(end - first_b) <= 1.0


SKEWED_CLOCK = Path(__file__).resolve().parent / "support" / "skewed_clock"


def skewed_env(seconds: float) -> dict[str, str]:
    """The environment of a daemon whose host's wall clock is ``seconds`` off (sitecustomize)."""
    path = os.pathsep.join(p for p in (str(SKEWED_CLOCK), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "INGESTD_TEST_CLOCK_SKEW": str(seconds)}


@pytest.mark.parametrize("skew", [-10.0, 10.0], ids=["standby-clock-behind", "standby-ahead"])
def test_standby_takeover_gap_is_timed_by_one_clock_when_the_hosts_disagree(
        tmp_path: Path, mongo_uri: str, mongo_database: str, skew: float) -> None:
    """B's wall clock is 10 s off A's. The takeover gap started at A's last receive time (A's
    clock) and ended at B's first message (B's): behind, B's messages all came before the start
    and the gap was never closed (coverage said the pair was offline while B streamed); ahead,
    the gap was 10 s too long. Now B times it by its own clock and the lease's age."""
    sim = sim_for(tmp_path, rate=300)  # 2 s a connection: the gap is timed against its tweets
    a = b = None
    try:
        a = Daemon(tmp_path / "a", ha_doc(sim, mongo_uri, mongo_database, "standby")).start()
        a.wait_ready(BOOT)
        wait_role(a, "active")
        b = Daemon(tmp_path / "b", ha_doc(sim, mongo_uri, mongo_database, "standby"))
        b.start(skewed_env(skew))
        b.wait_ready(BOOT)
        wait_until(lambda: ha_view(b).get("holder") == ha_view(a)["instance"], 60,
                   "B sees A's lease")
        # A stored all its connection's tweets: killed, it leaves no backlog behind (this test
        # does not bring it back to drain one).
        wait_until(lambda: a.counters("store").get("stored", 0) >= PER_CONN, 60,
                   "A stored its connection's tweets")
        signal_all(a, signal.SIGKILL)
        a.proc.wait(10)  # type: ignore[union-attr]
        wait_role(b, "active", timeout=60)
        wait_all_stored(mongo_uri, mongo_database, sim, conns=2)
        (gap,) = wait_until(lambda: [g for g in takeover_gaps(mongo_uri, mongo_database)
                                     if g["end"]], 60, "B's ledger closed the takeover gap")
        warned = b.wait_log("coverage_clock_skew")
        stop_all(b)
    finally:
        kill_all(sim, a, b)
    truth = sim.ground_truth()
    spans = open_intervals(truth)
    hole = float(truth.of("tweet", spans[1][0])[0]["t"]) - \
        float(truth.of("tweet", spans[0][0])[-1]["t"])
    print(f"\n[figure] B's clock {skew:+g}s: takeover gap {gap['seconds']:.2f}s, true hole "
          f"{hole:.2f}s, skew seen {warned['ahead_seconds']:+.2f}s")
    assert abs(warned["ahead_seconds"] + skew) <= 1.0, warned  # A's clock ahead of B's
    assert gap["start_basis"] in ("lease_age", "previous_holder") and gap["clock_skew_ns"]
    assert abs(gap["seconds"] - hole) <= 1.5, (gap["seconds"], hole)
    reconcile(mongo_uri, mongo_database, sim)


def coverage_gaps(uri: str, db: str) -> list[dict[str, Any]]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, tz_aware=True, serverSelectionTimeoutMS=10000)
    try:
        return list(client[db].coverage.find({"kind": "gap", "cause": {"$ne": "not_started"}}))
    finally:
        client.close()


def test_standby_killed_workers_of_the_active_are_replaced_and_the_pair_stays_one_stream(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """Workers of the active die, not the instance: its supervisor restarts them.

    - The store worker (no part in the lease): the stream goes on, the standby stays a standby
      and never connects, and the successor stores the backlog once.
    - The stream worker (the lease's keeper), SIGKILLed again each time its successor streams:
      a successor takes the lease back as its own (same name, same site) if it restarted
      within the lease (1 s of back-off, then 2 s); the third restart waits 4 s, longer than
      the 3 s lease, so by then the standby has taken over, and the successor stands by.
    One connection at a time, nobody logged out, every tweet stored once, each gap in the
    ledger within 1 s of the ground truth."""
    per_conn = 200  # 1 s a connection: each kill waits until A read all of its connection's
    sim = sim_for(tmp_path, per_conn=per_conn, rate=200)
    a = b = None
    reclaims = 0
    try:
        a, b = start_pair(tmp_path, sim, mongo_uri, mongo_database)
        a_name = ha_view(a)["instance"]
        wait_until(lambda: a.counters("store").get("stored", 0) >= 50
                   and a.status("store").get("spool", {}).get("acked_seq", 0) > 0, 60,
                   "A stored and checkpointed some tweets")
        store_pid = a.worker_pid("store")
        os.kill(store_pid, signal.SIGKILL)
        wait_until(lambda: a.status("store").get("pid") not in (None, store_pid), 30,
                   "A's new store worker")
        assert b.counters("stream").get("attempts") == 0, "a store worker's death moved the stream"
        for kill in range(1, 4):
            # A's connections so far (the first, one per reclaim) delivered, and the worker read
            # its own: a kill then loses nothing in flight
            wait_until(lambda kill=kill: list(delivered_per_conn(sim.ground_truth()).values())
                       == [per_conn] * kill
                       and a.counters("stream").get("received", 0) >= per_conn, 60,
                       f"A's stream worker read its connection's tweets (kill {kill})")
            stream_pid = a.worker_pid("stream")
            os.kill(stream_pid, signal.SIGKILL)
            wait_until(lambda pid=stream_pid: a.status("stream").get("pid") not in (None, pid),
                       30, "A's new stream worker")
            active = wait_until(lambda: [d for d in (a, b) if ha_view(d).get("role") == "active"],
                                60, f"an active instance after kill {kill}")
            if active == [b]:
                break
            assert b.counters("stream").get("attempts") == 0, "the standby connected"
            reclaims += 1
        assert active == [b], "the standby did not take over after a 4 s restart"
        wait_role(a, "standby")
        # the pair's alerts sum ingestd_ha_active by lease: one active, B
        assert [ha_active(d.state_dir)[1] for d in (a, b)] == [0.0, 1.0]
        wait_all_stored(mongo_uri, mongo_database, sim, conns=reclaims + 2, per_conn=per_conn)
        r = wait_until(lambda: (lambda r: r if r["in_flight"] == 0 else None)(reconciliation(a)),
                       60, "A's counts: every message it received resolved")
        stop_all(a, b)  # the standby first: a release would hand the stream over
    finally:
        kill_all(sim, a, b)
    truth = sim.ground_truth()
    assert_never_two_at_once(truth)
    spans = open_intervals(truth)
    ids, delivered = reconcile(mongo_uri, mongo_database, sim)
    print(f"\n[figure] standby pair, the active's stream worker SIGKILLed {reclaims + 1} times: "
          f"{reclaims} taken back by its successor, then B took over; {len(spans)} connections, "
          f"delivered {len(delivered)}, stored {len(ids)}, no duplicate; A's counts {r}")
    assert len(spans) == reclaims + 2 and r["difference"] == 0, (spans, r)
    # A successor restarted within the lease takes it back: the first (1 s of back-off, ~1.6 s
    # to stream again here) on a quiet machine; under load B may take over at any kill.
    assert not a.events("ha_takeover")
    (takeover,) = b.events("ha_takeover")
    assert takeover["previous_holder"] == a_name
    # One closed gap per kill: A's "crashed" ones while it took the lease back, B's takeover.
    gaps = sorted((g for g in coverage_gaps(mongo_uri, mongo_database) if g["end"] is not None),
                  key=lambda g: g["start_ns"])
    assert [(g["ha_instance"], g["causes"]) for g in gaps] == \
        [(a_name, ["crashed"])] * reclaims + [(ha_view(b)["instance"], ["takeover"])], gaps
    for gap, (before, after) in zip(gaps, itertools.pairwise(spans), strict=True):
        last = float(truth.of("tweet", before[0])[-1]["t"])
        first = float(truth.of("tweet", after[0])[0]["t"])
        start, end = gap["start"].timestamp(), gap["end"].timestamp()
        print(f"[figure] gap {gap['cause']} {end - start:.2f}s: start {start - last:+.3f}s, "
              f"end {end - first:+.3f}s against the ground truth")
        assert abs(start - last) <= 1.0 and abs(end - first) <= 1.0


def test_two_instances_given_one_name_do_not_log_each_other_out(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    # The HA audit's high finding: the same ha.instance in both settings files (the README
    # says to run a pair "with the same settings file"). Before: each took the lease back as
    # its own restarted process, 32 connections a minute, code-7 logouts, every status ok.
    sim = sim_for(tmp_path)
    docs = [ha_doc(sim, mongo_uri, mongo_database, "standby") for _ in "ab"]
    for doc in docs:
        doc["ha"]["instance"] = "twin"
    a, b = Daemon(tmp_path / "a", docs[0]), Daemon(tmp_path / "b", docs[1])
    try:
        a.start().wait_ready(BOOT)
        wait_role(a, "active")
        b.start().wait_ready(BOOT)
        conflict = b.wait_log("ha_instance_conflict", 60)
        assert conflict["other_site"].endswith(f":{(a.state_dir).resolve()}"), conflict
        renewals = lease_docs(mongo_uri, mongo_database)[0]["renew"]
        wait_until(lambda: lease_docs(mongo_uri, mongo_database)[0]["renew"] >= renewals + 10,
                   60, "ten more renewals by A while B stands by")
        state = str(b.status("stream").get("state"))
        assert state.startswith("degraded: ha.instance 'twin' is also used"), state
        assert collect(b.state_dir)["health"] == "degraded"
        assert ha_view(a)["role"] == "active" and ha_view(a)["takeovers"] == 0
        # A standby's reload changes no connection, and `ingestd reload` says so (the audit:
        # "new connection (stream.track changed)" for one it never opened)
        doc = dict(b.doc)
        doc["stream"] = {**doc["stream"], "track": [*doc["stream"]["track"], "standbyword"]}
        b.write_settings_atomically(doc)
        reload = operator_cli("reload", daemon=b)
        assert reload.returncode == 0, reload.stdout + reload.stderr
        assert "track +standbyword; no connection to change, standing by (stream.track " \
            "changed: used once this instance becomes active)" in reload.stdout, reload.stdout
        assert b.counters("stream").get("attempts") == 0, "B connected"
        stop_all(b, a)  # B first: A's release would hand the stream to B
    finally:
        kill_all(sim, a, b)
    assert len(open_intervals(sim.ground_truth())) == 1  # one connection: no logouts


def test_a_stopped_active_says_it_released_and_a_restart_is_no_takeover(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The audit's sequence: the active stops cleanly (its last status must not claim the
    lease), then the pair is started again: the free lease is acquired, not taken over, and
    the pair's gap is still recorded."""
    sim = sim_for(tmp_path)
    a = b = None
    try:
        a = Daemon(tmp_path / "a", ha_doc(sim, mongo_uri, mongo_database, "standby")).start()
        a.wait_ready(BOOT)
        a_name = wait_role(a, "active")["instance"]
        wait_until(lambda: a.counters("stream").get("received", 0) > 0, 60, "A streaming")
        code, _ = a.stop()
        assert code == 0, a.tail()
        assert a.events("lease_released"), a.tail()
        view = ha_view(a)
        assert view["role"] == "released" and view["holder"] is None, view
        assert view["last_holder"] == a_name
        text = render(collect(a.state_dir))
        assert f"lease holder {a_name}" not in text and "lease held by" not in text, text
        assert "stopped: lease released at" in text and "ha          released" in text, text
        b = Daemon(tmp_path / "b", ha_doc(sim, mongo_uri, mongo_database, "standby")).start()
        b.wait_ready(BOOT)
        assert wait_role(b, "active")["takeovers"] == 0
        free = b.wait_log("ha_lease_was_free")
        assert free["previous_holder"] == a_name and free["free_seconds"] >= 0
        assert not b.events("ha_takeover")
        wait_until(lambda: [g for g in takeover_gaps(mongo_uri, mongo_database) if g["end"]], 60,
                   "B's ledger closed the pair's gap")
        (gap,) = takeover_gaps(mongo_uri, mongo_database)
        assert gap["detail"]["from"] == a_name and gap["detail"]["released"] is True
        stop_all(b)
    finally:
        kill_all(sim, a, b)


def takeover_gaps(uri: str, db: str, cause: str = "takeover") -> list[dict[str, Any]]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, tz_aware=True, serverSelectionTimeoutMS=10000)
    try:
        return list(client[db].coverage.find({"kind": "gap", "cause": cause}))
    finally:
        client.close()


def test_standby_sigstop_the_active_returns_as_standby_and_drains(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    per_conn = 1500  # 15 s a connection: A is frozen while its connection still delivers
    sim = sim_for(tmp_path, per_conn=per_conn, rate=100)
    a = b = None
    try:
        a, b = start_together(tmp_path, sim, mongo_uri, mongo_database)
        wait_until(lambda: a.counters("stream").get("received", 0) >= 100, 60, "A streaming")
        stopped_at = time.time()
        signal_all(a, signal.SIGSTOP)  # frozen mid-stream: its lease expires, B takes over
        try:
            wait_role(b, "active", timeout=60)
            wait_until(lambda: b.counters("stream").get("received", 0) >= 50, 60,
                       "B streaming")
            conns_before = len(sim.ground_truth().connections())
            # The scenario is a 30 s freeze (a VM paused, a process stuck in D state): its length
            # is the point, not an event to wait for.
            time.sleep(max(0.0, FREEZE - (time.time() - stopped_at)))
        finally:
            signal_all(a, signal.SIGCONT)
        wait_role(a, "standby")
        a.wait_log("stream_stood_down")
        # The whole of A was frozen, not a worker hung: its supervisor must not abort them.
        assert a.wait_log("supervisor_suspended")["gap"] >= FREEZE - 1
        assert not a.events("worker_hung")
        wait_all_stored(mongo_uri, mongo_database, sim, conns=1, per_conn=per_conn)
        # A, back, stands by: it opened no connection after it woke up, B kept the lease.
        assert len(sim.ground_truth().connections()) == conns_before == 2
        wait_until(lambda: ha_view(a).get("holder") == ha_view(b)["instance"], 30,
                   "A sees B's lease")
        assert ha_view(b)["takeovers"] == 1 and ha_view(b)["role"] == "active"
        # B's ledger closed the gap, and settled its start once A's ledger reported where A's
        # messages ended (A's stand-down gap).
        wait_until(lambda: [g for g in takeover_gaps(mongo_uri, mongo_database)
                            if g["end"] and g.get("start_basis") == "previous_holder"], 60,
                   "B's ledger settled the takeover gap from A's report")
        stop_all(a, b)
    finally:
        kill_all(sim, a, b)
    truth = sim.ground_truth()
    (a_conn, _, _), (b_conn, _, _) = open_intervals(truth)
    # A frozen cannot close its connection: B's newer one logs it out (code 7). B itself was
    # never logged out, and its connection ran until B stopped.
    kicked = {e["conn"] for e in truth.control("disconnect")}
    assert kicked <= {a_conn}, kicked
    assert not any(e["conn"] == b_conn and "disconnect" in str(e.get("reason"))
                   for e in truth.closes())
    assert len(truth.connections()) == 2  # nobody connected after B: not A once it woke
    # While A was frozen, the endpoint kept writing into its socket: tweets it counts as
    # delivered, which A read when it woke, before closing (stand-down drain).
    while_frozen = [e for e in truth.of("tweet", a_conn) if e["t"] > stopped_at + 0.5]
    assert while_frozen, "the scenario should freeze A while its connection delivers"
    ids, delivered = reconcile(mongo_uri, mongo_database, sim)
    a_ids = set(truth.tweet_ids(a_conn))
    print(f"\n[figure] SIGSTOP {FREEZE:.0f}s: A's connection delivered {len(a_ids)} "
          f"({len(while_frozen)} into its socket while it was frozen, read when it woke), B's "
          f"{len(delivered) - len(a_ids)}; stored {len(ids)}, no duplicate")
    # One takeover gap, ending at B's first tweet. B first started it at A's last message read
    # before it froze (A's last renewal said so), earlier than A's last delivery: the endpoint
    # kept filling A's frozen socket. A's report moved it to A's last message's own time.
    (gap,) = takeover_gaps(mongo_uri, mongo_database)
    first_b = float(truth.of("tweet", b_conn)[0]["t"])
    last_a = float(truth.of("tweet", a_conn)[-1]["t"])
    start, end = gap["start"].timestamp(), gap["end"].timestamp()
    lease_start = gap["lease_start"].timestamp()
    print(f"[figure] SIGSTOP takeover gap {end - start:.2f}s: start {start - last_a:+.3f}s "
          f"against A's last delivery (the lease said {lease_start - last_a:+.3f}s), end "
          f"{end - first_b:+.3f}s against B's first")
    assert abs(start - last_a) <= 1.0 and abs(end - first_b) <= 1.0


def test_standby_holder_cut_off_from_mongodb_closes_before_the_takeover(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    host, port = parse_uri(mongo_uri)["nodelist"][0]
    sim = sim_for(tmp_path)
    a = b = None
    try:
        with MongoProxy((host, port)) as proxy:
            a, b = start_pair(tmp_path, sim, mongo_uri, mongo_database, uri_a=proxy.uri)
            wait_until(lambda: a.counters("stream").get("received", 0) >= PER_CONN, 60,
                       "A received its connection's tweets")
            # The holder's margin counts on a look at the lease every TICK: no slow-stream pause
            # may lengthen its reaction (fresh-13: B connected 4 ms before A had closed).
            assert a.status("stream").get("gathers") == 0
            proxy.failover(600)  # A alone loses MongoDB; its process keeps running
            wait_role(b, "active", timeout=60)
            stood_down = a.wait_log("stream_stood_down")
            assert ha_view(a)["renew_failures"] > 0
            proxy.pass_through()  # A reaches MongoDB again: B holds the lease now
            wait_until(lambda: a.events("lease_lost"), 30, "A sees it lost the lease")
            wait_all_stored(mongo_uri, mongo_database, sim, conns=2)
            assert ha_view(a)["role"] == "standby" and a.counters("stream")["attempts"] == 1
            # A's stand-down gap says why: it could not renew (not "lost": nobody had taken
            # it yet; "lapsed" if the renewal's own timeout had not fired by then)
            a_name = instance_name(a.state_dir)  # the ledger's name for A
            (gap,) = wait_until(lambda: [g for g in takeover_gaps(
                mongo_uri, mongo_database, "standby") if g["instance"] == a_name], 30,
                "A's stand-down gap in the ledger")
            assert gap["detail"]["lease"] in ("unreachable", "lapsed"), gap
            stop_all(a, b)
    finally:
        kill_all(sim, a, b)
    truth = sim.ground_truth()
    spans = open_intervals(truth)
    assert len(spans) == 2 and not truth.control("disconnect"), "nobody was logged out"
    # The simulator notices an idle client's close only at its next keep-alive write, so A's
    # close is taken from A's own log line, written once its connection was closed.
    closed = datetime.fromisoformat(stood_down["timestamp"]).timestamp()
    b_opened = spans[1][1]
    print(f"\n[figure] A, cut off from MongoDB, closed its stream {b_opened - closed:.2f}s "
          f"before B opened one (lease {LEASE}s, margin {margin(LEASE):.1f}s)")
    assert closed < b_opened
    reconcile(mongo_uri, mongo_database, sim)


def test_standby_stepdowns_during_renewals_keep_one_stream_and_a_long_one_hands_over(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The primary steps down while the holder renews (NotWritablePrimary on its
    findAndModify). A short election (two renewals) is ridden out inside the lease: no
    stand-down, no takeover. A long one (renewals refused for well past the lease) hands over:
    A closes its stream before B opens one, and once it can write again finds it lost."""
    host, port = parse_uri(mongo_uri)["nodelist"][0]
    sim = sim_for(tmp_path)
    a = b = None
    try:
        with MongoProxy((host, port)) as proxy:
            a, b = start_pair(tmp_path, sim, mongo_uri, mongo_database, uri_a=proxy.uri)
            wait_until(lambda: a.counters("stream").get("received", 0) >= 100, 60, "A streams")
            proxy.fail_writes(2, code=10107, commands=FIND_AND_MODIFY)
            proxy.wait_applied("command_error", 2)
            wait_until(lambda: ha_view(a)["renew_failures"] == 2 and not ha_view(a)["last_error"],
                       30, "A renewed again")
            assert ha_view(a)["role"] == "active" and ha_view(b)["role"] == "standby"
            assert not a.events("stream_stood_down") and ha_view(b)["takeovers"] == 0
            renewals = int(10 * LEASE / renew_interval(LEASE))  # ~10 leases of refusals
            proxy.fail_writes(renewals, code=10107, commands=FIND_AND_MODIFY)
            wait_role(b, "active", timeout=60)
            stood_down = a.wait_log("stream_stood_down")
            assert a.status("stream")["state"].startswith("degraded: lease unreachable "
                                                           "(NotPrimaryError: not primary")
            proxy.pass_through()
            wait_until(lambda: a.events("lease_lost"), 30, "A sees it lost the lease")
            wait_all_stored(mongo_uri, mongo_database, sim, conns=2)
            assert ha_view(a)["role"] == "standby" and a.counters("stream")["attempts"] == 1
            stop_all(a, b)
    finally:
        kill_all(sim, a, b)
    truth = sim.ground_truth()
    spans = open_intervals(truth)
    assert len(spans) == 2 and not truth.control("disconnect"), "nobody was logged out"
    closed = datetime.fromisoformat(stood_down["timestamp"]).timestamp()
    assert closed < spans[1][1], "A closed its stream before B opened one"
    reconcile(mongo_uri, mongo_database, sim)


def test_single_mode_writes_no_lease(tmp_path: Path, mongo_uri: str,
                                     mongo_database: str) -> None:
    sim = sim_for(tmp_path)
    daemon = Daemon(tmp_path / "d", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        daemon.start().wait_ready(BOOT)
        wait_all_stored(mongo_uri, mongo_database, sim, conns=1)
        assert ha_view(daemon) == {"mode": "single", "role": "single"}
        stop_all(daemon)
    finally:
        daemon.kill()
        sim.stop()
    assert lease_docs(mongo_uri, mongo_database) == []
    assert not [e for e in daemon.log_events()
                if str(e.get("event", "")).startswith(("lease_", "ha_"))]


PAIR = 'sum by (job, lease) (ingestd_ha_active{mode="standby"})'  # what the standby alerts sum


def scraped(tmp_path: Path, name: str, sim: SimProcess, uri: str, db: str, listen: str,
            collection: str = "leases") -> Daemon:
    """A standby instance whose metrics listen on ``listen`` (a target Prometheus knows)."""
    doc = ha_doc(sim, uri, db, "standby")
    doc["ha"]["collection"] = collection
    doc["metrics"] = {"listen": listen}
    return Daemon(tmp_path / name, doc)


def pair_sum(prom: Prometheus) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for s in prom.query(PAIR)]


def scraped_active(prom: Prometheus, target: str) -> float | None:
    """``target``'s last scraped ``ingestd_ha_active`` (None: not scraped, or stale)."""
    return prom.value(f'ingestd_ha_active{{instance="{target}"}}')


def wait_rule_state(prom: Prometheus, alert: str) -> str:
    """The alert's state once its rule has evaluated to something (pending or firing)."""
    def state() -> str:
        rules = {r["name"]: r for g in prom.rules()["groups"] for r in g["rules"]}
        assert rules[alert]["health"] == "ok", rules[alert].get("lastError")
        return "" if rules[alert]["state"] == "inactive" else str(rules[alert]["state"])
    return wait_until(state, 10, f"{alert}'s next evaluation")


def test_a_real_prometheus_counts_one_active_per_pair_through_a_takeover(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The standby alerts' premise, with Prometheus scraping real instances: the pair sums to one
    through a takeover (a killed instance's series go stale at its first failed scrape, so the
    pair never counts its old holder next to the new one), and to two once a third instance
    with the same credentials holds a lease in another collection (IngestdStandbyBothActive)."""
    find_binary()
    sim = sim_for(tmp_path)
    targets = [f"127.0.0.1:{free_port()}" for _ in "abc"]
    a = scraped(tmp_path, "a", sim, mongo_uri, mongo_database, targets[0])
    b = scraped(tmp_path, "b", sim, mongo_uri, mongo_database, targets[1])
    c = scraped(tmp_path, "c", sim, mongo_uri, mongo_database, targets[2], "leases_elsewhere")
    prom = Prometheus(tmp_path / "prom", targets, rule_files=[ALERT_RULES])
    try:
        a.start().wait_ready(BOOT)
        lease = wait_role(a, "active")["lease"]
        b.start().wait_ready(BOOT)
        wait_role(b, "standby")
        prom.start()

        def active(i: int) -> float | None:
            return scraped_active(prom, targets[i])

        wait_until(lambda: active(0) == 1 and active(1) == 0, 30, "A active, B standby scraped")
        assert pair_sum(prom) == [({"job": "ingestd", "lease": lease}, 1.0)]
        signal_all(a, signal.SIGKILL)
        a.proc.wait(10)  # type: ignore[union-attr]
        wait_role(b, "active", timeout=60)
        wait_until(lambda: active(1) == 1, 30, "B's takeover scraped")
        assert active(0) is None, "the killed instance's last sample is still current"
        assert pair_sum(prom) == [({"job": "ingestd", "lease": lease}, 1.0)]
        c.start().wait_ready(BOOT)
        assert wait_role(c, "active")["lease"] == lease  # same credentials, its own lease
        wait_until(lambda: active(2) == 1, 30, "C scraped")
        assert pair_sum(prom) == [({"job": "ingestd", "lease": lease}, 2.0)]
        assert wait_rule_state(prom, "IngestdStandbyBothActive") == "pending"  # for: 2m
    finally:
        prom.stop()
        kill_all(sim, a, b, c)


def test_a_real_prometheus_sees_a_pair_whose_lease_is_unreachable_stream_nowhere(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """IngestdStandbyNoneActive's premise with real instances: both lose MongoDB (a proxy cut
    between them and it), the holder stands down, the other cannot take over: the pair sums to
    zero. Back on MongoDB, one of them takes the lease again and the sum is one."""
    find_binary()
    host, port = parse_uri(mongo_uri)["nodelist"][0]
    sim = sim_for(tmp_path)
    targets = [f"127.0.0.1:{free_port()}" for _ in "ab"]
    a = b = None
    prom = Prometheus(tmp_path / "prom", targets, rule_files=[ALERT_RULES])
    try:
        with MongoProxy((host, port)) as proxy:
            a = scraped(tmp_path, "a", sim, proxy.uri, mongo_database, targets[0])
            b = scraped(tmp_path, "b", sim, proxy.uri, mongo_database, targets[1])
            a.start().wait_ready(BOOT)
            lease = wait_role(a, "active")["lease"]
            b.start().wait_ready(BOOT)
            wait_role(b, "standby")
            prom.start()
            wait_until(lambda: [scraped_active(prom, t) for t in targets] == [1.0, 0.0], 30,
                       "A active, B standby scraped")
            assert pair_sum(prom) == [({"job": "ingestd", "lease": lease}, 1.0)]
            proxy.failover(600)  # neither instance reaches MongoDB; both keep running
            wait_role(a, "standby", timeout=60)
            a.wait_log("stream_stood_down")
            assert ha_view(b)["role"] == "standby"
            wait_until(lambda: pair_sum(prom) == [({"job": "ingestd", "lease": lease}, 0.0)],
                       30, "the stand-down scraped")
            assert wait_rule_state(prom, "IngestdStandbyNoneActive") == "pending"  # for: 2m
            proxy.pass_through()
            wait_until(lambda: pair_sum(prom) == [({"job": "ingestd", "lease": lease}, 1.0)],
                       60, "one instance active again, scraped")
            stop_all(a, b)
    finally:
        prom.stop()
        kill_all(sim, a, b)


# ---------------------------------------------------------------- redundant


def test_redundant_every_tweet_delivered_twice_stored_once(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = sim_for(tmp_path, "--redundant", "2")
    a = Daemon(tmp_path / "a", ha_doc(sim, mongo_uri, mongo_database, "redundant"))
    b = Daemon(tmp_path / "b", ha_doc(sim, mongo_uri, mongo_database, "redundant"))
    try:
        a.start()
        b.start()
        a.wait_ready(BOOT)
        b.wait_ready(BOOT)
        wait_all_stored(mongo_uri, mongo_database, sim, conns=2)
        stop_all(a, b)
    finally:
        a.kill()
        b.kill()
        sim.stop()
    truth = sim.ground_truth()
    (one, _, _), (two, _, _) = open_intervals(truth)
    assert not truth.control("disconnect"), "a redundant connection was logged out"
    assert sorted(truth.tweet_ids(one)) == sorted(truth.tweet_ids(two))
    assert len(truth.tweet_ids(one)) == PER_CONN
    ids, _ = reconcile(mongo_uri, mongo_database, sim)
    dups = a.counters("store").get("duplicates", 0) + b.counters("store").get("duplicates", 0)
    print(f"\n[figure] redundant: delivered {2 * PER_CONN} ({PER_CONN} twice), stored "
          f"{len(ids)}, {dups} copies absorbed by _id")
    assert len(ids) == PER_CONN and dups == PER_CONN
    assert lease_docs(mongo_uri, mongo_database) == []


# ---------------------------------------------------------------- the lease itself


class Clock:
    """A monotonic clock the test moves (each elector may have its own: hosts' clocks differ)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def leases(mongo_uri: str, mongo_database: str) -> Any:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=10000)
    yield client[mongo_database].leases
    client.close()


def elector(coll: Any, name: str, clock: Clock, site: str = "") -> LeaseElector:
    return LeaseElector(coll, "stream:k", name, LEASE, clock=clock, site=site)


def test_a_standby_takes_over_only_after_the_holder_stopped_streaming(leases: Any) -> None:
    clock = Clock()
    a, b = elector(leases, "a", clock), elector(leases, "b", clock)
    a.step(1)
    b.step(0)
    assert a.may_stream() and not b.may_stream()
    assert (b.view.role, b.view.holder, b.view.term) == ("standby", "a", a.term)  # audit: 0
    for _ in range(10):  # A renews every interval: B never takes over
        clock.now += renew_interval(LEASE)
        a.step(2)
        b.step(0)
        assert a.may_stream() and not b.may_stream()
    last_renewal = clock.now
    while not b.may_stream():  # A is cut off: only B steps from now on
        clock.now += 0.1
        b.step(0)
    assert clock.now >= last_renewal + LEASE
    assert not a.may_stream(), "A would still stream when B took over"
    assert a.valid_until <= clock.now - margin(LEASE)
    assert b.view.takeovers == 1 and b.takeovers[0].previous_holder == "a"
    assert b.takeovers[0].last_recv_ns == 2  # A's last renewal carried its last message time
    a.step(3)  # A comes back: its renewal finds B's term and deposes it
    assert a.term is None and a.view.role == "standby" and a.view.holder == "b"
    assert not a.may_stream() and b.may_stream()


def test_a_released_lease_stops_claiming_the_holder_and_is_acquired_not_taken_over(
        leases: Any) -> None:
    clock = Clock()
    a = elector(leases, "a", clock)
    a.step(1)
    gate = StandbyGate(LeaseKeeper(a, lambda: 0), "a")  # not started: release by hand
    gate.closed = True  # what gate.close does before the keeper's release
    a.release()
    assert a.view.role == "released" and a.view.holder is None and a.view.last_holder == "a"
    assert gate.view()["role"] == "released"
    assert gate.state("connected").startswith("stopped: lease released at ")
    doc = leases.find_one({"_id": "stream:k"})
    assert doc["holder"] is None and doc["released_at"] is not None
    # B starts after the pair stopped: the lease is free at its first look. Not a takeover.
    b = elector(leases, "b", clock)
    b.step(0)
    assert b.may_stream() and b.view.takeovers == 0
    (found,) = b.takeovers
    assert found.found_free and found.released and not found.counted
    assert found.previous_holder == "a" and found.free_since is not None
    # A returns as standby and sees B hold it; B releases while A watches: a takeover (counted).
    a.step(0)
    assert a.view.role == "standby" and a.view.holder == "b"
    b.release()
    a.step(0)
    assert a.may_stream() and a.view.takeovers == 1
    (taken,) = a.takeovers
    assert taken.counted and taken.released and taken.previous_holder == "b"
    # B, stopped while standing by behind A, last knew A as the holder.
    b.step(0)
    b.release()
    assert b.view.role == "stopped" and b.view.holder is None and b.view.last_holder == "a"


def test_a_standby_looks_again_when_the_watched_lease_expires(leases: Any) -> None:
    # The holder renews every renew interval; a standby looks every WATCH_INTERVAL (it sees a
    # renewal at most that late) and once more at the moment the watched lease expires.
    clock = Clock()
    a, b = elector(leases, "a", clock), elector(leases, "b", clock)
    a.step(1)
    assert a.expires_in() is None  # holding: nothing to watch
    keeper = LeaseKeeper(b, lambda: 0)  # not started: only its schedule is asked
    assert b.expires_in() is None and keeper._next_wait(0.0) == keeper.interval  # not read yet
    b.step(0)  # B reads A's lease at `now`: it expires LEASE later unless A renews
    assert keeper._next_wait(0.0) == WATCH_INTERVAL < keeper.interval  # watching: sooner
    clock.now += LEASE - 0.1
    assert b.expires_in() == pytest.approx(0.1)
    assert keeper._next_wait(0.0) == pytest.approx(0.1)  # the look at the expiry itself
    clock.now += 0.2
    b.step(0)
    assert b.may_stream() and b.view.takeovers == 1
    assert b.expires_in() is None and keeper._next_wait(0.0) == keeper.interval


def test_two_standbys_racing_for_an_expired_lease_one_wins(leases: Any) -> None:
    clock = Clock()
    a, b, c = (elector(leases, n, clock) for n in "abc")
    a.step(0)
    expired = leases.find_one({"_id": "stream:k"})  # what both b and c read, A being silent
    b._take(expired, LEASE, 0)
    c._take(expired, LEASE, 0)  # the compare-and-set sees b's term, not the one c read
    assert b.may_stream() and not c.may_stream() and c.term is None
    assert leases.find_one({"_id": "stream:k"})["holder"] == "b"
    assert leases.find_one({"_id": "stream:k"})["term"] == 2


def test_a_released_lease_is_taken_at_once(leases: Any) -> None:
    clock = Clock()
    a, b = elector(leases, "a", clock), elector(leases, "b", clock)
    a.step(5)
    b.step(0)
    a.release()
    assert not a.may_stream()
    b.step(0)  # no waiting for the lease to expire
    assert b.may_stream() and b.takeovers[0].previous_holder == "a"


def test_a_restarted_holder_reclaims_its_own_lease(leases: Any) -> None:
    clock = Clock()
    elector(leases, "a", clock).step(0)  # then the process dies without releasing
    again = elector(leases, "a", clock)
    again.step(0)
    assert again.may_stream() and again.view.takeovers == 0 and not again.takeovers


def test_a_second_instance_with_the_same_name_waits_and_says_so(leases: Any) -> None:
    # The HA audit: two instances configured with the same ha.instance (a copied settings file)
    # each took the lease back "as its own restarted process", 32 times a minute, and every
    # status said ok. The site (host:state folder) tells a restart from a namesake.
    clock = Clock()
    first = elector(leases, "a", clock, site="h1:/var/lib/ingestd")
    twin = elector(leases, "a", clock, site="h2:/var/lib/ingestd")
    first.step(1)
    for _ in range(10):  # the namesake never takes a live lease; the holder keeps it
        twin.step(0)
        assert first.may_stream() and not twin.may_stream() and twin.term is None
        assert twin.view.conflict and "h1:/var/lib/ingestd" in twin.view.conflict
        clock.now += renew_interval(LEASE)
        first.step(2)
    assert first.view.conflict is None and leases.find_one({"_id": "stream:k"})["term"] == 1
    restarted = elector(leases, "a", clock, site="h1:/var/lib/ingestd")  # same site: at once
    restarted.step(3)
    assert restarted.may_stream() and not restarted.takeovers
    last_renewal = clock.now  # the holder dies: the namesake takes over like any standby
    while not twin.may_stream():
        clock.now += 0.1
        twin.step(0)
    assert clock.now >= last_renewal + LEASE
    (taken,) = twin.takeovers
    assert taken.counted and taken.previous_holder == "a" and twin.view.takeovers == 1
    assert twin.view.conflict is None


def test_a_stand_down_says_why_the_lease_said_no(leases: Any) -> None:
    # The HA audit: a holder cut off from MongoDB recorded its outage as a plain "standby" gap,
    # as if another instance had the stream; nobody had, and no takeover gap told the hole.
    clock = Clock()
    a = elector(leases, "a", clock)
    a.step(1)
    gate = StandbyGate(LeaseKeeper(a, lambda: 0), "a")  # not started: stepped by hand
    clock.now += LEASE  # no renewal in time, no error seen (a frozen host)
    assert not gate.may_stream() and gate.stand_down_why() == "lapsed"
    a.view.last_error = "ServerSelectionTimeoutError: …"  # what a failed step records
    assert gate.stand_down_why() == "unreachable"
    b = elector(leases, "b", clock)
    b.step(0)
    clock.now += LEASE
    b.step(0)  # unchanged for a lease on B's clock: B takes it
    assert b.may_stream()
    a.view.last_error = None
    a.step(2)  # A's renewal finds B's term
    assert a.view.holder == "b" and gate.stand_down_why() == "lost"


def test_a_takeover_whose_reply_was_lost_is_still_reported(leases: Any) -> None:
    class LostReply:
        """The lease collection, except that one findAndModify is applied and its reply lost."""

        def __init__(self, coll: Any) -> None:
            self.coll, self.lose = coll, 1

        def __getattr__(self, name: str) -> Any:
            return getattr(self.coll, name)

        def find_one_and_update(self, *args: Any, **kwargs: Any) -> Any:
            result = self.coll.find_one_and_update(*args, **kwargs)
            if self.lose:
                self.lose -= 1
                raise pymongo.errors.AutoReconnect("connection reset")
            return result

    clock = Clock()
    a = elector(leases, "a", clock)
    a.step(7)
    renewed = leases.find_one({"_id": "stream:k"})["renewed_ns"]  # a's clock at its last write
    b = LeaseElector(LostReply(leases), "stream:k", "b", LEASE, clock=clock)  # type: ignore[arg-type]
    b.step(0)
    clock.now += LEASE
    b.step(0)  # applied on the server, but b does not know it won
    assert not b.may_stream() and b.view.renew_failures == 1
    assert leases.find_one({"_id": "stream:k"})["holder"] == "b"
    b.step(0)  # finds the lease its own: completes the takeover
    assert b.may_stream() and b.view.takeovers == 1
    assert b.takeovers == [Takeover("a", 7, LEASE, renewed_ns=renewed)] and renewed > 0


def test_mongodb_unreachable_the_holder_stops_streaming_in_time() -> None:
    class Down:
        def find_one_and_update(self, *args: Any, **kwargs: Any) -> None:
            raise pymongo.errors.ServerSelectionTimeoutError("down")

    clock = Clock()
    a = LeaseElector(Down(), "stream:k", "a", LEASE, clock=clock)  # type: ignore[arg-type]
    a.term, a.valid_until = 1, clock.now + LEASE - margin(LEASE)
    a.view.role = "active"
    clock.now += LEASE - margin(LEASE)
    a.step(0)
    assert not a.may_stream() and a.view.renew_failures == 1 and "down" in str(a.view.last_error)
    gate = StandbyGate(LeaseKeeper(a, lambda: 0), "a")  # the thread is not started
    assert not gate.may_stream()
    assert gate.state("connected conn=1 gen=1").startswith("degraded: lease unreachable")
    assert gate.view()["role"] == "standby"  # the holder whose lease lapsed
    assert gate.view()["lease"] == "stream:k"  # the label a pair's metrics are summed by


# ---------------------------------------------------------------- settings, status, metrics


def ha_settings(**ha: Any) -> Any:
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", "mongodb://h", "db",
                       **({"ha": ha} if ha else {}))
    doc["state_dir"] = "/var/lib/ingestd/x"
    return load_settings_text(yaml.safe_dump(doc), Path("/etc/ingestd/x.yaml"), CREDS)


def test_ha_settings_defaults_and_errors() -> None:
    single = ha_settings()
    assert (single.ha.mode, single.ha.lease_seconds, single.ha.collection) == (
        "single", 10.0, "leases")
    assert single.ha.instance.startswith(socket.gethostname() + ":")
    assert ha_settings().ha.instance == single.ha.instance  # stable across restarts
    assert single.ha.lease_key.startswith("stream:")
    assert all(v not in single.ha.lease_key for v in CREDS.values())
    assert ha_settings(mode="standby", instance="db-1").ha.instance == "db-1"
    shipped = load_settings(Path(__file__).parents[1] / "settings.yaml", env=CREDS).ha
    assert (shipped.mode, shipped.lease_seconds, shipped.collection) == (
        single.ha.mode, single.ha.lease_seconds, single.ha.collection)  # documents the defaults
    with pytest.raises(ConfigErrors) as info:
        ha_settings(mode="active-active", lease_seconds=0.5)
    text = str(info.value)
    assert "ha.mode: must be one of single, standby, redundant; got 'active-active'" in text
    assert "ha.lease_seconds" in text


def test_status_and_metrics_show_role_holder_and_takeovers(tmp_path: Path) -> None:
    (tmp_path / RUN_DIR).mkdir()
    ha = {"mode": "standby", "instance": "h2:1", "lease": "stream:0123", "role": "standby",
          "holder": "h1:9", "term": 0, "takeovers": 2, "renew_failures": 1, "last_error": None}
    write_status(tmp_path, "stream", {"state": "standby: lease held by h1:9", "ha": ha})
    families = {f.name: f.samples[0].value for f in RunStateCollector(tmp_path).collect()
                if f.name.startswith("ingestd_ha_")}
    assert families == {"ingestd_ha_active": 0.0, "ingestd_ha_takeovers": 2.0,
                        "ingestd_ha_lease_failures": 1.0}
    view = {"health": "ok", "reasons": [], "running": dict.fromkeys(
        ("supervisor", "stream", "store"), True), "workers": {"stream": {"ha": ha}},
        "state_dir": str(tmp_path)}
    lines = render(view).splitlines()
    at = lines.index(
        "  ha          standby (h2:1)  lease holder h1:9  takeovers 2  lease failures 1")
    assert lines[at + 1] == "              lease stream:0123"
    # The lease unreachable: the holder last seen (itself, say) is not called the holder (the
    # HA audit: "standby (ingest-b) lease holder ingest-b" while nobody could hold it)
    ha.update(holder="h2:1", last_error="ServerSelectionTimeoutError: …")
    assert "  ha          standby (h2:1)  lease unreachable (last seen held by h2:1)  " \
        "takeovers 2  lease failures 1" in render(view).splitlines()
    # A frozen (hung) active: its file still calls it the holder; the line says it is old
    ha.update(role="active", holder="h2:1", last_error=None)
    view["liveness"] = {"supervisor": "ok", "stream": "hung", "store": "ok"}
    assert "  ha          last said: active (h2:1)  lease holder h2:1  takeovers 2  " \
        "lease failures 1" in render(view).splitlines()


def ha_active(state_dir: Path) -> tuple[dict[str, str], float]:
    """``ingestd_ha_active``'s one sample, as the instance of ``state_dir`` exports it."""
    (family,) = [f for f in RunStateCollector(state_dir).collect() if f.name == "ingestd_ha_active"]
    (sample,) = family.samples
    return sample.labels, sample.value


def test_ha_active_is_labelled_by_lease_and_needs_a_live_stream_worker(tmp_path: Path) -> None:
    (tmp_path / RUN_DIR).mkdir()
    ha = {"mode": "standby", "instance": "h1:9", "lease": "stream:0123", "role": "active"}
    write_status(tmp_path, "stream", {"state": "connected", "ha": ha})
    assert ha_active(tmp_path) == ({"mode": "standby", "lease": "stream:0123"}, 1.0)
    # A stream worker that died holding the lease leaves a file that still says active; it
    # streams no more, and the pair's other instance takes over: summed by lease, one active.
    exited = subprocess.Popen(["true"])
    exited.wait()
    doc = json.loads(status_path(tmp_path, "stream").read_bytes())
    status_path(tmp_path, "stream").write_text(json.dumps({**doc, "pid": exited.pid}))
    assert ha_active(tmp_path) == ({"mode": "standby", "lease": "stream:0123"}, 0.0)
    write_status(tmp_path, "stream", {"state": "connected", "ha": {"mode": "single",
                                                                   "role": "single"}})
    assert ha_active(tmp_path) == ({"mode": "single", "lease": ""}, 1.0)
