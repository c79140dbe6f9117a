"""Micro-benchmark: framing, spool and the stream worker's hot path on real tweets. Asserts nothing.

.venv/bin/python bench/bench_spool_framing.py [--mb 64] [--reference TREE] [--rounds 3]

``--reference TREE`` also runs every case on the ``ingestd`` package of another source tree (e.g.
``git archive HEAD ingestd | tar -x -C /tmp/ref``), loaded in this same process as ``ingestd_ref``,
interleaved with this tree's runs; each figure is the best of ``--rounds`` and the last column is
this tree's time divided by the reference's (< 1: faster).

The stream worker cases feed ``BodyIntake.on_data`` (what libcurl's write callback runs) slices of
the decoded body, through ``SpoolIntake`` into a ``SpoolWriter`` on disk (``--dir``, fsync every
0.2 s), and report CPU (user + system) per tweet: libcurl's own work (recv, chunked, inflate) is
not in it; a reference tree without that intake shows nan there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

TWEETS = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"
sys.path.insert(0, str(TWEETS.parents[2]))
CHUNK = 16 * 1024  # libcurl's CURL_MAX_WRITE_SIZE: a write callback's slice (gzip: always)
# Role -> where it lives: this layout first, then older ones (a ``--reference`` tree may be one).
MODULES = {
    "framing": ("source.framing", "framing"),
    "writer": ("spool.writer", "spool.log", "spool"),
    "reader": ("spool.reader", "spool.log", "spool"),
    "connection": ("source.connection", "reader"),
    "schema": ("config.schema", "settings"),
}
# The stream worker's intake, only in this layout (the stream cases skip a tree without it).
OPTIONAL = {"body": "source.body", "intake": "spool.intake", "stats": "source.stats"}


def load_messages(total_bytes: int) -> list[bytes]:
    lines = [line for line in TWEETS.read_bytes().split(b"\n") if line]
    out: list[bytes] = []
    size = 0
    while size < total_bytes:
        for line in lines:
            out.append(line)
            size += len(line)
    return out


def load_package(name: str, tree: Path | None, scratch: Path) -> dict[str, ModuleType]:
    """This tree's modules, or ``tree``'s ``ingestd`` copied and renamed to ``name``."""
    if tree is not None:
        target = scratch / name
        shutil.copytree(tree / "ingestd", target)
        for path in target.rglob("*.py"):
            text = path.read_text()
            text = re.sub(r"\bfrom ingestd([. ])", rf"from {name}\1", text)
            path.write_text(re.sub(r"\bimport ingestd\.", f"import {name}.", text))
        sys.path.insert(0, str(scratch))
    modules = {role: _import_first(name, where) for role, where in MODULES.items()}
    for role, where in OPTIONAL.items():
        with contextlib.suppress(ImportError):
            modules[role] = importlib.import_module(f"{name}.{where}")
    return modules


def _import_first(package: str, candidates: tuple[str, ...]) -> ModuleType:
    """The first of ``candidates`` that ``package`` has: older trees are laid out differently."""
    for candidate in candidates[:-1]:
        try:
            return importlib.import_module(f"{package}.{candidate}")
        except ModuleNotFoundError:
            continue
    return importlib.import_module(f"{package}.{candidates[-1]}")


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def case_framer(pkg: dict[str, ModuleType], wire: bytes, n: int, _: Path) -> float:
    framer = pkg["framing"].LineFramer(500_000)
    chunks = chunked(wire, CHUNK)
    start = time.process_time()
    got = sum(len(framer.feed(chunk)) for chunk in chunks)
    assert got == n, (got, n)
    return time.process_time() - start


def case_append(pkg: dict[str, ModuleType], messages: list[bytes], directory: Path) -> float:
    writer = pkg["writer"].SpoolWriter(directory, max_bytes=1 << 40, max_records=1 << 40,
                                       fsync_interval=0.2)
    batches = [[(0, m) for m in messages[i : i + 4]] for i in range(0, len(messages), 4)]
    start = time.process_time()
    for batch in batches:
        writer.is_full()  # once per libcurl callback in the stream worker
        writer.append(batch, 1, 1, 1)
    writer.close()
    return time.process_time() - start


def case_is_full(pkg: dict[str, ModuleType], _: list[bytes], directory: Path) -> float:
    """``is_full`` with a 30-segment backlog (the reader is behind), 200k calls."""
    writer = pkg["writer"].SpoolWriter(directory, segment_bytes=4096, max_bytes=1 << 40,
                                       max_records=1 << 40, fsync_interval=60)
    for _ in range(30):
        writer.append([(0, b"x" * 4096)], 1, 1, 1)
    is_full = writer.is_full
    start = time.process_time()
    for _ in range(200_000):
        is_full()
    elapsed = time.process_time() - start
    writer.close()
    return elapsed


def case_read(pkg: dict[str, ModuleType], messages: list[bytes], directory: Path) -> float:
    """Read back 1000 records at a time (CRC checks, ``Record``s), no ack."""
    return read_back(pkg, messages, directory, ack=False, clock=time.process_time)


def case_read_ack(pkg: dict[str, ModuleType], messages: list[bytes], directory: Path) -> float:
    """Read back and ack every 1000 records; wall time (checkpoint fsyncs block the loop)."""
    return read_back(pkg, messages, directory, ack=True, clock=time.perf_counter)


def read_back(pkg: dict[str, ModuleType], messages: list[bytes], directory: Path, *, ack: bool,
              clock: Callable[[], float]) -> float:
    writer = pkg["writer"].SpoolWriter(directory, max_bytes=1 << 40, max_records=1 << 40)
    for i in range(0, len(messages), 64):
        writer.append([(0, m) for m in messages[i : i + 64]], 1, 1, 1)
    writer.close()
    reader = pkg["reader"].SpoolReader(directory)
    start = clock()
    count = 0
    while batch := reader.read(1000, 16 << 20):
        count += len(batch)
        if ack:
            reader.ack(batch[-1])
    reader.close()
    assert count == len(messages)
    return clock() - start


def stream_case(
    chunk: int, per_pass: int
) -> Callable[[dict[str, ModuleType], bytes, int, Path], float]:
    """``per_pass`` libcurl callbacks (``BodyIntake.on_data``) per pass, then what they held is
    framed and the intake flushed: one spool write per pass, as ``StreamReader`` does it."""

    def case(pkg: dict[str, ModuleType], wire: bytes, n: int, directory: Path) -> float:
        import pycurl

        if "body" not in pkg:
            return float("nan")  # a reference tree from before source/body.py
        stream = pkg["schema"].StreamSettings(url="http://127.0.0.1:1/1.1/statuses/filter.json",
                                              track=("x",), gzip=False)
        writer = pkg["writer"].SpoolWriter(directory, max_bytes=1 << 40, max_records=1 << 40,
                                           fsync_interval=0.2)
        intake = pkg["intake"].SpoolIntake(writer, drop=False)
        stats = pkg["stats"].ReaderStats()
        body = pkg["body"].BodyIntake(intake, stats, is_full=intake.is_full,
                                      drop_when_full=False, clock=time.monotonic)
        framer = pkg["framing"].LineFramer(500_000)
        conn = pkg["connection"].Connection(1, 1, stream, pycurl.Curl(), framer, 0.0, 0.0,
                                            status=200, marked=True)
        # A pass ends by framing what the callbacks held (``settle``, since 2026-12-05).
        settle = getattr(body, "settle", lambda: None)
        passes = [chunked(part, chunk) for part in chunked(wire, chunk * per_pass)]
        start = time.process_time()
        for pieces in passes:
            for piece in pieces:
                body.on_data(conn, piece)
            settle()
            intake.flush()
        writer.close()
        elapsed = time.process_time() - start
        assert stats.received == n, (stats.received, n)
        return elapsed

    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=64, help="megabytes of messages per run")
    parser.add_argument("--reference", type=Path, help="a source tree to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="a disk-backed folder for the spool")
    args = parser.parse_args()
    messages = load_messages(args.mb * 1_000_000)
    n = len(messages)
    wire = b"".join(m + b"\r\n" for m in messages)
    print(f"{n:,} real tweets, mean {len(wire) / n:,.0f} bytes; best of {args.rounds} rounds")
    scratch = Path(tempfile.mkdtemp(prefix="bench-ref-"))
    try:
        pkgs = {"this": load_package("ingestd", None, scratch)}
        if args.reference:
            pkgs["ref"] = load_package("ingestd_ref", args.reference, scratch)
        cases: list[tuple[str, Callable[..., float], tuple[Any, ...], int]] = [
            ("LineFramer.feed, 16 KiB slices (CPU)", case_framer, (wire, n), n),
            ("SpoolWriter is_full+append, 4/append (CPU)", case_append, (messages,), n),
            ("is_full, 30-segment backlog (CPU, per call)", case_is_full, (None,), 200_000),
            ("SpoolReader.read, 1000 at a time (CPU)", case_read, (messages,), n),
            ("SpoolReader read + ack per 1000 (wall)", case_read_ack, (messages,), n),
            ("stream worker, 16 KiB slices, 1/pass (CPU)", stream_case(16 << 10, 1), (wire, n), n),
            ("stream worker, 16 KiB slices, 4/pass (CPU)", stream_case(16 << 10, 4), (wire, n), n),
            ("stream worker, 64 KiB slices, 1/pass (CPU)", stream_case(64 << 10, 1), (wire, n), n),
        ]
        for title, fn, extra, per in cases:
            best = dict.fromkeys(pkgs, float("inf"))
            for _ in range(args.rounds):
                for name, pkg in pkgs.items():
                    directory = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
                    try:
                        best[name] = min(best[name], fn(pkg, *extra, directory))
                    finally:
                        shutil.rmtree(directory, ignore_errors=True)
            line = f"{title:<46}" + "".join(
                f" {name} {best[name] / per * 1e6:7.2f} µs" for name in pkgs)
            if "ref" in best:
                line += f"   ratio {best['this'] / best['ref']:.2f}"
            print(line, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
