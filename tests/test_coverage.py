"""The coverage ledger on the real daemon: every way the stream stops leaves one gap document.

One scripted run (simulator, stand-in, real daemon): a reconnect, a stall, a reconnect answered by
420, a SIGTERM + restart and a SIGKILL of every process + restart. Each gap is reconciled against
the simulator's ground truth (the last tweet delivered before it, the first after it) to ±1 s;
limit notices and stored tweets against what was delivered and stored; ``ingestd coverage`` runs
as a real subprocess. Then the spool is replayed from scratch: nothing in the ledger changes.
An instance's archive begins with a ``not_started`` gap from the start of the hour of its first
start to its first connection, whatever runs without a message came in between.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import bson
import psutil
import pymongo
import pytest

from ingestd.config.errors import ConfigErrors
from ingestd.config.schema import Settings
from ingestd.config.settings import load_settings_text
from ingestd.sink.batch import Entry
from ingestd.sink.coverage import (
    HANDOVER_WAIT,
    HOUR_NS,
    LIMIT_CONNECTIONS,
    CoverageLedger,
    LimitSpans,
    message_time_ns,
    offline_span,
    split_hours,
)
from ingestd.sink.retry import Retrier
from ingestd.spool.events import GapMarkers, decode_event, encode_event
from ingestd.spool.format import KIND_EVENT, KIND_MESSAGE, Record
from ingestd.spool.writer import SpoolWriter
from ingestd.tools.coverage import (
    UnknownInstance,
    build_rows,
    lag_notes,
    last_seen,
    render,
    resolve_instance,
    unreported_gaps,
)
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.mongo import stored_ids
from tests.support.simulator import GroundTruthLog, SimProcess
from tests.support.wait import wait_until

TOLERANCE = 1.0  # seconds: ledger times against the simulator's delivery times
READ_TIMEOUT = 3.0
SCRIPT: list[list[dict[str, Any]]] = [
    [{"deliver": 40}, {"control": "limit"}, {"deliver": 20}, {"control": "limit"},
     {"close": True}],                                      # 1 → 2: reconnect
    [{"deliver": 40}, {"stall": 60}],                       # 2 → 3: stall (read_timeout)
    [{"deliver": 40}, {"close": True}],                     # 3 → 5: reconnect, then...
    [{"status": 420, "body": "Enhance your calm"}],         # 4: ...rate limited
    [{"deliver": 40}, {"control": "limit"}],                # 5 → 6: SIGTERM + restart
]                                                           # 6 → 7: SIGKILL + restart
EXPECTED_CAUSES = ["reconnect", "stall", "rate_limited", "stopped", "crashed"]


def ledger(uri: str, db: str, kind: str, limits: bool = False) -> list[dict[str, Any]]:
    """The ledger's documents of ``kind``; gaps are the interruptions, or with ``limits`` the
    limit notices' documents (undelivered tweets while the stream was up)."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, tz_aware=True, serverSelectionTimeoutMS=10000)
    cause = {"cause": "limit" if limits else {"$ne": "limit"}} if kind == "gap" else {}
    try:
        return sorted(client[db].coverage.find({"kind": kind, **cause}),
                      key=lambda d: d.get("start_ns") or d.get("hour_ns"))
    finally:
        client.close()


def closed_gaps(uri: str, db: str) -> list[dict[str, Any]]:
    return [g for g in ledger(uri, db, "gap") if g["end"] is not None]


