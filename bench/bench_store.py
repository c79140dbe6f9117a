"""The store worker alone: a pre-filled spool drained by the real ``StoreWorker`` to the blackhole.

Isolates the bottleneck of the pipeline from everything else that shares the machine's cores in
``bench/run.py`` (the stream worker, the payload server): the spool is written first (not timed),
then ``StoreWorker.run`` (matching, documents, ``insert_many``, spool acks) drains it in this
process, with the product's default settings and the benchmark's filters, against
``bench/blackhole.py`` (a subprocess). Prints tweets/s and CPU µs per tweet of this process.

    .venv/bin/python bench/bench_store.py [--tweets 50000] [--repeats 3]
    .venv/bin/py-spy record -o store.svg -- .venv/bin/python bench/bench_store.py   # a profile
    .venv/bin/python bench/bench_store.py --only child --perf /tmp/store.data   # perf, drain only
    .venv/bin/python bench/bench_store.py --paced 5000   # in-process: pre-filled against paced

``--paced RATE`` compares, in-process, a pre-filled spool with one that a writer process fills at
RATE tweets/s while the worker drains it (``--append`` tweets per append, as the stream worker of
a paced stream writes): the store worker alone at a steady rate, without the stream worker, the
network or gzip. ``--keep-awake`` (with ``--paced``) keeps the vCPUs from halting meanwhile
(``bench/awake.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import pickle
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: variant trees

import ingestd.memory
from bench.awake import kept_awake
from bench.payload import build
from bench.run import CACHE, FOLLOW, LOCATIONS, TRACK, Blackhole
from ingestd.config.settings import load_settings_text
from ingestd.sink.deadletter import DeadLetterStore
from ingestd.sink.mongo import open_collection
from ingestd.sink.worker import StoreWorker
from ingestd.spool.format import KIND_MESSAGE
from ingestd.spool.reader import SpoolReader
from ingestd.spool.writer import SpoolWriter

APPEND_BATCH = 4  # messages per spool append (what one 16 KB libcurl callback carries)


def fill_spool(directory: Path, messages: list[bytes]) -> None:
    writer = SpoolWriter(directory, max_bytes=1 << 40, max_records=1 << 40)
    recv_ns = time.time_ns()
    for i in range(0, len(messages), APPEND_BATCH):
        writer.append([(KIND_MESSAGE, m) for m in messages[i : i + APPEND_BATCH]], 1, 0, recv_ns)
    writer.close()


def feed_spool(directory: Path, messages: list[bytes], rate: float, per: int
               ) -> subprocess.Popen[bytes]:
    """A writer process (this script with ``--feed``) appending ``messages`` to the spool in
    ``directory``, ``per`` at a time, at ``rate`` tweets/s on an absolute schedule."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--feed", str(directory), "--rate",
                             str(rate), "--append", str(per)], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    pickle.dump(messages, proc.stdin)
    proc.stdin.close()
    return proc


def feed_main(directory: Path, rate: float, per: int) -> int:
    """``--feed``: the writer process of ``feed_spool`` (fsyncs on the writer's own interval)."""
    messages: list[bytes] = pickle.load(sys.stdin.buffer)
    writer = SpoolWriter(directory, max_bytes=1 << 40, max_records=1 << 40)
    started, appended = time.monotonic(), 0
    while appended < len(messages):
        chunk = messages[appended : appended + per]
        writer.append([(KIND_MESSAGE, m) for m in chunk], 1, 0, time.time_ns())
        writer.maybe_sync()
        appended += len(chunk)
        time.sleep(max(0.0, started + appended / rate - time.monotonic()))
    writer.close()
    return 0


def settings_text(mongo_uri: str, state_dir: Path) -> str:
    return yaml.safe_dump({
        "state_dir": str(state_dir),
        "stream": {"url": "http://127.0.0.1:9/1.1/statuses/filter.json", "track": TRACK,
                   "follow": FOLLOW, "locations": [list(b) for b in LOCATIONS]},
        "auth": {"consumer_key": "k", "consumer_secret": "s", "access_token": "t",
                 "access_token_secret": "ts"},
        "mongo": {"uri": mongo_uri, "database": "bench", "collection": "tweets"},
        "metrics": {"listen": None},
    })


