"""How fast this machine is right now, and what a new page costs it. Asserts nothing.

Figures in a `make bench` run move with the machine's state of the hour (a shared VM here: the
same code ran 50 µs per tweet at one hour and 70 at another). Ratios within one run hold up
better; absolute figures (issue 15's goal 2: µs of CPU per tweet) do not. So `bench/run.py` takes
two probes at its start and its end (``probe``):

* ``encode_us``: CPU µs per tweet of ``orjson.loads`` + ``bson.encode`` over the real sample
  tweets, best of a few passes on one core: the CPU's speed;
* what writing a 3.8 KB tweet into the page cache costs (the spool's append): into a new file's
  pages, and over pages already cached (``--pages`` adds a new file right after a delete).

On a VM that hands free memory back to its host (free page reporting, a balloon), the first touch
of such a page most likely is a fault the host serves, and costs several times the write itself.
A spool backlog (the stream worker reading faster than the store worker stores, as in every
throughput run) lives in new pages; a spool that keeps up reuses the pages of the segments it
deletes (docs/design.md, "Where the CPU goes").

    .venv/bin/python bench/probe.py [--pages] [--dir /var/tmp] [--mb 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import bson
import orjson

ROOT = Path(__file__).resolve().parents[1]
TWEETS = ROOT / "ingestd" / "data" / "real_tweets.jsonl"
TWEET_BYTES = 3800  # the benchmark payload's average tweet
PAGE_BYTES = 256 << 20  # about the spool backlog of a 60k-tweet throughput run
_CHUNK = 64 * 1024


def encode_us(passes: int = 10, rounds: int = 3) -> float:
    """Best-of-``rounds`` CPU µs per tweet of orjson.loads + bson.encode (one core)."""
    lines = [line for line in TWEETS.read_bytes().splitlines() if line.strip()]
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(passes):
            for line in lines:
                bson.encode(orjson.loads(line))
        best = min(best, time.thread_time() - started)
    return 1e6 * best / (passes * len(lines))


def page_costs(folder: Path, after_delete: bool = True,
               size: int = PAGE_BYTES) -> dict[str, float]:
    """CPU µs per tweet's bytes, ``size`` bytes each: a new file, the same file over its cached
    pages, and (with ``after_delete``) a new file written right after the first was deleted."""
    chunk = os.urandom(_CHUNK)
    # Named per process: two benches probing the same folder at once (the smoke suite runs
    # bench/run.py in parallel workers) would write, and delete, each other's file.
    first, second = (folder / f"page-probe-{os.getpid()}-{n}" for n in (1, 2))
    try:
        costs = {"new file": _write(first, chunk, os.O_TRUNC, size),
                 "over cached pages": _write(first, chunk, 0, size)}
        first.unlink()
        if after_delete:
            costs["new file after a delete"] = _write(second, chunk, os.O_TRUNC, size)
    finally:
        first.unlink(missing_ok=True)
        second.unlink(missing_ok=True)
    return {what: cpu * TWEET_BYTES / size * 1e6 for what, cpu in costs.items()}


def _write(path: Path, chunk: bytes, flags: int, size: int) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    try:
        started = time.thread_time()
        for _ in range(size // len(chunk)):
            os.write(fd, chunk)
        return time.thread_time() - started
    finally:
        os.close(fd)


def probe(folder: Path | None = None) -> dict[str, float]:
    """Both probes, for `bench/run.py`'s header and footer."""
    pages = page_costs(folder or Path(tempfile.gettempdir()), after_delete=False)
    return {"encode_us": encode_us(), "new_page_us": pages["new file"],
            "cached_page_us": pages["over cached pages"]}


def describe(p: dict[str, float]) -> str:
    return (f"orjson.loads + bson.encode {p['encode_us']:.1f} µs per tweet; writing a tweet "
            f"into a new file's pages {p['new_page_us']:.2f} µs, over cached pages "
            f"{p['cached_page_us']:.2f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", action="store_true", help="also the page-cache costs")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="a folder on the spool's filesystem")
    parser.add_argument("--mb", type=int, default=PAGE_BYTES >> 20, help="MiB written per case")
    args = parser.parse_args()
    print(f"orjson.loads + bson.encode: {encode_us():.1f} µs CPU per tweet (one core)")
    if args.pages:
        for what, us in page_costs(args.dir, size=args.mb << 20).items():
            print(f"page cache, {what:24s}: {us:5.2f} µs CPU per {TWEET_BYTES} B tweet")


if __name__ == "__main__":
    main()
