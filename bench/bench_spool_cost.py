"""What the durable spool costs on the store path: tweets/s with and without it. Asserts nothing.

.venv/bin/python bench/bench_spool_cost.py [--tweets 30000] [--dir /var/tmp] [--reference TREE]

Same process, same real tweets, same ``StoreWorker`` (parse, documents, batching, acks) writing
into an in-memory collection, so that only the queue differs (MongoDB and the stand-in would
dominate the figures):
  baseline  records handed over from a Python list (no spool at all)
  tmpfs     SpoolWriter.append → SpoolReader.read/ack on /dev/shm (CRC32C, checkpoints; fsync free)
  disk      the same on ``--dir`` (a real filesystem: fsync every 0.2 s, fsynced checkpoints)
``--reference TREE`` also runs the spool cases with ``TREE``'s spool package (same StoreWorker),
interleaved, best of ``--rounds``; ratios are against the baseline.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingestd.config.errors import Secret
from ingestd.config.schema import (
    AuthSettings,
    ControlSettings,
    DeadletterSettings,
    LoggingSettings,
    MetricsSettings,
    MongoSettings,
    Settings,
    SpoolSettings,
    StreamSettings,
    WriterSettings,
)
from ingestd.sink.deadletter import DeadLetterStore
from ingestd.sink.worker import StoreWorker
from ingestd.spool.format import KIND_MESSAGE, Record, RecordRef

TWEETS = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"
PER_APPEND = 8  # messages per network read, roughly, at a few hundred tweets/s
SpoolModules = tuple[ModuleType, ModuleType]  # the modules with SpoolWriter, SpoolReader


class _Result:
    def __init__(self, n: int = 0) -> None:
        self.deleted_count = n


class _Cursor(list[dict[str, Any]]):
    def sort(self, *_: object) -> _Cursor:
        return self

    def limit(self, _: int) -> _Cursor:
        return self


class MemoryCollection:
    """The part of pymongo's Collection the StoreWorker uses, in memory."""

    def __init__(self, name: str = "tweets") -> None:
        self.name = name
        self.ids: set[int] = set()
        self.database = self
        self.client = self

    def __getitem__(self, name: str) -> MemoryCollection:
        return MemoryCollection(name)

    def insert_many(self, docs: list[dict[str, Any]], ordered: bool = True) -> None:
        self.ids.update(d["_id"] for d in docs)

    def delete_many(self, query: dict[str, Any]) -> _Result:
        ids = set(query["_id"]["$in"]) & self.ids
        self.ids -= ids
        return _Result(len(ids))

    def update_many(self, *_: object, **__: object) -> None:
        return None

    update_one = update_many
    replace_one = update_many  # the coverage ledger's hour and gap documents

    def find_one(self, *_: object) -> None:
        return None

    def find(self, *_: object) -> _Cursor:
        return _Cursor()

    def create_indexes(self, _: object) -> None:
        return None

    def list_indexes(self) -> list[dict[str, Any]]:  # the tombstones' TTL index: none yet
        return []

    def create_index(self, *_: object, **__: object) -> str:
        return "index"

    def close(self) -> None:
        return None


def settings() -> Settings:
    return Settings(
        path=Path("/nonexistent/settings.yaml"), state_dir=Path("/nonexistent"),
        stream=StreamSettings(url="http://127.0.0.1:1/1.1/statuses/filter.json",
                              track=("iphone",)),
        auth=AuthSettings(Secret("a"), Secret("b"), Secret("c"), Secret("d")),
        mongo=MongoSettings(uri=Secret("mongodb://127.0.0.1:1")),
        writer=WriterSettings(batch_size=1000, flush_interval=0.5),
        spool=SpoolSettings(), deadletter=DeadletterSettings(), control=ControlSettings(),
        metrics=MetricsSettings(), logging=LoggingSettings())


