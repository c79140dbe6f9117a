"""A quiet stream costs next to nothing: the workers sleep until there is something to do.

The mechanism, not a speed: the spool reader sleeps on inotify events of the spool folder instead
of polling the files (``ingestd.spool.watch``), a signal wake-up descriptor ends that sleep, and on
the real daemon with keep-alives only each worker's loop runs about once per housekeeping interval
(the heartbeat, ``STATUS_INTERVAL`` = 1 s) plus the stream worker's ``IDLE_TICK``, counted by the
``loop_passes`` each worker publishes. The bounds are upper bounds on passes per elapsed second:
a loaded machine makes a worker pass less often, never more. The polling loops before (5 ms in the
store worker, 0.1 s in the stream worker) exceed them many times over.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pymongo
import pytest

from ingestd.control import runstate
from ingestd.control.pool import PoolHooks, WorkerPool
from ingestd.control.worker import STATUS_INTERVAL
from ingestd.source.stream_reader import GATHER_SECONDS, IDLE_TICK
from ingestd.spool import writer as spool_writer
from ingestd.spool.format import KIND_MESSAGE
from ingestd.spool.reader import SpoolReader
from ingestd.spool.writer import SpoolWriter
from ingestd.spool.written import WrittenMark
from tests.support.clock import FakeClock
from tests.support.daemon import Daemon, settings_doc
from tests.support.simulator import SimProcess
from tests.support.skips import unavailable
from tests.support.wait import wait_until


def writer_for(path: Path) -> SpoolWriter:
    return SpoolWriter(path, max_bytes=10**9, max_records=10**9)


def test_idle_reader_looks_at_the_spool_twice(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    writer_for(tmp_path)
    reader = SpoolReader(tmp_path)
    if reader.watch.polling:
        unavailable("inotify is not available here: the reader polls")
    looks = 0
    has_data = reader.has_data

    def counted() -> bool:
        nonlocal looks
        looks += 1
        return has_data()

    monkeypatch.setattr(reader, "has_data", counted)
    assert reader.wait_for_data(0.5) is False
    assert looks <= 2  # before the sleep and after it; polling every 5 ms looked ~100 times
    assert reader.watch.wakeups == 0


def test_an_append_wakes_the_reader_and_its_own_checkpoint_does_not(tmp_path: Path) -> None:
    writer = writer_for(tmp_path)
    reader = SpoolReader(tmp_path, checkpoint_interval=0.0)
    if reader.watch.polling:
        unavailable("inotify is not available here: the reader polls")
    go = threading.Event()

    def produce() -> None:
        go.wait()
        writer.append([(KIND_MESSAGE, b"x")], 1, 1, 1)

    thread = threading.Thread(target=produce)
    thread.start()
    go.set()
    assert reader.wait_for_data(30.0) is True
    thread.join()
    records = reader.read(10, 1 << 20)
    assert [r.payload for r in records] == [b"x"]
    reader.watch.clear()
    reader.ack(records[-1])  # writes the checkpoint (interval 0): events about our own file
    reader.flush()
    assert reader.watch.clear() is False


def test_the_writers_written_mark_does_not_wake_the_reader(tmp_path: Path) -> None:
    """The mark is rewritten right after each append: its event would be a second wake-up for
    the same records (the append's own event wakes the reader)."""
    writer = writer_for(tmp_path)
    reader = SpoolReader(tmp_path)
    if reader.watch.polling:
        unavailable("inotify is not available here: the reader polls")
    writer.append([(KIND_MESSAGE, b"x")], 1, 1, 1)
    assert reader.watch.clear() is True  # the append (and its mark)
    mark = WrittenMark(tmp_path)
    mark.note(1)  # as the writer does after an append
    mark.close()
    assert reader.watch.clear() is False


@contextlib.contextmanager
def signalled_soon(tmp_path: Path) -> Iterator[SpoolReader]:
    """A spool reader whose watch also waits on a signal pipe, written 50 ms from now."""
    reader = SpoolReader(tmp_path)
    if reader.watch.polling:
        unavailable("inotify is not available here: the reader polls")
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK)
    reader.watch.extra_fds.append(read_fd)
    threading.Timer(0.05, os.write, (write_fd, b"\x0f")).start()
    try:
        yield reader
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_signal_pipe_ends_the_wait(tmp_path: Path) -> None:
    with signalled_soon(tmp_path) as reader:
        reader.watch.wait(60.0)
        assert reader.watch.wakeups == 1  # ended by the pipe, not by the 60 s timeout


