"""DeadLetterStore: durable JSONL entries, raw kept or encoded, bounded without silent loss."""

from __future__ import annotations

import base64
import os
import signal
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestd.config.schema import DeadletterSettings
from ingestd.sink.deadletter import RAW_CAP, DeadLetterStore
from ingestd.sink.mongo import open_collection
from ingestd.sink.worker import StoreWorker
from ingestd.spool.format import KIND_MESSAGE
from ingestd.spool.reader import SpoolReader
from ingestd.spool.writer import SpoolWriter
from tests.support.daemon import Daemon, settings_doc
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until
from tests.test_writer import make_settings


def put(store: DeadLetterStore, raw: bytes, reason: str = "invalid_json", seq: int = 1) -> None:
    store.put(reason, raw, conn_id=4, generation=2, seq=seq, code=None, detail="why")


def test_entry_fields_and_daily_file(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 1 << 20,
                            clock=lambda: datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC))
    store.put("mongo_rejected", b'{"id": 1}', conn_id=4, generation=2, seq=9, code=121,
              detail="DocumentValidationFailure")
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == ["deadletter-20240506.jsonl"]
    entry = orjson.loads(files[0].read_bytes())
    assert entry == {
        "time": "2024-05-06T07:08:09.000+00:00", "reason": "mongo_rejected", "code": 121,
        "detail": "DocumentValidationFailure", "conn_id": 4, "generation": 2, "seq": 9,
        "size": 9, "truncated": False, "raw": '{"id": 1}'}
    assert store.counts == {"mongo_rejected": 1}


def test_a_file_moved_or_deleted_away_is_created_again_at_its_path(tmp_path: Path) -> None:
    # logrotate-style: after `mv` (or `rm`) of today's file the next dead letter goes to a new
    # file at the path, not to the moved file (or an unlinked inode).
    dead, elsewhere = tmp_path / "dead", tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = DeadLetterStore(dead, 1 << 20, clock=lambda: datetime(2024, 5, 6, tzinfo=UTC))
    path = dead / "deadletter-20240506.jsonl"
    try:
        put(store, b"one", seq=1)
        path.rename(elsewhere / path.name)
        put(store, b"two", seq=2)
        assert [e["seq"] for e in store.iter_entries()] == [2]
        assert [orjson.loads(line)["seq"] for line in (elsewhere / path.name).read_bytes()
                .splitlines()] == [1]
        assert store.total_bytes == path.stat().st_size  # the bound counts what is there
        path.unlink()
        put(store, b"three", seq=3)
        put(store, b"four", seq=4)
        assert [e["seq"] for e in store.iter_entries()] == [3, 4]
    finally:
        store.close()


def test_invalid_utf8_is_kept_as_base64(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 1 << 20)
    raw = b'{"text": "\xff\xfe"}'
    put(store, raw, "invalid_utf8")
    (entry,) = store.iter_entries()
    assert "raw" not in entry
    assert base64.b64decode(entry["raw_b64"]) == raw
    assert DeadLetterStore.raw_of(entry) == raw


def test_raw_is_capped_and_a_cut_character_is_not_bad_input(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 1 << 30)
    raw = b"a" * (RAW_CAP - 1) + "é".encode() * 10  # the cap splits the first "é"
    put(store, raw)
    (entry,) = store.iter_entries()
    assert entry["truncated"] is True
    assert entry["size"] == len(raw)
    assert entry["raw"] == "a" * (RAW_CAP - 1)


def test_store_full_drops_raw_but_keeps_and_counts_the_entry(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 2000)
    put(store, b"x" * 500, seq=1)
    put(store, b"y" * 2000, seq=2)
    entries = list(store.iter_entries())
    assert [e["seq"] for e in entries] == [1, 2]
    assert entries[0]["raw"] == "x" * 500
    assert entries[1]["raw_dropped"] == "store full"
    assert "raw" not in entries[1] and "raw_b64" not in entries[1]
    assert store.raw_dropped == 1
    assert store.counts == {"invalid_json": 2}


