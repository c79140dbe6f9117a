"""CPU per tweet of inflating the stream, by library, in one process.

The endpoint gzips its stream with a sync flush after every message (docs/protocol.md §2.3), so
every tweet is its own deflate block with its own Huffman header: decoders that build large tables
per header pay that per tweet. This inflates the bench payload's gzip body (the same flush per
message, ``bench/payload.py``) cut into reads of several sizes, with each library's
``decompressobj`` and with ingestd's own ``source.inflate.Inflater``, rounds interleaved, and
prints the best of ``--rounds`` per cell in µs per tweet with the ratio to stdlib zlib. isal is
measured when it is installed (it is not a dependency).

    .venv/bin/python bench/inflate.py
    .venv/bin/python bench/inflate.py --tweets 40000 --reads 430,21504,524288
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))

from zlib_ng import zlib_ng

from bench import payload as payload_mod
from bench import run
from ingestd.source.inflate import PIECE_BYTES, Inflater

GZIP_WBITS = 31


def libraries() -> dict[str, Any]:
    libs: dict[str, Any] = {"zlib": zlib, "zlib-ng": zlib_ng}
    try:
        from isal import isal_zlib
    except ImportError:
        print("isal not installed: not measured", flush=True)
    else:
        libs["isal"] = isal_zlib
    return libs


def raw_loop(module: Any) -> Callable[[list[bytes]], int]:
    """The library's decompressobj over the reads, output capped as ingestd caps it."""
    def inflate(reads: list[bytes]) -> int:
        z, total = module.decompressobj(GZIP_WBITS), 0
        for data in reads:
            total += len(z.decompress(data, PIECE_BYTES))
            while z.unconsumed_tail:
                total += len(z.decompress(z.unconsumed_tail, PIECE_BYTES))
        return total
    return inflate


def inflater_loop(reads: list[bytes]) -> int:
    """ingestd's Inflater (the library it imports), as the stream worker calls it."""
    inflater, total = Inflater(GZIP_WBITS), 0
    for data in reads:
        for piece in inflater.inflate(data):
            total += len(piece)
    return total


def cpu_per_tweet(fn: Callable[[list[bytes]], int], reads: list[bytes], tweets: int,
                  expect: int) -> float:
    started = time.process_time()
    total = fn(reads)
    spent = time.process_time() - started
    if total != expect:
        raise RuntimeError(f"inflated {total:,} bytes, expected {expect:,}")
    return spent / tweets * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tweets", type=int, default=40_000)
    parser.add_argument("--reads", default="430,4096,21504,65536,524288",
                        help="comma list of read sizes in bytes (430: about one tweet per read; "
                             "21504: a 5k tweets/s stream read every 10 ms)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--payload-tweets", type=int, default=200_000,
                        help="the generated payload (make bench's, kept in --cache)")
    parser.add_argument("--cache", type=Path, default=run.CACHE)
    args = parser.parse_args()
    if args.tweets > args.payload_tweets:
        parser.error(f"--tweets {args.tweets} is more than --payload-tweets {args.payload_tweets}")
    pay = payload_mod.build(args.cache, args.payload_tweets)
    offsets = pay.offsets(True)
    body = pay.body(True).read_bytes()[:offsets[args.tweets]]
    expect = pay.decoded_bytes(args.tweets)
    routes: dict[str, Callable[[list[bytes]], int]] = {
        name: raw_loop(module) for name, module in libraries().items()}
    routes["ingestd Inflater"] = inflater_loop
    sizes = [int(s) for s in args.reads.split(",")]
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for size in sizes:
            reads = [body[i:i + size] for i in range(0, len(body), size)]
            for name, fn in routes.items():
                cell = cpu_per_tweet(fn, reads, args.tweets, expect)
                best[name, size] = min(best.get((name, size), cell), cell)
    print(f"{args.tweets:,} tweets, {len(body) / args.tweets:.0f} compressed bytes per tweet, "
          f"a sync flush per message; best of {args.rounds} rounds, CPU µs per tweet "
          "(÷ stdlib zlib at the same read size)")
    print("| route | " + " | ".join(f"reads of {s:,} B" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name in routes:
        cells = [f"{best[name, s]:.2f} ({best[name, s] / best['zlib', s]:.2f}×)" for s in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
