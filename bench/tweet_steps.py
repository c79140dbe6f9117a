"""What one tweet costs on the store side, step by step, on one core with nothing else running.

Over the real sample tweets (``ingestd/data/real_tweets.jsonl``, Mongo exports left out) and the
benchmark's filters (``bench/run.py``: 12 track phrases, 4 follow ids, 2 boxes), best of
``--rounds``, CPU µs per tweet of:

* ``orjson.loads``;
* ``Matcher.match`` of an already parsed tweet;
* ``tweet_document`` (``_id``, ``created_at``, ``_ingest``) of an already parsed tweet;
* ``orjson.loads`` + ``bson.encode`` (the JSON → BSON floor of this route);
* ``encoder.encode``: all of it, as the store worker and its encoder child run it.

In the daemon the same steps cost more: three busy processes share two cores and their caches.
Prints figures; asserts nothing.

With ``--trees A B …`` it measures each source tree in its own interpreter (``PYTHONPATH``), in
turns (``--turns``, the order rotated every turn, so that the machine's noise falls on every tree
alike), and prints each step's median over the turns per tree and B's ratio to A.

    .venv/bin/python bench/tweet_steps.py [--rounds 3] [--passes 20]
    .venv/bin/python bench/tweet_steps.py --trees /work/main /work/wt-x [--turns 7]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bson
import orjson

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: variant trees

from bench.encode_routes import sample
from bench.run import FOLLOW, LOCATIONS, TRACK
from ingestd.documents.encoder import encode, received_at
from ingestd.documents.matching import Matched, Matcher
from ingestd.documents.messages import tweet_document
from ingestd.sink.encoder_pool import Job


def steps(lines: list[bytes], passes: int) -> dict[str, Callable[[], object]]:
    matcher = Matcher(TRACK, FOLLOW, [tuple(box) for box in LOCATIONS])
    parsed = [orjson.loads(line) for line in lines]
    jobs = [Job(line, time.time_ns(), 1, 0, i) for i, line in enumerate(lines)]
    when = received_at(jobs[0].recv_ns)

    def loads() -> None:
        for _ in range(passes):
            for line in lines:
                orjson.loads(line)

    def match() -> None:
        for _ in range(passes):
            for tweet in parsed:
                matcher.match(tweet)

    def document() -> None:  # on fresh copies: tweet_document changes the dict it is given
        for _ in range(passes):
            for line in lines:
                tweet_document(orjson.loads(line), received_at=when, conn_id=1, generation=0,
                               seq=1, matched=Matched())

    def loads_encode() -> None:
        for _ in range(passes):
            for line in lines:
                bson.encode(orjson.loads(line))

    def whole() -> None:
        for _ in range(passes):
            for job in jobs:
                encode(job, matcher)

    return {"orjson.loads": loads, "Matcher.match (parsed)": match,
            "orjson.loads + tweet_document": document, "orjson.loads + bson.encode": loads_encode,
            "encoder.encode (all of it)": whole}


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Each step's best of ``args.rounds`` rounds, CPU µs per tweet."""
    lines = sample()
    gc.freeze()
    table = steps(lines, args.passes)
    best = dict.fromkeys(table, float("inf"))
    for _ in range(args.rounds):  # interleaved: the machine's noise hits every step alike
        for name, run in table.items():
            started = time.process_time()
            run()
            best[name] = min(best[name], time.process_time() - started)
    count = len(lines) * args.passes
    return {name: seconds / count * 1e6 for name, seconds in best.items()}


def compare(args: argparse.Namespace) -> None:
    """Every tree measured ``args.turns`` times, each turn in a fresh interpreter."""
    figures: dict[str, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for turn in range(args.turns):
        shift = turn % len(args.trees)
        for tree in args.trees[shift:] + args.trees[:shift]:
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds),
                                  "--passes", str(args.passes), "--json"], env=env,
                                 capture_output=True, text=True, check=True).stdout
            figures[tree].append(json.loads(out))
    first = args.trees[0]
    names = list(figures[first][0])
    print(f"CPU µs/tweet, median of {args.turns} turns (each the best of {args.rounds} rounds of"
          f" {args.passes} passes); ratio to {first}")
    for name in names:
        medians = {t: statistics.median(f[name] for f in figures[t]) for t in args.trees}
        cells = "  ".join(f"{t}: {v:6.2f} ({v / medians[first]:.3f})" for t, v in medians.items())
        print(f"  {name:32s} {cells}")
    for tree in args.trees:
        whole = [f"{f[names[-1]]:.2f}" for f in figures[tree]]
        print(f"  {names[-1]} by turn, {tree}: {' '.join(whole)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=20, help="passes over the sample per round")
    parser.add_argument("--trees", nargs="+", help="source trees to compare, in turns")
    parser.add_argument("--turns", type=int, default=7, help="with --trees: turns per tree")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trees:
        compare(args)
        return
    figures = measure(args)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{len(sample())} tweets x {args.passes} passes, best of {args.rounds} rounds,"
          " CPU µs/tweet")
    for name, value in figures.items():
        print(f"  {name:32s} {value:6.2f}")


if __name__ == "__main__":
    main()
