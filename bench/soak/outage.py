"""Proof 1: MongoDB down for ``SOAK_OUTAGE_SECONDS`` (600) at ``SOAK_OUTAGE_RATE`` (300) tweets/s.

The stand-in is stopped after a warm-up; the spool absorbs the stream; the stand-in comes back and
the backlog drains. The simulator stops sending after warm-up + outage + 10 s (``--max-tweets``),
so the drain is not racing new tweets. Spool size and stored count are printed every 30 s.

No compliance notices by default (``SOAK_OUTAGE_CONTROL_EVERY``, 0): each scrub_geo or withheld
notice is an ``update_many`` by ``user.id``, which the stand-in answers by scanning the whole
collection, so with one every 10 tweets the drain of 180k tweets ran at ~20 tweets/s and measured
the stand-in, not ingestd (a real MongoDB uses the ``user.id`` index ingestd creates).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.soak.common import (
    Daemon,
    SimProcess,
    Summary,
    Trend,
    check_no_records_missing,
    cleanup,
    env_float,
    env_int,
    reconcile_base,
    say,
    soak_doc,
    wait_until,
)
from ingestd.tools.standin import StandIn

DB = "soak_outage"
WARMUP, TAIL = 10.0, 10.0


class Watch:
    """Prints the figures every ``every`` seconds and keeps the peaks and the trend."""

    def __init__(self, daemon: Daemon, sim: SimProcess, every: float) -> None:
        self.daemon, self.sim, self.every = daemon, sim, every
        self.started = time.monotonic()
        self.next = 0.0
        self.peak_records = self.peak_bytes = 0
        self.trend = Trend()

    def tick(self, phase: str) -> None:
        at = time.monotonic() - self.started
        if at < self.next:
            return
        self.next += self.every
        self.daemon.assert_running()
        spool = self.daemon.status("stream").get("spool", {})
        records, size = int(spool.get("records", 0)), int(spool.get("bytes", 0))
        self.peak_records, self.peak_bytes = max(self.peak_records, records), max(
            self.peak_bytes, size)
        got = self.trend.add(self.daemon, at)
        store = self.daemon.status("store")
        say(f"[outage] {phase:8s} t={at:6.0f}s delivered={len(self.sim.ground_truth().tweet_ids())}"
            f" spool={records} rec/{size / 1e6:.1f} MB "
            f"stored={store.get('counters', {}).get('stored', 0)} "
            f"rss={sum(s.rss for s in got.values()) / 2**20:.0f} MiB "
            f"fds={sum(s.fds for s in got.values())} state={str(store.get('state', ''))[:30]!r}")


def all_stored(daemon: Daemon, sim: SimProcess, total: int) -> bool:
    """Every tweet sent, every message read from the wire, spooled and resolved."""
    if daemon.status("stream").get("spool", {}).get("records") != 0:
        return False  # cheap first: the ground truth of a long run is ~100 MB of JSON
    truth = sim.ground_truth()
    if len(truth.tweet_ids()) < total:
        return False
    sent = len(truth.of("tweet")) + len(truth.of("control")) + len(truth.of("bad_line"))
    stream, store = daemon.counters("stream"), daemon.counters("store")
    dropped = sum(dict(stream.get("dropped", {})).values())
    caught_up = int(stream.get("received", -1)) + dropped == sent
    done = store.get("records_read") == stream.get("received") and store.get("pending") == 0
    return bool(caught_up and done and daemon.status("stream").get("spool", {}).get("records") == 0)


def run(work: Path) -> Summary:
    outage = env_float("SOAK_OUTAGE_SECONDS", 600)
    rate = env_int("SOAK_OUTAGE_RATE", 300)
    total = int(rate * (WARMUP + outage + TAIL))
    controls = env_int("SOAK_OUTAGE_CONTROL_EVERY", 0)
    summary = Summary("outage", extra={"outage_s": outage, "rate": rate, "tweets": total,
                                       "control_every": controls})
    standin = StandIn(work / "mongo").start()
    sim = SimProcess(work / "sim", "--rate", str(rate), "--max-tweets", str(total),
                     "--control-every", str(controls), "--keepalive", "1", "--seed", "5").start()
    daemon = Daemon(work / "daemon", soak_doc(sim, standin.uri, DB))
    watch = Watch(daemon, sim, env_float("SOAK_OUTAGE_PRINT_EVERY", 30))
    try:
        with cleanup(daemon, sim):
            daemon.start().wait_ready(120)
            wait_until(lambda: daemon.counters("store").get("stored", 0) >= rate * WARMUP / 2,
                       120, "the first tweets stored")
            standin.stop()
            down = time.monotonic()
            say(f"[outage] MongoDB stopped for {outage:.0f}s")
            while time.monotonic() - down < outage:
                watch.tick("down")
                time.sleep(1.0)  # the outage is the scenario: it lasts this long
            standin.start()
            say(f"[outage] MongoDB back after {time.monotonic() - down:.0f}s; draining")
            up = time.monotonic()

            def done() -> bool:
                watch.tick("draining")
                return all_stored(daemon, sim, total)
            wait_until(done, env_float("SOAK_OUTAGE_DRAIN_TIMEOUT", 3600), "the drain", 1.0)
            summary.extra["drain_s"] = round(time.monotonic() - up)
            store, stream = daemon.counters("store"), daemon.counters("stream")
            code, _ = daemon.stop()
            summary.check(code == 0, f"daemon exited {code}")
            check_no_records_missing(summary, daemon)
        reconcile(summary, daemon, sim, standin.uri, store, stream)
    finally:
        standin.stop()
    summary.peak_spool = f"{watch.peak_records} rec / {watch.peak_bytes / 1e6:.0f} MB"
    summary.rss, summary.fds = watch.trend.summary("rss"), watch.trend.summary("fds")
    summary.restarts = "0 (none expected)"
    return summary


def reconcile(summary: Summary, daemon: Daemon, sim: SimProcess, uri: str,
              store: dict[str, Any], stream: dict[str, Any]) -> None:
    delivered, ids, missing = reconcile_base(summary, daemon, sim, uri, DB, store, stream)
    summary.lost = max(0, len(missing) - summary.deadlettered - summary.dropped)
    summary.extra["store counters"] = {k: store.get(k) for k in (
        "records_read", "stored", "duplicates", "deadlettered", "skipped", "control")}
    summary.check(len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} stored twice")
    summary.check(set(ids) <= delivered, "stored ids never delivered")
    summary.check(summary.lost == 0, f"{summary.lost} tweets lost: {sorted(missing)[:5]}")
    summary.check(summary.dropped == 0, "block policy: nothing may be dropped")
