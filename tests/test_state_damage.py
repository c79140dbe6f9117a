"""A damaged state folder on the real daemon (docs/reliability.md §8, #8): files restored from
another moment, deleted as junk, or of a shape this version never writes.

Each test stores a first connection's tweets, damages the folder (stopped, or running), and checks
that the daemon goes on by itself where it safely can, with no worker crash and no second daemon
on one spool, and reconciles MongoDB with the simulator's ground truth.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestd.control.supervisor import Supervisor, run_files_look
from ingestd.spool.format import CHECKPOINT, KIND_MESSAGE, list_segments, read_checkpoint
from ingestd.spool.writer import SpoolWriter
from ingestd.tools.stream_in_use import state_dir_holder
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.mongo import stored_ids
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

TWEETS = 30  # per connection: then only keep-alives, so "all stored" is a fixed set
SCRIPT = [[{"deliver": TWEETS}, {"keepalive_only": 600}] for _ in range(8)]
CRASHES = ("uncaught_exception", "worker_exited")  # an exit the supervisor asked for is info
# s: how often the supervisor looks at its pid file (INGESTD_RUN_FILES_LOOK; the default,
# Supervisor.RUN_FILES_LOOK, is 10 s): the pid-file test waits for two looks, and needs a window
# between them for a reload by hand (a CLI run, ~1 s)
LOOK = 5.0


class Pair:
    def __init__(self, tmp_path: Path, mongo_uri: str, database: str) -> None:
        self.uri, self.database = mongo_uri, database
        self.sim = SimProcess(tmp_path / "sim", "--rate", "200", "--keepalive", "1",
                              "--control-every", "0", script=SCRIPT).start()
        self.daemon = Daemon(tmp_path / "daemon", settings_doc(self.sim.url, mongo_uri, database))

    def all_stored(self, tweets: int) -> bool:
        """The simulator sent ``tweets`` tweets and MongoDB holds each of them."""
        self.daemon.assert_running()
        truth = set(self.sim.ground_truth().tweet_ids())
        return len(truth) >= tweets and truth <= set(stored_ids(self.uri, self.database))

    def first_connection_stored_then_stopped(self) -> None:
        self.daemon.start().wait_ready()
        wait_until(lambda: self.all_stored(TWEETS), 60, "the first connection's tweets stored")
        code, _ = self.daemon.stop()
        assert code == 0, self.daemon.tail()

    def assert_exactly_once(self) -> None:
        stored = stored_ids(self.uri, self.database)
        assert sorted(stored) == sorted(self.sim.ground_truth().tweet_ids())

    def crashes(self) -> list[dict[str, Any]]:
        return [e for e in self.daemon.log_events()
                if e.get("event") in CRASHES and e.get("level") != "info"]


@pytest.fixture
def pair(tmp_path: Path, mongo_uri: str, mongo_database: str) -> Iterator[Pair]:
    pair = Pair(tmp_path, mongo_uri, mongo_database)
    try:
        yield pair
    finally:
        pair.daemon.kill()
        pair.sim.stop()


def test_a_checkpoint_whose_number_is_past_a_floats_range_replays_with_no_crash(pair: Pair
                                                                                ) -> None:
    # JSON reads 1e999 as infinity, which no int holds: the checkpoint is garbage like any other.
    pair.first_connection_stored_then_stopped()
    spool = pair.daemon.state_dir / "spool"
    segment = list_segments(spool)[0]
    (spool / CHECKPOINT).write_text(f'{{"seq": 1e999, "segment": "{segment}", "offset": 100}}')
    pair.daemon.start().wait_ready()
    wait_until(lambda: pair.all_stored(2 * TWEETS), 60, "the second connection's tweets stored")
    finish(pair.daemon, pair.sim)
    store = pair.daemon.counters("store")  # the stopped store worker's last word
    assert pair.crashes() == []
    pair.assert_exactly_once()
    assert store["duplicates"] == store["replayed"] == TWEETS  # the spool replayed, none lost


def test_a_generation_file_past_the_spools_range_is_not_numbered_after(pair: Pair) -> None:
    # A record's generation is a uint32: numbering after 4294967296.json failed every append.
    pair.first_connection_stored_then_stopped()
    generations = pair.daemon.state_dir / "generations"
    shutil.copy(generations / "1.json", generations / "4294967296.json")
    pair.daemon.start().wait_ready()
    wait_until(lambda: pair.all_stored(2 * TWEETS), 60, "the second connection's tweets stored")
    generation = pair.daemon.status("supervisor")["generation"]
    finish(pair.daemon, pair.sim)
    assert pair.crashes() == []
    assert generation == 2
    pair.assert_exactly_once()


def run_second(daemon: Daemon, *prefix: str) -> tuple[int, str]:
    """A second ``ingestd run`` on the daemon's settings: its exit code and output (one that
    starts after all is stopped at once, workers and all, by SIGTERM)."""
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "ingestd", "run", "--config",
                             str(daemon.config)], env=daemon.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_a_lock_file_deleted_as_stale_still_refuses_a_second_daemon(pair: Pair) -> None:
    # A second daemon on the folder logged the first one's stream out (code 7) and ran a second
    # store worker on its spool.
    pair.daemon.start().wait_ready()
    wait_until(lambda: pair.all_stored(TWEETS), 60, "the first connection's tweets stored")
    first = pair.daemon.pids()
    os.unlink(pair.daemon.state_dir / "run" / "supervisor.lock")
    code, out = run_second(pair.daemon)
    assert code == Supervisor.EXIT_LOCKED, out
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["state_dir_locked"]
    assert pair.daemon.pids() == first
    finish(pair.daemon, pair.sim)
    assert len(pair.sim.ground_truth().connections()) == 1  # never logged out by a second one
    pair.assert_exactly_once()


def command(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """``ingestd ARGS --config`` with the daemon's settings, as an operator runs it by hand."""
    return subprocess.run([sys.executable, "-m", "ingestd", *args, "--config",
                           str(daemon.config)], env=daemon.env(), capture_output=True,
                          text=True, timeout=60, check=False)


