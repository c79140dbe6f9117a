"""Durability on the real daemon when the disk fills up or turns read-only (issue #5): the spool
applies ``spool.when_full``, nothing crash-loops, and everything resumes once the disk takes
writes again. Split from ``test_durability.py`` (same helpers, same reconciliation against the
simulator's ground truth), so the two files run on two of ``make test``'s workers.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from ingestd.control.status import collect, render
from tests.support.daemon import Daemon, finish
from tests.support.mongo import MongoStandIn, stored_ids
from tests.support.mounts import bind_read_only
from tests.support.simulator import SimProcess
from tests.support.skips import unavailable
from tests.support.wait import wait_progressing, wait_until
from tests.test_durability import DB, durable_doc, figures, spooled, wait_drained


@pytest.fixture
def standin(mongo_standin: MongoStandIn) -> Iterator[MongoStandIn]:
    yield mongo_standin


# ---------------------------------------------------------------- 4. disk full


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at the end of the test (lazily: a daemon may still hold files)."""
    made: list[Path] = []
    yield made
    for mnt in reversed(made):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave: int) -> Path:
    """Fill the filesystem of ``path`` until ``leave`` bytes are free; return the filler file."""
    filler = path / "filler"
    free = shutil.disk_usage(path).free - leave
    with filler.open("wb") as f:
        f.write(b"\0" * max(free, 0))
    return filler


def disk_drill(tmp_path: Path, standin: MongoStandIn, policy: str, tweets: int, *, rate: int,
               seed: int, **spool: str) -> tuple[SimProcess, dict[str, Any], Daemon]:
    """A disk drill's simulator (started), settings (``spool.when_full: policy``) and daemon."""
    sim = SimProcess(tmp_path / "sim", "--rate", str(rate), "--max-tweets", str(tweets),
                     "--control-every", "0", "--keepalive", "1", "--seed", str(seed)).start()
    doc = durable_doc(sim, standin.uri, spool={"when_full": policy, **spool})
    return sim, doc, Daemon(tmp_path / "daemon", doc)


def stream_state_after_recovery(daemon: Daemon) -> str:
    """The stream's state once the disk works again: "connected…", or the assertion fails
    with the last one seen. With ``drop_newest`` nothing is held to retry, so the spool error
    clears at the next good write or at the spool's probe (every second: spool.intake), which
    may come just after the spool drained, when no message is left to write."""
    seen = [""]

    def cleared() -> bool:
        seen[0] = str(daemon.status("stream").get("state"))
        return seen[0].startswith("connected")

    try:
        wait_until(cleared, 15, "the stream's state to clear after recovery")
    except AssertionError:
        raise AssertionError(f"the stream still reports {seen[0]!r} after recovery") from None
    return seen[0]


def assert_stored_or_dropped(policy: str, ids: list[int], delivered: set[int],
                             stream: dict[str, Any], store: dict[str, Any], messages: int) -> None:
    """Every delivered tweet stored once or counted as dropped with its reason (the disk
    drills): ``block`` drops nothing, ``drop_newest`` drops only on the disk's account."""
    dropped = sum(stream["dropped"].values())
    assert len(ids) == len(set(ids)) and set(ids) <= delivered
    assert spooled(stream) + dropped == messages == len(delivered)
    assert len(ids) == store["stored"] + store["duplicates"] == spooled(stream)
    if policy == "block":
        assert dropped == 0 and set(ids) == delivered
    else:
        assert set(stream["dropped"]) <= {"disk_error", "spool_full"}
        assert stream["dropped"].get("disk_error", 0) > 0
        assert len(delivered - set(ids)) == dropped


