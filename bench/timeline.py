"""Where the two cores go during one throughput burst: cores used by each daemon process, over time.

``make bench``'s throughput figure is a rate; this shows how the daemon gets there. It runs the
real ``ingestd run`` daemon (``bench/run.py``'s ``Daemon``, payload server and blackhole) on one
burst of ``--tweets`` tweets, as the throughput runs do, and every ``--interval`` s prints the
tweets the blackhole acknowledged and the cores each process used (CPU time from
``/proc/<pid>/task/*/schedstat``, nanoseconds, all threads). The summary gives the mean cores by
process while the stream worker was still reading and after it had spooled everything: a burst's
end is the store worker and its encoder child alone. Each line also gives the cores of what else
runs on the machine, the acknowledging stand-in (``sink``) and this process (``bench``: the payload
server, the sampling), and the machine's total: 2 cores minus that is what is idle
(bench/LOG.md, 2026-12-05). Prints figures; asserts only that every tweet was acknowledged.

    .venv/bin/python bench/timeline.py                      # 60,000 tweets, plain, 0.1 s steps
    .venv/bin/python bench/timeline.py --gzip --tree /path/to/variant
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: variant trees

from bench import run

ROLES = ("stream", "store", "encoder", "supervisor")
# Not the daemon, on the same two cores: the acknowledging MongoDB stand-in (bench/blackhole.py)
# and this process (the payload server's sends, the sampling).
OTHERS = ("sink", "bench")
# A step in which the stream worker used less than this share of a core counts as "after it had
# spooled everything" (it still wakes for keep-alives and housekeeping).
STREAM_DONE = 0.05


def cpu_seconds(pid: int) -> float:
    """CPU time of all of ``pid``'s threads, in ns from schedstat (0 once it is gone)."""
    return sum(int(text.split()[0]) for text in run.task_files(pid, "schedstat")) / 1e9


def sample(bench: run.Bench, pid: int) -> dict[str, Any]:
    """The acknowledged count and each role's CPU seconds now."""
    row: dict[str, Any] = {"t": time.monotonic(), "acked": bench.blackhole.stats()["inserted"],
                           "sink": cpu_seconds(bench.blackhole.proc.pid),
                           "bench": cpu_seconds(os.getpid())}
    for proc in run.tree(pid):
        role = run.role_of(proc)
        row[role] = row.get(role, 0.0) + cpu_seconds(proc.pid)
    return row


def burst(bench: run.Bench, tweets: int, gzip: bool, interval: float,
          prespool: str = "") -> list[dict[str, Any]]:
    """One daemon, one burst: a sample every ``interval`` s from the go to the last ack
    (``prespool``: a prototype contender of bench/run.py, e.g. ``prespool-split@0.6``)."""
    daemon = run.Daemon(bench.next_dir(f"timeline-{'gzip' if gzip else 'plain'}"),
                        bench.ingestd_doc(bench.blackhole.uri, gzip, run.with_encoder(prespool)))
    bench.blackhole.reset(tweets)
    bench.server.arm(tweets)
    daemon.start(bench.env_of(prespool))
    rows: list[dict[str, Any]] = []
    try:
        bench.server.wait_delivery(60)
        daemon.wait_ready(60)
        time.sleep(0.5)  # the store worker finishes starting, as in the throughput runs
        assert daemon.proc is not None
        rows.append(sample(bench, daemon.proc.pid))
        bench.server.go()
        deadline = time.monotonic() + 60 + tweets / 500
        while rows[-1]["acked"] < tweets:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {rows[-1]['acked']} of {tweets} tweets acknowledged")
            daemon.assert_running()
            time.sleep(interval)  # the sampling step: a duration, not a wait for an event
            rows.append(sample(bench, daemon.proc.pid))
    finally:
        daemon.stop(60)
    return rows


def steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step: seconds since the go, its length, tweets acked per second, cores by role."""
    out = []
    for before, after in itertools.pairwise(rows):
        dt = after["t"] - before["t"]
        cores = {r: max(0.0, after.get(r, 0.0) - before.get(r, 0.0)) / dt
                 for r in (*ROLES, *OTHERS)}
        out.append({"t": after["t"] - rows[0]["t"], "dt": dt, "acked": after["acked"],
                    "rate": (after["acked"] - before["acked"]) / dt, "cores": cores})
    return out


def mean_cores(part: list[dict[str, Any]]) -> dict[str, float]:
    seconds = sum(s["dt"] for s in part)
    return {r: sum(s["cores"][r] * s["dt"] for s in part) / seconds
            for r in (*ROLES, *OTHERS)} if seconds else {}


def cores_text(cores: dict[str, float]) -> str:
    """The daemon's processes and their total, then the others and the machine's total."""
    daemon = sum(cores[r] for r in ROLES)
    return "  ".join(f"{r} {cores[r]:4.2f}" for r in ROLES) + f"  total {daemon:4.2f}  |  " + \
        "  ".join(f"{r} {cores[r]:4.2f}" for r in OTHERS) + \
        f"  machine {daemon + sum(cores[r] for r in OTHERS):4.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tweets", type=int, default=60_000)
    parser.add_argument("--gzip", action="store_true", help="a gzip'd stream (default: plain)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds per step")
    parser.add_argument("--payload-tweets", type=int, default=200_000)
    parser.add_argument("--cache", type=Path, default=run.CACHE)
    parser.add_argument("--tree", type=Path, help="run the daemon from this source tree")
    parser.add_argument("--workdir", type=Path, help="keep the daemon's folder (logs) here")
    parser.add_argument("--contender", default="ingestd",
                        help="ingestd, or a prototype of bench/run.py (prespool-split@0.6, ...)")
    args = parser.parse_args(argv)
    payload = run.build(args.cache, args.payload_tweets, progress=False)
    ns = argparse.Namespace(tree=args.tree, split_share=0.6, encode_budget=0.5)
    with run.workspace(args.workdir, False) as workdir:
        bench = run.Bench(ns, payload, workdir)
        try:
            rows = burst(bench, min(args.tweets, payload.tweets), args.gzip, args.interval,
                         "" if args.contender == "ingestd" else args.contender)
        finally:
            bench.close()
    timeline = steps(rows)
    for s in timeline:
        print(f"t={s['t']:5.2f} s  acked {s['acked']:>8,}  {s['rate']:>8,.0f}/s  "
              f"{cores_text(s['cores'])}")
    seconds = sum(s["dt"] for s in timeline)
    print(f"{rows[-1]['acked']:,} tweets in {seconds:.2f} s "
          f"({rows[-1]['acked'] / seconds:,.0f}/s over the steps)")
    reading = [s for s in timeline if s["cores"]["stream"] >= STREAM_DONE]
    after = [s for s in timeline if s["cores"]["stream"] < STREAM_DONE]
    for name, part in (("while the stream worker reads", reading),
                       ("after it has spooled everything", after)):
        if part:
            print(f"mean cores {name} ({sum(s['dt'] for s in part):.2f} s): "
                  f"{cores_text(mean_cores(part))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
