"""A store worker's counts at each checkpoint (``sink.counters.Settled``, ``control.settled``):
what a successor resuming there will not count again must be exactly what this worker counted of
the records up to it, whatever the batches, flights, withheld flushes, held reads and losses.

The real-process proof (SIGKILLed store workers, the run's reconciliation) is in test_counts.py.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog.testing

from ingestd.control.settled import SettledRecord, read_settled, settled_path
from ingestd.control.tally import Carried, reconciliation, role_totals
from ingestd.sink.counters import SETTLED_KEYS, Counts, StoreCounters, settled_counts
from ingestd.spool.format import KIND_MESSAGE, Record
from tests.test_durability_disk import mount_tmpfs
from tests.test_spool_disk import fill_up
from tests.test_writer import SNOW, FakeSpool, Harness, delete, make_settings, tweet

WITHHELD = orjson.dumps({"status_withheld": {"id": SNOW + 1, "user_id": 7,
                                             "withheld_in_countries": ["DE"]}})
LIMIT = b'{"limit":{"track":5}}'


class GappySpool(FakeSpool):
    """A FakeSpool whose record numbers can skip (records lost to damage), told to the worker
    as the real reader does: during the read that meets the gap, before its records are taken."""

    def __init__(self) -> None:
        super().__init__()
        self.next_seq = 1
        self.gaps: dict[int, tuple[int, int]] = {}  # seq of the record after a gap → the gap
        self.on_missing: Any = lambda first, last: None

    def add(self, payload: bytes, *, kind: int = KIND_MESSAGE, conn_id: int = 1,
            generation: int = 0) -> Record:
        seq = self.next_seq
        self.next_seq += 1
        rec = Record(seq, kind, conn_id, generation, time.time_ns(), payload, "seg", seq * 10)
        self.records.append(rec)
        return rec

    def lose(self, count: int, *, at_end: bool = False) -> None:
        """Records lost: found as the record after them is read, or (``at_end``) by the first
        read that finds nothing more (the real reader entering a segment with no record yet)."""
        gap = (self.next_seq, self.next_seq + count - 1)
        if at_end:
            self.end_gap = gap
        else:
            self.gaps[self.next_seq + count] = gap
        self.next_seq += count

    end_gap: tuple[int, int] | None = None

    def read(self, max_records: int, max_bytes: int) -> list[Record]:
        out = super().read(max_records, max_bytes)
        for rec in out:
            if rec.seq in self.gaps:
                self.on_missing(*self.gaps[rec.seq])
        if not out and self.end_gap is not None:
            self.on_missing(*self.end_gap)
            self.end_gap = None
        return out

    def reread(self, ref: Any) -> Record | None:
        return next((r for r in self.records if r.seq == ref.seq), None)


def expected_at(outcomes: dict[int, tuple[str, str | None]], lost: set[int], seq: int) -> Counts:
    """The counts of the records up to ``seq``, from what each one was made to be."""
    out: dict[str, Any] = {key: 0 for key in SETTLED_KEYS}
    for key in ("deadlettered", "control", "skipped"):
        out[key] = Counter()
    for s, (key, label) in outcomes.items():
        if s <= seq:
            out["records_read"] += 1
            if label is None:
                out[key] += 1
            else:
                out[key][label] += 1
    out["spool_missing_records"] = sum(1 for s in lost if s <= seq)
    return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in out.items()}


def labels_summed(counts: Counts, key: str) -> Counts:
    """``counts`` with ``key``'s labels summed (dead-letter reasons are the writer's business)."""
    value = counts[key]
    return {**counts, key: sum(value.values()) if isinstance(value, dict) else value}


@pytest.fixture
def harness(request: pytest.FixtureRequest, mongo_uri: str, mongo_database: str,
            tmp_path: Path) -> Iterator[Harness]:
    spool = GappySpool()
    settings = make_settings(mongo_uri, mongo_database, batch_size=3)
    h = Harness(settings, tmp_path / "dead", spool, encoder_process=request.param)
    yield h
    h.close()


@pytest.mark.parametrize("harness", [False, True], ids=["in_process", "encoder_child"],
                         indirect=True)
def test_the_counts_at_each_ack_are_those_of_the_records_up_to_it(harness: Harness) -> None:
    spool = harness.spool
    assert isinstance(spool, GappySpool)
    outcomes: dict[int, tuple[str, str | None]] = {}
    lost: set[int] = set()

    def add(payload: bytes, key: str, label: str | None = None) -> None:
        outcomes[spool.add(payload).seq] = (key, label)

    for round_ in range(6):  # batches of 3: every mix falls on a batch boundary somewhere
        base = SNOW + 100 * round_
        add(tweet(base + 1), "stored")
        add(tweet(base + 2), "stored")
        add(WITHHELD, "control", "status_withheld")  # flushes the batch before it
        add(b'{"id": 1, "text": "unterminated', "deadlettered", "invalid_json")
        first = spool.next_seq
        spool.lose(2 + round_ % 2)
        lost.update(range(first, spool.next_seq))
        add(tweet(base + 1), "duplicates")
        add(LIMIT, "control", "limit")
        add(delete(base + 9), "control", "delete")
        add(tweet(base + 9), "skipped", "deleted")  # its delete came first: a tombstone
        for n in range(3 + round_):
            add(tweet(base + 20 + n), "stored")
    seen: list[int] = []

    def on_ack(record: Record) -> None:
        settled = harness.worker.settled
        assert settled.seq == record.seq
        want = expected_at(outcomes, lost, record.seq)
        assert labels_summed(settled.counts, "deadlettered") == labels_summed(
            want, "deadlettered"), f"at {record.seq}"
        seen.append(record.seq)

    spool.on_ack = on_ack
    reads = iter(range(10**6))
    # not a drain from the start: the main loop's passes (flights finished while idle) too
    assert harness.worker.run(lambda: next(reads) > 12, lambda: None, lambda: None)
    assert len(seen) >= 10 and seen[-1] == spool.records[-1].seq
    c = harness.worker.counters()
    assert labels_summed(settled_counts(harness.worker.totals), "deadlettered") == \
        labels_summed(expected_at(outcomes, lost, spool.next_seq), "deadlettered")
    assert c["pending"] == 0


def test_a_loss_found_by_a_read_waits_for_the_record_after_it(
        mongo_uri: str, mongo_database: str, tmp_path: Path) -> None:
    """A read that meets a gap also brings records before it; a batch acked at one of those
    must not include the loss (its successor, resuming there, finds the gap again)."""
    spool = GappySpool()
    h = Harness(make_settings(mongo_uri, mongo_database, batch_size=3), tmp_path / "dead", spool)
    try:
        for n in range(4):
            spool.add(tweet(SNOW + n))
        spool.add(WITHHELD)  # 5: flushes [4] and is a batch of its own
        spool.lose(3)  # 6-8
        spool.add(tweet(SNOW + 9))  # read with 4 and 5, after [1, 2, 3]
        at: dict[int, Any] = {}
        spool.on_ack = lambda r: at.__setitem__(
            r.seq, h.worker.settled.counts["spool_missing_records"])
        assert h.drain()
    finally:
        h.close()
    assert at == {3: 0, 4: 0, 5: 0, 9: 3}


def test_a_loss_at_the_spools_end_is_not_settled_by_an_ack_of_the_records_before_it(
        mongo_uri: str, mongo_database: str, tmp_path: Path) -> None:
    """A loss found by a read that brings nothing (no record after it yet) while the open batch
    still holds records numbered before it: the ack of that batch must not include it (the
    audit's case; the old code counted it at once, at the idle pass)."""
    spool = GappySpool()
    settings = make_settings(mongo_uri, mongo_database, batch_size=3)
    # a batch open long enough for the read that finds the loss to come before its flush
    settings = dataclasses.replace(settings, writer=dataclasses.replace(
        settings.writer, flush_interval=1.0))
    h = Harness(settings, tmp_path / "dead", spool)
    try:
        spool.add(tweet(SNOW + 1))
        spool.add(tweet(SNOW + 2))
        spool.lose(2, at_end=True)  # 3-4
        at: dict[int, Any] = {}
        spool.on_ack = lambda r: at.__setitem__(
            r.seq, h.worker.settled.counts["spool_missing_records"])
        deadline = time.monotonic() + 30
        assert h.worker.run(  # the main loop until the loss is counted, then the drain
            lambda: h.worker.totals.spool_missing_records > 0 or time.monotonic() > deadline,
            lambda: None, lambda: None)
    finally:
        h.close()
    assert at == {2: 0}
    assert h.worker.totals.spool_missing_records == 2 and h.worker.settled.seq == 2


def test_the_file_names_the_counts_at_the_checkpoint_on_disk_either_side_of_a_write(
        tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    zero: Counts = {"records_read": 0, "stored": 0, "control": {}}
    record = SettledRecord(tmp_path, 0, zero)
    pid = os.getpid()
    assert read_settled(tmp_path, pid, 0) == zero  # killed before its first checkpoint
    at5: Counts = {"records_read": 5, "stored": 4, "control": {"limit": 1}}
    record.before_checkpoint(0, 5, at5)
    # killed before the checkpoint reached the disk, or after
    assert read_settled(tmp_path, pid, 0) == zero and read_settled(tmp_path, pid, 5) == at5
    at9: Counts = {"records_read": 9, "stored": 8, "control": {"limit": 1}}
    record.before_checkpoint(5, 9, at9)
    assert read_settled(tmp_path, pid, 5) == at5 and read_settled(tmp_path, pid, 9) == at9
    assert read_settled(tmp_path, pid, 0) is None  # no longer on disk either way
    # the write of 9 failed: the next names the checkpoint still on disk, 5
    record.before_checkpoint(5, 12, {"records_read": 12, "stored": 11, "control": {"limit": 1}})
    assert read_settled(tmp_path, pid, 5) == at5 and read_settled(tmp_path, pid, 9) is None
    assert read_settled(tmp_path, pid + 1, 5) is None  # another worker's file
    for junk in (b"{", b'{"pid": %d, "at": [[5, {"stored": -1}]]}' % pid,
                 b'{"pid": %d, "at": [[5, {"stored": "4"}]]}' % pid):
        settled_path(tmp_path).write_bytes(junk)
        assert read_settled(tmp_path, pid, 5) is None


def test_a_failed_write_is_logged_once_and_the_pair_before_stays(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    pid = os.getpid()
    zero: Counts = {"records_read": 0}
    record = SettledRecord(tmp_path, 0, zero)
    settled_path(tmp_path).unlink()
    settled_path(tmp_path).mkdir()  # what a write cannot replace
    with structlog.testing.capture_logs() as logs:
        record.before_checkpoint(0, 5, {"records_read": 5})
        record.before_checkpoint(0, 7, {"records_read": 7})
    assert [e["event"] for e in logs] == ["settled_write_failed"]  # once for the episode
    assert str(settled_path(tmp_path)) in logs[0]["path"]
    settled_path(tmp_path).rmdir()
    record.before_checkpoint(0, 9, {"records_read": 9})
    assert read_settled(tmp_path, pid, 9) == {"records_read": 9}
    assert read_settled(tmp_path, pid, 0) == zero


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (unmounted lazily at the end)."""
    where = tmp_path / "disk"
    mount_tmpfs(where, "1m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_on_a_full_disk_the_file_is_overwritten_in_place(small_disk: Path) -> None:
    """Like the checkpoint beside it (``spool.format.write_checkpoint``), and in the same folder:
    on a full disk the checkpoint moves on, so the counts at it must too."""
    state = small_disk
    (state / "spool").mkdir()
    pid = os.getpid()
    record = SettledRecord(state, 0, {"records_read": 0})
    fill_up(state)
    with structlog.testing.capture_logs() as logs:
        record.before_checkpoint(0, 5, {"records_read": 5, "control": {"limit": 1}})
    assert not logs
    assert read_settled(state, pid, 5) == {"records_read": 5, "control": {"limit": 1}}
    assert read_settled(state, pid, 0) == {"records_read": 0}


def test_a_carried_store_worker_counts_at_the_checkpoint_not_its_last_report() -> None:
    """Its last report counted records 1-120 (15 of them pending); the checkpoint on disk is at
    100, where its successor resumes: carried are the counts up to 100 alone, and the records
    after 100 are counted once, by the successor."""
    report = {"pid": 7, "counters": {
        "records_read": 120, "stored": 95, "duplicates": 0, "control": {"limit": 10},
        "deadlettered": {}, "skipped": {}, "replayed": 0, "spool_missing_records": 0,
        "pending": 15, "read_seq": 120, "batches": 12}}
    at100: Counts = {"records_read": 100, "stored": 95, "duplicates": 0, "control": {"limit": 5},
                     "deadlettered": {}, "skipped": {}, "replayed": 0, "spool_missing_records": 0}
    carried = Carried()
    carried.carry("store", 7, report, settled=(100, at100))
    assert carried.counters["records_read"] == 100 and carried.counters["stored"] == 95
    assert carried.counters["batches"] == 12 and carried.read_seq == 100
    successor = {"pid": 8, "counters": dict(StoreCounters().as_dict(pending=0),
                                            records_read=30, stored=30, read_seq=130)}
    # until the successor reports, the dead worker's own file is the store's: its read_seq
    # (120) and pending (15: 5 of 101-120 were limit messages) must not be read against
    # counts that stop at 100
    supervisor = {"carried": {"store": carried.as_dict()}}
    stream = {"counters": {"received": 130}, "spool": {"next_seq": 131}}
    gap = reconciliation(stream, role_totals(report, supervisor, "store"))
    assert gap == {"received": 130, "replayed": 0, "resolved": 100, "in_flight": 30,
                   "spool_missing": 0, "difference": 0}
    store = role_totals(successor, supervisor, "store")
    assert reconciliation(stream, store) == {
        "received": 130, "replayed": 0, "resolved": 130, "in_flight": 0, "spool_missing": 0,
        "difference": 0}


def test_counts_of_an_earlier_worker_on_the_same_pid_are_not_taken(tmp_path: Path) -> None:
    """A pid comes back once the kernel's counter wraps: the file names the process that wrote
    it, and counts another process on the same pid left are not a dead worker's own."""
    from ingestd.control.runstate import process_token

    (tmp_path / "spool").mkdir()
    zero: Counts = {"records_read": 0, "stored": 0, "control": {}}
    SettledRecord(tmp_path, 0, zero)
    pid = os.getpid()
    assert read_settled(tmp_path, pid, 0, process_token()) == zero
    assert read_settled(tmp_path, pid, 0, f"{pid}-1") is None  # an earlier worker's file