@dataclass
class DrillEnd:
    """What a disk drill ends with: the messages resolved, the workers' last counters, and
    (``landed``, once the daemon is gone) the ids stored against those delivered."""

    messages: int
    stream: dict[str, Any]
    store: dict[str, Any]
    ids: list[int] = field(default_factory=list)
    delivered: set[int] = field(default_factory=set)

    @property
    def dropped(self) -> int:
        return sum(self.stream["dropped"].values())

    def landed(self, standin: MongoStandIn, sim: SimProcess) -> DrillEnd:
        self.ids = stored_ids(standin.uri, DB)
        self.delivered = set(sim.ground_truth().tweet_ids())
        return self

    def check(self, policy: str) -> None:
        assert_stored_or_dropped(policy, self.ids, self.delivered, self.stream, self.store,
                                 self.messages)

    def report(self, name: str) -> None:
        """Print the drill's reconciliation (``figures``)."""
        figures(name, len(self.delivered), len(self.ids), self.store["duplicates"],
                sum(self.store["deadlettered"].values()), self.dropped,
                drops=self.stream["dropped"])


def drain_and_stop(daemon: Daemon, sim: SimProcess, tweets: int, *, timeout: float,
                   stall: float | None = None,
                   recovered: Callable[[], object] = lambda: None) -> DrillEnd:
    """A drill's end once the disk works again: until every delivered message is stored or
    dropped (and ``recovered()``), then the stop: exit 0, no worker restarted, no traceback."""
    messages = wait_drained(daemon, sim, tweets, timeout=timeout, stall=stall)
    recovered()
    stream_state_after_recovery(daemon)  # its spool_write_recovered line is logged by then
    end = DrillEnd(messages, daemon.counters("stream"), daemon.counters("store"))
    restarts = daemon.status("supervisor").get("restarts")
    code, _ = daemon.stop()
    assert code == 0, daemon.tail()
    assert not restarts or not any(restarts.values()), f"workers restarted: {restarts}"
    assert not daemon.events("uncaught_exception") and "Traceback" not in daemon.logs()
    return end


def run_disk_full(tmp_path: Path, standin: MongoStandIn, mounts: list[Path], policy: str,
                  whole_state_dir: bool) -> None:
    # A 12 MiB tmpfs (the spool folder, or the whole state folder) with a filler file leaving
    # ~1 MiB; MongoDB is stopped, so the spool can only grow and the disk fills up long before
    # the spool's own bound. Then the filler goes, MongoDB returns: everything must be stored
    # (block) or exactly the counted drops missing (drop_newest), with no worker restart.
    tweets = 1500
    sim, _, daemon = disk_drill(tmp_path, standin, policy, tweets, rate=600, seed=8,
                                segment_bytes="1MiB")
    disk = daemon.state_dir if whole_state_dir else daemon.state_dir / "spool"
    mount_tmpfs(disk, "12m")
    mounts.append(disk)
    filler = fill(disk, leave=1 << 20)
    standin.stop()
    try:
        daemon.start().wait_ready()
        wait_until(lambda: disk_full_seen(daemon, policy), 60, "the spool to hit ENOSPC")
        if policy == "block":
            assert len(sim.ground_truth().tweet_ids()) < tweets, "the disk filled too late"
        daemon.assert_running()
        filler.unlink()  # space returns
        standin.start()
        end = drain_and_stop(daemon, sim, tweets, timeout=120)
    finally:
        daemon.kill()
        sim.stop()
    end.landed(standin, sim).check(policy)
    end.report(f"disk-full {policy}")


@pytest.mark.parametrize("policy", ["block", "drop_newest"])
def test_disk_full_spool_applies_policy_and_recovers(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path], policy: str) -> None:
    run_disk_full(tmp_path, standin, mounts, policy, whole_state_dir=False)


def test_disk_full_whole_state_dir_no_crash_loop(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path]) -> None:
    run_disk_full(tmp_path, standin, mounts, "block", whole_state_dir=True)


def disk_full_seen(daemon: Daemon, policy: str) -> bool:
    daemon.assert_running()
    status = daemon.status("stream")
    if policy == "block":
        return bool(status.get("spool", {}).get("held")) and "spool write failed" in str(
            status.get("state"))
    return bool(status.get("counters", {}).get("dropped", {}).get("disk_error"))


