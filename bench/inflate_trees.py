"""The stream worker's inflate step of several source trees, in one process, rounds interleaved.

The real sample tweets (``ingestd/data/real_tweets.jsonl``, ``--passes`` times over) gzip'd as the
endpoint sends them (a sync flush after every message), inflated by each tree's
``source/inflate.py`` ``Inflater`` (loaded from its file, under its own name) fed one message per
call (a paced stream) or in reads of ``--reads`` bytes (64 KiB; 21,504: a 5k tweets/s stream read
every 10 ms); a fresh ``Inflater`` per timing. Prints the best and the median of ``--rounds`` per
cell (each the best of 3), CPU µs per message (``timeit`` with ``time.process_time``: this VM's
other load shows less in it than in wall-clock time); checks every tree's output size.

    .venv/bin/python bench/inflate_trees.py /work/main /work/wt-other [--rounds 15]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import timeit
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

TWEETS = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"


def load_inflate(tree: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, tree / "ingestd/source/inflate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync_flushed(messages: list[bytes]) -> list[bytes]:
    """Each message as the endpoint writes it: gzip'd, then a sync flush."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    return [z.compress(m) + z.flush(zlib.Z_SYNC_FLUSH) for m in messages]


def feeder(module: ModuleType, reads: list[bytes]) -> Callable[[], int]:
    def feed() -> int:
        inflater, total = module.Inflater(31), 0
        for data in reads:
            for piece in inflater.inflate(data):
                total += len(piece)
        return total
    return feed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", type=Path, nargs="+", help="source trees (say, before and after)")
    parser.add_argument("--passes", type=int, default=10, help="times over the sample tweets")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reads", default="65536,21504", help="comma list of read sizes in bytes")
    args = parser.parse_args()
    lines = [line.rstrip(b"\n") + b"\r\n" for line in TWEETS.read_bytes().splitlines(True)
             if line.strip()]
    messages = lines * args.passes
    per_message = sync_flushed(messages)
    wire = b"".join(per_message)
    splits = {"a message per call": per_message}
    for size in map(int, args.reads.split(",")):
        splits[f"reads of {size:,} B"] = [wire[i:i + size] for i in range(0, len(wire), size)]
    expect = sum(map(len, messages))
    modules = [load_inflate(tree, f"inflate_{n}") for n, tree in enumerate(args.trees)]
    cells: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for split, reads in splits.items():
            for n, module in enumerate(modules):
                feed = feeder(module, reads)
                if feed() != expect:
                    raise RuntimeError(f"{args.trees[n]} inflated the wrong number of bytes")
                spent = min(timeit.Timer(feed, timer=time.process_time).repeat(repeat=3, number=1))
                cells.setdefault((split, n), []).append(spent / len(messages) * 1e6)
    print(f"{len(messages):,} messages ({len(lines)} real tweets × {args.passes}), "
          f"{len(wire) / len(messages):.0f} compressed bytes per message; {args.rounds} rounds, "
          "µs per message, best / median")
    print("| tree | " + " | ".join(splits) + " |")
    print("|---|" + "---:|" * len(splits))
    for n, tree in enumerate(args.trees):
        row = [f"{min(cells[s, n]):.3f} / {statistics.median(cells[s, n]):.3f}" for s in splits]
        print(f"| {tree} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
