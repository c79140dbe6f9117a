"""What the operator sees when MongoDB misbehaves: the real daemon through a fault-injecting proxy.

The daemon writes to ``tests.support.mongo_proxy.MongoProxy`` in front of the test server; the
proxy answers writes the way a replica set does during an election or a replication stall. Every
test reconciles the daemon's counters against the simulator's ground truth and the collection:
delivered = stored (= documents in the collection) + duplicates + dead-lettered + dropped.
"""

from __future__ import annotations

import itertools
import signal
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pymongo
import pytest
from pymongo.errors import OperationFailure

from ingestd.control.collector import in_flight, received_total
from ingestd.control.status import collect, render
from ingestd.sink.mongo import INDEXES
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.mongo import stored_ids, write_target
from tests.support.mongo_proxy import CREATE_INDEXES, INSERTS, MongoProxy
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

TWEETS = 60


@pytest.fixture
def proxy(mongo_uri: str) -> Iterator[MongoProxy]:
    with MongoProxy(write_target(mongo_uri)) as running:
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
    # Inserts: the lines of a batch's write (a fresh archive's first write is its coverage gap).
    proxy.fail_writes(1, code=10107, commands=INSERTS)
    proxy.write_concern_error(1, code=64, commands=INSERTS)
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


def test_failover_longer_than_the_slow_threshold_warns_once_for_each_write_that_waited(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    threshold, window = 1.5, 4.0
    script = [[{"deliver": 400}, {"keepalive_only": 120}]]
    sim, daemon = start(tmp_path, proxy, mongo_database, script,
                        mongo={"slow_write_seconds": threshold})
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 40, 60, "first tweets")
        # At an insert: a failover at any moment may catch a coverage-ledger write instead.
        proxy.failover_at_next_insert(window)
        wait_until(lambda: settled(daemon, 400), 90, "all tweets resolved after the failover")
    finally:
        finish(daemon, sim)
    assert proxy.count("failover") == 1
    slow = daemon.events("mongo_write_slow")
    # The batch's insert waited through the failover: one warning for it. When its first attempt
    # fails fast, the retrier's back-off ticks, and the spool checkpoint written there needs the
    # coverage ledger's write first, which waits through the same outage (seen in 1 of ~10
    # runs): a second write that took that long, with its own warning. Nothing else was slow.
    ops = [w["op"] for w in slow]
    assert ops.count("insert") == 1, slow
    assert all(op == "insert" or op.startswith("coverage ") for op in ops), slow
    assert len(set(ops)) == len(ops), slow  # one warning per write, not per attempt
    (warning,) = [w for w in slow if w["op"] == "insert"]
    for each in slow:
        assert each["level"] == "warning" and threshold <= each["seconds"] < 30, each
        assert each["outcome"] == "ok", each  # the proxy reset it before the server saw it
    # The insert's causes are what pymongo saw: a command that failed on the reset connection, a
    # pool cleared or a server that went Unknown, with the socket error.
    causes = " | ".join(warning["causes"])
    assert "Unknown" in causes or "pool cleared" in causes or "failed on" in causes, causes
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["slow_writes"] == len(slow)  # each warning counted once
    hist = daemon.status("store")["hist"]["insert_seconds"]
    fast = sum(c for b, c in zip(hist["buckets"], hist["counts"], strict=False) if b <= 1.0)
    assert hist["count"] - fast >= 1, "the slow batch is in a bucket above 1 s"
    print(f"\n[failover {window}s] slow warnings {ops}, the insert's after {warning['seconds']}s, "
          f"causes: {causes}")


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


# ---------------------------------------------------------------- issue 14: every error on the wire


@pytest.mark.parametrize(("code", "name"), [
    (189, "PrimarySteppedDown"),
    (11602, "InterruptedDueToReplStateChange"),
    (91, "ShutdownInProgress"),
])
def test_replica_set_state_change_errors_are_retried_and_stored_once(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str,
        code: int, name: str) -> None:
    # What a primary answers while it steps down, is interrupted by an election, or shuts down:
    # the write was not applied; retrying (with back-off) is right, and nothing is dead-lettered.
    proxy.fail_writes(2, code=code)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database)
    try:
        proxy.wait_applied("command_error", 2)
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    failed = daemon.events("mongo_write_failed", code=code)
    # pymongo retries a retryable write once by itself (replica set): 1 or 2 lines, never 0.
    assert 1 <= len(failed) <= 2, daemon.events("mongo_write_failed")
    for line in failed:
        assert line["codeName"] == name and line["error_class"] == "transient", line
        assert line["error"] == "NotPrimaryError", line
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["stored"] == TWEETS and store["duplicates"] == 0
    assert sum(store["deadlettered"].values()) == 0
    assert store["state"] == "stopped"
    print(f"\n[{code} {name}] failed lines={len(failed)} retries={store['retries']} "
          f"stored={store['stored']}")


