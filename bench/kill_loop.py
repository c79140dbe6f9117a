"""SIGKILL the daemon's workers at random moments, then reconcile MongoDB with the ground truth.

.venv/bin/python bench/kill_loop.py --iterations 200 [--seed 7] [--rate 300] [--mongo-uri URI]

Runs the real ``ingestd run`` against the simulator and the nx-27017 stand-in (or ``--mongo-uri``).
Each iteration waits a random delay (seeded), then SIGKILLs, in turn: the stream worker, the store
worker, both workers, or the whole daemon (supervisor and workers, then a fresh start on the same
state folder, which also resets the supervisor's restart back-off). It waits until every killed
process is replaced and working again. At the end the simulator stops (its connection ends
cleanly), the spool drains, and every delivered tweet must be in MongoDB exactly once, except a
tail per connection whose stream worker was killed: bytes still in the socket or in libcurl when
the process died never reached the spool. That tail must be a suffix of the connection's tweets
(nothing is missing before a stored tweet) delivered at most ``TAIL_SECONDS`` before the kill.
``tests/test_durability.py`` runs this with 20 iterations; the script prints per-iteration and
total figures and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pymongo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daemon import Daemon, settings_doc
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

TARGETS = ("stream", "store", "both", "daemon")
STREAM_KILLS = ("stream", "both", "daemon")
TAIL_SECONDS = 2.0
RESTART_TIMEOUT = 60.0


@dataclass
class Kill:
    index: int
    target: str
    delay: float
    at: float  # wall clock, comparable with the ground truth's "t"
    restart_s: float = 0.0
    duplicates_before: int = 0  # the killed store worker's last published duplicates counter


@dataclass
class Report:
    kills: list[Kill]
    delivered: dict[int, list[tuple[int, float]]]  # conn -> [(id, t)] in delivery order
    stored: list[int]
    duplicates: int
    deadletters: int
    lost: dict[int, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reconcile()

    def _reconcile(self) -> None:
        stored = set(self.stored)
        if len(stored) != len(self.stored):
            self.problems.append(f"{len(self.stored) - len(stored)} tweets stored twice")
        every = {i for conn in self.delivered.values() for i, _ in conn}
        if stored - every:
            self.problems.append(f"{len(stored - every)} stored ids were never delivered")
        if self.deadletters:
            self.problems.append(f"{self.deadletters} dead letters in a clean stream")
        kills = [k for k in self.kills if k.target in STREAM_KILLS]
        for conn, tweets in self.delivered.items():
            missing = [i for i, _ in tweets if i not in stored]
            if missing:
                self.lost[conn] = missing
                self._check_tail(conn, tweets, len(missing), kills)
        if len(self.lost) > len(kills):
            self.problems.append(f"{len(self.lost)} connections lost tweets, {len(kills)} killed")

    def _check_tail(self, conn: int, tweets: list[tuple[int, float]], n: int,
                    kills: list[Kill]) -> None:
        tail = tweets[-n:]
        stored = set(self.stored)
        if any(i in stored for i, _ in tail):
            self.problems.append(f"conn {conn}: a tweet is missing before a stored one")
            return
        first_lost_t, last_t = tail[0][1], tweets[-1][1]
        kill = min(kills, key=lambda k: abs(k.at - last_t), default=None)
        if kill is None or kill.at - first_lost_t > TAIL_SECONDS:
            self.problems.append(f"conn {conn}: {n} tweets lost, delivered > {TAIL_SECONDS}s "
                                 "before any kill (they had time to reach the spool)")

    @property
    def delivered_count(self) -> int:
        return sum(len(t) for t in self.delivered.values())

    def print(self) -> None:
        for k in self.kills:
            # a killed store worker's duplicates: what it replayed after the kill before it
            replayed = (f"; its store worker had replayed {k.duplicates_before}"
                        if k.target in ("store", "daemon") else "")
            print(f"  #{k.index:3d} kill {k.target:6s} after {k.delay:4.2f}s "
                  f"-> working again in {k.restart_s:5.2f}s{replayed}")
        lost = sum(len(v) for v in self.lost.values())
        per_kill = sorted(len(v) for v in self.lost.values())
        restarts = [k.restart_s for k in self.kills]
        print(f"[kill-loop] iterations={len(self.kills)} delivered={self.delivered_count} "
              f"stored={len(self.stored)} duplicates={self.duplicates} "
              f"dead-lettered={self.deadletters} dropped=0 lost_in_flight={lost} "
              f"(per killed connection: {per_kill}) connections={len(self.delivered)} "
              f"restart_max={max(restarts, default=0):.2f}s")
        for problem in self.problems:
            print(f"  PROBLEM: {problem}")

    def check(self) -> None:
        assert not self.problems, self.problems
        assert len(self.stored) == self.delivered_count - sum(len(v) for v in self.lost.values())


class KillLoop:
    """One simulator, one daemon, N kills; ``run`` returns the reconciled ``Report``."""

    def __init__(self, workdir: Path, mongo_uri: str, database: str, *, seed: int,
                 rate: int = 300) -> None:
        self.workdir, self.mongo_uri, self.database = workdir, mongo_uri, database
        self.rng = random.Random(seed)
        self.rate = rate
        self.kills: list[Kill] = []

    def run(self, iterations: int) -> Report:
        sim = SimProcess(self.workdir / "sim", "--rate", str(self.rate), "--control-every", "0",
                         "--keepalive", "1", "--seed", str(self.rng.randrange(1 << 30))).start()
        daemon = Daemon(self.workdir / "daemon", self._settings(sim))
        try:
            daemon.start().wait_ready()
            wait_until(lambda: daemon.counters("store").get("stored", 0) > 0, 60, "first tweet")
            for index in range(iterations):
                self._iteration(daemon, index)
            sim.stop()
            duplicates = self._drain(daemon, time.time())
            code, _ = daemon.stop()
            assert code == 0, f"daemon exited {code}"
        finally:
            daemon.kill()
            sim.stop()
        return Report(self.kills, self._delivered(sim), self._stored(), duplicates,
                      self._deadletters(daemon))

    def _settings(self, sim: SimProcess) -> dict[str, Any]:
        doc = settings_doc(sim.url, self.mongo_uri, self.database)
        doc["writer"].update(retry_start=0.2, retry_cap=2.0)
        # Kills are the test: the supervisor must keep restarting, not declare a crash loop.
        doc["control"].update(crash_loop_restarts=1000, heartbeat_timeout=10)
        return doc

    def _iteration(self, daemon: Daemon, index: int) -> None:
        target = TARGETS[index % len(TARGETS)]
        delay = self.rng.uniform(0.05, 0.8)
        time.sleep(delay)  # the random moment: whatever the workers are doing then
        # The workers' own status files: confirmed fresh by the last _wait_working.
        pids = {role: int(daemon.status(role)["pid"]) for role in ("stream", "store")}
        kill = Kill(index, target, delay, time.time(),
                    duplicates_before=int(daemon.counters("store").get("duplicates", 0)))
        started = time.monotonic()
        if target == "daemon":
            self._kill_all(daemon, pids)
            daemon.start()
            roles = ("stream", "store")
        else:
            roles = ("stream", "store") if target == "both" else (target,)
            for role in roles:
                os.kill(pids[role], signal.SIGKILL)
            if "store" not in roles:
                kill.duplicates_before = 0
        self._wait_working(daemon, roles, pids)
        kill.restart_s = time.monotonic() - started
        self.kills.append(kill)

    @staticmethod
    def _kill_all(daemon: Daemon, pids: dict[str, int]) -> None:
        assert daemon.proc is not None
        daemon.proc.kill()  # first, so it cannot restart the workers killed next
        for role in ("stream", "store"):
            if role in pids:
                os.kill(pids[role], signal.SIGKILL)
        daemon.proc.wait()
        for role in ("stream", "store"):
            pid = pids[role]
            wait_until(lambda p=pid: _gone(p), 10, f"old {role} worker to die")

    @staticmethod
    def _wait_working(daemon: Daemon, roles: tuple[str, ...], old: dict[str, int]) -> None:
        def working() -> bool:
            daemon.assert_running()
            for role in roles:
                status = daemon.status(role)
                if status.get("pid") in (None, old.get(role)):
                    return False
                state = str(status.get("state", ""))
                if not state.startswith("connected" if role == "stream" else "running"):
                    return False
            return True
        wait_until(working, RESTART_TIMEOUT, f"{roles} to be replaced and working", 0.05)

    def _drain(self, daemon: Daemon, since: float) -> int:
        """Until the spool is empty after the stream ended; the store's duplicates, summed."""
        def drained() -> bool:
            daemon.assert_running()
            stream, store = daemon.status("stream"), daemon.status("store")
            fresh = stream.get("time", 0) > since + 1 and store.get("time", 0) > since + 1
            idle = store.get("counters", {}).get("pending") == 0
            return fresh and idle and stream.get("spool", {}).get("records") == 0
        wait_until(drained, 120, "the spool to drain", 0.2)
        last = int(daemon.counters("store").get("duplicates", 0))
        return last + sum(k.duplicates_before for k in self.kills)

    @staticmethod
    def _delivered(sim: SimProcess) -> dict[int, list[tuple[int, float]]]:
        out: dict[int, list[tuple[int, float]]] = {}
        for e in sim.ground_truth().of("tweet"):
            out.setdefault(int(e["conn"]), []).append((int(e["id"]), float(e["t"])))
        return out

    def _stored(self) -> list[int]:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(self.mongo_uri)
        try:
            return [int(d["_id"]) for d in client[self.database].tweets.find({}, {"_id": 1})]
        finally:
            client.close()

    @staticmethod
    def _deadletters(daemon: Daemon) -> int:
        folder = daemon.state_dir / "deadletter"
        files = folder.glob("*.jsonl") if folder.exists() else []
        return sum(len(p.read_bytes().splitlines()) for p in files)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--mongo-uri", help="a real MongoDB (default: a private nx-27017)")
    args = parser.parse_args()
    from ingestd.tools.standin import StandIn

    with tempfile.TemporaryDirectory(prefix="kill-loop-") as tmp:
        work = Path(tmp)
        standin = None if args.mongo_uri else StandIn(work / "mongo").start()
        uri = args.mongo_uri or (standin.uri if standin else "")
        try:
            loop = KillLoop(work, uri, f"kill_loop_{os.getpid()}", seed=args.seed,
                            rate=args.rate)
            report = loop.run(args.iterations)
        finally:
            if standin is not None:
                standin.stop()
    report.print()
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