def fill_to_the_last_block(path: Path) -> None:
    """Write a file in ``path`` until its file system has no block left (the daemon's own
    writes may race it: it stops at the first ENOSPC of the smallest size)."""
    with (path / "filler").open("wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)


def run_small_disk(tmp_path: Path, standin: MongoStandIn, mounts: list[Path],
                   policy: str, mongo_down: bool = True) -> None:
    # The audit's drill: the whole state folder on an 8 MiB tmpfs with the default 64 MiB
    # segments and no filler to remove: MongoDB is stopped until the spool fills the disk, and
    # the only way space comes back is the store worker deleting what it stored. Its checkpoint
    # must be written without a new block (in place) and the writer must have rolled, or the
    # store worker dies on the checkpoint (a crash loop, exit 75) and nothing is freed.
    # (drop_newest: the stream still delivers once space is back; its first good append is
    # what clears the state, see spool.intake)
    # 8,000 tweets (seed 18): the disk is full after ~4,700, and the filler left after the
    # first failed append stays, so every later one needs space the store worker freed.
    tweets = 8000
    sim, _, daemon = disk_drill(tmp_path, standin, policy, tweets, rate=1000, seed=18)
    mount_tmpfs(daemon.state_dir, "8m")
    mounts.append(daemon.state_dir)
    if mongo_down:
        standin.stop()
    try:
        daemon.start().wait_ready()
        if mongo_down:
            wait_until(lambda: disk_full_seen(daemon, policy), 60, "the spool to hit ENOSPC")
            if policy == "block":
                assert len(sim.ground_truth().tweet_ids()) < tweets, "the disk filled too late"
        else:  # MongoDB healthy: another file fills the disk while tweets are being stored
            wait_until(lambda: daemon.counters("store").get("stored", 0) > 500, 60,
                       "tweets stored")
        # What the failed append left free (up to one coalesced write) could still take a
        # checkpoint's temp file: another file takes it, and stays (the audit's second case).
        fill_to_the_last_block(daemon.state_dir)
        daemon.wait_log("spool_write_failed", 60)
        daemon.assert_running()
        if mongo_down:
            standin.start()  # no space given back by hand
        end = drain_and_stop(daemon, sim, tweets, timeout=180, stall=60)
    finally:
        daemon.kill()
        sim.stop()
    assert end.store["spool_missing_records"] == end.store["spool_corrupt_records"] == 0
    end.landed(standin, sim).check(policy)
    end.report(f"small-disk {policy} mongo_down={mongo_down}")


@pytest.mark.parametrize("policy", ["block", "drop_newest"])
def test_small_disk_default_segments_frees_stored_space_no_crash_loop(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path], policy: str) -> None:
    run_small_disk(tmp_path, standin, mounts, policy)


def test_small_disk_filled_by_another_file_while_storing_no_crash_loop(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path]) -> None:
    run_small_disk(tmp_path, standin, mounts, "block", mongo_down=False)