def test_a_signal_pipe_ends_the_readers_wait_for_data(tmp_path: Path) -> None:
    """The store worker's idle wait is the reader's ``wait_for_data``, which waited again after
    the watch woke for the signal pipe: SIGTERM began the drain only at the next heartbeat (up
    to a second into every stop). Now the wait ends, with no data to report."""
    with signalled_soon(tmp_path) as reader:
        started = time.monotonic()
        assert reader.wait_for_data(30.0) is False
        assert time.monotonic() - started < 10.0  # ended by the pipe, not by the 30 s timeout


def test_idle_daemon_loops_once_per_housekeeping_interval(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = SimProcess(tmp_path / "sim", "--max-tweets", "0", "--keepalive", "1").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        daemon.start()
        daemon.wait_ready(60)
        wait_until(lambda: daemon.status("stream").get("state", "").startswith("connected"), 60,
                   "the stream to connect")
        first = {role: daemon.status(role) for role in ("stream", "store")}
        started = time.monotonic()
        # an idle period of several heartbeats (each status file is rewritten every second)
        wait_until(lambda: all(daemon.status(r).get("time", 0) >= first[r]["time"] + 5
                               for r in first), 60, "five more heartbeats of both workers")
        elapsed = time.monotonic() - started
        last = {role: daemon.status(role) for role in first}
        daemon.assert_running()
    finally:
        daemon.stop(30)
        sim.stop()
    passes = {r: last[r]["loop_passes"] - first[r]["loop_passes"] for r in first}
    # store: one pass per heartbeat (its only timer when idle), +1 for a checkpoint or a late
    # wake-up per interval; stream: its idle tick, the heartbeat and the 1 s keep-alives, with
    # 50 % to spare (the 0.1 s tick before this change made 10 passes a second)
    store_bound = 2 * (elapsed / STATUS_INTERVAL + 1)
    stream_bound = 1.5 * elapsed * (1 / IDLE_TICK + 1 / STATUS_INTERVAL + 1) + 2
    print(f"[figure] idle {elapsed:.1f} s: loop passes {passes} "
          f"(bounds store {store_bound:.0f}, stream {stream_bound:.0f})")
    assert passes["store"] <= store_bound
    assert passes["stream"] <= stream_bound
    assert last["store"]["counters"]["records_read"] == first["store"]["counters"]["records_read"]


def status_across_heartbeats(daemon: Daemon, role: str, beats: int
                             ) -> tuple[dict[str, Any], dict[str, Any], float]:
    """``role``'s status once the first insert is done and again ``beats`` heartbeats later, with
    the seconds between the two looks."""
    wait_until(lambda: daemon.counters("store").get("stored", 0) > 0, 60, "a first insert")
    first = daemon.status(role)
    started = time.monotonic()
    wait_until(lambda: daemon.status(role).get("time", 0) >= first["time"] + beats, 60,
               f"{beats} more heartbeats of the {role} worker")
    elapsed = time.monotonic() - started
    return first, daemon.status(role), elapsed


def store_worker_at_rate(tmp_path: Path, mongo_uri: str, mongo_database: str, rate: str,
                         tweets: int, writer: dict[str, Any], beats: int
                         ) -> tuple[SimProcess, dict[str, Any], dict[str, Any], float]:
    """The daemon fed ``tweets`` at ``rate`` tweets/s with these ``writer`` settings: the store
    worker's status across ``beats`` heartbeats (``status_across_heartbeats``), once every tweet
    is stored and the daemon stopped; the simulator too, for its ground truth."""
    sim = SimProcess(tmp_path / "sim", "--rate", rate, "--max-tweets", str(tweets),
                     "--control-every", "0").start()
    daemon = Daemon(tmp_path / "daemon",
                    settings_doc(sim.url, mongo_uri, mongo_database, writer=writer))
    try:
        daemon.start()
        daemon.wait_ready(60)
        first, last, elapsed = status_across_heartbeats(daemon, "store", beats)
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= tweets, 120,
                   "every tweet stored")
        daemon.assert_running()
    finally:
        daemon.stop(30)
        sim.stop()
    return sim, first, last, elapsed