@pytest.mark.parametrize(("code", "name", "error_class", "state"), [
    (64, "WriteConcernFailed", "transient", "degraded: mongo unavailable"),
    (100, "UnsatisfiableWriteConcern", "fatal_config", "degraded: mongo rejects our configuration"),
], ids=["wce64-replication-timeout", "wce100-unsatisfiable"])
def test_write_concern_error_degrades_loudly_and_counts_nothing_until_confirmed(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str,
        code: int, name: str, error_class: str, state: str) -> None:
    # The primary applied the batch but could not confirm the write concern: 64, replication
    # too slow (retried with back-off); 100, a write concern the deployment can never satisfy
    # (w above its members: the operator must act; retried at the cap). Until a write is
    # confirmed, the daemon says so (state, error line with the code) and counts nothing stored.
    proxy.write_concern_error(10_000, code=code, err_info={
        "writeConcern": {"w": 5, "provenance": "clientSupplied"}}, commands=INSERTS)
    # error_interval 0: every attempt's own line is looked at (repeats would fold, same error).
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database,
                                    writer={"retry_cap": 1.0}, logging={"error_interval": 0})
    try:
        degraded = wait_until(
            lambda: (s := daemon.counters("store")).get("state", "").startswith("degraded")
            and s, 60, f"store degraded by writeConcernError {code}")
        applied_by_primary = len(stored_ids(mongo_uri, mongo_database))
        proxy.wait_applied("write_concern_error", 3)  # retried: still refused, still said
        proxy.pass_through()  # replication catches up / the operator fixes the replica set
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    assert degraded["state"].startswith(state), degraded
    assert f"writeConcernError {code} {name}" in degraded["state"], degraded
    assert degraded["stored"] == 0 < applied_by_primary, \
        "a batch with a write-concern error is never counted as stored at that moment"
    failed = daemon.events("mongo_write_failed")
    assert len(failed) >= 3, failed
    assert all(e["error_class"] == error_class and e["level"] == "error" for e in failed), failed
    assert all(e["writeConcernErrors"][0]["code"] == code for e in failed), failed
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert sum(store["deadlettered"].values()) == 0, "a server-side problem dead-letters nothing"
    assert store["stored"] == TWEETS and store["duplicates"] == 0
    print(f"\n[wce {code}] degraded: {degraded['state']!r} with stored=0 while the primary held "
          f"{applied_by_primary}; after the fix stored={store['stored']} "
          f"retries={store['retries']} error lines={len(failed)}")


def test_reply_held_past_timeout_ms_is_retried_and_stored_once(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    # A primary that applies the insert and answers 30 s later: the client gives up at
    # mongo.timeout_ms (small here), retries, and finds the batch's own documents.
    proxy.delay_writes(30.0, count=1)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database,
                                    mongo={"timeout_ms": 2000})
    try:
        proxy.wait_applied("delay", 1)
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    failed = daemon.events("mongo_write_failed")
    timeouts = [e for e in failed if "timed out" in e.get("errmsg", "")]
    assert timeouts and timeouts[0]["error_class"] == "transient", failed
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["stored"] == TWEETS and store["duplicates"] == 0
    assert store["retries"] >= 1
    print(f"\n[30 s reply, timeout_ms 2000] {timeouts[0]}; stored={store['stored']} "
          f"retries={store['retries']}")


# ---------------------------------------------------------------- issue 14: the write concern


def test_write_concern_in_force_is_logged_once_per_client_and_after_a_reload_changing_it(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database)
    try:
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
        (first,) = daemon.events("mongo_write_concern")
        doc = dict(daemon.doc)
        doc["writer"] = {**doc["writer"], "flush_interval": 0.3}  # not a new client
        daemon.write_settings_atomically(doc)
        daemon.send(signal.SIGHUP)
        daemon.wait_generation("store", 2)
        unchanged = daemon.events("mongo_write_concern")
        doc = dict(daemon.doc)
        doc["mongo"] = {**doc["mongo"], "write_concern": {"w": 1, "j": False}}
        daemon.write_settings_atomically(doc)
        daemon.send(signal.SIGHUP)
        changed = daemon.wait_log("mongo_write_concern", w=1)
    finally:
        finish(daemon, sim)
    assert (first["w"], first["j"], first["wtimeout"]) == ("majority", True, "none")
    assert first["timeout_ms"] == 10000 and first["level"] == "info"
    assert unchanged == [first], "a reload that keeps the client logs nothing new"
    assert changed["j"] is False
    assert len(daemon.events("mongo_write_concern")) == 2