def test_existing_files_count_towards_the_bound(tmp_path: Path) -> None:
    first = DeadLetterStore(tmp_path, 1500)
    put(first, b"x" * 1000)
    first.close()
    second = DeadLetterStore(tmp_path, 1500)
    put(second, b"y" * 1000, seq=2)
    assert second.raw_dropped == 1
    assert [e["seq"] for e in second.iter_entries()] == [1, 2]


def test_a_reload_bounds_the_next_dead_letter(tmp_path: Path, mongo_uri: str) -> None:
    # The settings audit: deadletter.max_bytes set by a reload was reported applied, and the
    # store worker kept the bound it started with.
    spool = tmp_path / "spool"
    bad_records(spool, [b'{"a": 1'])
    settings = make_settings(mongo_uri, "deadletter_reload")
    dead = DeadLetterStore(tmp_path / "dead", 1 << 20)
    worker = StoreWorker(settings, SpoolReader(spool), open_collection, dead,
                         encoder_process=False)
    try:
        worker.apply_settings(1, replace(settings, deadletter=DeadletterSettings(max_bytes=10)))
        assert worker.run(lambda: True, lambda: None, lambda: None)
    finally:
        worker.close()
        dead.close()
    (entry,) = dead.iter_entries()
    assert entry["raw_dropped"] == "store full" and "raw" not in entry, entry
    assert (dead.max_bytes, dead.evidence_bytes) == (10, 1 << 20)


def test_put_reaches_the_disk_before_returning(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 1 << 20)
    put(store, b"abc")
    # Another reader (a fresh store on the same dir) sees it without close(): flushed.
    assert [e["raw"] for e in DeadLetterStore(tmp_path, 1 << 20).iter_entries()] == ["abc"]


def test_raw_never_reaches_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = DeadLetterStore(tmp_path, 1 << 20)
    put(store, b"SECRET-PAYLOAD-CONTENT")
    out = capsys.readouterr()
    assert "SECRET-PAYLOAD-CONTENT" not in out.out + out.err


# ---------------------------------------------------------------- exactly once per spool record


def bad_records(spool: Path, payloads: list[bytes]) -> None:
    writer = SpoolWriter(spool, max_bytes=1 << 30, max_records=1 << 20)
    writer.append([(KIND_MESSAGE, p) for p in payloads], conn_id=1, generation=0, recv_ns=1)
    writer.close()


def drain(tmp_path: Path, mongo_uri: str, reader: SpoolReader) -> dict[str, Any]:
    """One store worker's life on the spool: drain it; the reader is left as a crash leaves it."""
    settings = make_settings(mongo_uri, "deadletter_once")
    dead = DeadLetterStore(tmp_path / "dead", 1 << 20)
    worker = StoreWorker(settings, reader, open_collection, dead, encoder_process=False)
    try:
        assert worker.run(lambda: True, lambda: None, lambda: None)
        return worker.counters()
    finally:
        worker.close()
        dead.close()


def test_a_replayed_record_is_not_dead_lettered_twice(tmp_path: Path, mongo_uri: str) -> None:
    spool = tmp_path / "spool"
    bad_records(spool, [b'{"a": 1'])
    first = SpoolReader(spool)
    drain(tmp_path, mongo_uri, first)
    first.close()  # checkpoint at seq 1
    bad_records(spool, [b'{"b": 2'])
    # Acks coalesced for an hour: seq 2 is dead-lettered, its ack never reaches the disk.
    crashed = SpoolReader(spool, checkpoint_interval=3600)
    assert drain(tmp_path, mongo_uri, crashed)["deadlettered"] == {"invalid_json": 1}
    assert crashed.checkpoint_pending
    replay = SpoolReader(spool)
    counters = drain(tmp_path, mongo_uri, replay)
    replay.close()
    assert counters["records_read"] == 1  # seq 2 again: counted where it went, written once
    assert counters["deadlettered"] == {"invalid_json": 1}
    entries = list(DeadLetterStore(tmp_path / "dead", 1 << 20).iter_entries())
    assert [(e["seq"], e["raw"]) for e in entries] == [(1, '{"a": 1'), (2, '{"b": 2')]