def test_a_restart_onto_a_full_disk_exits_75_naming_the_file_and_starts_once_space_returns(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path]) -> None:
    """The ops audit: a daemon restarted (by systemd, a reboot, an operator) onto a state
    folder whose disk is full exited 78 (`state_dir_unusable`, naming only the folder), which
    the unit's `RestartPreventExitStatus=78` never restarts: down for good, although space
    comes back by itself (and the spool's backlog, once stored, frees it). Now exit 75
    (`state_dir_full`, naming the file that could not be written, no temp file left), which
    systemd's `Restart=` retries; once space returns the next start runs. (With the state
    folder's reserve still there the start runs at once: the next test. Here it is gone, as
    after an earlier start onto a full disk used it.)"""
    sim = SimProcess(tmp_path / "sim", "--rate", "50").start()
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "4m")
    mounts.append(disk)
    doc = durable_doc(sim, standin.uri)
    doc["state_dir"] = str(disk / "state")
    daemon = Daemon(tmp_path / "daemon", doc)
    daemon.state_dir = disk / "state"
    try:
        daemon.start().wait_ready()
        assert daemon.stop()[0] == 0
        (daemon.state_dir / "run" / "space.reserve").unlink()
        fill_to_the_last_block(disk)
        daemon.start()
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 75, daemon.tail()
        (full,) = daemon.events("state_dir_full")
        assert re.fullmatch(rf"{re.escape(str(daemon.state_dir))}/(run/supervisor\.pid|"
                            r"generations/(first|\d+\.json)): No space left on device",
                            full["reason"]), full
        assert not daemon.events("state_dir_unusable")
        folders = (daemon.state_dir / "run", daemon.state_dir / "generations")
        assert [p for d in folders for p in d.iterdir() if p.name.endswith(".tmp")] == []
        (disk / "filler").unlink()
        daemon.start().wait_ready()
        finish(daemon, sim)
    finally:
        daemon.kill()
        sim.stop()


def test_a_restart_onto_a_disk_its_own_spool_filled_starts_and_stores_the_backlog(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path]) -> None:
    """MongoDB down, the spool fills the state folder's disk to the last block; the daemon is
    restarted (the watchdog, a deploy, an operator, a reboot) before MongoDB returns. Only
    the daemon can free that space, by storing its backlog, yet its start needed a block (the
    pid file, the generation file): it exited 75 on every try, systemd gave up after
    StartLimitBurst, and the backlog stayed on disk for good. The start now uses the state
    folder's reserve (run/space.reserve, set aside while there was space), so it runs, stores the
    backlog once MongoDB is back, and frees the disk by itself."""
    # 8,000 a connection: the first fills the 8 MiB disk after ~4,700 (seed 18), and storing
    # the second's whole takes the stand-in ~1 s a thousand (15,000 took 7 s more, to no end).
    tweets = 8000
    sim, doc, daemon = disk_drill(tmp_path, standin, "block", tweets, rate=1000, seed=18)
    # The first stop comes with MongoDB down: the store worker's drain can only wait out the
    # stop budget (10 s), whose length is no part of this test.
    doc["control"]["stop_timeout"] = 3
    daemon.write_settings(doc)
    mount_tmpfs(daemon.state_dir, "8m")
    mounts.append(daemon.state_dir)
    standin.stop()
    try:
        daemon.start().wait_ready()
        wait_until(lambda: disk_full_seen(daemon, "block"), 60, "the spool to hit ENOSPC")
        fill_to_the_last_block(daemon.state_dir)
        daemon.wait_log("spool_write_failed", 60)
        assert daemon.stop()[0] == 0, daemon.tail()
        # The stop gave back the pid file's block: another writer (a log) takes it meanwhile.
        fill_to_the_last_block(daemon.state_dir)
        assert shutil.disk_usage(daemon.state_dir).free == 0
        standin.start()
        daemon.start().wait_ready()
        assert not daemon.events("state_dir_full"), daemon.tail()
        wait_until(lambda: shutil.disk_usage(daemon.state_dir).free > 1 << 20, 120,
                   "the stored backlog to free the disk")
        wait_until(lambda: conn_stored(sim, standin, 2, tweets), 180,
                   "the restarted daemon's connection stored whole", interval=1)
        code, _ = daemon.stop()
        assert code == 0, daemon.tail()
    finally:
        daemon.kill()
        sim.stop()
    # The backlog is stored: connection 1's tweets up to the ones the paused reader never took
    # from its socket (the stop closed it), every one of connection 2's, each once.
    ids, truth = stored_ids(standin.uri, DB), sim.ground_truth()
    first = truth.tweet_ids(conn=1)
    assert len(ids) == len(set(ids)) and set(ids) == set(first[:len(ids) - tweets]) | set(
        truth.tweet_ids(conn=2)), (len(ids), len(first))
    assert len(ids) - tweets > 4000, "the backlog the first run spooled is not stored"