class GcTimer:
    """Collections and seconds spent in the cyclic garbage collector (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.counts[info["generation"]] += 1


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def perf_record(output: Path | None) -> Iterator[None]:
    """``perf record`` of this process (all threads, call graphs) while the block runs; the
    encoder child is a process of its own: ``perf record -a`` around the whole run shows it."""
    if output is None:
        yield
        return
    perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(output),
                             "-p", str(os.getpid())], stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # perf attaches asynchronously: nothing says when it has
    try:
        yield
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait()


def drain(state_dir: Path, mongo_uri: str, tweets: int, gc_timer: GcTimer, encoder: bool,
          perf: Path | None = None, given_up: Callable[[], bool] = lambda: False
          ) -> tuple[float, float, float, float, int]:
    """Wall and CPU seconds for the store worker to store ``tweets`` from the spool, the CPU
    seconds of its encoder child, the seconds its loop waited for ``insert_many``
    (``insert_seconds_total``) and the records the child encoded. ``given_up``: the tweets will
    not all come (a fed spool's writer failed): stop, and fail on the count."""
    settings = load_settings_text(settings_text(mongo_uri, state_dir), state_dir / "s.yaml")
    reader = SpoolReader(state_dir / "spool")
    worker = StoreWorker(settings, reader, open_collection,
                         DeadLetterStore(state_dir / "deadletter", 1 << 20),
                         encoder_process=encoder)
    waiting = reader.wait_for_data  # once every tweet is stored the run is over: no idle wait
    reader.wait_for_data = lambda timeout: (  # type: ignore[method-assign]
        worker.totals.stored >= tweets or given_up() or waiting(timeout))
    threshold = gc.get_threshold()
    getattr(ingestd.memory, "quiet_gc", gc.freeze)()  # as store_role does (older trees: freeze)
    gc.callbacks.append(gc_timer)
    child = children_cpu()
    with perf_record(perf):
        wall, cpu = time.perf_counter(), time.process_time()
        worker.run(lambda: worker.totals.stored >= tweets or given_up(), lambda: None,
                   lambda: None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gc.callbacks.remove(gc_timer)
    worker.close()  # waits for the encoder child: its CPU is in RUSAGE_CHILDREN from here
    child = children_cpu() - child
    gc.unfreeze()
    gc.set_threshold(*threshold)
    totals = worker.totals
    if totals.stored != tweets:
        raise RuntimeError(f"stored {totals.stored} of {tweets}")
    return wall, cpu, child, totals.insert_seconds_total, totals.offloaded


def run_once(state: Path, messages: list[bytes], uri: str, encoder: bool,
             perf: Path | None = None, paced: tuple[float, int] | None = None) -> float:
    """One drain; with ``paced`` (rate, tweets per append) the spool is fed while it drains."""
    feed = None
    if paced is None:
        fill_spool(state / "spool", messages)
    else:
        feed = feed_spool(state / "spool", messages, *paced)
    timer = GcTimer()
    failed = (lambda: False) if feed is None else (lambda: feed.poll() not in (None, 0))
    try:
        wall, cpu, child, insert, offloaded = drain(state, uri, len(messages), timer, encoder,
                                                    perf, failed)
    finally:
        if feed is not None:
            feed.wait()
    n = len(messages)
    label = "with encoder child" if encoder else "in-process        "
    if paced is not None:
        label += f" fed at {paced[0]:,.0f}/s"
    print(f"store worker {label}: {n / wall:9,.0f} tweets/s  {cpu / n * 1e6:6.1f} µs CPU/tweet"
          f" (+ child {child / n * 1e6:5.1f} µs, {offloaded / n:4.0%} of the tweets)"
          f", of which gc {timer.seconds / n * 1e6:5.1f} µs ({timer.counts} "
          f"collections by generation); waiting for inserts {insert / wall:4.0%} "
          f"of the time  (load {os.getloadavg()[0]:.2f})", flush=True)
    return n / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tweets", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("in-process", "child"),
                        help="run one arrangement only (default: both, interleaved)")
    parser.add_argument("--perf", type=Path, help="perf record the drain into this file")
    parser.add_argument("--paced", type=float, metavar="RATE",
                        help="in-process only: a pre-filled spool against one fed at RATE/s")
    parser.add_argument("--append", type=int, default=350,
                        help="tweets per append when fed (--paced)")
    parser.add_argument("--keep-awake", action="store_true",
                        help="with --paced: a SCHED_IDLE busy loop on each CPU (bench/awake.py)")
    parser.add_argument("--payload-tweets", type=int, default=200_000)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--feed", type=Path, help=argparse.SUPPRESS)  # the writer process
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.feed is not None:
        return feed_main(args.feed, args.rate, args.append)
    if args.paced is not None:
        return compare_paced(args)
    arrangements = [False, True] if args.only is None else [args.only == "child"]
    payload = build(args.cache, args.payload_tweets)
    messages = list(payload.messages(args.tweets))
    with tempfile.TemporaryDirectory(prefix="ingestd-bench-store-") as tmp:
        blackhole = Blackhole(Path(tmp) / "blackhole")
        try:
            rates: dict[bool, list[float]] = {False: [], True: []}
            for rep in range(args.repeats):
                for encoder in arrangements:  # interleaved: same machine state for both
                    rates[encoder].append(run_once(Path(tmp) / f"state{rep}{encoder}", messages,
                                                   blackhole.uri, encoder, args.perf))
            if rates[False] and rates[True]:
                base, shared = statistics.median(rates[False]), statistics.median(rates[True])
                print(f"median: in-process {base:,.0f} tweets/s, with the encoder child "
                      f"{shared:,.0f} tweets/s ({shared / base:.2f}×)")
        finally:
            blackhole.stop()
    return 0


def compare_paced(args: argparse.Namespace) -> int:
    """``--paced``: in-process, a pre-filled spool and a fed one, interleaved."""
    payload = build(args.cache, args.payload_tweets)
    messages = list(payload.messages(args.tweets))
    with tempfile.TemporaryDirectory(prefix="ingestd-bench-store-") as tmp, \
            kept_awake(args.keep_awake):
        blackhole = Blackhole(Path(tmp) / "blackhole")
        try:
            for rep in range(args.repeats):
                run_once(Path(tmp) / f"filled{rep}", messages, blackhole.uri, False)
                run_once(Path(tmp) / f"fed{rep}", messages, blackhole.uri, False,
                         paced=(args.paced, args.append))
        finally:
            blackhole.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