def assert_each_delivered_tweet_stored_once(
        sim: SimProcess, db: pymongo.database.Database[dict[str, Any]], tweets: int) -> None:
    truth = sim.ground_truth().tweet_ids()
    stored = [d["_id"] for d in db["tweets"].find({}, {"_id": 1})]
    assert len(truth) == tweets
    assert sorted(stored) == sorted(truth)


def test_slow_stream_store_worker_reads_each_batch_a_few_times(
        tmp_path: Path, mongo_uri: str, mongo_database: str,
        mongo_client: pymongo.MongoClient[dict[str, Any]]) -> None:
    """At 20 tweets/s with a 2 s flush interval the store worker's gather pause lasts until the
    batch could fill at the rate seen (capped by the flush time and the heartbeat), not
    ``GATHER_SECONDS``: a batch costs a few loop passes and one insert carries the interval's
    tweets. Before, the worker read again every 0.1 s (≥ 10 passes a second); every tweet the
    simulator delivered is still stored exactly once."""
    tweets, flush = 240, 2.0  # 12 s of tweets: they still come when the 8 heartbeats end
    sim, first, last, elapsed = store_worker_at_rate(
        tmp_path, mongo_uri, mongo_database, "20", tweets,
        {"batch_size": 1000, "flush_interval": flush}, beats=8)
    passes = last["loop_passes"] - first["loop_passes"]
    batches = last["counters"]["batches"] - first["counters"]["batches"]
    # An insert per flush interval at most (the batch never fills: 20 tweets/s × 2 s ≪ 1000).
    assert 0 < batches <= elapsed / flush + 2
    # Per batch: the read that opens it, one GATHER_SECONDS pause (the rate is not known yet),
    # the flush, and an empty read waiting for the next record; each heartbeat may cut one more
    # pause short. Half again to spare; the 0.1 s pauses before made ≥ 10 passes a second.
    bound = 1.5 * (4 * batches + elapsed / STATUS_INTERVAL + 2)
    print(f"[figure] 20 tweets/s, flush {flush} s, {elapsed:.1f} s: store passes {passes}, "
          f"inserts {batches} (bound {bound:.0f} passes)")
    assert passes <= bound
    assert_each_delivered_tweet_stored_once(sim, mongo_client[mongo_database], tweets)


def test_sparse_records_do_not_spin_the_idle_store_worker(
        tmp_path: Path, mongo_uri: str, mongo_database: str,
        mongo_client: pymongo.MongoClient[dict[str, Any]]) -> None:
    """Records at every phase of the heartbeat (1.37 tweets/s: a period that drifts across the
    1 s heartbeat; each batch flushed after 0.1 s, so the worker is idle between tweets): the idle
    sleep lasts until the housekeeping can run, which is the retrier's next tick, not the
    heartbeat's due time. Before, a record taken just before a heartbeat moved the tick past it and
    the worker looped with zero-second waits until the tick (up to 0.25 s each time): 20,000 to
    29,000 passes over 12 heartbeats instead of about 70; 8 heartbeats (~11 records, at phases
    0.27 s apart) are as telling."""
    tweets = 16  # 11.7 s of records: they still come when the 8 heartbeats end
    sim, first, last, elapsed = store_worker_at_rate(
        tmp_path, mongo_uri, mongo_database, "1.37", tweets, {"flush_interval": 0.1}, beats=8)
    passes = last["loop_passes"] - first["loop_passes"]
    read = last["counters"]["records_read"] - first["counters"]["records_read"]
    # Per record: the read that takes it, a gather pause, the flush, and the empty read that
    # waits; per heartbeat one more. Half again to spare.
    bound = 1.5 * (4 * read + elapsed / STATUS_INTERVAL + 2)
    print(f"[figure] 1.37 tweets/s, flush 0.1 s, {elapsed:.1f} s: store passes {passes} for "
          f"{read} records (bound {bound:.0f})")
    assert read > 0
    assert passes <= bound
    assert_each_delivered_tweet_stored_once(sim, mongo_client[mongo_database], tweets)


