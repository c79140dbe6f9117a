"""Settings generations: unique for a state folder's life, and each one's filters recorded, so that
``_ingest.matched`` is computed with the filters a tweet was received under, across restarts
(docs/design.md, "Generations").

The restart test runs the real daemon, simulator and a private MongoDB stand-in: a backlog
received under one run's filters is replayed by the next run, started with other filters. Every
stored document's ``matched`` is checked against the filters of the simulator connection that
delivered the tweet (its ground truth).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pymongo
import pytest

from ingestd.documents.matching import Matcher
from ingestd.spool.format import KIND_MESSAGE
from ingestd.spool.generations import KEEP, LEGACY_FIRST, MAX_GENERATION, GenerationRecord
from ingestd.spool.writer import SpoolWriter
from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import MongoStandIn, stored_ids
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

DB = "generations"


# ---------------------------------------------------------------- the record itself


def test_numbers_continue_after_the_last_recorded_generation(tmp_path: Path) -> None:
    first_run = GenerationRecord(tmp_path)
    assert first_run.next_generation() == 1  # a new folder
    first_run.record(1, (["iphone", "android"], [], []))
    first_run.record(2, (["iphone"], [12], [(-1.0, -2.0, 3.0, 4.0)]))
    second_run = GenerationRecord(tmp_path)  # a restart reads the folder again
    assert second_run.next_generation() == 3
    assert second_run.lookup(1) == (["iphone", "android"], [], [])
    assert second_run.lookup(2) == (["iphone"], [12], [(-1.0, -2.0, 3.0, 4.0)])
    assert second_run.lookup(3) == "missing"


def test_numbers_past_a_spool_records_generation_field_are_not_ours(tmp_path: Path) -> None:
    # A record carries its generation as a uint32: numbering after a file put there by hand
    # (4294967296.json, or such a ``first``) made every append of the stream worker fail.
    record = GenerationRecord(tmp_path)
    record.record(7, (["iphone"], [], []))
    (tmp_path / "generations" / f"{MAX_GENERATION + 1}.json").write_bytes(b"{}")
    assert record.next_generation() == 8
    (tmp_path / "generations" / "7.json").unlink()
    (tmp_path / "generations" / "first").write_text(f"{MAX_GENERATION + 1}\n")
    assert record.first() is None
    with pytest.raises(OSError, match="past the spool's 4294967295"):
        record.record(MAX_GENERATION + 1, (["iphone"], [], []))  # the number after 4294967295


def test_a_generation_file_of_another_shape_is_unreadable(tmp_path: Path) -> None:
    record = GenerationRecord(tmp_path)
    record.record(1, (["iphone"], [12], [(-1.0, -2.0, 3.0, 4.0)]))
    path = tmp_path / "generations" / "1.json"
    good = orjson.loads(path.read_bytes())
    for shape in ([], "x", 3, {**good, "track": "iphone"}, {**good, "track": ["a", " "]},
                  {**good, "track": [1]}, {**good, "follow": "12"}, {**good, "follow": [True]},
                  {**good, "locations": ["1234"]}, {**good, "locations": [[1, 2, 3]]},
                  {**good, "locations": [[1, 2, 3, "x"]]}, {**good, "locations": 5}):
        path.write_bytes(orjson.dumps(shape))
        assert record.lookup(1) == "unreadable", shape
    path.write_bytes(orjson.dumps(good))
    assert record.lookup(1) == (["iphone"], [12], [(-1.0, -2.0, 3.0, 4.0)])


def test_a_folder_whose_spool_an_older_ingestd_wrote_starts_past_its_numbers(
        tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "00000000000000000001.seg").write_bytes(b"x")
    record = GenerationRecord(tmp_path)
    assert record.next_generation() == LEGACY_FIRST
    record.record(LEGACY_FIRST, (["ipod"], [], []))
    assert record.lookup(1) == "before_record"  # an older run's record: filters never kept
    assert GenerationRecord(tmp_path).next_generation() == LEGACY_FIRST + 1


def test_records_appended_after_a_clean_stop_set_the_recorded_generations_aside(
        tmp_path: Path) -> None:
    """Only another program (an older ingestd, numbering its generations from 1 again) appends
    to a stopped daemon's spool: the next start sets the recorded generations aside, so a
    colliding number falls back (counted) instead of taking this version's filters."""
    record = GenerationRecord(tmp_path)
    assert record.supersede_if_appended(5) is None  # never stopped here: nothing to compare
    record.record(1, (["iphone"], [], []))
    record.record(2, (["ipad"], [], []))
    record.note_stop(10)
    assert record.supersede_if_appended(10) is None  # nothing appended since
    assert record.lookup(1) == (["iphone"], [], [])
    record.note_stop(10)
    assert record.supersede_if_appended(14) == (11, 14)
    assert record.lookup(1) == record.lookup(2) == "before_record"
    assert record.next_generation() == 3
    assert sorted(p.name for p in (record.directory / "superseded").iterdir()) == [
        "1.json", "2.json"]
    # the mark is used once: a run that crashes leaves none, its own appends are not foreign
    record.record(3, (["ipod"], [], []))
    assert record.supersede_if_appended(20) is None
    assert record.lookup(3) == (["ipod"], [], [])