def conn_stored(sim: SimProcess, standin: MongoStandIn, conn: int, tweets: int) -> bool:
    """Connection ``conn`` has delivered its ``tweets`` (``--max-tweets``: only keep-alives
    follow) and the collection holds each of them."""
    if sim.state()["tweets"].get(str(conn), 0) < tweets:
        return False
    return set(sim.ground_truth().tweet_ids(conn=conn)) <= set(stored_ids(standin.uri, DB))


def test_a_stop_on_a_full_disk_counts_the_messages_it_held(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path]) -> None:
    """`systemctl stop`/`restart` while `when_full: block` holds messages the full disk would
    not take: they were dropped without a word, still counted as `received` ("messages that
    reached the spool"), so `received` stood above what was ever stored. Now the stop writes
    them if it can, else counts them as `disk_error` drops (`spool_held_dropped`): every
    message counted as received is stored once space and MongoDB are back."""
    sim, doc, daemon = disk_drill(tmp_path, standin, "block", 4000, rate=800, seed=9,
                                  segment_bytes="1MiB")
    # The first stop comes with MongoDB down: the store worker's drain can only wait out the
    # stop budget (10 s), whose length is no part of this test.
    doc["control"]["stop_timeout"] = 3
    daemon.write_settings(doc)
    mount_tmpfs(daemon.state_dir, "6m")
    mounts.append(daemon.state_dir)
    filler = fill(daemon.state_dir, leave=1 << 20)
    standin.stop()
    try:
        daemon.start().wait_ready()
        wait_until(lambda: daemon.status("stream").get("spool", {}).get("held"), 60,
                   "messages held by the full disk")
        assert daemon.stop()[0] == 0, daemon.tail()
        first = daemon.counters("stream")
        assert first["dropped"].get("disk_error", 0) > 0, first
        filler.unlink()
        standin.start()
        daemon.start().wait_ready()
        conn1 = sim.ground_truth().tweet_ids(conn=1)

        def stored_of_conn1() -> int:
            return len(set(conn1) & set(stored_ids(standin.uri, DB)))
        wait_progressing(lambda: stored_of_conn1() >= first["received"], stored_of_conn1, 30,
                         120, "connection 1's spooled tweets stored")
        finish(daemon, sim)
    finally:
        daemon.kill()
        sim.stop()
    stored = set(stored_ids(standin.uri, DB)) & set(conn1)
    assert stored == set(conn1[:first["received"]]), (len(stored), first)


# ---------------------------------------------------------------- 4b. read-only state folder


def remount(where: Path, read_only: bool) -> None:
    option = "remount,bind,ro" if read_only else "remount,bind,rw"
    subprocess.run(["mount", "-o", option, str(where)], check=True)


@pytest.mark.parametrize("policy", ["block", "drop_newest"])
def test_read_only_state_dir_at_runtime_no_crash_loop(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path], policy: str) -> None:
    run_read_only(tmp_path, standin, mounts, policy, whole_state_dir=True)


def test_read_only_spool_folder_status_says_why(
        tmp_path: Path, standin: MongoStandIn, mounts: list[Path]) -> None:
    # Only the spool folder read-only: the status files still work and say what fails, the
    # store worker's "degraded: spool checkpoint unwritable (…EROFS…)" while it keeps storing.
    run_read_only(tmp_path, standin, mounts, "block", whole_state_dir=False)