# ---------------------------------------------------------------- what the status says


def test_mongodb_unreachable_status_says_what_the_driver_met(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    """No server reply, no code: the status named only the exception
    (``mongo unavailable (ServerSelectionTimeoutError)``) whether the host refused, reset, did
    not resolve or had no primary. Now pymongo's cause, without its timeouts and topology."""
    script = [[{"deliver": TWEETS}, {"keepalive_only": 120}]]
    # 10 tweets/s: tweets still arrive after MongoDB goes down, for 6 s (at 100/s all 60
    # could be stored before it did, and an idle store worker, writing nothing, has nothing to
    # fail)
    sim, daemon = start(tmp_path, proxy, mongo_database, script, "--rate", "10",
                        mongo={"timeout_ms": 2000}, writer={"retry_cap": 1.0})
    try:
        daemon.wait_ready()
        proxy.failover(600)  # every connection reset, new ones too: MongoDB down
        degraded = wait_until(
            lambda: (s := daemon.status("store")).get("state", "").startswith("degraded")
            and s, 60, "store degraded")
        text = render(collect(daemon.state_dir))
        proxy.pass_through()
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    state = degraded["state"]
    # AutoReconnect or ServerSelectionTimeoutError, depending on where the reset met the write
    assert state.startswith("degraded: mongo unavailable ("), state
    assert f"Error (127.0.0.1:{proxy.port}: " in state or \
        f"AutoReconnect (127.0.0.1:{proxy.port}: " in state, state
    assert "Connection reset by peer" in state or "connection closed" in state, state
    assert "Topology Description" not in state and "configured timeouts" not in state, state
    assert f"127.0.0.1:{proxy.port}: " in text
    reconcile(daemon, sim, mongo_uri, mongo_database)


# ---------------------------------------------------------------- a user without a privilege


def test_a_user_without_the_insert_privilege_is_told_so_and_stored_once_granted(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    """A user whose roles lack ``insert`` on the collection (13 Unauthorized): status names the
    privilege and the namespace, not a bare code; retried at the cap (no spin), nothing
    dead-lettered; once granted, every tweet is stored once."""
    proxy.fail_writes(10_000, code=13, commands=INSERTS)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database,
                                    writer={"retry_cap": 1.0})
    want = f"the user lacks the insert privilege on {mongo_database}.tweets"
    try:
        degraded = wait_until(
            lambda: (s := daemon.status("store")).get("state", "").startswith("degraded")
            and s, 60, "store degraded by Unauthorized")
        proxy.wait_applied("command_error", 3)  # retried: still refused, still said
        view = collect(daemon.state_dir)
        proxy.pass_through()  # the operator grants the role
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    assert degraded["state"] == ("degraded: mongo rejects our configuration "
                                 f"({want}: OperationFailure 13 Unauthorized)"), degraded
    assert view["health"] == "degraded" and want in view["reasons"][0], view["reasons"]
    assert f"insert: {want}" in render(view)
    failed = daemon.events("mongo_write_failed")
    assert failed and all(e["error_class"] == "fatal_config" and e["missing_privilege"] == want
                          for e in failed), failed
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["stored"] == TWEETS and sum(store["deadlettered"].values()) == 0


def test_indexes_the_user_may_not_create_are_named_in_status_and_tweets_still_stored(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    """A role without ``createIndex``: tweets are stored, but the analysts' indexes and the
    tombstones' TTL are missing. Before, status said ``ok`` and no metric moved: only
    ``index_create_failed`` lines with a bare code."""
    proxy.fail_writes(10_000, code=13, commands=CREATE_INDEXES)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database)
    try:
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
        view = wait_until(lambda: (v := collect(daemon.state_dir))["health"] != "ok" and v, 30,
                          "status says what is missing")
        text = render(view)
    finally:
        finish(daemon, sim)
    expected = len(INDEXES) + 1  # the analysts' and the tombstones' TTL
    assert view["health"] == "degraded", view
    (reason,) = view["reasons"]
    assert reason.startswith(f"store: {expected} indexes missing ("), reason
    assert reason.endswith(f"the user lacks the createIndex privilege on {mongo_database}.tweets"
                           ": OperationFailure 13 Unauthorized"), reason
    assert f"{expected} indexes missing" in text and "journal: index_create_failed" in text
    failed = daemon.events("index_create_failed")
    assert len(failed) == expected and all(e["code"] == 13 for e in failed), failed
    assert {e["missing_privilege"] for e in failed} == {
        f"the user lacks the createIndex privilege on {mongo_database}.{coll}"
        for coll in ("tweets", "tweets_deleted")}
    store = reconcile(daemon, sim, mongo_uri, mongo_database)
    assert store["stored"] == TWEETS and store["index_failures"] == expected


# ---------------------------------------------------------------- issue 14: sharded clusters


def test_second_start_on_the_same_database_recreates_no_index_and_fails_none(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    # create_index with a spec that exists is a no-op: a restart (or a second daemon on a
    # sharded collection whose indexes an operator made first) must start cleanly.
    truths, stores = [], []
    for run in ("first", "second"):
        sim, daemon = run_until_settled(tmp_path / run, proxy, mongo_uri, mongo_database)
        try:
            wait_until(lambda d=daemon: settled(d, TWEETS), 60, f"{run} run resolved")
        finally:
            finish(daemon, sim)
        assert daemon.events("index_create_failed") == [], run
        truths.append(set(sim.ground_truth().tweet_ids()))
        stores.append(daemon.counters("store"))
        if run == "first":
            indexes = index_keys(mongo_uri, mongo_database)
    assert index_keys(mongo_uri, mongo_database) == indexes
    assert len(indexes) == len(INDEXES) + 1  # the analysts' indexes and _id's
    ids = stored_ids(mongo_uri, mongo_database)
    assert len(ids) == len(set(ids)) and set(ids) == truths[0] | truths[1]
    assert [s["stored"] for s in stores] == [len(t) for t in truths]


def test_a_hashed_id_index_made_for_sharding_does_not_break_startup(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    # What an operator runs before sharding the collection on {_id: "hashed"} (README).
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        if not hashed_id_index_works(client[mongo_database]):
            pytest.skip("this server cannot write to a collection with a hashed _id index "
                        "(nx-27017 answers code 8 'JSON path error'); run against a real mongod "
                        "with INGESTD_TEST_MONGO_URI")
        client[mongo_database].tweets.create_index([("_id", pymongo.HASHED)])
    finally:
        client.close()
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database)
    try:
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
    finally:
        finish(daemon, sim)
    assert daemon.events("index_create_failed") == []
    assert ("_id", "hashed") in [key for keys in index_keys(mongo_uri, mongo_database)
                                 for key in keys]
    reconcile(daemon, sim, mongo_uri, mongo_database)


def hashed_id_index_works(db: Any) -> bool:
    """Whether ``db``'s server can hold a hashed ``_id`` index and still insert (a scratch one)."""
    try:
        db.hashed_probe.create_index([("_id", pymongo.HASHED)])
        db.hashed_probe.insert_one({"_id": 1})
    except OperationFailure:
        return False
    finally:
        db.drop_collection("hashed_probe")
    return True


def index_keys(uri: str, database: str) -> list[tuple[tuple[str, Any], ...]]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    try:
        info = client[database].tweets.index_information()
    finally:
        client.close()
    return sorted(tuple((str(k), v) for k, v in spec["key"]) for spec in info.values())


# ---------------------------------------------------------------- folding repeated errors


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): MongoDB is down there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_repeated_write_failures_fold_by_what_the_error_is_with_a_count(
        tmp_path: Path, mongo_database: str) -> None:
    """MongoDB down: each attempt's line differs in ``retries`` and in the timings inside
    ``errmsg``, yet it is the same error: one line per ``logging.error_interval`` for each
    operation and error, the next one saying how many were folded into it."""
    interval = 2.0
    sim = SimProcess(tmp_path / "sim", "--rate", "20", "--keepalive", "1", "--control-every",
                     "0").start()
    uri = f"mongodb://127.0.0.1:{closed_port()}/?directConnection=true"
    doc = settings_doc(sim.url, uri, mongo_database, mongo={"timeout_ms": 200},
                       writer={"retry_start": 0.05, "retry_cap": 0.2},
                       logging={"error_interval": interval})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        def folded() -> list[dict[str, Any]]:
            daemon.assert_running()
            return [e for e in daemon.events("mongo_write_failed") if e.get("repeated")]
        first = wait_until(folded, 30, "a mongo_write_failed line with a folded count")[0]
        failed = daemon.events("mongo_write_failed")
    finally:
        daemon.kill()
        sim.stop()
    same = [e for e in failed if (e["op"], e["error"]) == (first["op"], first["error"])]
    assert first["error"] == "ServerSelectionTimeoutError", first
    assert len({e["errmsg"] for e in same}) > 1, "the message changes at every attempt"
    assert first["repeated"] >= 2, first  # attempts every ~0.25 s for 2 s
    assert first["retries"] > same[0]["retries"] + first["repeated"] - 1
    times = [datetime.fromisoformat(str(e["timestamp"])).timestamp() for e in same]
    assert all(b - a >= interval - 0.1 for a, b in itertools.pairwise(times)), times
    print(f"\n[figure] MongoDB down, error_interval {interval:g}s: {len(same)} lines for "
          f"{first['op']} {first['error']}, the second folding {first['repeated']}")


def test_status_dates_a_past_mongo_error_and_says_it_is_past(
        tmp_path: Path, proxy: MongoProxy, mongo_uri: str, mongo_database: str) -> None:
    """An error the store retried through stays in ``status`` (the cause of a recent outage),
    dated and marked past: the operator must not chase it as a present one."""
    proxy.fail_writes(1, code=10107, commands=INSERTS)
    sim, daemon = run_until_settled(tmp_path, proxy, mongo_uri, mongo_database)
    try:
        proxy.wait_applied("command_error", 1)
        wait_until(lambda: settled(daemon, TWEETS), 60, f"{TWEETS} tweets resolved")
        store = daemon.status("store")
        assert store["state"] == "running" and store["last_error"].startswith("insert: ")
        logged = daemon.events("mongo_write_failed")[0]["timestamp"]
        (line,) = [ln for ln in render(collect(daemon.state_dir)).splitlines()
                   if ln.startswith("  last error")]
    finally:
        finish(daemon, sim)
    when, rest = line.removeprefix("  last error  ").split(" ", 1)
    assert rest == f"{store['last_error']} (past: the store is running since)"
    failed_at = datetime.fromisoformat(logged.replace("Z", "+00:00")).timestamp()
    assert abs(datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp() - failed_at) <= 1


def test_an_srv_name_that_does_not_resolve_degrades_the_store_worker_and_crashes_nothing(
        tmp_path: Path) -> None:
    """A ``mongodb+srv`` name that DNS does not answer (not up yet at boot, or mistyped) is a
    failed write, retried and said, while the stream goes on into the spool. Before, the store
    worker's MongoClient resolved it at construction: an uncaught ConfigurationError, a crash
    loop, and the daemon stopped."""
    sim = SimProcess(tmp_path / "sim", "--rate", "100", "--keepalive", "1", "--control-every",
                     "0", "--seed", "17").start()
    # stop_timeout 3: the stop comes with MongoDB unreachable, so the store worker's drain can
    # only wait out its budget (10 s by default), whose length is no part of this test.
    doc = settings_doc(sim.url, "mongodb+srv://ingestd-test.invalid/", "srv_unresolved",
                       writer={"retry_cap": 1.0}, logging={"error_interval": 0},
                       control={"stop_timeout": 3})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        degraded = wait_until(
            lambda: (s := daemon.counters("store")).get("state", "").startswith("degraded")
            and s, 60, "the store worker degraded by the unresolved name")
        wait_until(lambda: len(daemon.events("mongo_write_failed")) >= 3, 60, "three retries")
        wait_until(lambda: daemon.counters("stream").get("received", 0) >= 100, 60,
                   "the stream spooling meanwhile")
        text = render(collect(daemon.state_dir))
        code, _ = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    assert "ConfigurationError" in degraded["state"], degraded
    failed = daemon.events("mongo_write_failed")
    assert all("does not exist" in e.get("errmsg", e.get("error", "")) for e in failed), failed
    assert not [e for e in daemon.events("worker_exited", role="store")
                if not e["requested"]], "the store worker died"
    assert not daemon.events("uncaught_exception")
    assert "degraded" in text.splitlines()[0], text
    print(f"\n[srv unresolved] {degraded['state']!r}; {len(failed)} failed attempts, "
          f"{daemon.counters('stream')['received']} spooled; stop exit {code}")
