"""End-to-end throughput benchmark: ingestd against the pipelines users build, in one invocation.

    make bench            # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --tweets 50000 --repeats 1      # a quick look

Every contender reads the same payload (``bench/payload.py``: N real-sample tweets of ~3.8 KB under
fresh ids) from the same loopback chunked-HTTP server, plain and gzip, and inserts into the same
acknowledging wire-protocol server (``bench/blackhole.py``), so the figures measure ingestd and
pymongo, not a database:

(a) ``ingestd``: the real ``ingestd run`` daemon (supervisor, stream and store worker), spool on,
    product defaults (batch 1000, flush 0.5 s, fsync 0.2 s), with track/follow/locations set so
    ``_ingest.matched`` is computed;
(b) ``naive``: requests ``iter_lines`` + ``json.loads`` + ``insert_one`` per tweet (on the first
    ``--naive-tweets`` of the same payload: it runs at ~2k/s);
(c) ``threaded``: pycurl thread -> ``queue.Queue`` -> orjson + ``insert_many`` (one process);
(d) ``floor``: pycurl + framing + orjson only, no insert (the parse limit of one core).

A run's clock starts when the server sends the first body byte (the contender is connected and
started by then) and stops when the blackhole acknowledged the last tweet (``floor``: when the last
tweet was parsed). CPU is the contender's processes' CPU seconds in that window; peak RSS is the
sum of the processes' high-water marks. Contenders are interleaved within each repeat so that load
from other users of the machine hits all of them alike; the table shows medians, with the load
average next to every figure. Then: (e) p50/p99 send->acknowledged latency at a steady rate,
(f) RSS of all ingestd processes under a 10x overload (the blackhole delays every ack), (g) a
smaller run against the nx-27017 stand-in proving the same path stores every tweet exactly once
(its speed is not a figure), and with ``--profile`` (h) py-spy profiles of both workers.
``--tree DIR`` runs the daemon from another source tree, to measure a proposed change against the
same baselines. Results of a run, with the analysis, are kept in ``bench/RESULTS.md``.

Prints figures and ratios; asserts nothing about speed. Exit status 1 only if a correctness check
fails (a contender stored a different number of tweets than delivered).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import pymongo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.payload import Payload, PayloadServer, build
from ingestd.documents.matching import Matcher
from tests.support.daemon import Daemon, settings_doc

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

CONTENDERS = ("ingestd", "ingestd-1core", "threaded", "floor", "naive")
# ingestd-1core: the same daemon with writer.encoder_process: false (the store worker encodes
# every tweet itself), to show what the encoder child adds.
# Filters of a realistic deployment: several terms that hit the sample, a phrase, a hashtag, a
# URL-ish term, followed accounts and two boxes, so every tweet takes the full matching path.
TRACK = ["twitter", "iphone", "ipad", "python", "#ピザの日", "api", "engineering.twitter.com",
         "music data", "helm", "jade", "developer", "bolstering infrastructure"]
FOLLOW = [783214, 6253282, 2244994945, 12]
LOCATIONS = [(-122.75, 36.8, -121.75, 37.8), (-74.0, 40.0, -73.0, 41.0)]
DATABASE = "bench"


def say(text: str) -> None:
    print(text, flush=True)


def load1() -> float:
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and len(part.mountpoint) > len(best):
            best, kind = part.mountpoint, part.fstype
    return f"{kind} ({best})"


# ---------------------------------------------------------------- processes


def tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def grow(procs: list[psutil.Process], pid: int) -> list[psutil.Process]:
    """``procs`` plus the processes started in the tree since (the store worker starts its
    encoder child on the first large read, after the run began: all its CPU is in the run)."""
    known = {p.pid for p in procs}
    with suppress(psutil.Error):
        return procs + [p for p in tree(pid) if p.pid not in known]
    return procs


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def role_of(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    if any("ingestd.sink.encoder_pool" in part for part in cmd):
        return "encoder"
    return cmd[cmd.index("--role") + 1] if "--role" in cmd else "supervisor"


def cpu_by_role(procs: list[psutil.Process]) -> dict[str, float]:
    return {role_of(p): cpu_of([p]) for p in procs}


def hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_sum_kb(procs: list[psutil.Process]) -> int:
    """Proportional set size: shared pages (the interpreter, libraries) split between the
    processes that map them, so the sum is the memory the tree really holds."""
    total = 0
    for p in procs:
        with suppress(psutil.Error):
            total += p.memory_full_info().pss // 1024
    return total


def rss_sum_kb(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with suppress(psutil.Error):
            total += p.memory_info().rss // 1024
    return total


# ---------------------------------------------------------------- results


@dataclass
class Result:
    contender: str
    encoding: str
    tweets: int
    seconds: float
    cpu: float
    rss_mb: float
    load: float
    body_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.tweets / self.seconds

    @property
    def mb_s(self) -> float:
        return self.body_bytes / self.seconds / 1e6

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu * 100_000 / self.tweets

    def line(self) -> str:
        text = (f"{self.contender:>9} {self.encoding:<5} {self.rate:>9,.0f} tweets/s "
                f"{self.mb_s:7.1f} MB/s  CPU {self.cpu_per_100k:5.2f} s/100k  "
                f"RSS {self.rss_mb:6.1f} MB  ({self.tweets:,} in {self.seconds:.2f} s, "
                f"load {self.load:.2f})")
        if "cpu_by_role" in self.extra:
            per = ", ".join(f"{k} {v * 100_000 / self.tweets:.2f}"
                            for k, v in self.extra["cpu_by_role"].items())
            mem = ", ".join(f"{k} {v}" for k, v in self.extra["rss_by_role_mb"].items())
            text += f"\n              CPU s/100k by process: {per}; RSS MB: {mem}"
        return text


class Bench:
    """Shared fixtures: payload, payload server, blackhole, work folder."""

    def __init__(self, args: argparse.Namespace, payload: Payload, workdir: Path) -> None:
        self.args, self.payload, self.workdir = args, payload, workdir
        # ``--tree``: run the daemon from another source tree (to measure a proposed change)
        self.daemon_env = {"PYTHONPATH": str(args.tree)} if args.tree else {}
        self.server = PayloadServer(payload)
        self.blackhole = Blackhole(workdir / "blackhole")
        self._runs = 0

    def close(self) -> None:
        self.server.close()
        self.blackhole.stop()

    def next_dir(self, name: str) -> Path:
        self._runs += 1
        path = self.workdir / f"{self._runs:02d}-{name}"
        path.mkdir(parents=True)
        return path

    # -- (a) ingestd ------------------------------------------------------------------------

    def ingestd_doc(self, mongo_uri: str, gzip: bool, encoder: bool = True) -> dict[str, Any]:
        doc = settings_doc(self.server.url, mongo_uri, DATABASE)
        doc["stream"].update(track=TRACK, follow=FOLLOW, locations=[list(b) for b in LOCATIONS],
                             gzip=gzip)
        # product defaults (batch 1000, flush 0.5 s, encoder child on) unless told otherwise
        doc["writer"] = {} if encoder else {"encoder_process": False}
        return doc

    def run_ingestd(self, gzip: bool, tweets: int, *, rate: float = 0.0,
                    blackhole: Blackhole | None = None, profile: bool = False,
                    sample_rss: bool = False, track: bool = False, encoder: bool = True
                    ) -> Result:
        bh = blackhole or self.blackhole
        name = "ingestd" if encoder else "ingestd-1core"
        workdir = self.next_dir(f"{name}-{'gzip' if gzip else 'plain'}")
        daemon = Daemon(workdir, self.ingestd_doc(bh.uri, gzip, encoder))
        bh.reset(tweets, track)
        self.server.arm(tweets, rate)
        load = load1()
        daemon.start(self.daemon_env)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            self.server.wait_delivery(60)
            daemon.wait_ready(60)
            time.sleep(0.5)  # the store worker finishes starting (imports, spool open)
            assert daemon.proc is not None
            procs = tree(daemon.proc.pid)
            if profile:
                spies = [spy(daemon.worker_pid(role), workdir / f"profile-{role}.txt")
                         for role in ("stream", "store")]
                time.sleep(0.5)
            cpu0 = cpu_of(procs)
            roles0 = cpu_by_role(procs)
            self.server.go()
            sampler = RssSampler(procs, daemon.proc.pid) if sample_rss else None
            stats = bh.wait_reached(tweets, self.progress("ingestd", tweets),
                                    alive=daemon.assert_running,
                                    timeout=60 + tweets / 500)
            procs = grow(procs, daemon.proc.pid)
            cpu1 = cpu_of(procs)
            roles = {k: round(v - roles0.get(k, 0.0), 2) for k, v in cpu_by_role(procs).items()}
            peak_sum = sampler.stop() if sampler else 0
            rss = sum(hwm_kb(p.pid) for p in procs) / 1024
            counters = {role: daemon.counters(role) for role in ("stream", "store")}
            rss_roles = {role_of(p): round(hwm_kb(p.pid) / 1024, 1) for p in procs}
        finally:
            for proc in spies:
                proc.send_signal(signal.SIGINT)
            for proc in spies:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            daemon.stop(60)
        delivery = self.server.deliveries[0]
        seconds = (stats["reached_ns"] - delivery.first_byte_ns) / 1e9
        extra = {"acked": stats["inserted"], "batches": stats["batches"], "cpu_by_role": roles,
                 "rss_by_role_mb": rss_roles,
                 "peak_rss_sum_mb": round(peak_sum / 1024, 1), "workdir": str(workdir),
                 "store": {k: counters["store"].get(k) for k in ("stored", "duplicates",
                                                                   "batches", "deadlettered")}}
        return Result(name, "gzip" if gzip else "plain", tweets, seconds, cpu1 - cpu0, rss,
                      load, self.payload.decoded_bytes(tweets), extra)

    # -- (b)-(d) baselines ------------------------------------------------------------------

    def run_contender(self, kind: str, gzip: bool, tweets: int) -> Result:
        workdir = self.next_dir(f"{kind}-{'gzip' if gzip else 'plain'}")
        self.blackhole.reset(tweets)
        self.server.arm(tweets)
        load = load1()
        cmd = [sys.executable, str(BENCH / "contenders.py"), kind, "--url", self.server.url,
               "--mongo", self.blackhole.uri, "--database", DATABASE, "--tweets", str(tweets)]
        if gzip:
            cmd.append("--gzip")
        with (workdir / "stderr.txt").open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        try:
            self.server.wait_delivery(60)
            self.server.go()
            if kind != "floor":
                self.blackhole.wait_reached(tweets, self.progress(kind, tweets),
                                            alive=lambda: _alive(proc, workdir),
                                            timeout=60 + tweets / 100)
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} failed: {(workdir / 'stderr.txt').read_text()[-2000:]}")
        report = json.loads(out.decode().strip().splitlines()[-1])
        delivery = self.server.deliveries[0]
        end = report["done_ns"]
        extra: dict[str, Any] = {"reported": report["tweets"]}
        if kind != "floor":
            stats = self.blackhole.stats()
            end = stats["reached_ns"]
            extra["acked"] = stats["inserted"]
        seconds = (end - delivery.first_byte_ns) / 1e9
        return Result(kind, "gzip" if gzip else "plain", tweets, seconds, report["cpu"],
                      report["maxrss_kb"] / 1024, load, self.payload.decoded_bytes(tweets), extra)

    def progress(self, name: str, tweets: int) -> Callable[[int, float], None]:
        def show(done: int, elapsed: float) -> None:
            rate = done / elapsed if elapsed > 0 else 0.0
            say(f"      {name}: {done:>9,}/{tweets:,} acknowledged  {rate:>9,.0f}/s  "
                f"{elapsed:5.1f} s")
        return show


def _alive(proc: subprocess.Popen[bytes], workdir: Path) -> None:
    if proc.poll() is not None and proc.returncode != 0:
        raise RuntimeError(f"contender exited {proc.returncode}: "
                           f"{(workdir / 'stderr.txt').read_text()[-2000:]}")


class Blackhole:
    """``bench/blackhole.py`` as a subprocess, and a client for its bench commands."""

    def __init__(self, workdir: Path, ack_delay: float = 0.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        port_file = workdir / "port"
        cmd = [sys.executable, str(BENCH / "blackhole.py"), "--port", "0", "--port-file",
               str(port_file), "--ack-delay", str(ack_delay)]
        self._log = (workdir / "blackhole.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the blackhole did not start")
            time.sleep(0.05)
        self.uri = f"mongodb://127.0.0.1:{int(port_file.read_text())}"
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=5000)
        self.db = self.client["admin"]

    def reset(self, target: int, track: bool = False) -> None:
        self.db.command("benchReset", target=target, track=track)

    def stats(self) -> dict[str, Any]:
        return dict(self.db.command("benchStats"))

    def dump(self, path: Path) -> list[tuple[int, int]]:
        self.db.command("benchDump", path=str(path))
        raw = array("q")
        raw.frombytes(path.read_bytes())
        return list(zip(raw[::2], raw[1::2], strict=True))

    def wait_reached(self, target: int, show: Callable[[int, float], None], *,
                     alive: Callable[[], None], timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        next_show = started + 2.0
        while True:
            stats = self.stats()
            if stats["reached_ns"]:
                return stats
            now = time.monotonic()
            if now >= next_show:
                show(stats["inserted"], now - started)
                next_show = now + 2.0
            if now - started > timeout:
                raise TimeoutError(f"only {stats['inserted']:,} of {target:,} acknowledged "
                                   f"after {timeout:.0f} s")
            alive()
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class RssSampler:
    """Samples the summed RSS of a process tree every 0.1 s on a thread; ``stop()`` -> peak KB."""

    def __init__(self, procs: list[psutil.Process], root: int) -> None:
        import threading

        self.procs, self.root, self.peak = procs, root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.procs = grow(self.procs, self.root)
            self.peak = max(self.peak, rss_sum_kb(self.procs))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` (collapsed stacks, non-blocking) until SIGINT."""
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "250", "--format",
                             "raw", "--nonblocking", "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- profiles


