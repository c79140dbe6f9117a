"""Proof 2: ``SOAK_KILLS`` (200) SIGKILLs at random moments, each target replaced every time.

Targets in turn: the whole daemon (supervisor and every process below it, then a fresh start, as
systemd restarts the unit), the stream worker, the store worker, and the store worker's encoder
child. A worker kill counts as restarted when the supervisor's restart counter for that role went
up by one and the replacement works; an encoder kill when the store worker counted the lost child
and a new child took over; a daemon kill when the new daemon is ready and working. The delay before
each kill is drawn from a seeded RNG (``SOAK_SEED``, printed). Runs through the wire proxy so an
encoder kill can wait for a large read: a held reply makes the backlog the child is used for.

Reconciliation reuses bench/kill_loop.py's ``Report``: every delivered tweet stored exactly once,
except a per-connection tail a killed stream worker had not read from its socket yet (never in
the spool), which must be a suffix of its connection delivered at most 2 s before the kill. And
the last daemon run's own counters (``ingestd status``'s reconciliation) must hold exactly.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path

import psutil

from bench.kill_loop import Kill, Report
from bench.soak.common import (
    Daemon,
    SimProcess,
    Summary,
    Trend,
    check_no_records_missing,
    cleanup,
    daemon_processes,
    deadletter_count,
    drained,
    encoder_child,
    env_int,
    say,
    soak_doc,
    stored_ids,
    wait_until,
)
from ingestd.control.status import collect
from ingestd.tools.standin import StandIn
from tests.support.mongo_proxy import MongoProxy

DB = "soak_kills"
# How long a killed target may take to work again (measured and printed; the machine is shared,
# and a start under contention was seen to take > 10 s).
RESTART_TIMEOUT = 180.0
# The daemon first: the last daemon run (after the last daemon kill) then has a kill of each
# worker, and its counts must still reconcile at the end.
TARGETS = ("daemon", "stream", "store", "encoder")


class Killer:
    def __init__(self, daemon: Daemon, proxy: MongoProxy, rng: random.Random) -> None:
        self.daemon, self.proxy, self.rng = daemon, proxy, rng
        self.kills: list[Kill] = []
        self.restarted: dict[str, int] = dict.fromkeys(TARGETS, 0)
        self.killed: dict[str, int] = dict.fromkeys(TARGETS, 0)
        self.supervisor_restarts: dict[str, int] = {}  # summed over supervisor lifetimes

    def iteration(self, index: int) -> None:
        target = TARGETS[index % len(TARGETS)]
        if target == "encoder":
            self._ensure_encoder()
        delay = self.rng.uniform(0.05, 0.8)
        time.sleep(delay)  # the random moment: whatever the processes are doing then
        store = self.daemon.counters("store")
        kill = Kill(index, target, delay, time.time(),
                    duplicates_before=int(store.get("duplicates", 0))
                    if target in ("store", "daemon") else 0)
        started = time.monotonic()
        getattr(self, f"_kill_{target}")()
        kill.restart_s = time.monotonic() - started
        self.kills.append(kill)
        self.killed[target] += 1
        self.restarted[target] += 1

    def _kill_stream(self) -> None:
        self._kill_worker("stream")

    def _kill_store(self) -> None:
        self._kill_worker("store")

    def _kill_worker(self, role: str) -> None:
        before = self._restarts(role)
        old = int(self.daemon.status(role)["pid"])
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: self._restarts(role) == before + 1, RESTART_TIMEOUT,
                   f"the supervisor to count the {role} restart")
        self._wait_working((role,), {role: old})

    def _restarts(self, role: str) -> int:
        self.daemon.assert_running()
        return int(self.daemon.status("supervisor").get("restarts", {}).get(role, 0))

    def _kill_encoder(self) -> None:
        child = encoder_child(self.daemon)
        assert child is not None, "the encoder child went away before its kill"
        store_pid = int(self.daemon.status("store")["pid"])
        before = int(self.daemon.counters("store").get("encoder_restarts", 0))
        child.kill()

        def replaced() -> bool:
            self.daemon.assert_running()
            assert self.daemon.status("store").get("pid") == store_pid, "store worker restarted"
            counted = int(self.daemon.counters("store").get("encoder_restarts", 0)) == before + 1
            new = encoder_child(self.daemon)
            if counted and new is not None and new.pid != child.pid:
                return True
            self._backlog()
            return False
        wait_until(replaced, RESTART_TIMEOUT, "a counted, replaced encoder child", 0.5)

    def _ensure_encoder(self) -> None:
        """The child starts on the first large read: hold a reply until there is a backlog."""
        def present() -> bool:
            self.daemon.assert_running()
            if encoder_child(self.daemon) is not None:
                return True
            self._backlog()
            return False
        wait_until(present, RESTART_TIMEOUT, "the encoder child", 0.5)

    def _backlog(self) -> None:
        if self.proxy.pending() == 0:
            self.proxy.delay_writes(1.5, 1)

    def _kill_daemon(self) -> None:
        procs = daemon_processes(self.daemon)
        old = {r: p.pid for r, p in procs.items()}
        for role, n in self.daemon.status("supervisor").get("restarts", {}).items():
            self.supervisor_restarts[role] = self.supervisor_restarts.get(role, 0) + int(n)
        assert self.daemon.proc is not None
        self.daemon.proc.kill()  # first, so it cannot restart the workers killed next
        for role, proc in procs.items():
            if role != "supervisor":
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        self.daemon.proc.wait()
        psutil.wait_procs([p for r, p in procs.items() if r != "supervisor"], timeout=10)
        self.daemon.start()
        self.daemon.wait_ready(RESTART_TIMEOUT)
        self._wait_working(("stream", "store"), old)

    def _wait_working(self, roles: tuple[str, ...], old: dict[str, int]) -> None:
        def working() -> bool:
            self.daemon.assert_running()
            for role in roles:
                status = self.daemon.status(role)
                if status.get("pid") in (None, old.get(role)):
                    return False
                state = str(status.get("state", ""))
                if not state.startswith("connected" if role == "stream" else "running"):
                    return False
            return True
        wait_until(working, RESTART_TIMEOUT, f"{roles} replaced and working", 0.05)

    def all_restarts(self) -> dict[str, int]:
        out = dict(self.supervisor_restarts)
        for role, n in self.daemon.status("supervisor").get("restarts", {}).items():
            out[role] = out.get(role, 0) + int(n)
        return out


def run(work: Path) -> Summary:
    n = env_int("SOAK_KILLS", 200)
    seed = env_int("SOAK_SEED", int(time.time()) % 100000)
    rate = env_int("SOAK_KILLS_RATE", 200)
    say(f"[kills] {n} kills, seed {seed}, {rate} tweets/s")
    summary = Summary("kills", extra={"kills": n, "seed": seed, "rate": rate})
    rng = random.Random(seed)
    standin = StandIn(work / "mongo").start()
    proxy = MongoProxy(("127.0.0.1", standin.port)).start()
    sim = SimProcess(work / "sim", "--rate", str(rate), "--control-every", "0", "--keepalive",
                     "1", "--seed", str(rng.randrange(1 << 30))).start()
    # Kills are the test: the supervisor must keep restarting, not declare a crash loop.
    doc = soak_doc(sim, proxy.uri, DB, control={"crash_loop_restarts": 100000,
                                               "heartbeat_timeout": 30})
    # A child on every large read: ``auto`` starts one only for a worker that cannot keep up
    # while encoding, and the backlog a held reply makes is waiting for MongoDB, not encoding.
    doc["writer"]["encoder_process"] = True
    daemon = Daemon(work / "daemon", doc)
    killer, trend = Killer(daemon, proxy, rng), Trend()
    try:
        with cleanup(daemon, sim):
            daemon.start().wait_ready(120)
            wait_until(lambda: daemon.counters("store").get("stored", 0) > 0, 60, "first tweet")
            started = time.monotonic()
            for index in range(n):
                killer.iteration(index)
                if index % 10 == 9:
                    trend.add(daemon, time.monotonic() - started)
                    say(f"[kills] {index + 1}/{n} killed={killer.killed} "
                        f"restarted={killer.restarted} delivered="
                        f"{len(sim.ground_truth().tweet_ids())} "
                        f"stored={daemon.counters('store').get('stored', 0)} (this store worker)")
            sim.stop()
            stopped = time.time()
            wait_until(lambda: drained(daemon, stopped), 300, "the spool to drain", 0.2)
            # The counters of the last daemon run (its worker kills carried, its replay
            # counted) must reconcile exactly once everything is read.
            counts = collect(daemon.state_dir)["reconciliation"]
            summary.check(counts["difference"] == 0 and counts["in_flight"] == 0,
                          f"the last daemon run's counts do not reconcile: {counts}")
            summary.extra["last daemon run's reconciliation"] = counts
            duplicates = int(daemon.counters("store").get("duplicates", 0)) + sum(
                k.duplicates_before for k in killer.kills)
            restarts = killer.all_restarts()
            code, _ = daemon.stop()
            summary.check(code == 0, f"daemon exited {code}")
            check_no_records_missing(summary, daemon)
        report = Report(killer.kills, delivered_by_conn(sim), stored_ids(proxy.uri, DB),
                        duplicates, deadletter_count(daemon))
    finally:
        proxy.stop()
        standin.stop()
    report.print()
    fill(summary, report, killer, restarts, trend)
    return summary


def delivered_by_conn(sim: SimProcess) -> dict[int, list[tuple[int, float]]]:
    out: dict[int, list[tuple[int, float]]] = {}
    for e in sim.ground_truth().of("tweet"):
        out.setdefault(int(e["conn"]), []).append((int(e["id"]), float(e["t"])))
    return out


def fill(summary: Summary, report: Report, killer: Killer, restarts: dict[str, int],
         trend: Trend) -> None:
    in_flight = sum(len(v) for v in report.lost.values())
    summary.delivered, summary.stored = report.delivered_count, len(set(report.stored))
    summary.duplicates, summary.deadlettered = report.duplicates, report.deadletters
    # A tweet missing for any other reason than the in-flight tail is a problem of the report.
    summary.lost = in_flight if report.problems else 0
    n = len(killer.kills)
    summary.restarts = f"{sum(killer.restarted.values())}/{n}"
    summary.rss, summary.fds = trend.summary("rss"), trend.summary("fds")
    summary.extra["killed / restarted by target"] = f"{killer.killed} / {killer.restarted}"
    summary.extra["supervisor restart counters (summed over daemon lifetimes)"] = restarts
    summary.extra["not spooled: in a killed reader's socket (tail <= 2 s before the kill)"] = (
        f"{in_flight} tweets over {len(report.lost)} connections")
    times = sorted(k.restart_s for k in killer.kills)
    if times:
        summary.extra["kill -> working again (median / max)"] = (
            f"{times[len(times) // 2]:.2f}s / {times[-1]:.2f}s")
    summary.problems.extend(report.problems)
    worker_kills = killer.killed["stream"] + killer.killed["store"]
    summary.check(restarts.get("stream", 0) + restarts.get("store", 0) == worker_kills,
                  f"supervisor counted {restarts} restarts for {worker_kills} worker kills")