def test_an_older_versions_records_after_a_stop_are_not_matched_by_our_filters(
        tmp_path: Path, mongo_standin: MongoStandIn) -> None:
    """The audit's downgrade and upgrade back: this version recorded generation 1 = [iphone];
    an older one (no ``generations/``) then spooled tweets as its own generation 1 = [android]
    and stopped with them unstored; this version starts again with [android]. Those tweets were
    matched by our generation 1's filters ([], nothing counted); now by the start's, counted."""
    standin = mongo_standin
    sim = SimProcess(tmp_path / "sim", "--rate", "200", "--max-tweets", "50", "--keepalive",
                     "1", "--control-every", "0").start()
    doc = settings_doc(sim.url, standin.uri, DB, stream={"track": ["iphone"]})
    daemon = Daemon(tmp_path / "daemon", doc)
    try:
        daemon.start()
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 50, 30, "50 stored")
        daemon.stop()
        # the older version's run: three tweets of its generation 1, left in the spool
        spool = SpoolWriter(daemon.state_dir / "spool", max_bytes=1 << 30, max_records=10**6)
        ids = [9_100_000_000_000_000_001 + i for i in range(3)]
        tweets = [orjson.dumps({"id": i, "id_str": str(i), "text": "my new android phone",
                                "created_at": "Sat Dec 05 10:00:00 +0000 2026",
                                "user": {"id": 7, "screen_name": "someone"},
                                "entities": {"hashtags": [], "user_mentions": [], "urls": []}})
                  for i in ids]
        spool.append([(KIND_MESSAGE, t) for t in tweets], 1, 1, time.time_ns())
        spool.close()
        daemon.write_settings_atomically({**doc, "stream": {**doc["stream"],
                                                            "track": ["android"]}})
        daemon.start()
        daemon.wait_ready()
        wait_until(lambda: set(ids) <= set(stored_ids(standin.uri, DB)), 30,
                   "the older version's tweets stored")
        # published once a second: until the counts include them
        store = wait_until(lambda: (c if (c := daemon.counters("store")).get(
            "matched_fallback") == {"before_record": 3} else None), 10, "3 fallbacks counted")
        superseded = daemon.events("generations_superseded")
    finally:
        daemon.kill()
        sim.stop()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        standin.uri, serverSelectionTimeoutMS=10000)
    try:
        docs = {d["_id"]: d["_ingest"] for d in client[DB].tweets.find({"_id": {"$in": ids}})}
    finally:
        client.close()
    assert {i: (d["generation"], d["matched"]["track"]) for i, d in docs.items()} == {
        i: (1, ["android"]) for i in ids}
    assert store["matched_fallback"] == {"before_record": 3}
    assert len(superseded) == 1


def test_only_the_newest_generations_are_kept(tmp_path: Path) -> None:
    record = GenerationRecord(tmp_path)
    for generation in range(1, KEEP + 3):
        record.record(generation, ([f"w{generation}"], [], []))
    assert len(list(record.directory.glob("*.json"))) == KEEP
    assert record.lookup(2) == "pruned"
    assert record.lookup(KEEP + 2) == ([f"w{KEEP + 2}"], [], [])
    assert record.next_generation() == KEEP + 3


# ---------------------------------------------------------------- restart with a backlog


def matched_of(doc: dict[str, Any], track: list[str]) -> dict[str, list[Any]]:
    m = Matcher(track).match(doc)
    return {"track": m.track, "follow": m.follow, "locations": m.locations}