def summarize_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            incl[name] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples (non-idle)", "", "| self % | incl % | function |", "|---:|---:|---|"]
    names = sorted(set(own.most_common(top)) | {(n, own[n]) for n, _ in incl.most_common(top)},
                   key=lambda item: (-incl[item[0]], item[0]))
    for name, _ in names[: top * 2]:
        lines.append(f"| {100 * own[name] / total:5.1f} | {100 * incl[name] / total:5.1f} | "
                     f"`{name}` |")
    return "\n".join(lines)


def _frame_name(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "module.py:function"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    filename = where.rsplit(":", 1)[0]
    short = "/".join(filename.split("/")[-2:]) if filename else ""
    return f"{short}:{name}" if short else name


# ---------------------------------------------------------------- extra runs


def latency_figures(bench: Bench, pairs: list[tuple[int, int]], slices: list[tuple[int, int]]
                    ) -> dict[str, float]:
    ids = bench.payload.ids()
    index_of = {tweet_id: i for i, tweet_id in enumerate(ids)}
    starts = [s for s, _ in slices]
    import bisect

    lat: list[float] = []
    for tweet_id, ack_ns in pairs:
        i = index_of.get(tweet_id)
        if i is None:
            continue
        k = bisect.bisect_right(starts, i) - 1
        lat.append((ack_ns - slices[k][1]) / 1e9)
    lat.sort()
    if not lat:
        return {}

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))]

    return {"count": len(lat), "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99),
            "max": lat[-1]}


