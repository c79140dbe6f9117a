"""The encoder child's wire alone: CPU per tweet on each side of a chunk, against encoding here.

Sends the same 500 real tweets (a typical chunk) to a real encoder child (``EncoderProcess``)
60 times and reads the answers, one chunk at a time, then encodes the same tweets in this process.
Prints, per tweet: ``encode`` in-process, the child's CPU (from /proc: parsing, matching, encoding
and its end of the wire), the parent's CPU for ``submit`` + ``result`` (the store worker's side),
and the wall time of a round trip. Run it with the workers' malloc settings
(``control.pool.WORKER_MALLOC_ENV``), as the daemon does::

    MALLOC_MMAP_THRESHOLD_=8388608 MALLOC_TRIM_THRESHOLD_=16777216 \\
        .venv/bin/python bench/encoder_wire.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: variant trees

from bench.run import FOLLOW, LOCATIONS, TRACK
from ingestd.documents.encoder import encode
from ingestd.documents.matching import Matcher
from ingestd.sink.encoder_pool import EncoderProcess, Job

CHUNK = 500
TIMES = 60


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    spec = (TRACK, FOLLOW, [tuple(box) for box in LOCATIONS])
    data = resources.files("ingestd").joinpath("data", "real_tweets.jsonl").read_bytes()
    payloads = [line for line in data.splitlines()
                if line.strip() and b"$numberLong" not in line][:CHUNK]
    jobs = [Job(p, 1_700_000_000_123_456_789 + i, 5, 1, 100 + i) for i, p in enumerate(payloads)]
    matcher = Matcher(*spec)
    n = TIMES * len(jobs)
    for _ in range(args.rounds):
        started = time.thread_time()
        for _ in range(TIMES):
            for job in jobs:
                encode(job, matcher)
        here = (time.thread_time() - started) / n * 1e6
        child = EncoderProcess()
        try:
            child.submit(jobs, {1: spec})  # its start and its first chunk are not counted
            child.result()
            cpu0, wall, mine = cpu_seconds(child.pid), time.perf_counter(), time.thread_time()
            for _ in range(TIMES):
                child.submit(jobs, {1: spec})
                child.result()
            wall = (time.perf_counter() - wall) / n * 1e6
            mine = (time.thread_time() - mine) / n * 1e6
            theirs = (cpu_seconds(child.pid) - cpu0) / n * 1e6
        finally:
            child.close()
        print(f"per tweet: encode here {here:5.1f} µs; child {theirs:5.1f} µs CPU; "
              f"parent's side {mine:4.1f} µs CPU; round trip {wall:5.1f} µs wall", flush=True)


if __name__ == "__main__":
    main()