def reload_by_hand(pair: Pair, generation: int) -> None:
    """``ingestd reload`` without ``--pid`` (found by run/supervisor.pid) applies a filter
    change as ``generation``, and the stream reconnects with it."""
    doc = pair.daemon.doc
    doc["stream"]["track"] = [*doc["stream"]["track"], f"ipad{generation}"]
    pair.daemon.write_settings(doc)
    reload = command(pair.daemon, "reload", "--timeout", "30")
    assert reload.returncode == 0, reload.stderr
    assert f"reload applied: generation {generation}" in reload.stdout


def test_a_run_folder_removed_as_junk_comes_back_and_status_reads_ok(pair: Pair) -> None:
    # Its files were written to a folder that no longer was: `ingestd status` said "down"
    # (exit 3) for as long as the daemon ran, and /healthz answered 503. Then the status files
    # came back but the pid file did not: `ingestd reload` said "no running daemon" (exit 3)
    # until a restart, `ingestd status` showed no metrics URL, and `check --online` saw no lock.
    pair.daemon.doc["metrics"] = {"listen": "127.0.0.1:0"}
    pair.daemon.write_settings(pair.daemon.doc)
    pair.daemon.start().wait_ready()
    run = pair.daemon.state_dir / "run"
    address = (run / "metrics.addr").read_text()
    shutil.rmtree(run)
    wait_until(lambda: command(pair.daemon, "status").returncode == 0, 30,
               "ingestd status: ok again")
    # restored by the same status write that made run/ again: no wait for a later look
    wait_until(lambda: (run / "supervisor.pid").exists(), 3, "run/supervisor.pid again")
    assert (run / "supervisor.pid").read_text() == f"{pair.daemon.pids()['supervisor']}\n"
    assert (run / "metrics.addr").read_text() == address
    assert state_dir_holder(pair.daemon.state_dir) != ""  # the new lock file is flocked
    wait_until(lambda: pair.all_stored(TWEETS), 60, "the first connection's tweets stored")
    reload_by_hand(pair, 2)
    wait_until(lambda: pair.all_stored(2 * TWEETS), 60, "the second connection's tweets stored")
    assert run_second(pair.daemon)[0] == Supervisor.EXIT_LOCKED
    finish(pair.daemon, pair.sim)
    assert pair.crashes() == []
    (restored,) = pair.daemon.events("run_files_restored")
    assert sorted(restored["files"]) == ["metrics.addr", "supervisor.lock", "supervisor.pid"]
    pair.assert_exactly_once()


