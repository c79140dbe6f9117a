"""X API v2 end to end: the real daemon, the simulator's v2 routes and MongoDB, reconciled.

The simulator's firehose publishes tweets for the app's rules whether or not a stream is
connected; its ground truth says which were written to a connection (``tweet``) and which were
published while none could take them (``missed``). So "nothing lost" is checkable: no ``missed``
events, and every delivered id stored exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import itertools
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pymongo
import pytest
import yaml

from ingestd.config.settings import load_settings_text
from ingestd.control.collector import RunStateCollector
from ingestd.documents.messages import TWITTER_EPOCH_MS
from ingestd.source.connection import open_connection
from ingestd.source.stream_reader import StreamReader
from tests.support.counters import resolved
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.simulator import GroundTruthLog, SimProcess
from tests.support.wait import wait_until

TOKEN = "AAAAAAAAAAAAAAAAAAAAAv2-e2e-token-ingestd-tests"
ENV = {"TWITTER_BEARER_TOKEN": TOKEN}
RULES = [{"value": "coffee OR music", "tag": "drinks"}, {"value": "rain -sunny", "tag": "weather"}]


def v2_doc(sim: SimProcess, mongo_uri: str, db: str, rules: list[dict[str, Any]],
           **stream: Any) -> dict[str, Any]:
    doc = settings_doc(f"http://127.0.0.1:{sim.port}/2/tweets/search/stream", mongo_uri, db)
    del doc["stream"]["track"]
    doc["stream"].update({"api": "v2", "rules": rules, "read_timeout": 10, **stream})
    doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
    return doc


def start(tmp_path: Path, mongo_uri: str, db: str, *sim_args: str,
          script: list[list[dict[str, Any]]] | None = None, rules: list[dict[str, Any]] = RULES,
          **stream: Any) -> tuple[SimProcess, Daemon]:
    sim = SimProcess(tmp_path / "sim", "--keepalive", "1", "--seed", "5", *sim_args,
                     script=script, env=ENV).start()
    daemon = Daemon(tmp_path / "daemon", v2_doc(sim, mongo_uri, db, rules, **stream))
    daemon.start(extra_env=ENV)
    return sim, daemon


def stored(mongo_uri: str, db: str, projection: dict[str, int] | None = None
           ) -> list[dict[str, Any]]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        return list(client[db].tweets.find({}, projection or {"_id": 1}))
    finally:
        client.close()


def stream_connects(truth: GroundTruthLog) -> list[dict[str, Any]]:
    return [e for e in truth.connections() if e.get("api") == "v2"]


def settled(daemon: Daemon, sim: SimProcess, published: int) -> bool:
    """The firehose published everything, and the store worker read all the daemon received."""
    daemon.assert_running()
    truth = sim.ground_truth()
    written = set(truth.tweet_ids()) | {e["id"] for e in truth.of("missed")}
    stream, store = daemon.counters("stream"), daemon.counters("store")
    if len(written) < published or not stream or not store:
        return False
    seen = store["stored"] + store["duplicates"]
    return bool(store["records_read"] == stream["received"]
                and seen >= len(set(truth.tweet_ids())))


# ---------------------------------------------------------------- reconciliation


def test_v2_every_delivered_tweet_is_stored_once_with_its_rules(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    # Connection 1 ends with an operational-disconnect; the daemon reconnects and goes on.
    total = 600
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "300",
                        "--max-tweets", str(total),
                        script=[[{"deliver": 150}, {"disconnect": 1}]])
    try:
        daemon.wait_ready()
        wait_until(lambda: settled(daemon, sim, total), 90, "every published tweet")
        stream, store = daemon.counters("stream"), daemon.counters("store")
    finally:
        finish(daemon, sim)
    truth = sim.ground_truth()
    delivered = set(truth.tweet_ids())
    docs = stored(mongo_uri, mongo_database, {"_id": 1, "created_at": 1, "matching_rules": 1,
                                              "includes": 1, "_ingest": 1, "text": 1})
    ids = [d["_id"] for d in docs]
    assert len(ids) == len(set(ids)), "a tweet was stored twice"
    assert set(ids) == delivered
    assert resolved(store) == store["records_read"] == stream["received"]
    assert store["stored"] + store["duplicates"] == len(truth.tweet_ids())
    assert store["control"] == {"v2_error": 1}
    assert stream["disconnect_codes"] == {"operational-disconnect": 1}
    assert [c["status"] for c in stream_connects(truth)] == [200, 200]
    tags = {r["id"]: r.get("tag") for e in truth.of("rules") for r in e["rules"]}
    for d in docs:
        assert isinstance(d["_id"], int) and isinstance(d["created_at"], datetime)
        assert d["matching_rules"] and d["includes"]["users"]
        assert d["_ingest"]["matched"]["rules"] == [r["id"] for r in d["matching_rules"]]
        assert d["_ingest"]["matched"]["tags"] == [tags[r["id"]] for r in d["matching_rules"]]
        assert isinstance(d["_ingest"]["received_at"], datetime)
    # The analyst audit: a v2 collection got only the v1.1 indexes (user.id, matched.track...),
    # so "by author" and "by rule" over the archive scanned it. Queried as the cookbook says.
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        tweets = client[mongo_database].tweets
        keys = [list(dict(i["key"])) for i in tweets.index_information().values()]
        author = tweets.find_one({}, {"author_id": 1})
        assert author is not None and isinstance(author["author_id"], str), "as delivered"
        by_author = tweets.count_documents({"author_id": author["author_id"]})
    finally:
        client.close()
    for key in (["author_id", "created_at"], ["_ingest.matched.rules", "created_at"],
                ["_ingest.matched.tags", "created_at"]):
        assert key in keys, f"no index on {key}"
    assert by_author >= 1
    missed = {e["id"] for e in truth.of("missed")}
    print(f"\n[v2 reconcile] published={len(delivered | missed)} delivered={len(delivered)} "
          f"stored={len(ids)} duplicates={store['duplicates']} "
          f"deadlettered={sum(store['deadlettered'].values())} "
          f"missed_in_reconnect_gap={len(missed)}")


# ---------------------------------------------------------------- redundant connections


def test_redundant_v2_instances_both_stream_and_each_stores_every_tweet(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    # --redundant 2 (v2 Enterprise): both connections are served and carry the same tweets;
    # backfill_minutes replays what was published before each one connected.
    total = 400
    sim = SimProcess(tmp_path / "sim", "--keepalive", "1", "--seed", "5", "--rate", "150",
                     "--max-tweets", str(total), "--redundant", "2", env=ENV).start()
    doc = v2_doc(sim, mongo_uri, mongo_database, RULES, backfill_minutes=5)
    daemons = [Daemon(tmp_path / name, {**doc, "ha": {"mode": "redundant"}}) for name in "ab"]
    try:
        for daemon in daemons:
            daemon.start(extra_env=ENV)
            daemon.wait_ready()
        wait_until(lambda: all(both_settled(daemons, sim, total)), 90, "both instances settled")
        stores = [d.counters("store") for d in daemons]
    finally:
        for daemon in daemons:
            daemon.kill()
        sim.stop()
    truth = sim.ground_truth()
    published = set(truth.tweet_ids()) | {e["id"] for e in truth.of("missed")}
    ids = [d["_id"] for d in stored(mongo_uri, mongo_database)]
    assert [(c["conn"], c["status"]) for c in stream_connects(truth)] == [(1, 200), (2, 200)]
    assert len(published) == total
    assert set(truth.tweet_ids(1)) == set(truth.tweet_ids(2)) == published
    assert len(ids) == len(set(ids)) and set(ids) == published
    assert sorted(s["stored"] + s["duplicates"] for s in stores) == sorted(
        len(truth.tweet_ids(c)) for c in (1, 2)), "an instance did not store its stream"
    print(f"\n[v2 redundant] published={total} delivered={len(truth.tweet_ids())} "
          f"stored={len(ids)} duplicates={sum(s['duplicates'] for s in stores)}")


def both_settled(daemons: list[Daemon], sim: SimProcess, published: int) -> list[bool]:
    """Per instance: it read all it received, and the two together resolved every delivery."""
    truth = sim.ground_truth()
    if len(set(truth.tweet_ids()) | {e["id"] for e in truth.of("missed")}) < published:
        return [False]
    done, seen = [], 0
    for daemon in daemons:
        daemon.assert_running()
        stream, store = daemon.counters("stream"), daemon.counters("store")
        done.append(bool(stream and store and store["records_read"] == stream["received"]))
        seen += store["stored"] + store["duplicates"] if store else 0
    return [*done, seen == len(truth.tweet_ids())]


# ---------------------------------------------------------------- bad lines


def test_v2_bad_lines_are_dead_lettered_with_their_reason_and_reconcile(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    kinds = ["truncated_json", "invalid_utf8", "json_array", "oversize", "non_object"]
    total = 60
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "100", "--max-tweets",
                        str(total), "--max-line", "600000",
                        script=[[{"deliver": 20}, {"bad_lines": kinds}]],
                        max_message_bytes=500000)
    try:
        daemon.wait_ready()
        wait_until(lambda: settled(daemon, sim, total), 60, "every published tweet")
        wait_until(lambda: sum(daemon.counters("store")["deadlettered"].values()) == len(kinds),
                   30, "the bad lines dead-lettered")
        stream, store = daemon.counters("stream"), daemon.counters("store")
    finally:
        finish(daemon, sim)
    truth = sim.ground_truth()
    letters = [orjson.loads(line) for path in sorted((daemon.state_dir / "deadletter")
                                                     .glob("*.jsonl"))
               for line in path.read_bytes().splitlines() if line.strip()]
    assert [e["kind"] for e in truth.of("bad_line", 1)] == kinds
    assert sorted(d["reason"] for d in letters) == sorted(
        ["invalid_json", "invalid_utf8", "not_an_object", "oversize", "not_an_object"])
    assert {d["_id"] for d in stored(mongo_uri, mongo_database)} == set(truth.tweet_ids())
    assert store["deadlettered"] == {"invalid_json": 1, "invalid_utf8": 1, "not_an_object": 2,
                                     "oversize": 1}
    assert stream["received"] == store["records_read"] == resolved(store)
    assert store["stored"] + store["duplicates"] == len(truth.tweet_ids())


def test_v2_poison_lines_are_dead_lettered_or_stored_never_a_crash(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    # Each crash-looped the store worker (OverflowError, TypeError) with nothing stored after it.
    kinds = ["v2_date_out_of_range", "v2_rules_not_a_list"]
    total = 40
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "100", "--max-tweets",
                        str(total), script=[[{"deliver": 20}, {"bad_lines": kinds}]])
    try:
        daemon.wait_ready()
        wait_until(lambda: settled(daemon, sim, total), 60, "every published tweet")
        store = daemon.counters("store")
    finally:
        finish(daemon, sim)
    assert "uncaught_exception" not in [e.get("event") for e in daemon.log_events()]
    assert store["deadlettered"] == {"invalid_tweet": 1}
    docs = {d["_id"]: d for d in stored(mongo_uri, mongo_database, {"_ingest": 1})}
    assert set(docs) == set(sim.ground_truth().tweet_ids()) | {1500000000000000002}
    assert docs[1500000000000000002]["_ingest"]["matched"] == {"rules": [], "tags": []}


# ---------------------------------------------------------------- reload: rules, no reconnect


def test_sighup_changes_rules_on_the_live_connection_without_losing_a_tweet(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    total, rate = 900, 100.0  # the reload at ~3 s, then ~6 s of tweets under the new rules
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", str(rate),
                        "--max-tweets", str(total))
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 300, 60, "300 stored")
        new_rules = [RULES[0], {"value": "#python OR snow", "tag": "new"}]  # weather out, new in
        daemon.write_settings_atomically(v2_doc(sim, mongo_uri, mongo_database, new_rules))
        hup_at = time.time()
        daemon.send(signal.SIGHUP)
        synced = daemon.wait_log("rules_synced", generation=2)
        wait_until(lambda: settled(daemon, sim, total), 120, "every published tweet")
    finally:
        finish(daemon, sim)
    truth = sim.ground_truth()
    delivered, missed = set(truth.tweet_ids()), truth.of("missed")
    docs = stored(mongo_uri, mongo_database, {"_ingest": 1})
    changes = [e for e in truth.of("rules") if e["t"] >= hup_at]
    changed_at = min(e["t"] for e in changes)
    times = [e["t"] for e in truth.of("tweet")]
    normal = (times[-1] - times[0]) / (len(times) - 1)
    around = [b - a for a, b in itertools.pairwise(times)
              if hup_at - 1 <= a <= changed_at + 1]
    # Tweets published after the last rule change (the snowflake id carries the time).
    done_ms = max(e["t"] for e in changes) * 1000
    tags_after = {t for d in docs if (d["_id"] >> 22) + TWITTER_EPOCH_MS > done_ms
                  for t in d["_ingest"]["matched"]["tags"]}

    assert len(stream_connects(truth)) == 1, "the reload reconnected"
    assert not missed, f"{len(missed)} tweets published but never delivered"
    assert {d["_id"] for d in docs} == delivered and len(docs) == len(delivered)
    assert sorted(synced["added"]) == ["#python OR snow [new]"]
    assert sorted(synced["deleted"]) == ["rain -sunny [weather]"]
    assert "new" in tags_after and "weather" not in tags_after
    print(f"\n[v2 reload] connections=1 delivered={len(delivered)} stored={len(docs)} missed=0 "
          f"rules_applied_after={changed_at - hup_at:.3f}s "
          f"max_gap_around_reload={max(around):.3f}s (mean interval {normal:.3f}s)")


def test_an_invalid_rule_on_reload_keeps_the_old_rules_and_says_why(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "50")
    try:
        daemon.wait_ready()
        daemon.wait_log("rules_synced", generation=1)
        bad = [RULES[0], {"value": "frm:bob coffee", "tag": "typo"}]
        daemon.write_settings_atomically(v2_doc(sim, mongo_uri, mongo_database, bad))
        daemon.send(signal.SIGHUP)
        rejected = daemon.wait_log("rules_rejected", generation=2)
        wait_until(lambda: "previous rules still in force" in daemon.status("stream")
                   .get("state", ""), 10, "the degraded state")
        in_force = daemon.status("stream")["rules"]["in_force"]
        # Degraded, yet the connection with the old rules delivers: the metrics say both.
        metrics = {(f.name, tuple(s.labels.items())): s.value
                   for f in RunStateCollector(daemon.state_dir).collect() for s in f.samples}
    finally:
        finish(daemon, sim)
    assert metrics[("ingestd_stream_connected", ())] == 1
    assert metrics[("ingestd_stream_state", (("state", "degraded"),))] == 1
    assert any("Reference to invalid operator 'frm'" in e for e in rejected["errors"])
    assert {(r["value"], r["tag"]) for r in in_force} == {(r["value"], r["tag"]) for r in RULES}
    assert [e["op"] for e in sim.ground_truth().of("rules")] == ["add"]
    assert TOKEN not in daemon.logs()


# ---------------------------------------------------------------- reconnects


@pytest.mark.parametrize("backfill", [0, 2])
def test_reconnect_with_backfill_recovers_the_gap(
    tmp_path: Path, mongo_uri: str, mongo_database: str, backfill: int
) -> None:
    # Connection 1 goes silent (no keep-alives): the daemon's stall timer (2 s) ends it; what the
    # firehose published meanwhile was never written — recovered only by backfill_minutes.
    total = 900
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "150",
                        "--max-tweets", str(total), script=[[{"deliver": 100}, {"stall": 60}]],
                        read_timeout=2, backfill_minutes=backfill)
    try:
        daemon.wait_ready()
        wait_until(lambda: settled(daemon, sim, total), 120, "every published tweet")
        store = daemon.counters("store")
    finally:
        finish(daemon, sim)
    truth = sim.ground_truth()
    missed = {e["id"] for e in truth.of("missed", 1)} | {e["id"] for e in truth.of("missed")}
    delivered = set(truth.tweet_ids())
    ids = [d["_id"] for d in stored(mongo_uri, mongo_database)]
    assert len(ids) == len(set(ids))
    assert set(ids) == delivered
    assert missed, "the stall should leave published tweets undelivered"
    if backfill:
        assert missed <= set(ids), "backfill should bring back the gap"
        assert store["duplicates"] > 0  # the replay re-sent stored tweets; absorbed by _id
        assert truth.of("backfill")
    else:
        assert not missed & set(ids)
    print(f"\n[v2 backfill={backfill}] gap_tweets={len(missed)} "
          f"recovered={len(missed & set(ids))} stored={len(ids)} "
          f"duplicates_absorbed={store['duplicates']}")


def test_too_many_connections_backs_off_until_the_other_stream_closes(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    sim = SimProcess(tmp_path / "sim", "--keepalive", "1", "--rate", "50", env=ENV).start()
    other = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    other.request("GET", "/2/tweets/search/stream", headers={"Authorization": f"Bearer {TOKEN}"})
    held = other.getresponse()  # keep a reference: dropping it closes the socket
    assert held.status == 200
    daemon = Daemon(tmp_path / "daemon", v2_doc(sim, mongo_uri, mongo_database, RULES))
    daemon.start(extra_env=ENV)
    try:
        daemon.wait_ready()
        wait_until(lambda: len([c for c in stream_connects(sim.ground_truth())
                                if c["status"] == 429]) >= 3, 60, "three refused attempts")
        held.close()
        other.close()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 20, 60, "tweets stored")
        stream = daemon.counters("stream")
    finally:
        other.close()
        finish(daemon, sim)
    connects = stream_connects(sim.ground_truth())[1:]  # the test's own stream first
    refused = [c for c in connects if c["status"] == 429]
    assert all(c.get("reason") == "TooManyConnections" for c in refused)
    waits = [b["t"] - a["t"] for a, b in itertools.pairwise(connects)][:3]
    # rate_limit_start is 1 s in test settings, doubling (cap 4 s): never sooner than that.
    assert waits[0] >= 1.0 and waits[1] >= 2.0, waits
    assert stream["endings"].get("rate_limited", 0) >= 3
    print(f"\n[v2 429] refused={len(refused)} waits={[round(w, 2) for w in waits]}")


def test_a_bad_bearer_token_is_diagnosed_and_never_logged(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    sim = SimProcess(tmp_path / "sim", "--keepalive", "1", env=ENV).start()
    daemon = Daemon(tmp_path / "daemon", v2_doc(sim, mongo_uri, mongo_database, RULES))
    wrong = "AAAAAAAAAAAAAAAAAAAAAwrong-token-value"
    daemon.start(extra_env={"TWITTER_BEARER_TOKEN": wrong})
    try:
        daemon.wait_ready()
        ended = daemon.wait_log("stream_ended", conn=1)
        wait_until(lambda: "HTTP 401" in daemon.status("stream")["rules"]["error"], 30,
                   "the rules call refused")
    finally:
        finish(daemon, sim)
    assert "token rejected: check auth.bearer_token" in ended["reason"]
    assert wrong not in daemon.logs()
    assert all(c["status"] == 401 for c in stream_connects(sim.ground_truth()))


# ---------------------------------------------------------------- reloads: verdicts, reconnects

# Production's 429 schedule (60 s doubling): a 429 about our own old connection, taken at its
# word, shows as a minute without a stream.
PRODUCTION_429 = {"network_start": 0.25, "network_step": 0.25, "network_cap": 2,
                  "http_start": 0.5, "http_cap": 4, "rate_limit_start": 60,
                  "rate_limit_cap": 320, "reconnect_delay": 0.2, "max_attempts_per_minute": 60}


def reload_cli(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    """``ingestd reload`` from an operator's shell (no secrets), as the unit's ExecReload."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWITTER_")}
    return subprocess.run([sys.executable, "-m", "ingestd", "reload", "--config",
                           str(daemon.config)], env=env, capture_output=True, text=True,
                          timeout=90, check=False)


