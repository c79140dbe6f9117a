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
import os
import signal
import time
from pathlib import Path
from typing import Any

import pymongo

from ingestd.control.lease import renew_interval
from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import stored_ids
from tests.support.simulator import GroundTruthLog, SimProcess
from tests.support.wait import wait_until

LEASE = 3.0  # seconds: small, so takeovers are quick; the renewals stay well inside it
PER_CONN = 600  # tweets per connection (--max-tweets)
FIRST_BACKOFF = 0.25  # settings_doc's network_start: the delay a takeover may add at most


def ha_doc(sim: SimProcess, uri: str, db: str, mode: str) -> dict[str, Any]:
    return settings_doc(sim.url, uri, db, ha={"mode": mode, "lease_seconds": LEASE})


def sim_for(tmp_path: Path, *args: str) -> SimProcess:
    return SimProcess(tmp_path / "sim", "--rate", "150", "--max-tweets", str(PER_CONN),
                      "--control-every", "0", "--keepalive", "1", "--seed", "13", *args).start()


def ha_view(daemon: Daemon) -> dict[str, Any]:
    return dict(daemon.status("stream").get("ha") or {})


def wait_role(daemon: Daemon, role: str, timeout: float = 30.0) -> dict[str, Any]:
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


def wait_all_stored(uri: str, db: str, sim: SimProcess, conns: int) -> None:
    """Until ``conns`` connections delivered their tweets and MongoDB holds every one."""
    def done() -> bool:
        truth = sim.ground_truth()
        per_conn = delivered_per_conn(truth)
        if sorted(per_conn.values())[-conns:] != [PER_CONN] * conns:
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


def start_pair(tmp_path: Path, sim: SimProcess, uri: str, db: str) -> tuple[Daemon, Daemon]:
    """A starts first and becomes active; B then starts and stands by behind A."""
    a = Daemon(tmp_path / "a", ha_doc(sim, uri, db, "standby")).start()
    a.wait_ready()
    active = wait_role(a, "active")
    b = Daemon(tmp_path / "b", ha_doc(sim, uri, db, "standby")).start()
    b.wait_ready()
    standby = wait_role(b, "standby")
    wait_until(lambda: ha_view(b).get("holder") == active["instance"], 30, "B sees A's lease")
    assert standby["instance"] != active["instance"]
    return a, b


# ---------------------------------------------------------------- standby