def test_a_backlog_replayed_after_a_restart_is_matched_by_the_filters_it_came_under(
        tmp_path: Path, mongo_standin: MongoStandIn) -> None:
    """Defect: a backlog left in the spool (MongoDB down at the stop) was replayed by the next
    run with its old generation number but matched by the new run's filters (received under
    [iphone, android], stored with ``matched.track: []``), and the new run numbered its
    generations from 1 again."""
    standin = mongo_standin
    sim = SimProcess(tmp_path / "sim", "--rate", "300", "--max-tweets", "1500", "--keepalive",
                     "1", "--control-every", "0", "--source", "generated",
                     "--seed", "7").start()
    doc = settings_doc(sim.url, standin.uri, DB, stream={"track": ["iphone", "android"]},
                       control={"stop_timeout": 4, "heartbeat_timeout": 10})
    doc["mongo"].update(timeout_ms=2000)
    doc["writer"].update(retry_start=0.2, retry_cap=1.0)
    daemon = Daemon(tmp_path / "daemon", doc)
    try:
        daemon.start()
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 100, 30,
                   "first tweets stored")
        standin.stop()  # MongoDB down: what arrives now stays in the spool
        wait_until(lambda: daemon.status("stream").get("spool", {}).get("records", 0) >= 300,
                   30, "a backlog in the spool")
        daemon.stop()
        assert daemon.status("store")["spool"]["bytes"] > 0, "the backlog was left in the spool"

        # The next run: other filters, MongoDB back.
        daemon.write_settings_atomically({**doc, "stream": {**doc["stream"],
                                                            "track": ["iphone", "ipod"]}})
        standin.start()
        daemon.start()
        daemon.wait_ready()
        assert daemon.status("supervisor")["generation"] == 2  # not 1 again
        accepted = wait_until(lambda: [c["conn"] for c in sim.ground_truth().connections()
                                       if c["status"] == 200][1:], 30, "the second run's stream")
        second = accepted[-1]

        def drained() -> bool:
            daemon.assert_running()
            truth = sim.ground_truth()
            store = daemon.status("store")
            return (len(truth.tweet_ids(second)) >= 1500
                    and daemon.status("stream").get("spool", {}).get("records") == 0
                    and store.get("counters", {}).get("pending") == 0
                    and set(truth.tweet_ids(second)) <= set(stored_ids(standin.uri, DB)))
        wait_until(drained, 60, "the backlog and the second connection stored", 0.25)
        store = daemon.counters("store")
        cmdlines = [psutil.Process(daemon.worker_pid(r)).cmdline() for r in ("stream", "store")]
        resolved = daemon.events("generation_resolved", generation=1)
    finally:
        daemon.kill()
        sim.stop()

    truth = sim.ground_truth()
    tracks = {c["conn"]: list(c["params"]["track"]) for c in truth.connections()
              if c["status"] == 200}
    conn_of = {e["id"]: e["conn"] for e in truth.of("tweet")}
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        standin.uri, serverSelectionTimeoutMS=10000)
    try:
        docs = list(client[DB].tweets.find())
    finally:
        client.close()
    assert list(tracks.values()) == [["iphone", "android"], ["iphone", "ipod"]]
    wrong = []
    for d in docs:
        expected = matched_of(d, tracks[conn_of[d["_id"]]])
        if d["_ingest"]["matched"] != expected:
            wrong.append((d["_ingest"]["conn"], d["_ingest"]["generation"], expected["track"],
                          d["_ingest"]["matched"]["track"]))
    first_conn = min(tracks)
    first_run_docs = [d for d in docs if conn_of[d["_id"]] == first_conn]
    android = sum(1 for d in first_run_docs if "android" in d["_ingest"]["matched"]["track"])
    print(f"\n[figure] {len(docs)} stored, {len(first_run_docs)} received under "
          f"[iphone, android] ({android} matched 'android'), wrong matched: {len(wrong)}")
    assert not wrong, f"{len(wrong)} stored with another generation's filters: {wrong[:5]}"
    assert resolved, "the replayed generation was resolved from the state folder's record"
    assert store.get("matched_fallback") == {}
    # Generations are unique across the two runs: one number per run's filters.
    gens = {(d["_ingest"]["conn"], d["_ingest"]["generation"]) for d in docs}
    assert {g for _, g in gens} == {1, 2}
    assert all(len({g for c, g in gens if c == conn}) == 1 for conn, _ in gens)
    # The workers' command line names the generation they started with for what it is.
    assert all(c[c.index("--start-generation") + 1] == "2" for c in cmdlines), cmdlines