def test_a_fields_reload_reconnects_within_seconds_and_reload_says_so(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """One connection per app: the old one is closed first; the endpoint may not have noticed
    yet (429 TooManyConnections), which is retried within seconds, not after the 60 s of the
    429 schedule. ``ingestd reload`` says the daemon reconnects, and why."""
    # The simulator holds a closed stream as the app's connection for 2 s (a real endpoint
    # notices late): the first two attempts after the close meet 429.
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "50",
                        "--v2-close-lag", "2", backoff=PRODUCTION_429)
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 20, 60, "tweets stored")
        doc = dict(daemon.doc)
        fields = ["author_id", "created_at", "entities", "geo", "lang", "conversation_id"]
        doc["stream"] = {**doc["stream"], "tweet_fields": fields}
        daemon.write_settings_atomically(doc)
        reloaded_at = time.time()
        result = reload_cli(daemon)
        daemon.wait_log("connected", timeout=20, generation=2)
        connected_at = time.time()
        ended = daemon.events("stream_ended")
    finally:
        finish(daemon, sim)
    accepted = [c for c in stream_connects(sim.ground_truth()) if c["status"] == 200]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "new connection (stream.tweet_fields changed)" in result.stdout
    assert "filters unchanged" not in result.stdout
    assert len(accepted) == 2 and "public_metrics" not in str(accepted[1]["params"])
    assert connected_at - reloaded_at < 15
    assert ended and all("TooManyConnections" in e["reason"] for e in ended), ended
    assert all(e["backoff"] <= 2 for e in ended), ended  # never the 429 schedule
    print(f"\n[v2 fields reload] reconnected after {accepted[1]['t'] - reloaded_at:.2f}s; "
          f"429s on the way: {len(ended)}")