def run_latency(bench: Bench, rate: float, seconds: float) -> dict[str, Any]:
    tweets = min(bench.payload.tweets, int(rate * seconds))
    bh = Blackhole(bench.workdir / "blackhole-latency")
    try:
        result = bench.run_ingestd(True, tweets, rate=rate, blackhole=bh, track=True)
        pairs = bh.dump(bench.workdir / "latency-pairs.bin")
    finally:
        bh.stop()
    figures = latency_figures(bench, pairs, bench.server.deliveries[0].slices)
    return {"rate": rate, "tweets": tweets, "load": result.load, **figures}


def run_overload(bench: Bench, rate: float, ack_delay: float, seconds: float,
                 encoder: bool = True) -> dict[str, Any]:
    """Offer ``rate``/s while every 1000-tweet insert is acked ``ack_delay`` s late."""
    tweets = min(bench.payload.tweets, int(rate * seconds))
    bh = Blackhole(bench.workdir / f"blackhole-overload-{encoder}", ack_delay=ack_delay)
    workdir = bench.next_dir("ingestd-overload" if encoder else "ingestd-1core-overload")
    daemon = Daemon(workdir, bench.ingestd_doc(bh.uri, True, encoder))
    bh.reset(0)
    bench.server.arm(tweets, rate)
    load = load1()
    daemon.start(bench.daemon_env)
    try:
        bench.server.wait_delivery(60)
        daemon.wait_ready(60)
        time.sleep(0.5)
        assert daemon.proc is not None
        procs = tree(daemon.proc.pid)
        bench.server.go()
        sampler = RssSampler(procs, daemon.proc.pid)
        started = time.monotonic()
        while time.monotonic() - started < seconds + 2:
            time.sleep(2)
            daemon.assert_running()
            procs = grow(procs, daemon.proc.pid)
            stream, store = daemon.counters("stream"), daemon.counters("store")
            say(f"      overload: received {stream.get('received', 0):>8,}  stored "
                f"{store.get('stored', 0):>8,}  rss {rss_sum_kb(procs) / 1024:6.1f} MB")
        peak_sum = sampler.stop()
        procs = grow(procs, daemon.proc.pid)
        hwm = {role_of(p): hwm_kb(p.pid) for p in procs}
        pss = pss_sum_kb(procs)
        stream, store = daemon.counters("stream"), daemon.counters("store")
        spool = daemon.status("stream").get("spool", {})
        elapsed = time.monotonic() - started
    finally:
        daemon.stop(60)
        bh.stop()
    received, stored = int(stream.get("received", 0)), int(store.get("stored", 0))
    return {"offered_rate": rate, "ack_delay": ack_delay, "seconds": round(elapsed, 1),
            "received": received, "stored": stored,
            "overload": round(received / max(stored, 1), 1),
            "spool_backlog_records": spool.get("records"), "load": load,
            "peak_rss_sum_mb": round(peak_sum / 1024, 1),
            "pss_sum_mb_at_end": round(pss / 1024, 1),
            "hwm_sum_mb": round(sum(hwm.values()) / 1024, 1),
            "hwm_mb": {role: round(kb / 1024, 1) for role, kb in hwm.items()}}