def test_a_new_spool_is_not_mistaken_for_a_replay(tmp_path: Path, mongo_uri: str) -> None:
    bad_records(tmp_path / "old", [b"x1", b"x2", b"x3"])
    drain(tmp_path, mongo_uri, SpoolReader(tmp_path / "old"))
    # The spool is replaced by an empty one: seqs start at 1 again, no checkpoint yet.
    bad_records(tmp_path / "new", [b"y1", b"y2"])
    drain(tmp_path, mongo_uri, SpoolReader(tmp_path / "new"))
    entries = list(DeadLetterStore(tmp_path / "dead", 1 << 20).iter_entries())
    assert [(e["seq"], e["raw"]) for e in entries] == [
        (1, "x1"), (2, "x2"), (3, "x3"), (1, "y1"), (2, "y2")]


def reopened(path: Path, checkpoint_seq: int) -> DeadLetterStore:
    """The store as a restarted worker opens it, the spool's checkpoint at ``checkpoint_seq``."""
    store = DeadLetterStore(path, 1 << 20)
    store.remember_replays(checkpoint_seq)
    return store


def test_the_entries_after_the_checkpoint_are_read_back_past_a_torn_tail(tmp_path: Path) -> None:
    # Out of seq order, as in the daemon: a parse failure (seq 24) is written when taken, the
    # rejections of an earlier batch (5, 9) when that batch is flushed.
    store = DeadLetterStore(tmp_path, 1 << 20)
    for seq in (3, 24, 5, 9):
        put(store, b"x", seq=seq)
    store.close()
    (path,) = tmp_path.glob("deadletter-*.jsonl")
    with path.open("ab") as f:
        f.write(b'{"time": "2024-')  # a crash in the middle of a line
    again = reopened(tmp_path, 4)
    assert [s for s in range(1, 30) if again.holds(s)] == [5, 9, 24]
    assert not again.holds(3)  # before the checkpoint: acknowledged, never replayed
    again.forget_spool()
    assert not again.holds(5) and not reopened(tmp_path, 0).holds(5)
    put(again, b"c", seq=2)
    assert [s for s in range(1, 30) if reopened(tmp_path, 0).holds(s)] == [2]


def test_a_rejection_flushed_after_a_later_parse_failure_is_still_written(
        tmp_path: Path) -> None:
    """Written out of seq order within one run: nothing is mistaken for a replay."""
    store = reopened(tmp_path, 0)
    put(store, b"bad line", seq=24)
    assert not store.holds(5)  # seq 5's rejection comes later, with its batch


# ---------------------------------------------------------------- the real daemon


def test_a_record_is_dead_lettered_once_however_often_the_store_worker_is_killed(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    # The bad line comes last, with tweets in its batch: the store worker is killed as soon as
    # its dead letter is on disk (before the batch, and the bad line's spool ack, are stored),
    # then twice more once its successor runs; the daemon's stop then drains the spool.
    script = [[{"deliver": 150}, {"bad_lines": ["truncated_json"]}, {"keepalive_only": 600}]]
    sim = SimProcess(tmp_path / "sim", "--rate", "0", "--max-tweets", "150", "--keepalive", "1",
                     "--seed", "3", script=script).start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    dead_dir = daemon.state_dir / "deadletter"
    try:
        daemon.start().wait_ready()
        wait_until(lambda: any(f.read_bytes().endswith(b"\n") for f in dead_dir.glob("*.jsonl")),
                   60, "the bad line's dead letter", interval=0.005)
        for n in range(1, 4):
            kill_store_worker(daemon, n)
        code, _ = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    assert code == 0
    assert len(sim.ground_truth().of("bad_line")) == 1
    entries = list(DeadLetterStore(dead_dir, 1 << 20).iter_entries())
    assert [(e["reason"], e["seq"]) for e in entries] == [("invalid_json", entries[0]["seq"])]


def kill_store_worker(daemon: Daemon, n: int) -> None:
    """SIGKILL the store worker and wait for its successor to publish that it runs."""
    pid = daemon.worker_pid("store")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: daemon.status("supervisor").get("restarts", {}).get("store") == n, 30,
               f"store worker restart {n}")
    wait_until(lambda: daemon.status("store").get("pid") not in (None, pid)
               and daemon.status("store").get("state") == "running", 30, "a new store worker")