def test_a_reload_that_reconnects_loses_nothing_the_old_connection_delivered(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """v2 allows one connection per app, so a reload that changes the connection closes the old
    one before opening the next. The close came right after a wait that bytes had ended, before
    they were read: what the endpoint wrote last on the old connection was lost. It is now read
    to the endpoint's close first, as on a stop."""
    total = 6000
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "2000",
                        "--max-tweets", str(total))
    try:
        daemon.wait_ready()
        wait_until(lambda: len(sim.ground_truth().tweet_ids()) >= 1000, 60, "tweets flowing")
        doc = dict(daemon.doc)
        doc["stream"] = {**doc["stream"], "tweet_fields": ["author_id", "created_at", "lang"]}
        daemon.write_settings_atomically(doc)
        daemon.send(signal.SIGHUP)
        daemon.wait_log("connected", timeout=30, generation=2)
        with contextlib.suppress(AssertionError):  # a lost tweet never settles: said below
            wait_until(lambda: settled(daemon, sim, total), 60, "every published tweet")
        closed = daemon.events("stream_ended")
    finally:
        finish(daemon, sim)
    truth = sim.ground_truth()
    first, ids = set(truth.tweet_ids(1)), [d["_id"] for d in stored(mongo_uri, mongo_database)]
    assert len([c for c in stream_connects(truth) if c["status"] == 200]) >= 2, closed
    assert len(truth.tweet_ids(1)) < total, "the reload came after the last tweet"
    assert len(ids) == len(set(ids)), "a tweet was stored twice"
    missing = first - set(ids)
    assert not missing, f"{len(missing)} of {len(first)} tweets of the old connection not stored"
    assert set(ids) == set(truth.tweet_ids())
    assert truth.closes(1)[0]["reason"].startswith("client closed"), truth.closes(1)
    print(f"\n[v2 reload] old connection: {len(first)} delivered, all stored; "
          f"{len(truth.tweet_ids()) - len(first)} after it; "
          f"{len(truth.of('missed'))} missed between the two")