def run_standin(bench: Bench, tweets: int) -> dict[str, Any]:
    """The same daemon against the nx-27017 stand-in: stored == delivered, each exactly once."""
    from ingestd.tools.standin import StandIn

    standin = StandIn(bench.workdir / "standin").start()
    workdir = bench.next_dir("ingestd-standin")
    daemon = Daemon(workdir, bench.ingestd_doc(standin.uri, True))
    bench.server.arm(tweets)
    daemon.start(bench.daemon_env)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(standin.uri)
    coll = client[DATABASE]["tweets"]
    try:
        bench.server.wait_delivery(60)
        daemon.wait_ready(60)
        bench.server.go()
        started = time.monotonic()
        while True:
            daemon.assert_running()
            store = daemon.counters("store")
            stored = int(store.get("stored", 0)) + int(store.get("duplicates", 0))
            if stored >= tweets or time.monotonic() - started > 60 + tweets / 50:
                break
            say(f"      stand-in: {stored:,}/{tweets:,} stored")
            time.sleep(2)
        count = coll.count_documents({})
        expected = {int(i) for i in bench.payload.ids()[:tweets]}
        docs = {d["_id"]: d["_ingest"]["matched"] for d in coll.find({})}
        ids = set(docs)
        distinct = len(ids)
        # _ingest.matched as stored == the matcher's answer on the delivered tweet
        matcher = Matcher(TRACK, FOLLOW, LOCATIONS)
        wrong = 0
        with_track = 0
        for raw in bench.payload.messages(tweets):
            tweet = orjson.loads(raw)
            want = matcher.match(tweet)
            got = docs.get(tweet["id"], {})
            with_track += bool(want.track)
            if [got.get("track"), got.get("follow"), got.get("locations")] != [
                    want.track, want.follow, want.locations]:
                wrong += 1
        stream = daemon.counters("stream")
    finally:
        daemon.stop(60)
        client.close()
        standin.stop()
    ok = count == tweets == distinct and ids == expected and not wrong
    return {"delivered": tweets, "received": stream.get("received"), "stored_documents": count,
            "distinct_ids": distinct, "ids_match_payload": ids == expected,
            "with_track_match": with_track, "matched_differs": wrong,
            "deadlettered": store.get("deadlettered"),
            "duplicates": store.get("duplicates"), "ok": ok}