class ListSource:
    """Baseline: the records are already in memory; ack is free."""

    acked = None  # no checkpoint: nothing stored before
    checkpoint_resets = 0

    def __init__(self, payloads: list[bytes]) -> None:
        self.records = [Record(i + 1, KIND_MESSAGE, 1, 0, time.time_ns(), p, "mem", i)
                        for i, p in enumerate(payloads)]
        self.pos = 0

    def read(self, max_records: int, max_bytes: int) -> list[Record]:
        out = self.records[self.pos:self.pos + max_records]
        self.pos += len(out)
        return out

    def wait_for_data(self, timeout: float) -> bool:
        return self.pos < len(self.records)

    def unread_bytes(self) -> int:
        return sum(len(r.payload) for r in self.records[self.pos:])

    def ack(self, record: Record) -> None:
        return None

    def maybe_flush(self) -> None:
        return None

    def reread(self, ref: RecordRef) -> Record | None:
        return self.records[ref.seq - 1]


def store_all(source: Any, work: Path) -> int:
    coll = MemoryCollection()
    dead = DeadLetterStore(work / "dead", 1 << 30)
    worker = StoreWorker(settings(), source, lambda _: coll, dead)  # type: ignore[arg-type]
    worker.run(lambda: True, lambda: None, lambda: None)  # stop at once = drain everything
    dead.close()
    return len(coll.ids)


def baseline(payloads: list[bytes], work: Path) -> int:
    return store_all(ListSource(payloads), work)


def load_spool(package: str, tree: Path | None, scratch: Path) -> SpoolModules:
    """This tree's spool, or ``tree``'s (loaded as ``package``, whatever its layout)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_spool_framing import load_package

    modules = load_package(package, tree, scratch)
    return modules["writer"], modules["reader"]


def through_spool(spool_modules: SpoolModules, payloads: list[bytes], work: Path) -> int:
    spool = work / "spool"
    writer_module, reader_module = spool_modules
    writer = writer_module.SpoolWriter(spool, max_bytes=1 << 40, max_records=1 << 40,
                                       fsync_interval=0.2)
    for i in range(0, len(payloads), PER_APPEND):
        writer.append([(KIND_MESSAGE, p) for p in payloads[i:i + PER_APPEND]], 1, 0,
                      time.time_ns())
    writer.close()
    reader = reader_module.SpoolReader(spool)
    try:
        return store_all(reader, work)
    finally:
        reader.close()


def timed(fn: Callable[[list[bytes], Path], int], payloads: list[bytes],
          parent: str | None) -> tuple[float, int]:
    work = Path(tempfile.mkdtemp(prefix="spool-cost-", dir=parent))
    try:
        started = time.perf_counter()
        stored = fn(payloads, work)
        return time.perf_counter() - started, stored
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tweets", type=int, default=30000)
    parser.add_argument("--dir", default="/var/tmp", help="a disk-backed folder for the spool")
    parser.add_argument("--reference", type=Path, help="a source tree whose spool to compare")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    tweets = [orjson.loads(x) for x in TWEETS.read_bytes().splitlines() if x.strip()]
    tweets = [t for t in tweets if type(t.get("id")) is int]  # skip Mongo-export rows
    ids = [10**18 + i for i in range(args.tweets)]
    payloads = [orjson.dumps({**tweets[i % len(tweets)], "id": n, "id_str": str(n)})
                for i, n in enumerate(ids)]
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    scratch = Path(tempfile.mkdtemp(prefix="spool-cost-ref-"))
    spools = [("", load_spool("ingestd", None, scratch))]
    if args.reference:
        spools.append((" (reference)", load_spool("ingestd_ref", args.reference, scratch)))
    shutil.rmtree(scratch, ignore_errors=True)  # the copied modules are loaded by now
    runs: list[tuple[str, Callable[[list[bytes], Path], int], str | None]] = [
        ("baseline (list)", baseline, None)]
    for where, parent in (("tmpfs", shm), ("disk", args.dir)):
        runs += [(f"spool on {where}{tag}", functools.partial(through_spool, module), parent)
                 for tag, module in spools]
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.rounds):
        for name, fn, parent in runs:
            seconds, stored = timed(fn, payloads, parent)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, stored)
    base_rate = 0.0
    print(f"{args.tweets} real tweets, avg {sum(map(len, payloads)) // len(payloads)} bytes, "
          f"best of {args.rounds}")
    for name, (seconds, stored) in best.items():
        rate = stored / seconds
        base_rate = base_rate or rate
        print(f"  {name:28s} {rate:9.0f} tweets/s  ({seconds:.2f} s, stored {stored})  "
              f"ratio {rate / base_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