def test_a_reload_whose_old_connection_ends_while_read_to_its_close_opens_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read to the old connection's close may end it (held bytes that turn out undecodable
    end it through ``_finished``); the reload must then go on to the next connection, not
    close a connection that is no longer there (an AttributeError on ``None`` before)."""
    doc = settings_doc("http://127.0.0.1:9/2/tweets/search/stream", "mongodb://127.0.0.1:9",
                       "db")
    del doc["stream"]["track"]
    doc["stream"].update({"api": "v2", "rules": RULES})
    doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
    settings = load_settings_text(yaml.safe_dump(doc), tmp_path / "s.yaml", ENV)
    reader = StreamReader(settings.stream, settings.auth, 1, lambda *_: None,
                          is_full=lambda: False, drop_when_full=False)
    reader.active = open_connection(1, 1, settings.stream, settings.auth, 0.0,
                                    lambda conn, data: None)

    def ended_meanwhile(closing: list[Any], budget: float) -> bool:
        reader.active = None  # what ``_finished`` does to an active connection
        return True
    monkeypatch.setattr(reader, "_read_to_close", ended_meanwhile)
    new = dataclasses.replace(settings.stream, tweet_fields=("author_id", "lang"))
    reader.reload(new, settings.auth, 2)
    assert reader.active is None and reader.next_attempt_at is not None
    reader.close()


@pytest.mark.parametrize("rules", [
    [{"value": "(coffee OR music", "tag": "unbalanced"}],
    [{"value": f"word{i}"} for i in range(32)],  # the cap is 25
], ids=["unbalanced", "over-cap"])
def test_a_reload_whose_rules_the_endpoint_refuses_is_rejected(
    tmp_path: Path, mongo_uri: str, mongo_database: str, rules: list[dict[str, Any]]
) -> None:
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "50")
    try:
        daemon.wait_ready()
        daemon.wait_log("rules_synced", generation=1)
        daemon.write_settings_atomically(v2_doc(sim, mongo_uri, mongo_database, rules))
        result = reload_cli(daemon)
        wait_until(lambda: daemon.status("supervisor").get("reload_failures") == 1, 10,
                   "the failure counted")
        failed = daemon.wait_log("reload_failed", role="supervisor", generation=2)
        in_force = daemon.status("stream")["rules"]["in_force"]
        metrics = {(s.name, tuple(s.labels.items())): s.value
                   for f in RunStateCollector(daemon.state_dir).collect() for s in f.samples}
    finally:
        finish(daemon, sim)
    assert result.returncode == 78, result.stdout + result.stderr
    assert "refused the stream.rules of generation 2" in result.stderr
    assert "previous rules stay in force" in result.stderr
    assert ("UnprocessableEntity" in result.stderr or "RulesCapExceeded" in result.stderr)
    assert "reload applied" not in result.stdout
    assert failed["key"] == "stream.rules"
    assert metrics[("ingestd_config_reload_failures_total", ())] == 1
    assert {(r["value"], r["tag"]) for r in in_force} == {(r["value"], r["tag"]) for r in RULES}


def test_a_refused_token_on_the_rules_endpoint_is_a_credentials_problem(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    sim = SimProcess(tmp_path / "sim", "--keepalive", "1", "--rate", "50", env=ENV).start()
    daemon = Daemon(tmp_path / "daemon", v2_doc(sim, mongo_uri, mongo_database, RULES))
    daemon.start(extra_env={"TWITTER_BEARER_TOKEN": "WRONG"})
    try:
        rejected = daemon.wait_log("rules_rejected", generation=1)
        wait_until(lambda: "check auth.bearer_token" in daemon.status("stream").get("state", ""),
                   10, "the token named in the state")
        state = daemon.status("stream")["state"]
    finally:
        finish(daemon, sim)
    assert "token rejected: check auth.bearer_token" in rejected["action"]
    assert "stream.rules" not in rejected["action"]
    # the first sync failed: there are no previous rules to stay in force (the secrets audit)
    assert rejected["action"].startswith("the endpoint holds none of these settings' rules yet")
    assert "rules not accepted" not in state and "token rejected" in state