def test_an_oversize_message_is_dead_lettered_with_its_real_size_and_its_head(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """Only a head of a message over ``stream.max_message_bytes`` reaches the spool, but its dead
    letter (and log line) says its real size as the framer counted it (the line without its
    CRLF), that the raw bytes are truncated, and why in words."""
    size = 2_000_000
    script = [[{"deliver": 5}, {"bad_lines": ["oversize"]}, {"deliver": 5},
               {"keepalive_only": 600}]]
    sim = SimProcess(tmp_path / "sim", "--rate", "100", "--keepalive", "1", "--control-every",
                     "0", "--max-line", str(size), "--seed", "5", script=script).start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        daemon.start().wait_ready()
        logged = daemon.wait_log("dead_letter", timeout=60, reason="oversize")
    finally:
        daemon.kill()
        sim.stop()
    (entry,) = DeadLetterStore(daemon.state_dir / "deadletter", 1 << 30).iter_entries()
    assert entry["reason"] == "oversize" and entry["conn_id"] == 1
    assert entry["size"] == size and entry["truncated"] is True
    assert entry["detail"] == f"message of {size} bytes over stream.max_message_bytes 1000000"
    assert DeadLetterStore.raw_of(entry) == (b'{"oversize":"' + b"x" * size)[:RAW_CAP]
    assert logged["size"] == size
    print(f"\n[figure] oversize dead letter: size={entry['size']} truncated="
          f"{entry['truncated']} kept={len(DeadLetterStore.raw_of(entry) or b'')} "
          f"detail={entry['detail']!r}")


def test_readme_lists_every_dead_letter_reason() -> None:
    """The README's list of reasons is the code's (MESSAGE_REASONS), no more, no less."""
    import re

    from ingestd.documents.labels import MESSAGE_REASONS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (listed,) = re.findall(r"`ingestd_messages_deadlettered_total`\) is one of:(.*?)\.\n", readme,
                           re.DOTALL)
    assert sorted(re.findall(r"`([a-z0-9_]+)`", listed)) == sorted(MESSAGE_REASONS)


def test_dead_letter_lines_are_folded_per_reason_and_add_up(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """A storm of bad lines costs a few log lines (the first of each reason in full, then a
    folded `repeated` count per logging.error_interval), not one each; the lines of a reason add
    up to its dead letters, and the store and the counters keep every one."""
    n = 1500
    script = [[{"deliver": 5}, {"bad_lines": ["truncated_json"] * n},
               {"bad_lines": ["non_object"] * n}, {"keepalive_only": 600}]]
    sim = SimProcess(tmp_path / "sim", "--rate", "0", "--max-tweets", "5", "--keepalive", "1",
                     "--seed", "7", script=script).start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database,
                                                      logging={"error_interval": 1}))
    dead_dir = daemon.state_dir / "deadletter"

    def logged() -> dict[str, int]:
        sums: dict[str, int] = {}
        for e in daemon.events("dead_letter"):
            sums[e["reason"]] = sums.get(e["reason"], 0) + 1 + e.get("repeated", 0)
        return sums

    try:
        daemon.start().wait_ready()
        wait_until(lambda: sum(1 for _ in DeadLetterStore(dead_dir, 1 << 30).iter_entries())
                   == 2 * n, 60, "every bad line dead-lettered")
        # The storm's last fold is printed once its window ends, without a further dead letter.
        sums = wait_until(lambda: s if sum((s := logged()).values()) == 2 * n else None, 30,
                          f"dead_letter lines adding up to {2 * n}")
        counted = wait_until(lambda: c if sum((c := dict(daemon.counters("store")[
            "deadlettered"])).values()) == 2 * n else None, 30, "the counters (published ≤ 1 s)")
        code, _ = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    assert code == 0
    lines = daemon.events("dead_letter")
    assert len(lines) < 2 * n / 20, f"{len(lines)} dead_letter lines for {2 * n} dead letters"
    reasons = [e["reason"] for e in DeadLetterStore(dead_dir, 1 << 30).iter_entries()]
    assert sums == {r: reasons.count(r) for r in set(reasons)} and len(sums) == 2
    assert counted == sums
    assert all("repeated" not in e for e in [
        next(e for e in lines if e["reason"] == r) for r in sums])  # the first of each in full
