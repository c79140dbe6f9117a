"""The same encoding in slices: why a paced stream costs more per tweet than a burst here.

A daemon that keeps up with its stream works in slices (a few hundred tweets, then a wait for the
next ones); a throughput run works in one long stretch. This encodes the real sample tweets
(``encoder.encode`` with the benchmark's filters, as the store worker does) in slices of N tweets
with a gap between two slices, and prints the CPU µs per tweet of the encoding alone: the thread's
CPU time around each slice, so the gap itself is never counted. The gap either sleeps (the vCPU
may idle) or spins on the clock (the thread stays busy and the vCPU never idles): if spinning
slows the next slice as much as sleeping does, the cost is not the vCPU waking up but whatever
else runs on the core's caches meanwhile. Cases are interleaved round by round, because the
machine's speed moves from minute to minute; the last column is each case's median.
Prints figures; asserts nothing.

    .venv/bin/python bench/slices.py [--rounds 5] [--tweets 10000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from itertools import cycle
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: variant trees

from bench.encode_routes import sample
from bench.run import FOLLOW, LOCATIONS, TRACK
from ingestd.documents.encoder import encode
from ingestd.documents.matching import Matcher
from ingestd.memory import quiet_gc
from ingestd.sink.encoder_pool import Job

# (tweets per slice, seconds between slices, how the gap passes)
CASES = [(50, 0.0, "none"), (50, 0.01, "sleep"), (50, 0.01, "spin"), (500, 0.1, "sleep"),
         (5000, 1.0, "sleep")]


def spin(seconds: float) -> None:
    """Stay busy (reading the clock) for ``seconds``: the vCPU never idles."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_case(jobs: cycle[Job], matcher: Matcher, size: int, gap: float, how: str,
             tweets: int) -> float:
    """CPU µs per tweet of ``tweets`` encodings done ``size`` at a time, ``gap`` apart."""
    wait = {"sleep": time.sleep, "spin": spin}.get(how)
    done = cpu_ns = 0
    while done < tweets:
        started = time.thread_time_ns()
        for _ in range(size):
            encode(next(jobs), matcher)
        cpu_ns += time.thread_time_ns() - started
        done += size
        if wait is not None and gap:
            wait(gap)
    return cpu_ns / done / 1000


def label(size: int, gap: float, how: str) -> str:
    return f"{size} at once" if how == "none" else f"{size}, {how} {gap * 1000:g} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tweets", type=int, default=10_000, help="per case and round")
    args = parser.parse_args()
    quiet_gc()  # as in the store worker and its encoder child
    gc.freeze()
    matcher = Matcher(TRACK, FOLLOW, LOCATIONS)
    jobs = cycle([Job(line, time.time_ns(), 1, 0, i) for i, line in enumerate(sample())])
    figures: dict[str, list[float]] = {label(*case): [] for case in CASES}
    print(f"CPU µs per tweet of encoder.encode, {args.tweets:,} tweets per case and round")
    print("round  " + "  ".join(f"{name:>18s}" for name in figures))
    for n in range(1, args.rounds + 1):
        row = []
        for size, gap, how in CASES:
            us = run_case(jobs, matcher, min(size, args.tweets), gap, how, args.tweets)
            figures[label(size, gap, how)].append(us)
            row.append(us)
        print(f"{n:5d}  " + "  ".join(f"{us:18.1f}" for us in row), flush=True)
    print("median " + "  ".join(f"{statistics.median(v):18.1f}" for v in figures.values()))


if __name__ == "__main__":
    main()