@pytest.mark.parametrize("damage", ["deleted", "overwritten"])
def test_a_pid_file_a_tmp_cleaner_took_is_written_again(pair: Pair, damage: str) -> None:
    # systemd-tmpfiles ages files by their times, and the pid file is written once, at start:
    # `ingestd reload` by hand said "no running daemon" (exit 3) until a restart, then, with
    # the file written back at the supervisor's next look, for up to 10 s.
    pair.daemon.start({Supervisor.RUN_FILES_LOOK_ENV: str(LOOK)}).wait_ready()
    wait_until(lambda: pair.all_stored(TWEETS), 60, "the first connection's tweets stored")
    pidfile = pair.daemon.state_dir / "run" / "supervisor.pid"
    supervisor = pair.daemon.pids()["supervisor"]

    def take() -> None:
        if damage == "deleted":
            pidfile.unlink()
        else:  # by a restored backup: a pid no process has
            pidfile.write_text(f"{dead_pid()}\n")

    def written_again() -> bool:
        return pidfile.exists() and pidfile.read_text() == f"{supervisor}\n"

    take()
    wait_until(written_again, LOOK + 5, "run/supervisor.pid written again")
    take()  # again, just after a look: the next one is LOOK away
    reload_by_hand(pair, 2)  # found by run/supervisor.json's pid, verified by its token
    assert not written_again()  # (so not by the pid file)
    worker = command(pair.daemon, "reload", "--pid", str(pair.daemon.worker_pid("stream")))
    assert worker.returncode == 3, worker.stderr
    assert f"its supervisor is pid {supervisor}" in worker.stderr
    wait_until(written_again, LOOK + 5, "run/supervisor.pid written again")
    wait_until(lambda: pair.all_stored(2 * TWEETS), 60, "the second connection's tweets stored")
    finish(pair.daemon, pair.sim)
    assert pair.crashes() == []  # the worker got no SIGHUP
    assert [e["files"] for e in pair.daemon.events("run_files_restored")] == [
        ["supervisor.pid"], ["supervisor.pid"]]
    assert not pidfile.exists()  # removed at the stop, as ever
    pair.assert_exactly_once()


def test_the_pid_file_look_can_be_made_shorter_never_longer() -> None:
    default = Supervisor.RUN_FILES_LOOK
    assert run_files_look(str(LOOK), default) == LOOK < default
    assert [run_files_look(t, default) for t in ("", "x", "0", "-1", "60", "nan")] == [
        default] * 6


