"""End to end: the real daemon process, the simulator and MongoDB over TCP, reconciled exactly.

The simulator's ground truth lists every message whose bytes it wrote; with a fixed number of
tweets per connection and a quiet stream afterwards, everything it wrote is read by the daemon, so
the reconciliation is exact: stored = delivered − deleted, nothing else in the collection.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pymongo
import pytest

from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import stored_ids
from tests.support.simulator import GroundTruthLog, SimProcess
from tests.support.wait import wait_until

TWEETS = 500


def delivered_messages(truth: GroundTruthLog) -> int:
    return len(truth.of("tweet")) + len(truth.of("control"))


def wait_caught_up(daemon: Daemon, sim: SimProcess, expected_tweets: int, timeout: float) -> int:
    """Until the simulator delivered its tweets and the store worker read every message."""
    def caught_up() -> int:
        daemon.assert_running()
        truth = sim.ground_truth()
        if len(truth.tweet_ids()) < expected_tweets:
            return 0
        sent = delivered_messages(truth)
        received = daemon.counters("stream").get("received")
        read = daemon.counters("store").get("records_read")
        return sent if received == sent == read else 0
    return wait_until(caught_up, timeout, "the daemon to read every delivered message")


@pytest.mark.parametrize("framing", ["newline+gzip", "length+plain"])
def test_every_delivered_tweet_is_stored_exactly_once(
    tmp_path: Path, mongo_uri: str, mongo_database: str, framing: str
) -> None:
    delimited = framing.startswith("length")
    sim = SimProcess(tmp_path / "sim", "--rate", "500", "--max-tweets", str(TWEETS),
                     "--control-every", "10", "--keepalive", "1", "--seed", "7").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database)
    doc["stream"].update(delimited=delimited, gzip=not delimited)
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        messages = wait_caught_up(daemon, sim, TWEETS, timeout=90)
        code, took = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    truth = sim.ground_truth()
    delivered, deleted = set(truth.tweet_ids()), set(truth.deleted_ids())
    ids = stored_ids(mongo_uri, mongo_database)
    store = daemon.counters("store")

    assert code == 0
    assert len(ids) == len(set(ids)), "a tweet was stored twice"
    assert set(ids) == delivered - deleted, "stored ≠ delivered − deleted"
    assert delivered & deleted, "the scenario should exercise deletes of stored tweets"
    # Every message is accounted for: stored, duplicate, dead-lettered, control, or skipped.
    accounted = (store["stored"] + store["duplicates"] + sum(store["deadlettered"].values())
                 + sum(store["control"].values()) + sum(store["skipped"].values()))
    assert accounted == store["records_read"] == messages
    # A tweet is either stored (and maybe deleted later) or, when its delete was already seen,
    # skipped; never both, never neither.
    assert store["stored"] + store["skipped"].get("deleted", 0) == len(delivered)
    print(f"\n[{framing}] delivered={len(delivered)} control={messages - len(delivered)} "
          f"deleted={len(delivered & deleted)} stored_now={len(ids)} "
          f"duplicates={store['duplicates']} deadlettered={sum(store['deadlettered'].values())} "
          f"stop={took:.2f}s")


def test_control_messages_never_become_documents(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    sim = SimProcess(tmp_path / "sim", "--rate", "400", "--max-tweets", "200",
                     "--control-every", "3", "--keepalive", "1", "--seed", "11").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database)).start()
    try:
        daemon.wait_ready()
        wait_caught_up(daemon, sim, 200, timeout=60)
        assert daemon.stop()[0] == 0
    finally:
        daemon.kill()
        sim.stop()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        col = client[mongo_database].tweets
        kinds = {str(ev.get("type")) for ev in sim.ground_truth().of("control")}
        assert {"delete", "limit", "scrub_geo"} <= kinds, kinds
        # Limit notices are logged once per logging.error_interval (10 s) and connection, each
        # line with the cumulative count so far and how many notices it stands for.
        notices = [ev for ev in sim.ground_truth().of("control") if ev.get("type") == "limit"]
        logged = daemon.events("stream_limit")
        assert 1 <= len(logged) < len(notices), (len(logged), len(notices))
        assert len(logged) + sum(e.get("repeated", 0) for e in logged) <= len(notices)
        for key in ("delete", "scrub_geo", "limit", "status_withheld", "user_withheld",
                    "disconnect", "warning"):
            assert col.count_documents({key: {"$exists": True}}) == 0, key
        assert col.count_documents({"user": {"$exists": False}}) == 0
        docs = list(col.find({}, {"created_at": 1, "_ingest": 1, "text": 1}))
        assert docs
        for d in docs:
            assert isinstance(d["created_at"], datetime)
            assert isinstance(d["_ingest"]["received_at"], datetime)
            # The simulator delivered it because it matched; our matcher must agree.
            assert d["_ingest"]["matched"]["track"], d["_id"]
    finally:
        client.close()


GEO_FIELDS = ("coordinates", "geo", "place")


def tweet_copies(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A stored tweet ("") and each copy of another tweet it carries, by path."""
    yield "", doc
    original, quoted = doc.get("retweeted_status"), doc.get("quoted_status")
    for path, copy in (("retweeted_status", original), ("quoted_status", quoted),
                       ("retweeted_status.quoted_status", (original or {}).get("quoted_status"))):
        if copy is not None:
            yield path, copy


def test_scrub_geo_reaches_every_stored_copy_of_the_users_tweets(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    # The analyst audit: a retweet or a quote of a scrubbed user's tweet kept that tweet's
    # coordinates, geo and place. Each scrub_geo the simulator delivered (one user, up to an id)
    # must leave none of them in any copy of that user's tweets, whether it was stored before the
    # notice or arrived after it; and every other copy keeps them (every tweet here has the keys).
    # One burst: the store worker reads it in large reads, shared with its encoder child.
    sim = SimProcess(tmp_path / "sim", "--rate", "0", "--max-tweets", "1500",
                     "--control-every", "2", "--keepalive", "1", "--seed", "5").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, writer={"encoder_process": True})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        wait_caught_up(daemon, sim, 1500, timeout=120)
        assert daemon.stop()[0] == 0
    finally:
        daemon.kill()
        sim.stop()
    up_to: dict[int, int] = {}
    for notice in sim.ground_truth().control("scrub_geo"):
        user = notice["user_id"]
        up_to[user] = max(up_to.get(user, 0), notice["up_to_status_id"])
    assert daemon.counters("store")["offloaded"] > 0, "the encoder child took part"
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    scrubbed: list[str] = []
    try:
        for stored in client[mongo_database].tweets.find():
            for path, copy in tweet_copies(stored):
                if copy["id"] <= up_to.get(copy["user"]["id"], 0):
                    assert not set(GEO_FIELDS) & set(copy), (stored["_id"], path)
                    scrubbed.append(path)
                else:
                    assert set(GEO_FIELDS) <= set(copy), (stored["_id"], path)
    finally:
        client.close()
    assert "" in scrubbed and {"retweeted_status", "quoted_status"} & set(scrubbed), scrubbed


def test_sigterm_on_a_silent_stream_exits_promptly(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    # One tweet, then a stream that sends nothing at all (not even keep-alives) for minutes.
    sim = SimProcess(tmp_path / "sim", "--rate", "50", "--keepalive", "600",
                     script=[[{"deliver": 1}, {"stall": 600}]]).start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database)).start()
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored") == 1, 30, "the one tweet")
        code, took = daemon.stop(sig=signal.SIGTERM)
    finally:
        daemon.kill()
        sim.stop()
    assert code == 0
    assert took < 2.0, f"stop took {took:.2f}s on a silent stream"