def run_read_only(tmp_path: Path, standin: MongoStandIn, mounts: list[Path], policy: str,
                  whole_state_dir: bool) -> None:
    # The state folder turns read-only under a running daemon (the audit's bind mount): the
    # open segment is written on until it rolls, then the spool's writes fail and follow
    # when_full; checkpoints and status files fail and are reported. Longer than the heartbeat
    # timeout (5 s here): the workers beat through the supervisor's pipe and are not killed.
    # Made writable again, everything resumes by itself.
    tweets = 4000
    sim, doc, daemon = disk_drill(tmp_path, standin, policy, tweets, rate=400, seed=19,
                                  segment_bytes="256KiB")
    doc["control"]["heartbeat_timeout"] = 5  # half the default: the wait below is timed by it
    daemon.write_settings(doc)
    state = daemon.state_dir if whole_state_dir else daemon.state_dir / "spool"
    try:
        daemon.start().wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) > 200, 60, "tweets stored")
        # Mounted over the running daemon in one step (a bind then a remount fails when the
        # daemon opens a file in between: tests/support/mounts.py): the files it holds open
        # stay writable, as in the audit; every new open meets the read-only mount.
        bind_read_only(state)
        mounts.append(state)
        read_only_at = time.monotonic()
        try:
            failed = daemon.wait_log("spool_write_failed", 60)
            assert "Read-only file system (EROFS)" in failed["error"]
            assert f"{daemon.state_dir}/spool/" in failed["error"], failed
            daemon.wait_log("spool_checkpoint_write_failed", 30)
            if whole_state_dir:
                daemon.wait_log("status_write_failed", 30)
            else:
                store_state = wait_until(
                    lambda: str(daemon.status("store").get("state", "")).startswith(
                        "degraded: spool checkpoint unwritable") and daemon.status("store"),
                    30, "the store worker's status to say why")["state"]
                assert "(EROFS)" in store_state, store_state
                # published at the pass that failed (a few ms after the line is logged)
                wait_until(lambda: "(EROFS)" in str(daemon.status("stream").get("state")), 5,
                           "the stream's status to say why")
            heartbeat = float(doc["control"]["heartbeat_timeout"])
            wait_until(lambda: (daemon.assert_running() or
                                time.monotonic() - read_only_at > heartbeat + 3),
                       heartbeat + 30, "longer than the heartbeat timeout, read-only", 0.5)
            assert not daemon.events("worker_hung"), daemon.tail()
            if whole_state_dir:  # what `ingestd status` says: no file is fresh, none can be
                view = collect(daemon.state_dir)
                shown = render(view)
                assert view["health"] == "degraded" and set(view["liveness"].values()) == {
                    "unknown"}, shown
                assert "status files cannot be written" in shown, shown
                assert "read-only file system" in shown and "HUNG" not in shown, shown
        finally:
            remount(state, read_only=False)
        end = drain_and_stop(daemon, sim, tweets, timeout=180, stall=60, recovered=lambda: (
            wait_until(lambda: not str(daemon.status("store").get("state")).startswith(
                "degraded"), 30, "the store worker's status to recover")))
    finally:
        daemon.kill()
        sim.stop()
    assert daemon.events("spool_write_recovered")
    assert daemon.events("status_write_recovered") or not whole_state_dir
    assert daemon.events("spool_checkpoint_write_recovered")
    end.landed(standin, sim).check(policy)
    end.report(f"read-only {'state_dir' if whole_state_dir else 'spool'} {policy}")


# ---------------------------------------------------------------- 6. state folder unreadable

# Root without the capabilities that override file permissions: the folder's mode applies to the
# daemon as to the systemd unit's DynamicUser (tests run as root, whom a mode does not stop).
WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
               "--inh-caps=-dac_override,-dac_read_search", "--"]


