"""JSON → BSON routes for one tweet, per tweet, in one process: is there a cheaper one than ours?

The store side's essential cost is turning a tweet's JSON into a BSON document. ingestd does it
as ``orjson.loads`` + ``bson.encode`` (pymongo's C encoder), and its matcher reads the parsed
dict. This prints the CPU µs per tweet of that route and of the alternatives on PyPI, over the
real sample tweets (``ingestd/data/real_tweets.jsonl``, Mongo exports left out), routes
interleaved within each round so the machine's noise hits them alike:

* ``python-bsonjs``: libbson's JSON parser straight to BSON, no Python objects; matching would
  then need a second, partial decode (a ``msgspec`` struct of the fields it reads);
* ``msgspec``: its untyped JSON decode in place of orjson's, and a typed partial decode alone.

Libraries that are not installed are skipped with a note (``pip install python-bsonjs msgspec``
into the venv: neither is a dependency of ingestd). Prints figures; asserts nothing.

    .venv/bin/python bench/encode_routes.py [--rounds 3] [--passes 20]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson
import orjson

SAMPLE = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"


def sample() -> list[bytes]:
    lines = [line.strip() for line in SAMPLE.read_bytes().splitlines() if line.strip()]
    return [line for line in lines if b'"$' not in line]  # Mongo exports: extended JSON


def routes() -> dict[str, Callable[[bytes], Any]]:
    found: dict[str, Callable[[bytes], Any]] = {
        "orjson + bson.encode (ingestd)": lambda line: bson.encode(orjson.loads(line)),
        "orjson.loads alone": orjson.loads,
    }
    try:
        bsonjs = importlib.import_module("bsonjs")
        found["python-bsonjs loads"] = bsonjs.loads
    except ImportError:
        print("python-bsonjs not installed: its routes skipped")
    try:
        msgspec = importlib.import_module("msgspec")
    except ImportError:
        print("msgspec not installed: its routes skipped")
        return found
    partial = msgspec.json.Decoder(_partial_type(msgspec))
    found["msgspec untyped + bson.encode"] = lambda line: bson.encode(msgspec.json.decode(line))
    found["msgspec partial (id, created_at, text, user.id)"] = partial.decode
    if "python-bsonjs loads" in found:
        loads = found["python-bsonjs loads"]
        found["python-bsonjs + msgspec partial"] = lambda line: (loads(line), partial.decode(line))
    return found


def _partial_type(msgspec: Any) -> Any:
    """The fields matching and ``_ingest`` start from (the real matcher reads a few more)."""
    user = msgspec.defstruct("User", [("id", int, 0)])
    ext = msgspec.defstruct("Ext", [("full_text", str, "")])
    return msgspec.defstruct("Tweet", [("id", int, 0), ("created_at", str, ""), ("text", str, ""),
                                       ("user", user | None, None),
                                       ("extended_tweet", ext | None, None)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=20, help="passes over the sample per round")
    args = parser.parse_args()
    lines = sample()
    print(f"{len(lines)} tweets, {sum(map(len, lines)) / len(lines):,.0f} B each on average")
    table: dict[str, list[float]] = {}
    found = routes()
    for _ in range(args.rounds):
        for name, fn in found.items():
            started = time.process_time()
            for _ in range(args.passes):
                for line in lines:
                    fn(line)
            spent = time.process_time() - started
            table.setdefault(name, []).append(spent / (args.passes * len(lines)) * 1e6)
    base = statistics.median(table["orjson + bson.encode (ingestd)"])
    print(f"\n| route | CPU µs/tweet (median of {args.rounds}) | rounds | ÷ ingestd's |")
    print("|---|---:|---|---:|")
    for name, figures in table.items():
        median = statistics.median(figures)
        print(f"| {name} | {median:.1f} | {', '.join(f'{f:.1f}' for f in figures)} "
              f"| {median / base:.2f}× |")


if __name__ == "__main__":
    main()