def limit_spans(docs: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """(start, end, undelivered) per connection (a connection's documents across hours joined),
    in connection order."""
    by_conn: dict[int, list[dict[str, Any]]] = {}
    for doc in docs:
        by_conn.setdefault(doc["conn"], []).append(doc)
    return [(min(d["start"].timestamp() for d in ds), max(d["end"].timestamp() for d in ds),
             sum(d["undelivered"] for d in ds)) for _, ds in sorted(by_conn.items())]


def delivery_gaps(truth: GroundTruthLog) -> list[tuple[float, float]]:
    """(last tweet delivered on a connection, first tweet on the next that delivered any)."""
    times: dict[int, list[float]] = {}
    for e in truth.of("tweet"):
        times.setdefault(e["conn"], []).append(float(e["t"]))
    conns = sorted(times)
    return [(max(times[a]), min(times[b])) for a, b in itertools.pairwise(conns)]


def kill_everything(daemon: Daemon) -> None:
    """SIGKILL the stream worker, the store worker (and its encoder) and the supervisor: a
    power cut for the processes; the restart must tell that the stream ended unannounced."""
    procs = []
    for pid in (daemon.worker_pid("stream"), daemon.worker_pid("store")):
        proc = psutil.Process(pid)
        procs += [proc, *proc.children(recursive=True)]
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    daemon.kill()
    gone = psutil.wait_procs(procs, timeout=30)[1] == []
    assert gone, "the killed workers did not exit"


def replayed(daemon: Daemon) -> bool:
    """The store worker read all the spool holds, and found tweets it had stored before."""
    store, spool = daemon.counters("store"), daemon.status("stream").get("spool", {})
    read_all = store.get("read_seq", 0) >= spool.get("next_seq", 2**63) - 1
    return bool(read_all and store.get("duplicates", 0) > 0)


def run_coverage_cli(daemon: Daemon) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWITTER_")}  # no secrets
    out = subprocess.run([sys.executable, "-m", "ingestd", "coverage", "--config",
                          str(daemon.config), "--since", "2000-01-01T00:00:00", "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    text = subprocess.run([sys.executable, "-m", "ingestd", "coverage", "--config",
                           str(daemon.config), "--since", "2000-01-01T00:00:00"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert text.returncode == 0 and "covered" in text.stdout, text.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_every_stop_leaves_one_gap_matching_ground_truth(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = SimProcess(tmp_path / "sim", "--rate", "100", "--keepalive", "1", "--control-every",
                     "0", script=SCRIPT).start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, stream={"read_timeout": READ_TIMEOUT})
    daemon = Daemon(tmp_path / "daemon", doc).start()

    def wait_gaps(n: int) -> None:  # n interruptions, after the archive's first gap
        wait_until(lambda: daemon.assert_running() or len(closed_gaps(mongo_uri, mongo_database))
                   >= n + 1, 90, f"{n} closed gaps in the ledger after the first")

    try:
        daemon.wait_ready()
        wait_gaps(3)  # reconnect, stall, 420
        code, _ = daemon.stop()
        assert code == 0, daemon.tail()
        opened = [g for g in ledger(mongo_uri, mongo_database, "gap") if g["end"] is None]
        assert [g["cause"] for g in opened] == ["stopped"], "the stop is written before exit"
        daemon.start().wait_ready()
        wait_gaps(4)
        kill_everything(daemon)
        daemon.start().wait_ready()
        wait_gaps(5)
        # This run's store worker opened a gap (the crash's): published for the metrics.
        wait_until(lambda: daemon.counters("store").get("coverage_gaps", 0) >= 1, 30,
                   "coverage_gaps in run/store.json")
    finally:
        finish(daemon, sim)

    truth = sim.ground_truth()
    first, *gaps = ledger(mongo_uri, mongo_database, "gap")
    # The archive began at the start of the hour of the first start; until the first tweet.
    first_tweet = min(float(e["t"]) for e in truth.of("tweet"))
    assert first["cause"] == "not_started" and first["start_ns"] % HOUR_NS == 0
    assert abs(first["end"].timestamp() - first_tweet) <= TOLERANCE, (first, first_tweet)
    expected = delivery_gaps(truth)
    assert len(expected) == len(EXPECTED_CAUSES)
    closed, still_open = gaps[:-1], gaps[-1]
    assert [g["cause"] for g in closed] == EXPECTED_CAUSES, [g["causes"] for g in gaps]
    assert closed[2]["causes"] == ["reconnect", "rate_limited"]
    for gap, (last_before, first_after) in zip(closed, expected, strict=True):
        assert isinstance(gap["start"], datetime) and isinstance(gap["end"], datetime)
        assert abs(gap["start"].timestamp() - last_before) <= TOLERANCE, (gap, last_before)
        assert abs(gap["end"].timestamp() - first_after) <= TOLERANCE, (gap, first_after)
        print(f"\n[coverage] {gap['cause']:>12}: start {gap['start_ns'] / 1e9 - last_before:+.3f}s"
              f" end {gap['end_ns'] / 1e9 - first_after:+.3f}s vs ground truth,"
              f" {gap['seconds']:.3f}s")
    # The final stop: one open gap from the last tweet received.
    last_tweet = max(float(e["t"]) for e in truth.of("tweet"))
    assert still_open["cause"] == "stopped" and still_open["end"] is None
    assert abs(still_open["start"].timestamp() - last_tweet) <= TOLERANCE
    # A date-range query finds the gaps (BSON dates, not text). Limit documents are left out,
    # as ``gaps`` leaves them: connection 5's, if its notice was read before the stop, starts
    # inside the range (seen once under load: 7 == 6).
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri, tz_aware=True)
    try:
        in_range = client[mongo_database].coverage.count_documents(
            {"kind": "gap", "cause": {"$ne": "limit"},
             "start": {"$gte": closed[0]["start"], "$lte": still_open["start"]}})
    finally:
        client.close()
    assert in_range == len(gaps)

    stored = len(stored_ids(mongo_uri, mongo_database))
    limits = truth.control("limit")
    undelivered = sum(max(e["track"] for e in limits if e["conn"] == c)
                      for c in {e["conn"] for e in limits})
    hours = ledger(mongo_uri, mongo_database, "hour")
    assert sum(h["tweets"] for h in hours) == stored, "each stored tweet counted once"
    # Limit notices: `limit` documents per connection (and hour) with the connection's
    # undelivered count, from the connection's first tweet to its last notice (±1 s).
    limit_docs = ledger(mongo_uri, mongo_database, "gap", limits=True)
    spans = limit_spans(limit_docs)
    noticed = sorted({e["conn"] for e in limits})
    assert [u for _, _, u in spans] == [max(e["track"] for e in limits if e["conn"] == c)
                                        for c in noticed]
    for (start, end, _), conn in zip(spans, noticed, strict=True):
        first_tweet = min(float(e["t"]) for e in truth.of("tweet", conn))
        last_notice = max(float(e["t"]) for e in limits if e["conn"] == conn)
        assert abs(start - first_tweet) <= TOLERANCE and abs(end - last_notice) <= TOLERANCE

    # The stand-in compares dates to the second: a gap that began in the current second is not
    # ``$lt`` now there (a real mongod finds it), and the report reads gaps with start < now.
    newest_second = gaps[-1]["start_ns"] // 10**9
    wait_until(lambda: time.time() >= newest_second + 1, 5, "the clock past that second")
    report = run_coverage_cli(daemon)
    assert sum(r["tweets"] for r in report["hours"]) == stored
    assert sum(r["undelivered"] for r in report["hours"]) == undelivered > 0
    assert [g["cause"] for g in report["gaps"] if g["cause"] != "limit"] == [
        "not_started", *EXPECTED_CAUSES, "stopped"]
    assert sum(g.get("undelivered", 0) for g in report["gaps"]) == undelivered
    offline = sum(r["offline_seconds"] for r in report["hours"])
    assert offline >= sum(g["seconds"] for g in [first, *closed])

    # Replay the whole spool (checkpoint gone): the ledger is rewritten to the same figures.
    (daemon.state_dir / "spool" / "checkpoint").unlink()
    sim2 = SimProcess(tmp_path / "sim2", "--rate", "0", "--max-tweets", "0").start()
    daemon.doc["stream"]["url"] = sim2.url
    daemon.write_settings(daemon.doc)
    try:
        daemon.start().wait_ready()
        wait_until(lambda: replayed(daemon), 60, "the replayed spool read")
    finally:
        finish(daemon, sim2)
    after = ledger(mongo_uri, mongo_database, "gap")
    assert [(g["_id"], g["end"]) for g in after[:len(closed) + 1]] == [
        (g["_id"], g["end"]) for g in [first, *closed]], \
        "a replay neither duplicates nor reopens a gap"
    assert sum(h["tweets"] for h in ledger(mongo_uri, mongo_database, "hour")) == stored
    assert ledger(mongo_uri, mongo_database, "gap", limits=True) == limit_docs
    assert len(stored_ids(mongo_uri, mongo_database)) == stored


# ---------------------------------------------------------------- the archive's beginning

# Every attempt refused: each run on it gets no message at all (back-off 0.5-4 s between tries).
REFUSE_ALL = 200


def refusing(workdir: Path, status: int) -> SimProcess:
    return SimProcess(workdir, "--rate", "100", script=[[{"status": status, "body": "no"}]]
                      * REFUSE_ALL).start()


def refused(sim: SimProcess, status: int) -> int:
    return sum(1 for c in sim.ground_truth().connections() if c["status"] == status)


def open_gap(uri: str, db: str) -> dict[str, Any] | None:
    return next((g for g in ledger(uri, db, "gap") if g["end"] is None), None)


def hour_of(seconds: float) -> int:
    return int(seconds * 1e9) - int(seconds * 1e9) % HOUR_NS


def run_refused(daemon: Daemon, sim: SimProcess, status: int, cause: str, uri: str,
                db: str) -> tuple[float, float]:
    """One run on ``sim`` (every attempt refused with ``status``) until two attempts were
    refused and the ledger's open gap lists ``cause``; then SIGTERM. (start, stop) wall times."""
    daemon.doc["stream"]["url"] = sim.url
    daemon.write_settings(daemon.doc)
    before = refused(sim, status)
    started = time.time()
    daemon.start().wait_ready()

    def recorded() -> bool:
        gap = open_gap(uri, db)
        return refused(sim, status) >= before + 2 and gap is not None and cause in gap["causes"]
    wait_until(lambda: daemon.assert_running() or recorded(), 60,
               f"two {status}s and the ledger's open gap with {cause}")
    code, _ = daemon.stop()
    assert code == 0, daemon.tail()
    return started, time.time()


def run_delivering(daemon: Daemon, sim: SimProcess, uri: str, db: str, closed: int) -> float:
    """One run on the delivering ``sim`` until ``closed`` gaps are closed; its start time."""
    daemon.doc["stream"]["url"] = sim.url
    daemon.write_settings(daemon.doc)
    started = time.time()
    daemon.start().wait_ready()
    wait_until(lambda: daemon.assert_running() or len(closed_gaps(uri, db)) >= closed, 60,
               f"{closed} closed gaps")
    code, _ = daemon.stop()
    assert code == 0, daemon.tail()
    return started


def test_first_start_counts_the_hour_before_it_as_offline(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The first daemon on a fresh state folder: its hour is covered from its first connection
    only. The ``not_started`` gap runs from the start of that hour (the archive did not exist) to
    the connection; ``ingestd coverage`` counts it offline and says how much came before the
    start. Tolerances: the stream worker takes its start time between the launch and ready; the
    gap ends at the connection's first body byte, after the simulator logged the connect and
    before the first tweet arrived (±TOLERANCE for a loaded machine)."""
    sim = SimProcess(tmp_path / "sim", "--rate", "100", "--keepalive", "1").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        launched = time.time()
        daemon.start().wait_ready()
        ready = time.time()
        wait_until(lambda: daemon.assert_running() or closed_gaps(mongo_uri, mongo_database), 60,
                   "the archive's first gap closed")
    finally:
        finish(daemon, sim)
    truth = sim.ground_truth()
    connect = truth.connections()[0]["t"]
    first_tweet = min(float(e["t"]) for e in truth.of("tweet"))
    gap, stopped = ledger(mongo_uri, mongo_database, "gap")
    started = gap["detail"]["started_ns"] / 1e9
    assert gap["cause"] == "not_started" and gap["causes"] == ["not_started"]
    assert launched <= started <= ready and gap["started_at"].timestamp() == pytest.approx(
        started, abs=0.001)
    assert gap["start_ns"] == hour_of(started) and isinstance(gap["start"], datetime)
    # end_ns: the BSON date keeps milliseconds only, and may read just before the connect.
    assert connect <= gap["end_ns"] / 1e9 <= first_tweet + TOLERANCE, (gap, connect)
    hours = {h["hour_ns"]: h for h in ledger(mongo_uri, mongo_database, "hour")}
    key = str(gap["start_ns"])
    for hour, seconds in split_hours(gap["start_ns"], gap["end_ns"]):
        assert hours[hour]["gap_seconds"][key] == round(seconds, 3)
    assert stopped["cause"] == "stopped" and stopped["end"] is None

    newest_second = stopped["start_ns"] // 10**9  # the stand-in compares dates to the second
    wait_until(lambda: time.time() >= newest_second + 1, 5, "the clock past that second")
    report = run_coverage_cli(daemon)
    row = next(r for r in report["hours"] if r["hour"] == _hour_iso(gap["start_ns"]))
    before_start = started - gap["start_ns"] / 1e9
    assert row["not_started_seconds"] == pytest.approx(min(before_start, 3600), abs=0.002)
    assert row["offline_seconds"] >= min(connect - gap["start_ns"] / 1e9, 3600) - 0.002
    assert "not_started" in row["causes"] and row["covered_percent"] < 100
    (reported,) = [g for g in report["gaps"] if g["cause"] == "not_started"]
    assert reported["start_ns"] == gap["start_ns"] and reported["started_at"]


def _hour_iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_runs_without_a_message_are_offline_with_their_causes(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """Runs that never receive a message (every attempt answered 420, then 401) leave the whole
    time without a connection offline, the gap listing what happened during it: on a fresh state
    folder (the archive's first gap) and after a stopped run (its stop gap). Reconciled against
    the runs' start times and the simulator's first/last tweets of the delivering runs."""
    good = SimProcess(tmp_path / "good", "--rate", "100", "--keepalive", "1").start()
    calm, unauthorized = refusing(tmp_path / "calm", 420), refusing(tmp_path / "unauth", 401)
    daemon = Daemon(tmp_path / "daemon", settings_doc(good.url, mongo_uri, mongo_database))
    try:
        first_start, _ = run_refused(daemon, calm, 420, "rate_limited", mongo_uri, mongo_database)
        run_refused(daemon, unauthorized, 401, "http_error", mongo_uri, mongo_database)
        run_delivering(daemon, good, mongo_uri, mongo_database, 1)
        run_refused(daemon, calm, 420, "rate_limited", mongo_uri, mongo_database)
        run_delivering(daemon, good, mongo_uri, mongo_database, 2)
    finally:
        daemon.kill()
        for sim in (good, calm, unauthorized):
            sim.stop()
    truth = good.ground_truth()
    conns = [c["conn"] for c in truth.connections()]
    assert len(conns) == 2, "one connection per delivering run"
    tweets = {c: [float(e["t"]) for e in truth.of("tweet", c)] for c in conns}
    connects = [c["t"] for c in truth.connections()]
    archive, stop, last = ledger(mongo_uri, mongo_database, "gap")
    # The fresh folder: offline from the start of the first start's hour to the first connection.
    assert archive["cause"] == "not_started" and archive["causes"] == [
        "not_started", "rate_limited", "stopped", "http_error"]
    assert archive["start_ns"] == hour_of(first_start) <= archive["detail"]["started_ns"]
    # end_ns: the BSON date keeps milliseconds only, and may read just before the connect.
    assert connects[0] <= archive["end_ns"] / 1e9 <= min(tweets[conns[0]]) + TOLERANCE
    # After a stopped run: offline from its last tweet to the next connection, through the 420s.
    assert stop["cause"] == "stopped" and stop["causes"] == ["stopped", "rate_limited"]
    assert abs(stop["start"].timestamp() - max(tweets[conns[0]])) <= TOLERANCE
    assert connects[1] <= stop["end_ns"] / 1e9 <= min(tweets[conns[1]]) + TOLERANCE
    assert last["cause"] == "stopped" and last["end"] is None
    attempts = [e["conn"] for e in daemon.log_events() if e.get("event") == "connecting"]
    assert len(attempts) == len(set(attempts)), "connection ids are unique in the spool"
    # The hours count each closed gap's seconds once, under its own key.
    hours = ledger(mongo_uri, mongo_database, "hour")
    for gap in (archive, stop):
        counted = sum(h["gap_seconds"].get(str(gap["start_ns"]), 0) for h in hours)
        assert counted == pytest.approx(gap["seconds"], abs=0.002 * len(hours))
        assert gap["seconds"] == round((gap["end_ns"] - gap["start_ns"]) / 1e9, 3)


def test_a_connection_unanswered_at_the_stop_keeps_its_id_from_the_next_run(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """Connection ids are unique for the state folder's life, also for an attempt the stop cut
    before any answer (the CI: a run stopped 6 ms after "connecting conn=7", and the next run's
    first connection was conn=7 again). Here an endpoint that accepts and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/1.1/statuses/filter.json"
        daemon = Daemon(tmp_path / "daemon", settings_doc(url, mongo_uri, mongo_database))
        try:
            for run in (1, 2):
                daemon.start().wait_ready()
                daemon.wait_log("connecting", 30, generation=run)
                assert daemon.stop()[0] == 0, daemon.tail()
        finally:
            daemon.kill()
    attempts = [e["conn"] for e in daemon.log_events() if e.get("event") == "connecting"]
    assert attempts == [1, 2], attempts


def test_coverage_collection_must_differ_from_the_tweets_collection(tmp_path: Path) -> None:
    text = ("stream: {url: 'http://127.0.0.1:1/1.1/statuses/filter.json', track: [a]}\n"
            "auth: {consumer_key: a, consumer_secret: b, access_token: c, "
            "access_token_secret: d}\n"
            "mongo: {uri: 'mongodb://127.0.0.1:1', collection: tweets, "
            "coverage_collection: tweets}\n"
            f"state_dir: {tmp_path}\n")
    with pytest.raises(ConfigErrors) as err:
        load_settings_text(text, tmp_path / "s.yaml", {})
    assert "mongo.coverage_collection" in str(err.value) and "must differ" in str(err.value)


def test_v2_reconnect_asks_for_the_backfill_the_gap_needs_and_the_ledger_records_it(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    from tests.test_v2 import settled, start

    total, bound = 600, 3
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "150", "--max-tweets",
                        str(total), script=[[{"deliver": 100}, {"stall": 60}]], read_timeout=2,
                        backfill_minutes=bound)
    try:
        daemon.wait_ready()
        wait_until(lambda: settled(daemon, sim, total)
                   and len(closed_gaps(mongo_uri, mongo_database)) == 2, 120,
                   "every published tweet, and the stall's gap closed (after the first)")
    finally:
        finish(daemon, sim)
    truth = sim.ground_truth()
    asked = [e["params"].get("backfill_minutes") for e in truth.connections()]
    # The first connection knows no gap: the bound; the reconnect after a ~2 s stall: 1 minute.
    assert asked == [str(bound), "1"], asked
    first, gap = closed_gaps(mongo_uri, mongo_database)
    # The archive's first gap: its connection asked for the bound, and got that much back.
    assert first["cause"] == "not_started" and first["backfill_minutes"] == bound
    assert first["backfilled_seconds"] == round(min(first["seconds"], bound * 60.0), 3)
    assert gap["cause"] == "stall" and gap["backfill_minutes"] == 1
    assert gap["backfilled_seconds"] == gap["seconds"] > 0
    missed = {e["id"] for e in truth.of("missed")}
    assert missed and missed <= set(stored_ids(mongo_uri, mongo_database)), "backfill recovered"


def test_limit_counts_and_gap_seconds_are_split_across_hours() -> None:
    """A connection's cumulative limit count spanning hours counts each hour's increase once; a
    gap across an hour boundary gives each hour its share; an open gap counts until now."""
    h = HOUR_NS
    hours = [
        {"instance": "a", "hour_ns": 10 * h, "tweets": 5, "limit_max": {"7": 30}},
        {"instance": "a", "hour_ns": 11 * h, "tweets": 6, "limit_max": {"7": 45, "8": 4}},
        {"instance": "b", "hour_ns": 11 * h, "tweets": 1, "limit_max": {"7": 2}},
    ]
    gaps = [
        {"instance": "a", "start_ns": 11 * h - 10 * 10**9, "end_ns": 11 * h + 20 * 10**9,
         "cause": "stall"},
        {"instance": "a", "start_ns": 11 * h + 1800 * 10**9, "end_ns": None, "cause": "stopped"},
    ]
    rows = build_rows(hours, gaps, 10 * h, 12 * h, now_ns=11 * h + 2700 * 10**9)
    got = {(r.instance, r.hour[11:13]): (r.tweets, r.undelivered, r.offline_seconds, r.causes)
           for r in rows}
    hour10, hour11 = rows[0].hour[11:13], rows[1].hour[11:13]
    assert got == {
        ("a", hour10): (5, 30, 10.0, ["stall"]),
        ("a", hour11): (6, 15 + 4, 20.0 + 900.0, ["stall", "stopped"]),
        ("b", hour11): (1, 2, 0.0, []),
    }
    current = next(r for r in rows if r.instance == "a" and r.hour[11:13] == hour11)
    assert current.covered_percent == round(100 * (1 - 920 / 2700), 2)  # the hour so far
    assert split_hours(11 * h - 1, 11 * h + 1) == [(10 * h, 1e-9), (11 * h, 1e-9)]


# ---------------------------------------------------------------- handover (ledger, stand-in)


class _Now:
    """The ledger's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _Direct:
    """A Retrier's with_retry without the helper thread: nothing fails here."""

    def with_retry(self, what: str, fn: Any) -> Any:
        return fn()


def flush(ledger: CoverageLedger) -> None:
    """What the store worker does by the next checkpoint: apply what was taken, then write."""
    ledger.apply()
    ledger.write()


def _ledger_pair(coll: Any, clock: _Now) -> tuple[CoverageLedger, CoverageLedger]:
    target: Any = SimpleNamespace(collection=coll, settings=SimpleNamespace(
        mongo=SimpleNamespace(coverage_collection="coverage")))
    a = CoverageLedger(target, cast(Retrier, _Direct()), "host-a:/state", "a", clock)
    b = CoverageLedger(target, cast(Retrier, _Direct()), "host-b:/state", "b", clock)
    return a, b


def _applied_then_replayed(db: Any, records: list[Record]) -> tuple[list[Any], list[Any]]:
    """The coverage collection after a ledger took ``records``, and after a new store worker's
    ledger replayed them all (the whole spool, as after a restart)."""
    snapshots = []
    for _ in range(2):
        ledger_, _ = _ledger_pair(db.tweets, _Now())
        for record in records:
            (ledger_.on_event if record.kind == KIND_EVENT else ledger_.on_live)(record)
        flush(ledger_)
        snapshots.append(sorted(db.coverage.find(), key=lambda d: d["_id"]))
    return snapshots[0], snapshots[1]


def _rec(seq: int, recv_ns: int, payload: bytes, kind: int = KIND_MESSAGE) -> Record:
    return Record(seq, kind, 1, 1, recv_ns, payload, "s", 0)


def _marker(seq: int, recv_ns: int, cause: str, start_ns: int, **detail: Any) -> Record:
    event = {"type": "gap", "cause": cause, "last_recv_ns": start_ns, **detail}
    return _rec(seq, recv_ns, encode_event(event), KIND_EVENT)


@pytest.mark.parametrize("report_first", [False, True])
def test_takeover_gap_start_moves_to_the_previous_holders_last_message(
        mongo_uri: str, mongo_database: str, report_first: bool) -> None:
    # A renewed its lease last with last_recv L, froze, and its socket kept filling until T; B
    # took over at L and delivered first at R. A wakes at W > R, reads up to T (logged out by a
    # code 7 notice, which has no time), and stands down. B's gap must end up [T, R], with the
    # hour's offline seconds counted once, whichever ledger writes first.
    s = 10**9
    base = (time.time_ns() // HOUR_NS) * HOUR_NS + 600 * s  # inside one hour
    lease, last, first_b, wake = base, base + 5 * s, base + 6 * s, base + 30 * s
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    clock = _Now()
    try:
        coll = client[mongo_database].tweets
        a, b = _ledger_pair(coll, clock)
        for ledger in (a, b):
            flush(ledger)  # loads the open gap (none)

        def a_reports() -> None:
            a.on_live(_rec(1, wake, b'{"id":1,"text":"x","timestamp_ms":"%d"}' % (last // 10**6)))
            a.on_live(_rec(2, wake, b'{"disconnect":{"code":7,"reason":"dup"}}'))
            a.on_event(_marker(3, wake, "reconnect", wake))
            a.on_event(_marker(4, wake, "standby", wake))
            flush(a)

        b.on_event(_marker(1, lease + s, "takeover", lease, **{"from": "a"}))
        flush(b)
        if report_first:
            a_reports()
            clock.t += 5
            b.settle()
        b.on_live(_rec(2, first_b, b'{"id":2,"text":"y"}'))
        flush(b)
        if not report_first:
            a_reports()
            clock.t += 5
            b.settle()
        coverage = client[mongo_database].coverage
        (gap,) = list(coverage.find({"cause": "takeover"}))
        hour = coverage.find_one({"kind": "hour", "instance": "host-b:/state"})
        a_gap = coverage.find_one({"kind": "gap", "instance": "host-a:/state"})
    finally:
        client.close()
    assert gap["start_basis"] == "previous_holder" and gap["lease_start_ns"] == lease
    assert (gap["start_ns"], gap["end_ns"], gap["seconds"]) == (last, first_b, 1.0)
    assert hour is not None and hour["gap_seconds"] == {str(lease): 1.0}
    assert hour["offline_seconds"] == 1.0
    assert a_gap is not None and a_gap["causes"] == ["reconnect", "standby"]
    assert (a_gap["ha_instance"], a_gap["last_message_ns"]) == ("a", last)


def test_takeover_gap_keeps_the_lease_start_while_the_previous_holder_is_silent(
        mongo_uri: str, mongo_database: str) -> None:
    s = 10**9
    lease = (time.time_ns() // HOUR_NS) * HOUR_NS + 600 * s
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    clock = _Now()
    try:
        coll = client[mongo_database].tweets
        _, b = _ledger_pair(coll, clock)
        b.on_event(_marker(1, lease + s, "takeover", lease, **{"from": "a"}))
        b.on_live(_rec(2, lease + 2 * s, b'{"id":2,"text":"y"}'))
        flush(b)
        clock.t += HANDOVER_WAIT + 1  # A never reports (its host died)
        b.settle()
        (gap,) = list(client[mongo_database].coverage.find({"cause": "takeover"}))
    finally:
        client.close()
    assert gap["start_basis"] == "lease" and gap["start_ns"] == lease and gap["seconds"] == 2.0
    assert not b._handovers.waiting  # no longer awaited


@pytest.mark.parametrize(("payload", "expected"), [
    (b'{"id":1,"timestamp_ms":"1700000000123"}', 1700000000123),
    (b'{"limit":{"track":5,"timestamp_ms":"1700000000456"}}', 1700000000456),
    (b'{"disconnect":{"code":7,"reason":"x"}}', None),
    (b'{"id":1,"text":"no time"}', None),
    (b'not json', None),
    (b'[1,2]', None),
    # no date holds them (the ledger stores it as one: the worker crash-looped at the next gap)
    (b'{"id":1,"timestamp_ms":"99999999999999999999"}', None),
    (b'{"id":1,"timestamp_ms":18446744073709551615}', None),
    (b'{"id":1,"timestamp_ms":"\xc2\xb2"}', None),  # a superscript 2: isdigit(), not int()
    (b'{"id":1,"timestamp_ms":"' + b"1" * 5000 + b'"}', None),
])
def test_message_time_of_a_record(payload: bytes, expected: int | None) -> None:
    got = message_time_ns(_rec(1, 1, payload))
    assert got == (expected * 10**6 if expected is not None else None)


def _entry(seq: int, recv_ns: int) -> Entry:
    entry = Entry(bson.encode({"_id": seq}))
    entry.tweet_id, entry.record = seq, _rec(seq, recv_ns, b"{}").ref()
    return entry


def test_stored_tweets_are_counted_in_the_hour_each_was_received(
        mongo_uri: str, mongo_database: str) -> None:
    """A batch within one hour is counted at once; one across an hour boundary tweet by tweet:
    each hour gets its own tweets and the newest spool seq among them, out of order or not."""
    s = 10**9
    hour = (time.time_ns() // HOUR_NS) * HOUR_NS - 2 * HOUR_NS
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        ledger, _ = _ledger_pair(client[mongo_database].tweets, _Now())
        ledger.on_stored([_entry(1, hour + 10 * s), _entry(3, hour + 5 * s),
                          _entry(2, hour + 20 * s)])
        ledger.on_stored([_entry(4, hour + HOUR_NS - s), _entry(6, hour + HOUR_NS + s),
                          _entry(5, hour + HOUR_NS - 2 * s), _entry(7, hour + HOUR_NS + 2 * s)])
        ledger.on_stored([])
        flush(ledger)
        docs = list(client[mongo_database].coverage.find({"kind": "hour"}))
    finally:
        client.close()
    got = {d["hour_ns"]: (d["tweets"], d["seq"]) for d in docs}
    assert got == {hour: (5, 5), hour + HOUR_NS: (2, 7)}


def test_not_started_gap_replayed_under_an_open_gap_changes_nothing(
        mongo_uri: str, mongo_database: str) -> None:
    """A spool replayed from its first record (the ``not_started`` marker) while a later gap is
    open: that gap goes on, the archive's first gap is neither reopened nor counted twice."""
    s = 10**9
    hour = (time.time_ns() // HOUR_NS) * HOUR_NS - 2 * HOUR_NS
    started, stop = hour + 600 * s, hour + 900 * s
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        records = [_marker(1, started, "not_started", hour, started_ns=started),
                   _rec(2, started + s, b'{"connected":1}'),
                   _rec(3, stop - s, b'{"id":3,"text":"x"}'),
                   _marker(4, stop, "stopped", stop - s)]
        before, after = _applied_then_replayed(client[mongo_database], records)
    finally:
        client.close()
    assert after == before
    first = next(d for d in after if d.get("cause") == "not_started")
    assert (first["start_ns"], first["end_ns"], first["seconds"]) == (hour, started + s, 601.0)
    (hour_doc,) = [d for d in after if d["kind"] == "hour"]
    assert hour_doc["offline_seconds"] == 601.0


def test_takeover_ends_a_standbys_first_gap_even_from_before_it(
        mongo_uri: str, mongo_database: str) -> None:
    """A fresh standby's archive begins at its hour; the previous holder's last message was in
    the hour before: the takeover still gets its own gap (the pair's hole), not a cause of the
    standby's first gap, and no second counts the same time twice."""
    s = 10**9
    hour = (time.time_ns() // HOUR_NS) * HOUR_NS - 2 * HOUR_NS
    lease_last, started, first_b = hour - 5 * s, hour + 2 * s, hour + 20 * s
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        _, b = _ledger_pair(client[mongo_database].tweets, _Now())
        b.on_event(_marker(1, started, "not_started", hour, started_ns=started))
        b.on_event(_marker(2, first_b - s, "takeover", lease_last, **{"from": "a"}))
        b.on_live(_rec(3, first_b, b'{"id":3,"text":"y"}'))
        flush(b)
        gaps = {g["cause"]: g for g in client[mongo_database].coverage.find({"kind": "gap"})}
        hours = {h["hour_ns"]: h for h in client[mongo_database].coverage.find({"kind": "hour"})}
    finally:
        client.close()
    assert set(gaps) == {"not_started", "takeover"}
    assert (gaps["not_started"]["end_ns"], gaps["not_started"]["seconds"]) == (hour, 0.0)
    assert (gaps["takeover"]["start_ns"], gaps["takeover"]["end_ns"]) == (lease_last, first_b)
    assert hours[hour]["offline_seconds"] == 20.0
    assert hours[hour - HOUR_NS]["offline_seconds"] == 5.0


def test_coverage_report_tells_the_time_before_the_first_start() -> None:
    h = HOUR_NS
    gaps = [{"instance": "a", "start_ns": 10 * h, "end_ns": 10 * h + 1810 * 10**9,
             "cause": "not_started", "detail": {"started_ns": 10 * h + 1800 * 10**9}}]
    (row,) = build_rows([], gaps, 10 * h, 11 * h, now_ns=12 * h)
    assert (row.offline_seconds, row.not_started_seconds) == (1810.0, 1800.0)
    assert row.covered_percent == round(100 * (1 - 1810 / 3600), 2)
    assert row.causes == ["not_started"]


def test_coverage_table_lists_every_cause_of_the_hours_gaps() -> None:
    """The causes column is every cause a gap lasted through (``causes``), not its main one."""
    h = HOUR_NS
    gaps = [{"instance": "a", "start_ns": 10 * h, "end_ns": 10 * h + 60 * 10**9,
             "cause": "not_started", "causes": ["not_started", "http_error", "stopped"]},
            {"instance": "a", "start_ns": 10 * h + 120 * 10**9, "end_ns": 10 * h + 130 * 10**9,
             "cause": "reconnect", "causes": ["reconnect", "rate_limited"]}]
    (row,) = build_rows([], gaps, 10 * h, 11 * h, now_ns=12 * h)
    assert row.causes == ["not_started", "http_error", "stopped", "reconnect", "rate_limited"]
    assert render([row]).splitlines()[1].endswith(
        "  not_started,http_error,stopped,reconnect,rate_limited")


def test_limit_counts_are_kept_for_the_last_connections_only(
        mongo_uri: str, mongo_database: str) -> None:
    """The long-run audit: LimitSpans remembered every connection for the store worker's life
    (one per reconnect or reload, for months). It keeps the last LIMIT_CONNECTIONS; a late
    notice of an older one is counted from its document, and a replayed one adds nothing."""
    s = 10**9
    t = (time.time_ns() // HOUR_NS) * HOUR_NS + 60 * s
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        coll = client[mongo_database].coverage
        spans = LimitSpans(lambda: coll, cast(Retrier, _Direct()), "host:/state")
        for conn in range(1, 51):
            spans.connected(conn, t + conn * s)
            doc = spans.notice(conn, 10, t + conn * s + s // 2)
            assert doc is not None and doc["undelivered"] == 10
            coll.replace_one({"_id": doc["_id"]}, doc, upsert=True)  # as the ledger writes it
        kept = (len(spans._up), len(spans._last))
        late = spans.notice(1, 15, t + 60 * s)  # connection 1 is long forgotten
        replayed = spans.notice(2, 10, t + 61 * s)
    finally:
        client.close()
    assert kept == (LIMIT_CONNECTIONS, LIMIT_CONNECTIONS)
    assert late is not None and late["undelivered"] == 15 and late["limit_track"] == 15
    assert replayed is None


def _lagged_gap(start_ns: int, end_ns: int, message_seconds: float,
                previous_end_ns: int | None) -> dict[str, Any]:
    gap = {"instance": "a", "start_ns": start_ns, "end_ns": end_ns, "cause": "reconnect",
           "causes": ["reconnect"], "seconds": round((end_ns - start_ns) / 1e9, 3),
           "message_seconds": message_seconds, "last_message_ns": start_ns - 2 * 10**9}
    return gap if previous_end_ns is None else {**gap, "previous_end_ns": previous_end_ns}


def test_a_lagging_connections_gap_counts_its_hole_by_the_messages_times() -> None:
    """A connection that lagged 1.7 s: the gap lasted 0.3 s by receipt, 2.0 s by the messages'
    own times. The hours count the 2.0 s (reaching back from its end, across the hour's start),
    never past the end of the gap before, and a lag under LAG_SECONDS not at all."""
    h, s = HOUR_NS, 10**9
    end = 11 * h + s // 2  # half a second into hour 11
    rows = build_rows([], [_lagged_gap(end - 3 * s // 10, end, 2.0, 10 * h)], 10 * h, 12 * h,
                      now_ns=12 * h)
    assert [(r.hour[11:13], r.offline_seconds) for r in rows] == [("10", 1.5), ("11", 0.5)]
    assert offline_span(_lagged_gap(end - 3 * s // 10, end, 2.0, 10 * h)) == (end - 2 * s, end)
    floor = end - s  # the connection that lagged came up only a second before the gap's end
    assert offline_span(_lagged_gap(end - 3 * s // 10, end, 2.0, floor)) == (floor, end)
    # no known start of the lagging connection, or a lag within LAG_SECONDS: receipt times
    assert offline_span(_lagged_gap(end - 3 * s // 10, end, 2.0, None)) == (end - 3 * s // 10,
                                                                           end)
    assert offline_span(_lagged_gap(end - s, end, 1.9, 10 * h)) == (end - s, end)
    (note,) = lag_notes([{**_lagged_gap(end - 3 * s // 10, end, 2.0, 10 * h), "_id": "x"}])
    assert "0.3 s by receipt but 2.0 s by the messages' own times" in note
    assert not lag_notes([_lagged_gap(end - s, end, 1.9, 10 * h)])


def test_the_ledger_counts_a_lagging_connections_gap_in_its_hours(
        mongo_uri: str, mongo_database: str) -> None:
    """The store worker's ledger: a connection comes up, lags (its last message published 1.7 s
    before it was received), is cut off, and the next connection's first message is fresh. The
    hour document counts the hole by the messages' own times, and a replay changes nothing."""
    s = 10**9
    hour = (time.time_ns() // HOUR_NS) * HOUR_NS - 2 * HOUR_NS
    up, cut = hour + 600 * s, hour + 700 * s
    after = cut + 3 * s // 10
    records = [_marker(1, up - s, "reconnect", up - 10 * s),
               _rec(2, up, b'{"id":2,"text":"x","timestamp_ms":"%d"}' % (up // 10**6)),
               _rec(3, cut, b'{"id":3,"text":"x","timestamp_ms":"%d"}' % ((cut - 17 * s // 10)
                                                                         // 10**6)),
               _marker(4, cut + s // 10, "reconnect", cut),
               _rec(5, after, b'{"id":5,"text":"x","timestamp_ms":"%d"}' % (after // 10**6))]
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        coll = client[mongo_database].tweets
        docs = []
        for _ in range(2):  # the second time, a new store worker replays the spool
            ledger_, _ = _ledger_pair(coll, _Now())
            for record in records:
                (ledger_.on_event if record.kind == KIND_EVENT else ledger_.on_live)(record)
            flush(ledger_)
            docs.append(sorted(client[mongo_database].coverage.find(), key=lambda d: d["_id"]))
    finally:
        client.close()
    assert docs[0] == docs[1]
    gap = next(d for d in docs[0] if d.get("start_ns") == cut)
    assert (gap["seconds"], gap["message_seconds"], gap["previous_end_ns"]) == (0.3, 2.0, up)
    (hour_doc,) = [d for d in docs[0] if d["kind"] == "hour"]
    assert hour_doc["gap_seconds"][str(cut)] == 2.0
    assert hour_doc["offline_seconds"] == 10.0 + 2.0  # the first gap's 10 s, then the lag's


def test_coverage_table_shows_whole_instance_names_in_aligned_columns() -> None:
    # The analyst audit: names were cut to their last 30 characters, dropping the host, so two
    # hosts with the same state folder read the same.
    h = HOUR_NS
    names = ["analytics-host-01:/var/lib/ingestd/instances/news",
             "analytics-host-02:/var/lib/ingestd/instances/news", "b"]
    gaps = [{"instance": name, "start_ns": 10 * h, "end_ns": 10 * h + 60 * 10**9,
             "cause": "reconnect", "causes": ["reconnect"]} for name in names]
    rows = build_rows([], gaps, 10 * h, 11 * h, now_ns=12 * h)
    lines = render(rows).splitlines()
    assert [n for n in names if any(f" {n} " in line for line in lines[1:])] == names
    ends = {line.index(" 0 ") + 1 for line in lines[1:]}  # the tweets column, right-aligned
    assert ends == {lines[0].index("tweets") + len("tweets") - 1}, lines


def coverage_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWITTER_")}  # no secrets
    return subprocess.run([sys.executable, "-m", "ingestd", "coverage", "--config",
                           str(daemon.config), "--since", "2000-01-01T00:00:00", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_coverage_instance_accepts_the_ha_instance_and_refuses_unknown_names(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """``--instance`` takes the ledger's name (host:state folder) and the ``ha.instance`` that
    ``status`` shows; a name that is neither is an error listing the ledger's names, never an
    empty table with exit 0."""
    sim = SimProcess(tmp_path / "sim", "--rate", "100", "--keepalive", "1").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database,
                       ha={"mode": "standby", "lease_seconds": 3.0})
    daemon = Daemon(tmp_path / "daemon", doc)
    try:
        daemon.start().wait_ready()
        wait_until(lambda: daemon.assert_running() or closed_gaps(mongo_uri, mongo_database), 60,
                   "the archive's first gap closed")
        ha_name = daemon.status("stream")["ha"]["instance"]
    finally:
        finish(daemon, sim)
    (gap, *_) = ledger(mongo_uri, mongo_database, "gap")
    ledger_name = gap["instance"]
    assert gap["ha_instance"] == ha_name != ledger_name
    by_ledger = coverage_cli(daemon, "--instance", ledger_name, "--json")
    by_ha = coverage_cli(daemon, "--instance", ha_name, "--json")
    assert by_ledger.returncode == by_ha.returncode == 0, by_ha.stderr
    def hours(out: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
        # The open stop gap counts until now (rows are whole hours "so far"): its seconds and the
        # share covered move between the two calls.
        return [{**h, "covered_percent": None, "offline_seconds": None}
                for h in json.loads(out.stdout)["hours"]]
    assert hours(by_ha) == hours(by_ledger) != []
    assert f"ha.instance {ha_name} is the ledger's instance {ledger_name}" in by_ha.stderr
    table = coverage_cli(daemon, "--instance", ha_name)
    assert table.returncode == 0 and "no coverage records" not in table.stdout, table.stdout
    unknown = coverage_cli(daemon, "--instance", "nobody:1")
    assert unknown.returncode == 2 and unknown.stdout == "", unknown.stdout
    assert "--instance nobody:1: no such instance" in unknown.stderr
    assert ledger_name in unknown.stderr


def test_coverage_rows_are_whole_hours_wherever_the_window_cuts_them(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The analyst audit: with ``--since`` inside an hour, that hour's gaps before it vanished
    from its row while its tweets stayed (offline time understated, coverage overstated); the
    default window (now − 24 h) always cut the oldest row so. Each row now counts its whole hour,
    whatever ``--since``/``--until`` fall on, and says which window it reports."""
    h, s = HOUR_NS, 10**9
    hour = (time.time_ns() // h - 3) * h  # a past hour: no "so far"
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        coll = client[mongo_database].coverage
        coll.insert_one({"_id": "h:/s:hour", "kind": "hour", "instance": "h:/s", "hour_ns": hour,
                         "hour": _utc(hour), "tweets": 100, "limit_max": {}})
        for n, (start, end, cause) in enumerate([(60, 160, "stall"), (1800, 1830, "reconnect")]):
            a, b = hour + start * s, hour + end * s
            coll.insert_one({"_id": f"h:/s:{n}", "kind": "gap", "instance": "h:/s",
                             "cause": cause, "start_ns": a, "end_ns": b, "start": _utc(a),
                             "end": _utc(b), "seconds": end - start})
    finally:
        client.close()
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, mongo_database)
    daemon = Daemon(tmp_path / "daemon", doc)
    daemon.config.write_text(json.dumps(doc))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWITTER_")}

    def report(since: int, until: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ingestd", "coverage", "--config",
                               str(daemon.config), "--since", _utc(since).isoformat(), "--until",
                               _utc(until).isoformat(), *args],
                              capture_output=True, text=True, env=env, timeout=60)

    for since, until in [(hour, hour + h), (hour + 1000 * s, hour + 2000 * s),
                         (hour + 3500 * s, hour + 3599 * s), (hour - 10 * s, hour + 1 * s)]:
        out = report(since, until, "--json")
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        first = hour if since >= hour else hour - h  # the window, widened to whole hours
        assert (got["since"], got["until"]) == (_utc(first).isoformat(),
                                                _utc(hour + h).isoformat())
        (row,) = [r for r in got["hours"] if r["hour"] == _iso_z(hour)]
        assert (row["tweets"], row["offline_seconds"], row["causes"]) == (
            100, 130.0, ["stall", "reconnect"]), (since, until, row)
        assert row["covered_percent"] == round(100 * (1 - 130 / 3600), 2)
    inverted = report(hour + 2000 * s, hour + 1000 * s)
    assert inverted.returncode == 2 and inverted.stdout == "", inverted.stdout
    assert "is not before --until" in inverted.stderr


def _utc(ns_: int) -> datetime:
    return datetime.fromtimestamp(ns_ // 10**9, UTC)


def _iso_z(ns_: int) -> str:
    return _utc(ns_).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_coverage_instance_maps_a_pair_partners_ha_instance(
        mongo_uri: str, mongo_database: str) -> None:
    """Another instance's ha.instance (a pair's partner) maps through the ha_instance its gaps
    record."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        coll = client[mongo_database].coverage
        coll.insert_one({"_id": "h:/b:1", "kind": "gap", "instance": "h:/b",
                         "ha_instance": "vm:b", "cause": "standby"})
        mine = cast(Settings, SimpleNamespace(ha=SimpleNamespace(instance="vm:a"),
                                              state_dir=Path("/nonexistent/a")))
        assert resolve_instance(coll, mine, "h:/b") == ("h:/b", None)
        assert resolve_instance(coll, mine, "vm:b")[0] == "h:/b"
        assert resolve_instance(coll, mine, "vm:a")[0].endswith(":/nonexistent/a")
        with pytest.raises(UnknownInstance, match="h:/b"):
            resolve_instance(coll, mine, "vm:c")
    finally:
        client.close()


def test_gap_markers_open_the_archive_on_a_fresh_spool(tmp_path: Path) -> None:
    """The first start writes the ``not_started`` marker (from the hour's start); a refused
    attempt adds its cause to that gap, and the next run resumes it, numbering on past the
    refused connection ids."""
    def writer() -> SpoolWriter:
        return SpoolWriter(tmp_path / "spool", max_bytes=1 << 30, max_records=10**6)

    before = time.time_ns()
    spool = writer()
    markers = GapMarkers(spool, spool.last_record)
    after = time.time_ns()
    assert markers.open_cause == "not_started" and markers.gap_start_ns() is None
    assert markers.written == 1  # read back below, with the later markers
    markers.gap("rate_limited", detail={"conn": 4, "status": 420})
    markers.gap("rate_limited", detail={"conn": 5, "status": 420})  # the same gap: no marker
    markers.gap("stopped")
    spool.close()
    again = writer()
    last = again.last_record
    assert last is not None and last.conn_id == 5
    event = decode_event(last.payload)
    assert event is not None and event["cause"] == "stopped"
    start = int(event["last_recv_ns"])
    assert start in (before - before % HOUR_NS, after - after % HOUR_NS)
    resumed = GapMarkers(again, last)
    assert (resumed.open_cause, resumed.last_recv_ns, resumed.written) == ("stopped", start, 0)
    again.close()


def test_a_marker_the_disk_refuses_is_logged_and_the_stream_worker_goes_on(
        tmp_path: Path) -> None:
    # A full disk at a start, a connection and a stop: each marker's loss is one
    # coverage_marker_lost line (the marker's type in `marker`: `event` is the line's name),
    # and the caller, the stream worker's loop, carries on.
    import errno
    import io

    import orjson
    import structlog

    from ingestd.logs import configure_logging
    from ingestd.spool.writer import SpoolWriteError

    class FullSpool(SpoolWriter):
        def append(self, *args: Any, **kwargs: Any) -> int:
            raise SpoolWriteError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    buf = io.StringIO()
    configure_logging("info", "json", stream=buf, error_interval=0)
    spool = FullSpool(tmp_path / "spool", max_bytes=1 << 20, max_records=1000)
    try:
        markers = GapMarkers(spool, None)  # the fresh spool's not_started gap
        markers.connected(1)
        markers.gap("stopped", last_recv_ns=time.time_ns())
    finally:
        spool.close()
        structlog.reset_defaults()
    lost = [e for e in map(orjson.loads, buf.getvalue().splitlines())
            if e["event"] == "coverage_marker_lost"]
    assert [(e["marker"], e["cause"]) for e in lost] == [
        ("gap", "not_started"), ("connected", None), ("gap", "stopped")]
    assert all("No space left" in e["error"] for e in lost) and markers.written == 0


def test_a_daemon_killed_and_never_restarted_is_not_counted_as_covered(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The analyst audit: every process SIGKILLed (a host lost) and no restart to record the
    ``crashed`` gap left the ledger with no open gap, so ``ingestd coverage`` counted the hours
    after the kill as covered (100 % for a past hour the stream was up for seconds). The store
    worker now stamps how far the ledger is complete (``seen_ns``); time past a stale stamp with
    no open gap is ``unreported`` offline time."""
    sim = SimProcess(tmp_path / "sim", "--rate", "100", "--keepalive", "0.5",
                     "--control-every", "0").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        daemon.start().wait_ready()
        def stamped() -> bool:
            daemon.assert_running()
            return daemon.counters("store").get("stored", 0) >= 50 and any(
                "seen_ns" in h for h in ledger(mongo_uri, mongo_database, "hour"))
        wait_until(stamped, 60, "tweets stored and the ledger stamped")
        kill_everything(daemon)
        killed = time.time_ns()
    finally:
        daemon.kill()
        sim.stop()
    hours, gaps = ledger(mongo_uri, mongo_database, "hour"), ledger(mongo_uri, mongo_database,
                                                                    "gap")
    delivered = [e["t"] for e in sim.ground_truth().of("tweet")]
    seen = max(h["seen_ns"] for h in hours)
    assert seen <= killed and seen >= min(delivered) * 1e9, "stamped while the stream was up"
    assert [g["end"] is None for g in gaps] == [False], "no restart: no crashed gap recorded"
    later = killed + 2 * HOUR_NS  # the analyst looks two hours on
    extra = unreported_gaps(last_seen(hours), gaps, later)
    assert [(g["cause"], g["start_ns"]) for g in extra] == [("unreported", seen)]
    rows = build_rows(hours, gaps + extra, gaps[0]["start_ns"], later, now_ns=later)
    offline = sum(r.offline_seconds for r in rows)
    assert offline == pytest.approx(gaps[0]["seconds"] + (later - seen) / 1e9, abs=0.01)
    assert all("unreported" in r.causes for r in rows[-2:]), rows
    assert rows[-1].covered_percent == 0.0
    # ...while a stamp fresher than UNREPORTED_AFTER_NS is a daemon that is merely between two
    assert unreported_gaps(last_seen(hours), gaps, seen + 60 * 10**9) == []


def test_coverage_cli_names_an_instance_that_stopped_reporting(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """``ingestd coverage`` (the real command) on a ledger whose instance last stamped it an hour
    and a half ago, with no open gap: the hours since are offline, cause ``unreported``, and a
    note says so; a ledger with an open gap (a clean stop) gets no such gap."""
    h, s = HOUR_NS, 10**9
    hour = (time.time_ns() // h - 2) * h
    seen = hour + 30 * 60 * s
    name, other = "host1:/var/lib/ingestd", "host2:/var/lib/ingestd"
    stop = hour + 90 * 60 * s
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        client[mongo_database].coverage.insert_many([
            {"_id": f"{name}:{hour}", "kind": "gap", "instance": name, "cause": "not_started",
             "causes": ["not_started"], "start": datetime.fromtimestamp(hour / 1e9, UTC),
             "end": datetime.fromtimestamp((hour + s) / 1e9, UTC), "start_ns": hour,
             "end_ns": hour + s, "seconds": 1.0, "detail": {}},
            {"_id": f"hour:{name}:x", "kind": "hour", "instance": name,
             "hour": datetime.fromtimestamp(hour / 1e9, UTC), "hour_ns": hour, "tweets": 10,
             "seq": 10, "limit_max": {}, "gap_seconds": {str(hour): 1.0}, "offline_seconds": 1.0,
             "seen_ns": seen, "seen": datetime.fromtimestamp(seen / 1e9, UTC)},
            # another instance, stopped cleanly after the window asked for below: its open gap
            # says why it went quiet, wherever the window ends
            {"_id": f"hour:{other}:x", "kind": "hour", "instance": other,
             "hour": datetime.fromtimestamp(hour / 1e9, UTC), "hour_ns": hour, "tweets": 5,
             "seq": 5, "limit_max": {}, "gap_seconds": {}, "offline_seconds": 0.0,
             "seen_ns": seen, "seen": datetime.fromtimestamp(seen / 1e9, UTC)},
            {"_id": f"{other}:{stop}", "kind": "gap", "instance": other, "cause": "stopped",
             "causes": ["stopped"], "start": datetime.fromtimestamp(stop / 1e9, UTC),
             "end": None, "start_ns": stop, "end_ns": None, "seconds": None, "detail": {}}])
    finally:
        client.close()
    doc = settings_doc("http://127.0.0.1:1/1.1/statuses/filter.json", mongo_uri, mongo_database)
    config = tmp_path / "settings.yaml"
    config.write_text(json.dumps(doc))
    since = datetime.fromtimestamp(hour / 1e9, UTC).isoformat()
    out = subprocess.run([sys.executable, "-m", "ingestd", "coverage", "--config", str(config),
                          "--since", since, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout)["hours"] if r["instance"] == name]
    assert [r["causes"] for r in rows[:2]] == [["not_started", "unreported"], ["unreported"]]
    assert rows[0]["offline_seconds"] == 1.0 + 30 * 60 and rows[1]["covered_percent"] == 0.0
    text = subprocess.run([sys.executable, "-m", "ingestd", "coverage", "--config", str(config),
                           "--since", since], capture_output=True, text=True, timeout=60)
    assert f"note: {name} has not reported since" in text.stdout, text.stdout
    assert f"note: {other}" not in text.stdout, text.stdout
    until = datetime.fromtimestamp((hour + h) / 1e9, UTC).isoformat()
    past = subprocess.run([sys.executable, "-m", "ingestd", "coverage", "--config", str(config),
                           "--since", since, "--until", until, "--json"], capture_output=True,
                          text=True, timeout=60)
    got = json.loads(past.stdout)
    assert {r["instance"]: r["causes"] for r in got["hours"]} == {
        name: ["not_started", "unreported"], other: []}
    assert [g["cause"] for g in got["gaps"] if g["instance"] == other] == []


@pytest.mark.parametrize("window", [("--until", "9999-12-31T23:59:59"),
                                    ("--since", "0001-01-01T00:30:00+01:00")])
def test_coverage_window_past_the_calendar_is_an_error_not_a_traceback(
        tmp_path: Path, window: tuple[str, str]) -> None:
    """The analyst audit: an ``--until`` in the last hour of year 9999 (a "no end" an analyst
    types) widened to a whole hour past what a date holds and ended in a ValueError traceback."""
    config = tmp_path / "settings.yaml"
    config.write_text(json.dumps(settings_doc("http://127.0.0.1:1/1.1/statuses/filter.json",
                                              "mongodb://127.0.0.1:1", "x")))
    out = subprocess.run([sys.executable, "-m", "ingestd", "coverage", "--config", str(config),
                          *window], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert "Traceback" not in out.stderr and "--since/--until: out of range" in out.stderr


def test_a_quiet_hour_has_a_document_stamped_seen(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """A stream that delivers nothing (keep-alives only): the idle store worker stamps the hour's
    document, so the hour has a row (0 tweets, covered) and the stamp says the ledger is current;
    before, a quiet hour had no document and no row."""
    sim = SimProcess(tmp_path / "sim", "--max-tweets", "0", "--keepalive", "0.5").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        started = time.time_ns()
        daemon.start().wait_ready()
        wait_until(lambda: daemon.assert_running() or any(
            "seen_ns" in h for h in ledger(mongo_uri, mongo_database, "hour")), 30,
            "the idle store worker's stamp")
    finally:
        finish(daemon, sim)
    hours = ledger(mongo_uri, mongo_database, "hour")  # one, or two across an hour's end
    assert [h["tweets"] for h in hours] == [0] * len(hours)
    assert max(h.get("seen_ns", 0) for h in hours) >= started
    assert sim.ground_truth().tweet_ids() == []


def _connected(seq: int, recv_ns: int, conn: int, **flags: Any) -> Record:
    return _rec(seq, recv_ns, encode_event({"type": "connected", "conn": conn, **flags}),
                KIND_EVENT)


def test_a_rules_refused_gap_is_held_until_a_connection_with_the_rules_accepted(
        mongo_uri: str, mongo_database: str) -> None:
    """v2 rules refused at the first sync: connections coming up with the rules unsettled
    (``rules_pending``), messages and later gap markers do not end the gap; the
    ``rules_accepted`` marker does. Replayed by a new store worker, the ledger is the same."""
    s = 10**9
    hour = (time.time_ns() // HOUR_NS) * HOUR_NS - 2 * HOUR_NS
    up = hour + 600 * s
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        records = [_marker(1, up - s, "not_started", hour, started_ns=up - s),
                   _connected(2, up, 1, rules_pending=True),
                   # from the connection's coming up (``GapMarkers.pending_since_ns``)
                   _marker(3, up + 1 * s, "rules_refused", up, refused=["Invalid"]),
                   _rec(4, up + 2 * s, b'{"data":{"id":"4"}}'),  # the server's older rules
                   _marker(5, up + 60 * s, "reconnect", up + 2 * s),
                   _connected(6, up + 61 * s, 2, rules_pending=True),
                   _connected(7, up + 300 * s, 2, rules_accepted=True)]
        before, after = _applied_then_replayed(client[mongo_database], records)
    finally:
        client.close()
    assert after == before
    first, gap = sorted((d for d in after if d["kind"] == "gap"), key=lambda d: d["start_ns"])
    assert (first["cause"], first["end_ns"]) == ("not_started", up), first
    assert gap["causes"] == ["rules_refused", "reconnect"], gap
    assert (gap["start_ns"], gap["end_ns"]) == (up, up + 300 * s), gap
    assert gap["detail"]["refused"] == ["Invalid"], gap
    (hour_doc,) = [d for d in after if d["kind"] == "hour"]
    assert hour_doc["offline_seconds"] == 900.0
