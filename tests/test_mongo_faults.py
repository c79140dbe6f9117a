"""What the operator sees when MongoDB misbehaves: the real daemon through a fault-injecting proxy.

The daemon writes to ``tests.support.mongo_proxy.MongoProxy`` in front of the test server; the
proxy answers writes the way a replica set does during an election or a replication stall. Every
test reconciles the daemon's counters against the simulator's ground truth and the collection:
delivered = stored (= documents in the collection) + duplicates + dead-lettered + dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo.uri_parser import parse_uri

from ingestd.control.collector import in_flight, received_total
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.mongo import stored_ids
from tests.support.mongo_proxy import MongoProxy
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

TWEETS = 60


@pytest.fixture
def proxy(mongo_uri: str) -> Iterator[MongoProxy]:
    host, port = parse_uri(mongo_uri)["nodelist"][0]
    with MongoProxy((host, port)) as running:
        yield running


def start(tmp_path: Path, proxy: MongoProxy, db: str, script: list[list[dict[str, Any]]],
          *sim_args: str, **sections: Any) -> tuple[SimProcess, Daemon]:
    # No control messages: a delete's writes would take faults meant for the tweets' inserts.
    sim = SimProcess(tmp_path / "sim", "--rate", "100", "--keepalive", "1", "--control-every",
                     "0", *sim_args, script=script).start()
    doc = settings_doc(sim.url, proxy.uri, db, **sections)
    return sim, Daemon(tmp_path / "daemon", doc).start()


def settled(daemon: Daemon, tweets: int) -> bool:
    """Every received message is resolved, and at least ``tweets`` tweets are stored."""
    daemon.assert_running()
    stream, store = daemon.counters("stream"), daemon.counters("store")
    if not stream or not store:
        return False
    return bool(store["records_read"] == stream["received"] and store["pending"] == 0
                and store["stored"] + store["duplicates"] >= tweets)


def reconcile(daemon: Daemon, sim: SimProcess, mongo_uri: str, db: str) -> dict[str, Any]:
    """The counters against ground truth and the collection; returns the store counters."""
    stream, store = daemon.counters("stream"), daemon.counters("store")
    delivered = sim.ground_truth().tweet_ids()
    ids = stored_ids(mongo_uri, db)
    assert len(ids) == len(set(ids))
    assert set(ids) == set(delivered), "every delivered tweet stored"
    assert store["stored"] == len(ids), "stored_total equals the documents in the collection"
    dropped = sum(stream["dropped"].values())
    resolved = (store["stored"] + store["duplicates"] + sum(store["deadlettered"].values())
                + sum(store["control"].values()) + sum(store["skipped"].values()))
    assert received_total(stream) == resolved + dropped + in_flight(daemon.status("stream"),
                                                                    store)
    assert in_flight(daemon.status("stream"), store) == 0
    return store


def run_until_settled(tmp_path: Path, proxy: MongoProxy, mongo_uri: str, db: str,
                      **sections: Any) -> tuple[SimProcess, Daemon]:
    script = [[{"deliver": TWEETS}, {"keepalive_only": 120}]]
    sim, daemon = start(tmp_path, proxy, db, script, **sections)
    daemon.wait_ready()
    return sim, daemon


# ---------------------------------------------------------------- issue 19, point 5


def test_mongo_error_lines_carry_the_servers_code_name_message_and_errinfo(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    proxy.fail_writes(1, code=10107)
    proxy.write_concern_error(1, code=64)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database)
    try:
        proxy.wait_applied("write_concern_error", 1)
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    failed = daemon.events("mongo_write_failed")
    not_primary = [e for e in failed if e.get("code") == 10107]
    assert len(not_primary) == 1, failed
    assert not_primary[0]["codeName"] == "NotWritablePrimary"
    assert not_primary[0]["errmsg"] == "not primary"
    assert not_primary[0]["error"] == "NotPrimaryError"
    wce = [e for e in failed if e.get("writeConcernErrors")]
    assert len(wce) == 1, failed
    (server_said,) = wce[0]["writeConcernErrors"]
    assert server_said["code"] == 64 and server_said["codeName"] == "WriteConcernFailed"
    assert server_said["errmsg"] == "waiting for replication timed out"
    assert server_said["errInfo"] == {
        "wtimeout": True, "writeConcern": {"w": 2, "wtimeout": 100, "provenance": "clientSupplied"}}
    assert wce[0]["writeErrors"] == [] and wce[0]["nInserted"] > 0
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["duplicates"] == 0
    print(f"\n[error lines] 10107: {not_primary[0]}\n[error lines] 64: {wce[0]}")


# ---------------------------------------------------------------- issue 19, point 7


def test_write_concern_error_retry_counts_the_documents_it_stored_as_stored(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    proxy.write_concern_error(3, code=64)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database)
    try:
        proxy.wait_applied("write_concern_error", 3)
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["duplicates"] == 0, "the retry found its own documents: stored, not duplicates"
    assert store["stored"] == TWEETS
    assert store["retries"] >= 3
    print(f"\n[wce retry] stored={store['stored']} duplicates={store['duplicates']} "
          f"retries={store['retries']}")


def test_reply_lost_mid_write_is_stored_once_and_counted_once(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    # The server applied the insert; the client never got the answer: the same path as a
    # writeConcernError for the accounting (the retry finds the batch's own documents).
    proxy.reset_mid_reply(1)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database)
    try:
        proxy.wait_applied("reset_mid_reply", 1)
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["duplicates"] == 0 and store["stored"] == TWEETS
    assert any(e.get("error") == "AutoReconnect" for e in daemon.events("mongo_write_failed"))


# ---------------------------------------------------------------- issue 19, point 6


def test_failover_longer_than_the_slow_threshold_gives_one_warning_and_one_count(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    threshold, window = 1.5, 4.0
    script = [[{"deliver": 400}, {"keepalive_only": 120}]]
    sim, daemon = start(tmp_path, proxy, mongo_database, script,
                        mongo={"slow_write_seconds": threshold})
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 40, 60, "first tweets")
        proxy.failover(window)
        wait_until(lambda: settled(daemon, 400), 90, "all tweets resolved after the failover")
    finally:
        finish(daemon, sim)
    assert proxy.count("failover") == 1
    slow = daemon.events("mongo_write_slow")
    assert len(slow) == 1, slow
    (warning,) = slow
    assert warning["level"] == "warning"
    assert warning["op"] == "insert" and warning["outcome"] == "ok"
    assert threshold <= warning["seconds"] < 30
    # The causes are what pymongo saw: a command that failed on the reset connection, a pool
    # cleared or a server that went Unknown, with the socket error.
    causes = " | ".join(warning["causes"])
    assert "Unknown" in causes or "pool cleared" in causes or "failed on" in causes, causes
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["slow_writes"] == 1
    hist = daemon.status("store")["hist"]["insert_seconds"]
    fast = sum(c for b, c in zip(hist["buckets"], hist["counts"], strict=False) if b <= 1.0)
    assert hist["count"] - fast >= 1, "the slow batch is in a bucket above 1 s"
    print(f"\n[failover {window}s] slow warning after {warning['seconds']}s, causes: {causes}")


def test_writes_faster_than_the_threshold_are_not_reported_slow(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    proxy.delay_writes(0.5, count=2)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database,
                                    mongo={"slow_write_seconds": 2.0})
    try:
        proxy.wait_applied("delay", 2)
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    assert daemon.events("mongo_write_slow") == []
    assert reconcile(daemon, sim, mongo_uri, mongo_database)["slow_writes"] == 0


# ---------------------------------------------------------------- issue 19, point 11


def test_retired_server_selection_key_is_named_in_a_warning_and_the_daemon_runs(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database,
                                    mongo={"server_selection_timeout_ms": 500})
    try:
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    (notice,) = daemon.events("settings_key_ignored")
    assert notice["level"] == "warning"
    assert str(daemon.config) in notice["detail"]
    assert "mongo.server_selection_timeout_ms" in notice["detail"]
    assert "mongo.timeout_ms" in notice["detail"]
    reconcile(daemon, sim, mongo_uri, mongo_database)
