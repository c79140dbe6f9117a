"""Paired throughput runs of ingestd from two source trees: the measure of a change.

One ``make bench`` figure moves by ±10 % from run to run on this VM (bench/LOG.md, "Why the
figures move"), more than most changes are worth. This runs ``bench/run.py``'s ingestd burst
(``--contenders ingestd --repeats 1``) from tree A and tree B in turns, the order swapped every
round, and prints each round's tweets/s, CPU µs per tweet and B's ratio to A, then the medians
and the paired ratio's median and mean. Prints figures; judges none.

    .venv/bin/python bench/pairs.py --b /path/to/variant                  # 10 rounds, plain
    .venv/bin/python bench/pairs.py --a /path/to/main --b /path/to/variant --gzip --rounds 12
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/run.py's throughput row: | ingestd | plain | 30,484 | 1.54× | 3.73× | 54.5 | ...
ROW = re.compile(r"^\| ingestd \| (?:plain|gzip) \| ([\d,]+) \|[^|]*\|[^|]*\| ([\d.]+) \|", re.M)


def burst(tree: Path, args: argparse.Namespace) -> tuple[float, float]:
    """One ingestd burst from ``tree``: (tweets/s, CPU µs per tweet)."""
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--tree", str(tree),
           "--contenders", "ingestd", "--repeats", "1",
           "--encodings", "gzip" if args.gzip else "plain", "--tweets", str(args.tweets),
           "--payload-tweets", str(args.payload_tweets),
           *(["--cache", str(args.cache)] if args.cache else []),
           "--skip", "latency,overload,standin,quiet,profile", "--results", ""]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    found = ROW.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        sys.exit(f"bench/run.py failed for {tree} (exit {proc.returncode}):\n"
                 f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return float(found.group(1).replace(",", "")), float(found.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, default=ROOT, help="baseline tree (default: this one)")
    parser.add_argument("--b", type=Path, required=True, help="the tree with the change")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--gzip", action="store_true", help="a gzip'd stream (default: plain)")
    parser.add_argument("--tweets", type=int, default=60_000)
    parser.add_argument("--payload-tweets", type=int, default=200_000)
    parser.add_argument("--cache", type=Path, help="payload cache (default: bench/run.py's)")
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"A": [], "B": []}
    ratios: list[float] = []
    print(f"A = {args.a}\nB = {args.b}\n{args.rounds} rounds, {args.tweets:,} tweets, "
          f"{'gzip' if args.gzip else 'plain'}; the order swaps every round")
    for n in range(args.rounds):
        order = ("A", "B") if n % 2 == 0 else ("B", "A")
        got = {side: burst(args.a if side == "A" else args.b, args) for side in order}
        for side in ("A", "B"):
            rates[side].append(got[side][0])
        ratios.append(got["B"][0] / got["A"][0])
        print(f"round {n + 1:2d} ({order[0]} first): A {got['A'][0]:8,.0f}/s {got['A'][1]:5.1f} µs"
              f"  B {got['B'][0]:8,.0f}/s {got['B'][1]:5.1f} µs  B/A {ratios[-1]:.3f}", flush=True)
    med_a, med_b = statistics.median(rates["A"]), statistics.median(rates["B"])
    print(f"medians: A {med_a:,.0f}/s, B {med_b:,.0f}/s; paired ratio B/A median "
          f"{statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f} over "
          f"{len(ratios)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