def test_writer_reads_a_moving_checkpoint_once_a_second_far_from_the_bounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store worker rewrites the checkpoint about every second; the stream worker's writer
    looks at it on every ``is_full`` (each libcurl callback). Under half the bounds it re-reads it
    at most every ``_CHECKPOINT_POLL_FAR`` s; from half on, every ``_CHECKPOINT_POLL`` s again, so
    a full spool is seen as soon as before. Before, a checkpoint younger than a second was
    re-read on every look 50 ms apart (~10 reads a second on a 50 tweets/s stream)."""
    reads = 0
    read = spool_writer.read_checkpoint

    def counted(directory: Path) -> Any:
        nonlocal reads
        reads += 1
        return read(directory)

    monkeypatch.setattr(spool_writer, "read_checkpoint", counted)
    clock = FakeClock()
    writer = SpoolWriter(tmp_path, max_bytes=10**9, max_records=100, clock=clock)
    reader = SpoolReader(tmp_path, checkpoint_interval=0.0)
    writer.append([(KIND_MESSAGE, b"x" * 100)] * 45, 1, 1, time.time_ns())
    reads = 0
    step = 0.0625  # a look every 62.5 ms (exact in binary), the checkpoint moved before each
    for _ in range(32):  # 2 s
        reader.ack(reader.read(1)[0])
        clock.now += step
        assert not writer.is_full()
    assert 2 <= reads <= 3  # one per second (the first look included)
    assert writer.backlog()[0] < 45 - 16  # the checkpoints it read were current

    writer.append([(KIND_MESSAGE, b"x" * 100)] * 70, 1, 1, time.time_ns())  # past half of 100
    reads = 0
    for _ in range(20):
        reader.ack(reader.read(1)[0])
        clock.now += step
        writer.is_full()
    assert reads == 20  # near the bounds: a look every 50 ms at most, as before


def test_slow_stream_stream_worker_gathers_on_every_pass(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """At 150 tweets/s (a few hundred KB/s) every pass that read something is followed by a
    ``GATHER_SECONDS`` pause: the pause's bytes come at under ``GATHER_RATE``. Before, the bytes
    of one pause (> 16 KiB) made the next pass look fast: it waited for the very next tweet and
    then paused, two passes and two wake-ups per pause."""
    sim = SimProcess(tmp_path / "sim", "--rate", "150", "--max-tweets", "20000",
                     "--control-every", "0").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        daemon.start()
        daemon.wait_ready(60)
        first, last, elapsed = status_across_heartbeats(daemon, "stream", 6)
        daemon.assert_running()
    finally:
        daemon.stop(30)
        sim.stop()
    passes = last["loop_passes"] - first["loop_passes"]
    gathers = last.get("gathers", 0) - first.get("gathers", 0)
    received = last["counters"]["received"] - first["counters"]["received"]
    # A pass per pause at most, plus a few for the heartbeat; a loaded machine passes less often.
    bound = 1.25 * elapsed / GATHER_SECONDS + 3
    print(f"[figure] 150 tweets/s, {elapsed:.1f} s: stream passes {passes}, gathers {gathers}, "
          f"received {received} (bound {bound:.0f} passes)")
    assert received > 50 * elapsed  # the stream did deliver throughout
    assert passes <= bound
    assert gathers >= 0.8 * passes


def test_supervisor_parses_a_worker_status_only_once_it_was_rewritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor looks at each worker's heartbeat on every pass; it reads and parses the
    status file only when the file was replaced since (a worker rewrites it every second; the
    supervisor passed every 0.5 s and parsed both files each time)."""
    reads = 0
    read = runstate.read_status

    def counted(state_dir: Path, role: str) -> dict[str, Any] | None:
        nonlocal reads
        reads += 1
        return read(state_dir, role)

    monkeypatch.setattr(runstate, "read_status", counted)
    hooks = PoolHooks(control=lambda: None, spawned=lambda worker: None,  # type: ignore[arg-type]
                      crash_loop=lambda: None)
    pool = WorkerPool(lambda role, generation: ["sleep", "60"], tmp_path, hooks)
    (tmp_path / runstate.RUN_DIR).mkdir()
    pool.spawn("store", 1)
    worker = pool.workers["store"]

    def beat(at: float) -> None:  # as runstate.write_status does it, with the worker's pid
        target = runstate.status_path(tmp_path, "store")
        tmp = target.with_name(".tmp")
        tmp.write_bytes(orjson.dumps({"role": "store", "pid": worker.pid, "time": at}))
        os.replace(tmp, target)

    try:
        beat(1.0)
        for _ in range(5):
            pool.replace_hung(30.0)
        assert (reads, worker.beat_time) == (1, 1.0)
        beat(2.0)
        for _ in range(5):
            pool.replace_hung(30.0)
        assert (reads, worker.beat_time) == (2, 2.0)  # the new heartbeat was seen at once
    finally:
        pool.kill_all()
        worker.proc.wait(10)