def test_a_state_folder_made_unreadable_under_the_daemon_is_reported_and_loses_nothing(
        tmp_path: Path, standin: MongoStandIn) -> None:
    """The state folder's permissions change under the running daemon (seen once as a tmpfs
    mounted over it): both workers died with a PermissionError traceback (the checkpoint's stat,
    the spool's listing) and the supervisor exited 75 after the crash loop (then, with the
    workers surviving, the supervisor itself died looking for its disk reserve). Now each worker
    logs ``spool_unreadable`` with the path and the cause, counts it, and waits; ``status``
    says why (not HUNG); once the folder is back every tweet of the ground truth is stored."""
    if shutil.which("setpriv") is None:
        unavailable("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    tweets = 4000
    sim, doc, daemon = disk_drill(tmp_path, standin, "block", tweets, rate=300, seed=23)
    daemon.wrapper = WITHOUT_DAC
    try:
        daemon.start().wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) > 200, 60, "tweets stored")
        mode = daemon.state_dir.stat().st_mode
        daemon.state_dir.chmod(0)
        unreadable_at = time.monotonic()
        try:
            failed = {role: daemon.wait_log("spool_unreadable", 30, role=role)
                      for role in ("stream", "store")}
            heartbeat = float(doc["control"]["heartbeat_timeout"])
            wait_until(lambda: (daemon.assert_running() or
                                time.monotonic() - unreadable_at > heartbeat + 3),
                       heartbeat + 30, "longer than the heartbeat timeout, unreadable", 0.5)
            view = collect(daemon.state_dir)
            shown = render(view)
        finally:
            daemon.state_dir.chmod(mode)
        daemon.wait_log("spool_readable_again", 30, role="store")
        end = drain_and_stop(daemon, sim, tweets, timeout=120)
    finally:
        daemon.kill()
        sim.stop()
    for event in failed.values():
        assert "Permission denied (EACCES)" in event["error"], event
        assert str(daemon.state_dir / "spool") in event["error"], event
        assert "make the state folder readable" in event["action"], event
    assert not daemon.events("worker_hung") and not daemon.events("supervisor_failed")
    assert view["health"] == "degraded", shown
    assert "permission denied to the daemon's user" in shown and "mode 0000" in shown, shown
    assert "HUNG" not in shown, shown
    assert end.stream["spool_read_failures"] >= 1 and end.store["spool_read_failures"] >= 1
    end.landed(standin, sim).check("block")
    end.report("state folder unreadable")


def test_a_worker_restarted_onto_an_unreadable_state_folder_says_why_and_starts_once_back(
        tmp_path: Path, standin: MongoStandIn) -> None:
    """The store worker killed while the folder is unreadable: its restart met the folder in its
    start (the spool's ``mkdir``) and died with a PermissionError traceback, again and again.
    Now it logs ``spool_unreadable`` naming the path and exits 75 (the supervisor's back-off
    retries it); once the folder is back, it starts and stores everything."""
    if shutil.which("setpriv") is None:
        unavailable("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    tweets = 2000
    sim, _, daemon = disk_drill(tmp_path, standin, "block", tweets, rate=300, seed=29)
    daemon.wrapper = WITHOUT_DAC
    try:
        daemon.start().wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) > 200, 60, "tweets stored")
        mode = daemon.state_dir.stat().st_mode
        store = psutil.Process(daemon.worker_pid("store"))
        daemon.state_dir.chmod(0)
        try:
            store.kill()  # a worker this test's daemon started
            refused = wait_until(lambda: next(
                (e for e in daemon.events("spool_unreadable", role="store")
                 if "cannot start" in e["effect"]), None), 30, "the restart's refusal")
            exited = daemon.wait_log("worker_exited", 30, role="store", exit_code=75)
        finally:
            daemon.state_dir.chmod(mode)
        # the counters are per worker process: the ground truth against MongoDB instead
        def all_stored() -> set[int] | None:
            truth = set(sim.ground_truth().tweet_ids())
            return truth if len(truth) == tweets and truth <= set(
                stored_ids(standin.uri, DB)) else None
        delivered = wait_until(all_stored, 120, "every delivered tweet stored")
        code, _ = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    assert code == 0, daemon.tail()
    assert str(daemon.state_dir) in refused["error"] and "(EACCES)" in refused["error"], refused
    assert exited["exit_code"] == 75
    assert "Traceback" not in daemon.logs() and not daemon.events("uncaught_exception")
    ids = stored_ids(standin.uri, DB)
    assert len(ids) == len(set(ids)) and set(ids) == delivered

