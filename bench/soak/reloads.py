"""Proof 4: ``SOAK_RELOADS`` (100) SIGHUPs with changing writer settings and filters; fds and RSS
of every process flat, nothing lost.

Reuses tests/test_control.py's ``reload_many`` (batch size and flush interval change every reload,
the track list at reloads 25, 50 and 75) and ``settled_figures`` (fds and RSS once both workers run
the newest generation). Figures are printed every 10 reloads; at the end the stream stops, the
spool drains and MongoDB is reconciled with the ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.soak.common import (
    Daemon,
    SimProcess,
    Summary,
    check_no_records_missing,
    cleanup,
    drained,
    env_int,
    reconcile_base,
    say,
    settings_doc,
    wait_until,
)
from ingestd.tools.standin import StandIn
from tests.test_control import FILTER_CHANGES, reload_many, settled_figures

DB = "soak_reloads"
FD_SLACK = 1  # the store worker may hold one more fd (its MongoDB pool) at one moment than another
RSS_SLACK = 4 << 20  # as tests/test_control.py's 40-reload test


def figures_line(figs: dict[str, tuple[int, int]]) -> str:
    return " ".join(f"{r}: fds={f} rss={m / 2**20:.1f}MiB" for r, (f, m) in figs.items())


def run(work: Path) -> Summary:
    n = env_int("SOAK_RELOADS", 100)
    summary = Summary("reloads", extra={"reloads": n})
    standin = StandIn(work / "mongo").start()
    sim = SimProcess(work / "sim", "--rate", "100", "--keepalive", "1", "--seed", "61").start()
    doc = settings_doc(sim.url, standin.uri, DB, control={"heartbeat_timeout": 30})
    daemon = Daemon(work / "daemon", doc)
    try:
        with cleanup(daemon, sim):
            daemon.start().wait_ready(120)
            wait_until(lambda: daemon.counters("store").get("stored", 0) >= 20, 60, "20 stored")
            reload_many(daemon, 1, 10)  # warm-up: first-use imports, caches, allocator arenas
            before = settled_figures(daemon, 11)
            pids = daemon.pids()
            say(f"[reloads] after warm-up: {figures_line(before)}")
            done = 0
            while done < n:
                step = min(10, n - done)
                reload_many(daemon, 11 + done, step)
                done += step
                say(f"[reloads] {done}/{n}: {figures_line(settled_figures(daemon, 11 + done))}")
            after = settled_figures(daemon, 11 + n)
            sup = daemon.status("supervisor")
            sim.stop()
            stopped = time.time()
            wait_until(lambda: drained(daemon, stopped), 300, "the spool to drain", 0.2)
            store, stream = daemon.counters("store"), daemon.counters("stream")
            same_pids = daemon.pids() == pids
            code, _ = daemon.stop()
            summary.check(code == 0, f"daemon exited {code}")
            check_no_records_missing(summary, daemon)
        reconcile(summary, daemon, sim, standin.uri, store, stream)
    finally:
        standin.stop()
    changes = sum(1 for k in FILTER_CHANGES if 11 <= k < 11 + n)
    connections = len(sim.ground_truth().connections())
    summary.extra["filter changes / stream connections"] = f"{changes} / {connections}"
    summary.extra["reload failures"] = sup.get("reload_failures")
    summary.extra["same worker pids throughout"] = same_pids
    summary.extra["figures after warm-up"] = figures_line(before)
    summary.extra[f"figures after {n} more"] = figures_line(after)
    summary.check(sup.get("reload_failures") == 0, "a reload failed")
    summary.check(connections == 1 + changes, "a writer-only reload reconnected")
    compare(summary, before, after)
    return summary


def compare(summary: Summary, before: dict[str, tuple[int, int]],
            after: dict[str, tuple[int, int]]) -> None:
    summary.fds = " ".join(f"{r} {before[r][0]}→{after[r][0]}" for r in before)
    summary.rss = " ".join(f"{r} {before[r][1] / 2**20:.1f}→{after[r][1] / 2**20:.1f} MiB"
                           for r in before)
    summary.restarts = "0 (reloads restart nothing)"
    for role, (fds, rss) in before.items():
        fds_after, rss_after = after[role]
        summary.check(fds_after <= fds + FD_SLACK, f"{role}: fds {fds} → {fds_after}")
        summary.check(rss_after - rss < RSS_SLACK, f"{role}: RSS {rss} → {rss_after}")


def reconcile(summary: Summary, daemon: Daemon, sim: SimProcess, uri: str,
              store: dict[str, Any], stream: dict[str, Any]) -> None:
    delivered, ids, missing = reconcile_base(summary, daemon, sim, uri, DB, store, stream)
    skipped = dict(store.get("skipped", {}))
    accounted = sum(int(v) for k, v in skipped.items() if k != "deleted")
    summary.lost = max(0, len(missing) - accounted - summary.deadlettered - summary.dropped)
    summary.extra["skipped by the store worker (by reason)"] = skipped
    summary.check(len(ids) == len(set(ids)), "a tweet stored twice")
    summary.check(set(ids) <= delivered, "stored ids never delivered")
    summary.check(summary.lost == 0, f"{summary.lost} tweets lost: {sorted(missing)[:5]}")