def dead_pid() -> int:
    """A pid no process has now (one that just exited, reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_folder_in_place_of_the_pid_file_is_named_at_start(pair: Pair) -> None:
    # The rename's error names its source, the temp file, which is not what is in the way.
    (pair.daemon.state_dir / "run" / "supervisor.pid").mkdir(parents=True)
    code, out = run_second(pair.daemon)
    assert code == Supervisor.EXIT_CONFIG, out
    (line,) = [e for e in map(json.loads, out.splitlines()) if e["level"] == "error"]
    assert line["event"] == "state_dir_unusable", out
    assert line["reason"] == f"{pair.daemon.state_dir}/run/supervisor.pid: Is a directory"


def test_a_folder_named_as_a_spool_segment_stops_the_start_naming_it(pair: Pair) -> None:
    # Both workers died on it at every start (IsADirectoryError, naming no file), then exit 75.
    folder = pair.daemon.state_dir / "spool" / "00000000000000000999.seg"
    folder.mkdir(parents=True)
    code, out = run_second(pair.daemon)
    assert code == Supervisor.EXIT_CONFIG, out
    (line,) = [e for e in map(json.loads, out.splitlines()) if e["level"] in ("error", "critical")]
    assert line["event"] == "state_dir_unusable" and line["reason"] == f"{folder} is not a file"


def as_any_user() -> list[str]:
    """A command prefix under which file modes bind root as they bind any user (a daemon's
    DynamicUser, a migrated folder's wrong owner); none needed for another user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file modes do not bind root")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_a_segment_the_daemons_user_cannot_read_stops_the_start_naming_it(pair: Pair) -> None:
    # Both workers died on it at every start (PermissionError tracebacks), then exit 75.
    pair.first_connection_stored_then_stopped()
    spool = pair.daemon.state_dir / "spool"
    segment = spool / list_segments(spool)[0]
    segment.chmod(0)
    code, out = run_second(pair.daemon, *as_any_user())
    assert code == Supervisor.EXIT_CONFIG, out
    events = list(map(json.loads, out.splitlines()))
    (line,) = [e for e in events if e["level"] in ("error", "critical")]
    assert line["event"] == "state_dir_unusable", out
    assert line["reason"] == f"{segment} is not readable by uid {os.geteuid()}"
    assert "worker_started" not in [e["event"] for e in events]
    segment.chmod(0o600)  # made readable, the next start stores what the spool held
    pair.daemon.start().wait_ready()
    wait_until(lambda: pair.all_stored(2 * TWEETS), 60, "the second connection's tweets stored")
    finish(pair.daemon, pair.sim)
    pair.assert_exactly_once()


def spool_backlog_tweet(pair: Pair, tweet_id: int) -> None:
    """Append a tweet of generation 1 to the stopped daemon's spool: a backlog left unstored."""
    spool = SpoolWriter(pair.daemon.state_dir / "spool", max_bytes=1 << 30, max_records=10**6)
    spool.append([(KIND_MESSAGE, orjson.dumps({
        "id": tweet_id, "id_str": str(tweet_id), "text": "my iphone",
        "created_at": "Sat Dec 05 10:00:00 +0000 2026", "user": {"id": 7, "screen_name": "me"},
        "entities": {"hashtags": [], "user_mentions": [], "urls": []}}))], 1, 1, time.time_ns())
    spool.close()


@pytest.mark.parametrize("track", ["iphone", ["iphone", " "]], ids=["a string", "a blank phrase"])
def test_a_generation_file_of_another_shape_is_counted_and_never_fatal(pair: Pair,
                                                                       track: object) -> None:
    # A string's characters were taken as phrases (matched: nothing, silently); a blank phrase,
    # which no settings validate, made the store worker's Matcher raise at every start.
    pair.first_connection_stored_then_stopped()
    backlog = 9_100_000_000_000_000_001  # a tweet generation 1 left unstored in the spool
    spool_backlog_tweet(pair, backlog)
    (pair.daemon.state_dir / "generations" / "stopped_at").unlink()  # as a killed run leaves it
    generation = pair.daemon.state_dir / "generations" / "1.json"
    generation.write_bytes(orjson.dumps({**orjson.loads(generation.read_bytes()), "track": track}))
    pair.daemon.start().wait_ready()
    wait_until(lambda: pair.all_stored(2 * TWEETS)
               and backlog in stored_ids(pair.uri, pair.database), 60, "every tweet stored")
    finish(pair.daemon, pair.sim)
    assert pair.crashes() == []
    assert pair.daemon.counters("store")["matched_fallback"] == {"unreadable": 1}
    (unknown,) = pair.daemon.events("generation_unknown")
    assert unknown["generation"] == 1 and unknown["reason"] == "unreadable"
    assert sorted(stored_ids(pair.uri, pair.database)) == sorted(
        [*pair.sim.ground_truth().tweet_ids(), backlog])



def metric(state_dir: Path, name: str) -> float | None:
    """One sample of /metrics, as the supervisor's collector reads the run files."""
    from ingestd.control.collector import RunStateCollector

    return next((s.value for family in RunStateCollector(state_dir).collect()
                 for s in family.samples if s.name == name), None)


def test_a_folder_in_place_of_the_checkpoint_is_visible_and_cleared_once_removed(
        pair: Pair) -> None:
    # Storing went on and the status said why, but no metric but ingestd_store_degraded (whose
    # help said "MongoDB writes are failing") showed it. The daemon recovers by itself once the
    # operator removes the folder: it never removes it (an operator's folder may hold anything).
    spool = pair.daemon.state_dir / "spool"
    pair.daemon.start().wait_ready()
    wait_until(lambda: pair.all_stored(TWEETS), 60, "the first connection's tweets stored")
    store_pid = pair.daemon.pids()["store"]
    (spool / CHECKPOINT).unlink()
    (spool / CHECKPOINT).mkdir()
    reload_by_hand(pair, 2)  # the second connection's tweets: acks the checkpoint cannot follow
    wait_until(lambda: pair.all_stored(2 * TWEETS), 60, "the second connection's tweets stored")
    store = wait_until(lambda: (s := pair.daemon.status("store")).get(
        "spool", {}).get("checkpoint_failures", 0) >= 5 and s, 30, "failures retried")
    assert store["state"].startswith("degraded: spool checkpoint unwritable (")
    assert f"{spool / CHECKPOINT}: Is a directory (EISDIR)" in store["state"]
    assert command(pair.daemon, "status").returncode == 1  # degraded
    assert metric(pair.daemon.state_dir, "ingestd_store_degraded") == 1
    failures = metric(pair.daemon.state_dir, "ingestd_spool_checkpoint_failures_total")
    assert failures is not None and failures >= 5
    (spool / CHECKPOINT).rmdir()  # what the operator does (docs/reliability.md, #8b)
    wait_until(lambda: not pair.daemon.status("store")["state"].startswith("degraded"), 30,
               "the store worker's state clear, with no restart")
    assert command(pair.daemon, "status").returncode == 0
    assert metric(pair.daemon.state_dir, "ingestd_store_degraded") == 0
    acked = pair.daemon.status("store")["spool"]["acked_seq"]
    assert pair.daemon.pids()["store"] == store_pid
    finish(pair.daemon, pair.sim)
    assert pair.crashes() == []
    assert read_checkpoint(spool) is not None and acked > 0
    lines = pair.daemon.events("spool_checkpoint_write_failed")
    assert 0 < len(lines) < failures  # folded by the log's rate limit, never silent
    assert len(pair.daemon.events("spool_checkpoint_write_recovered")) == 1
    pair.assert_exactly_once()


def test_a_stop_mark_restored_from_a_backup_sets_generations_aside_and_loses_no_tweet(
        pair: Pair) -> None:
    # generations/stopped_at holding a valid but wrong (older) number reads as an older ingestd
    # having appended: the generations are set aside, kept in superseded/. What that costs is
    # only the filters the backlog's _ingest.matched is computed with (the newest), counted and
    # logged; every tweet is still stored, and the new start's are matched by their own.
    pair.first_connection_stored_then_stopped()
    backlog = 9_100_000_000_000_000_002  # a tweet generation 1 left unstored in the spool
    spool_backlog_tweet(pair, backlog)
    generations = pair.daemon.state_dir / "generations"
    (generations / "stopped_at").write_text("3\n")  # a backup's: the spool is past it
    pair.daemon.start().wait_ready()
    wait_until(lambda: pair.all_stored(2 * TWEETS)
               and backlog in stored_ids(pair.uri, pair.database), 60, "every tweet stored")
    generation = pair.daemon.status("supervisor")["generation"]
    finish(pair.daemon, pair.sim)
    assert pair.crashes() == []
    (superseded,) = pair.daemon.events("generations_superseded")
    assert superseded["first_seq"] == 4 and superseded["level"] == "warning"
    assert (generations / "superseded" / "1.json").is_file()  # set aside, not deleted
    assert generation == 2  # numbered past the set-aside ones: never reused
    # the backlog's tweets only (those of generation 1 still in the spool), each counted
    assert pair.daemon.counters("store")["matched_fallback"] == {"before_record": 1}
    assert sorted(stored_ids(pair.uri, pair.database)) == sorted(
        [*pair.sim.ground_truth().tweet_ids(), backlog])
