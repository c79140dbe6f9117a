"""Micro-benchmark: framing and spool throughput on real tweets. Prints figures, asserts nothing.

.venv/bin/python bench/bench_spool_framing.py [--mb 64]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ingestd.framing import LengthFramer, LineFramer
from ingestd.spool import KIND_MESSAGE, SpoolReader, SpoolWriter

TWEETS = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"
CHUNK = 16 * 1024


def load_messages(total_bytes: int) -> list[bytes]:
    lines = [line for line in TWEETS.read_bytes().split(b"\n") if line]
    out: list[bytes] = []
    size = 0
    while size < total_bytes:
        for line in lines:
            out.append(line)
            size += len(line)
    return out


def report(name: str, seconds: float, nbytes: int, messages: int) -> None:
    mb = nbytes / 1e6
    print(
        f"{name:<44} {mb / seconds:9.1f} MB/s {messages / seconds:12,.0f} msg/s  ({seconds:.2f} s)"
    )


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_framer(name: str, framer: LineFramer | LengthFramer, wire: bytes, n: int) -> None:
    chunks = [wire[i : i + CHUNK] for i in range(0, len(wire), CHUNK)]

    def run() -> int:
        return sum(len(framer.feed(chunk)) for chunk in chunks)

    seconds, got = timed(run)
    assert got == n, (got, n)
    report(name, seconds, len(wire), n)


def bench_one_byte(size: int) -> None:
    framer = LineFramer(size)
    wire = b"x" * size + b"\r\n"
    pieces = [wire[i : i + 1] for i in range(len(wire))]
    seconds, got = timed(lambda: sum(len(framer.feed(p)) for p in pieces))
    report(f"LineFramer, {size // 1000} KB message in 1-byte chunks", seconds, len(wire), got)


def bench_spool(messages: list[bytes], directory: Path) -> None:
    nbytes = sum(map(len, messages))
    writer = SpoolWriter(directory, max_bytes=1 << 40, max_records=1 << 40, fsync_interval=0.2)
    batches = [[(KIND_MESSAGE, m) for m in messages[i : i + 4]] for i in range(0, len(messages), 4)]

    def write() -> int:
        for batch in batches:
            writer.append(batch, 1, 1, time.time_ns())
        writer.close()
        return len(messages)

    seconds, _ = timed(write)
    report("SpoolWriter.append (4/batch, fsync 0.2 s)", seconds, nbytes, len(messages))
    reader = SpoolReader(directory)

    def read() -> int:
        count = 0
        while batch := reader.read(1000, 16 << 20):
            count += len(batch)
            reader.ack(batch[-1])
        return count

    seconds, got = timed(read)
    assert got == len(messages), (got, len(messages))
    report("SpoolReader.read + ack per 1000", seconds, nbytes, got)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=64, help="megabytes of messages per run")
    args = parser.parse_args()
    messages = load_messages(args.mb * 1_000_000)
    sizes = sum(map(len, messages)) / len(messages)
    print(f"{len(messages):,} real tweets, mean {sizes:,.0f} bytes, {CHUNK // 1024} KiB chunks")
    line_wire = b"".join(m + b"\r\n" for m in messages)
    bench_framer("LineFramer", LineFramer(500_000), line_wire, len(messages))
    length_wire = b"".join(b"%d\r\n%s\r\n" % (len(m) + 2, m) for m in messages)
    bench_framer("LengthFramer", LengthFramer(500_000), length_wire, len(messages))
    bench_one_byte(1_000_000)
    directory = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    try:
        bench_spool(messages, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