# ---------------------------------------------------------------- report


def median_result(results: list[Result]) -> Result:
    ordered = sorted(results, key=lambda r: r.rate)
    mid = ordered[len(ordered) // 2]
    return Result(mid.contender, mid.encoding, mid.tweets, mid.seconds,
                  statistics.median(r.cpu for r in results),
                  statistics.median(r.rss_mb for r in results),
                  statistics.median(r.load for r in results), mid.body_bytes,
                  {"runs": [round(r.rate) for r in results]})


def table(medians: dict[tuple[str, str], Result], encodings: list[str]) -> str:
    head = ("| contender | enc | tweets/s | MB/s | CPU s/100k | peak RSS MB | "
            "ingestd ÷ this | runs (tweets/s) | load |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for enc in encodings:
        ours = medians.get(("ingestd", enc))
        for name in CONTENDERS:
            r = medians.get((name, enc))
            if r is None:
                continue
            ratio = f"{ours.rate / r.rate:.2f}×" if ours and name != "ingestd" else "—"
            runs = ", ".join(f"{x:,}" for x in r.extra.get("runs", []))
            lines.append(f"| {name} | {enc} | {r.rate:,.0f} | {r.mb_s:.1f} | "
                         f"{r.cpu_per_100k:.2f} | {r.rss_mb:.1f} | {ratio} | {runs} | "
                         f"{r.load:.2f} |")
    return "\n".join(lines)


@contextmanager
def workspace(arg: Path | None, keep: bool) -> Iterator[Path]:
    path = arg or Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if not keep and arg is None:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = parser.add_argument
    a("--payload-tweets", type=int, default=200_000, help="payload size (tweets), generated once")
    a("--tweets", type=int, help="tweets per run (a prefix of the payload; default: all of it)")
    a("--naive-tweets", type=int, default=50_000,
      help="tweets for the naive contender: a prefix of the same payload (it runs at ~2k/s); "
      "0 = all")
    a("--repeats", type=int, default=3)
    a("--encodings", default="plain,gzip")
    a("--contenders", default=",".join(CONTENDERS))
    a("--latency-rate", type=float, default=5000.0)
    a("--latency-seconds", type=float, default=20.0)
    a("--overload-rate", type=float, default=20000.0)
    a("--overload-ack-delay", type=float, default=0.5, help="s per insert (1000 tweets)")
    a("--overload-seconds", type=float, default=10.0)
    a("--standin-tweets", type=int, default=5000)
    a("--skip", default="", help="comma list of: latency, overload, standin")
    a("--profile", action="store_true", help="py-spy both workers in one more ingestd run each")
    a("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    a("--keep", action="store_true", help="keep the temporary work folder")
    a("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
      / "ingestd-bench", help="where the generated payload is kept between runs")
    a("--json", type=Path, help="write all figures here")
    a("--tree", type=Path, help="run the daemon from this source tree (a folder holding "
      "ingestd/), to measure a proposed change against the same baselines")
    args = parser.parse_args(argv)
    encodings = args.encodings.split(",")
    contenders = [c for c in args.contenders.split(",") if c]
    skip = set(args.skip.split(","))
    if "naive" in contenders and importlib.util.find_spec("requests") is None:
        say("note: the naive contender needs `requests` (pip install requests): skipped")
        contenders.remove("naive")
    if args.profile and not shutil.which("py-spy", path=str(Path(sys.executable).parent)):
        say("note: --profile needs py-spy (pip install py-spy): no profiles")
        args.profile = False

    info = machine()
    say(f"# ingestd benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    say(f"machine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}, "
        f"load {info['loadavg']}")
    say(f"payload: {args.payload_tweets:,} tweets (cache {args.cache})")
    payload = build(args.cache, args.payload_tweets)
    args.tweets = min(args.tweets or payload.tweets, payload.tweets)
    manifest = json.loads((payload.directory / "manifest.json").read_text())
    per_tweet = manifest["plain_bytes"] / payload.tweets
    say(f"  {manifest['plain_bytes'] / 1e6:.0f} MB decoded ({per_tweet:,.0f} B/tweet), "
        f"{manifest['gzip_bytes'] / 1e6:.0f} MB gzip")
    failures: list[str] = []
    report: dict[str, Any] = {"machine": info, "payload": manifest, "args": {
        k: str(v) for k, v in vars(args).items()}}
    with workspace(args.workdir, args.keep) as workdir:
        say(f"work folder: {workdir} (spool on {filesystem_of(workdir)})")
        bench = Bench(args, payload, workdir)
        try:
            results: list[Result] = []
            for rep in range(1, args.repeats + 1):
                for enc in encodings:
                    for name in contenders:
                        gzip = enc == "gzip"
                        n = args.tweets
                        say(f"  [{rep}/{args.repeats}] {name} {enc} ...")
                        if name.startswith("ingestd"):
                            r = bench.run_ingestd(gzip, n, encoder=name == "ingestd")
                        else:
                            if name == "naive" and args.naive_tweets:
                                n = min(n, args.naive_tweets)
                            r = bench.run_contender(name, gzip, n)
                        say("    " + r.line())
                        acked = r.extra.get("acked")
                        if acked is not None and acked != n:
                            failures.append(f"{name} {enc}: acked {acked} != {n}")
                        results.append(r)
            medians = {}
            for name in contenders:
                for enc in encodings:
                    runs = [r for r in results if r.contender == name and r.encoding == enc]
                    if runs:
                        medians[(name, enc)] = median_result(runs)
            say("")
            say(f"## Throughput (medians of {args.repeats}; load = 1-min load average at start)")
            say(table(medians, encodings))
            report["runs"] = [asdict(r) | {"rate": r.rate} for r in results]
            report["table"] = table(medians, encodings)

            if "latency" not in skip:
                say(f"\n## Latency at a steady {args.latency_rate:,.0f} tweets/s (gzip) ...")
                lat = run_latency(bench, args.latency_rate, args.latency_seconds)
                report["latency"] = lat
                say(f"   send -> acknowledged over {lat.get('count', 0):,} tweets: "
                    f"p50 {lat.get('p50', 0):.3f} s, p90 {lat.get('p90', 0):.3f} s, "
                    f"p99 {lat.get('p99', 0):.3f} s, max {lat.get('max', 0):.3f} s "
                    f"(load {lat['load']:.2f})")
            if "overload" not in skip:
                say(f"\n## Overload: {args.overload_rate:,.0f}/s offered, each insert acked "
                    f"{args.overload_ack_delay} s late ...")
                for encoder in (True, False):
                    ov = run_overload(bench, args.overload_rate, args.overload_ack_delay,
                                      args.overload_seconds, encoder)
                    report["overload" if encoder else "overload-1core"] = ov
                    say(f"   {'ingestd' if encoder else 'ingestd-1core'}: received "
                        f"{ov['received']:,}, stored {ov['stored']:,} "
                        f"({ov['overload']}x overload), spool backlog "
                        f"{ov['spool_backlog_records']} records; peak RSS of all ingestd "
                        f"processes: {ov['peak_rss_sum_mb']} MB sampled, {ov['hwm_sum_mb']} MB "
                        f"sum of high-water marks {ov['hwm_mb']}; PSS (shared pages split) at "
                        f"the end {ov['pss_sum_mb_at_end']} MB (load {ov['load']:.2f})")
            if "standin" not in skip:
                say(f"\n## Correctness against the nx-27017 stand-in ({args.standin_tweets:,} "
                    "tweets, speed not a figure) ...")
                st = run_standin(bench, args.standin_tweets)
                report["standin"] = st
                say(f"   {st}")
                if not st["ok"]:
                    failures.append(f"stand-in: {st}")
            if args.profile:
                for gzip in (False, True):
                    enc = "gzip" if gzip else "plain"
                    say(f"\n## Profile (py-spy, non-blocking, 250 Hz), ingestd {enc} ...")
                    r = bench.run_ingestd(gzip, args.tweets, profile=True)
                    say("    " + r.line() + "  (under the profiler)")
                    run_dir = Path(r.extra["workdir"])
                    for role in ("stream", "store"):
                        text = summarize_profile(run_dir / f"profile-{role}.txt")
                        report.setdefault("profiles", {})[f"{role}-{enc}"] = text
                        say(f"\n### {role} worker ({enc})\n{text}")
        finally:
            bench.close()
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    say(f"\nload average at the end: {report['loadavg_end']}")
    for failure in failures:
        say(f"CHECK FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