def test_standby_sigkill_the_active_standby_takes_over_nothing_lost(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = sim_for(tmp_path)
    a = b = None
    try:
        a, b = start_pair(tmp_path, sim, mongo_uri, mongo_database)
        # A's connection delivered all its tweets and A read them: a SIGKILL then loses nothing
        # in A's kernel buffers (TCP cannot give those back), only A's unstored spool backlog.
        wait_until(lambda: a.counters("stream").get("received", 0) >= PER_CONN, 60,
                   "A received its connection's tweets")
        assert b.counters("stream").get("attempts") == 0, "the standby opened a connection"
        killed_at = time.time()
        signal_all(a, signal.SIGKILL)
        a.proc.wait(10)  # type: ignore[union-attr]
        view = wait_role(b, "active", timeout=60)
        assert view["takeovers"] == 1
        takeover = b.wait_log("ha_takeover")
        assert takeover["previous_holder"] == ha_view(a)["instance"]
        assert takeover["lease_age"] >= LEASE  # never before A's lease could have expired
        # A returns: it stands by behind B, drains its own spool, and never connects.
        a.start()
        a.wait_ready()
        wait_role(a, "standby")
        wait_all_stored(mongo_uri, mongo_database, sim, conns=2)
        assert a.counters("stream").get("attempts") == 0, "the returning instance connected"
        assert ha_view(a)["holder"] == view["instance"], (ha_view(a), a.tail(60))
        stop_all(a, b)
    finally:
        for d in (a, b):
            if d is not None:
                d.kill()
        sim.stop()
    truth = sim.ground_truth()
    assert_never_two_at_once(truth)
    spans = open_intervals(truth)
    assert len(spans) == 2, spans  # A's, then B's: nobody else ever connected
    delay = spans[1][1] - killed_at
    bound = LEASE + 2 * renew_interval(LEASE) + FIRST_BACKOFF + 1.0  # + scheduling on 2 cores
    print(f"\n[figure] standby takeover after SIGKILL: B streaming {delay:.2f}s after the kill "
          f"(lease {LEASE}s, bound {bound:.2f}s)")
    assert delay <= bound
    ids, delivered = reconcile(mongo_uri, mongo_database, sim)
    print(f"[figure] delivered {len(delivered)} (2 connections), stored {len(ids)}, no duplicate")


def test_standby_sigstop_the_active_returns_as_standby_and_drains(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = sim_for(tmp_path)
    a = b = None
    try:
        a, b = start_pair(tmp_path, sim, mongo_uri, mongo_database)
        wait_until(lambda: a.counters("stream").get("received", 0) >= 100, 60, "A streaming")
        signal_all(a, signal.SIGSTOP)  # frozen mid-stream: its lease expires, B takes over
        try:
            wait_role(b, "active", timeout=60)
            wait_until(lambda: b.counters("stream").get("received", 0) >= 50, 60,
                       "B streaming")
            conns_before = len(sim.ground_truth().connections())
        finally:
            signal_all(a, signal.SIGCONT)
        wait_role(a, "standby")
        a.wait_log("stream_stood_down")
        wait_all_stored(mongo_uri, mongo_database, sim, conns=1)
        wait_until(lambda: ha_view(b).get("role") == "active"
                   and b.counters("stream").get("received", 0) >= PER_CONN, 60, "B's tweets")
        # A, back, stands by: it opened no connection after it woke up, B kept the lease.
        assert len(sim.ground_truth().connections()) == conns_before == 2
        assert ha_view(a)["holder"] == ha_view(b)["instance"]
        assert ha_view(b)["takeovers"] == 1
        stop_all(a, b)
    finally:
        for d in (a, b):
            if d is not None:
                d.kill()
        sim.stop()
    truth = sim.ground_truth()
    (a_conn, _, _), (b_conn, _, _) = open_intervals(truth)
    # A frozen cannot close its connection: B's newer one logs it out (code 7). B itself was
    # never logged out, and its connection ran until B stopped.
    kicked = {e["conn"] for e in truth.control("disconnect")}
    assert kicked <= {a_conn}, kicked
    assert not any(e["conn"] == b_conn and "disconnect" in str(e.get("reason"))
                   for e in truth.closes())
    assert len(truth.connections()) == 2  # nobody connected after B: not A once it woke
    ids, delivered = reconcile(mongo_uri, mongo_database, sim)
    a_ids = set(truth.tweet_ids(a_conn))
    print(f"\n[figure] SIGSTOP: A's connection delivered {len(a_ids)} (stored by A after it "
          f"woke), B's {len(delivered) - len(a_ids)}; stored {len(ids)}, no duplicate")


def test_single_mode_writes_no_lease(tmp_path: Path, mongo_uri: str,
                                     mongo_database: str) -> None:
    sim = sim_for(tmp_path)
    daemon = Daemon(tmp_path / "d", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        daemon.start().wait_ready()
        wait_all_stored(mongo_uri, mongo_database, sim, conns=1)
        assert ha_view(daemon) == {"mode": "single", "role": "single"}
        stop_all(daemon)
    finally:
        daemon.kill()
        sim.stop()
    assert lease_docs(mongo_uri, mongo_database) == []
    assert not [e for e in daemon.log_events()
                if str(e.get("event", "")).startswith(("lease_", "ha_"))]


# ---------------------------------------------------------------- redundant


def test_redundant_every_tweet_delivered_twice_stored_once(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = sim_for(tmp_path, "--redundant", "2")
    a = Daemon(tmp_path / "a", ha_doc(sim, mongo_uri, mongo_database, "redundant"))
    b = Daemon(tmp_path / "b", ha_doc(sim, mongo_uri, mongo_database, "redundant"))
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
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
