"""End-to-end throughput benchmark: ingestd against the pipelines users build, in one invocation.

    make bench            # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --tweets 50000 --repeats 1      # a quick look

Every contender reads the same payload (``bench/payload.py``: N real-sample tweets of ~3.8 KB under
fresh ids) from the same loopback chunked-HTTP server, plain and gzip, and inserts into the same
acknowledging wire-protocol server (``bench/blackhole.py``), so the figures measure ingestd and
pymongo, not a database:

(a) ``ingestd``: the real ``ingestd run`` daemon (supervisor, stream and store worker), spool on,
    product defaults (batch 1000, flush 1 s, fsync 0.2 s), with track/follow/locations set so
    ``_ingest.matched`` is computed;
(b) ``naive``: requests ``iter_lines`` + ``json.loads`` + ``insert_one`` per tweet (on the first
    ``--naive-tweets`` of the same payload: it runs at ~2k/s);
(c) ``threaded``: pycurl thread -> ``queue.Queue`` -> orjson + ``insert_many`` (one process):
    "the pipeline", the first denominator of the ratios;
(c') ``tweepy``: tweepy 4.13's default ``tweepy.Stream`` path + ``insert_many`` (on the first
    ``--tweepy-tweets``), the second denominator;
(d) ``floor``: pycurl + framing + orjson only, no insert (the parse limit of one core);
(a') ``prespool`` / ``prespool-split`` / ``prespool-budget`` (on request): a prototype, the daemon
    with its stream worker encoding all of the tweets (or ``--split-share`` of them, or while that
    takes under ``--encode-budget`` of a core) to BSON before the spool, its store worker encoding
    the rest and inserting, no encoder child (``bench/prespool.py``); ``prespool-child``: the
    stream worker encodes ``--split-share``, the store worker shares the JSON rest with its encoder
    child as ingestd does. A prototype's name may carry its share or budget: ``prespool-split@0.5``.
``make bench`` runs ingestd, threaded, tweepy and floor (``--contenders`` for the others) on 60k
tweets, medians of 3, to fit in 10 minutes on an idle 2-core machine.

A run's clock starts when the server sends the first body byte (the contender is connected and
started by then) and stops when the blackhole acknowledged the last tweet (``floor``: when the last
tweet was parsed). CPU is the contender's processes' CPU seconds in that window; peak RSS is the
sum of the processes' high-water marks. Contenders are interleaved within each repeat so that load
from other users of the machine hits all of them alike; the table shows medians, with the load
average next to every figure. Then: (e) p50/p99 send->acknowledged latency at a steady rate,
with ingestd's CPU per tweet there and the pipeline's on the same paced stream (``--steady-rounds``
rounds of both, order swapped each round; medians, every round listed),
(f) RSS of all ingestd processes under a 10x overload (the blackhole delays every ack), (f') the
rate at which ingestd drains a backlog into a MongoDB that acks each insert 0.05 s late, (g) a
smaller run against the nx-27017 stand-in proving the same path stores every tweet exactly once
(its speed is not a figure), (h) a py-spy profile of both workers (one extra plain run), and (i)
the quiet stream: CPU and wake-ups (voluntary context switches) of every daemon process from /proc
with keep-alives only and at 50 tweets/s. Peak RSS and PSS are sampled from
/proc/PID/smaps_rollup and summed over the contender's processes. A dated section with the figures
is appended to ``bench/LOG.md``.
``--tree DIR`` runs the daemon from another source tree, to measure a proposed change against the
same baselines. ``bench/LOG.md`` keeps every run with its reading; ``bench/RESULTS.md`` sums
them up against issue 15's goals.

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
from bench.probe import describe, probe
from ingestd.documents.matching import Matcher
from tests.support.daemon import Daemon, settings_doc

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# where generated payloads are kept between runs (bench/run.py, steady.py, bench_store.py)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ingestd-bench"

CONTENDERS = ("ingestd", "ingestd-1core", "prespool", "prespool-split", "prespool-budget",
              "prespool-child", "threaded", "tweepy", "floor", "naive")
# What `make bench` runs (fits in 10 minutes); the others on request with --contenders.
DEFAULT_CONTENDERS = ("ingestd", "threaded", "tweepy", "floor")
PIPELINE, TWEEPY = "threaded", "tweepy"  # the ratios' denominators
# ingestd-1core: the same daemon with writer.encoder_process: false (the store worker encodes
# every tweet itself), to show what the encoder child adds.
# prespool: the same daemon with tweets encoded to BSON by the stream worker before the spool and
# only inserted by the store worker (a prototype: bench/prespool.py; branch spike);
# prespool-split: the stream worker encodes only --split-share of the tweets, spread evenly, and
# the store worker the rest (as ingestd-1core does), to balance the two cores;
# prespool-budget: the stream worker encodes while that takes under --encode-budget of its time.
# prespool-child: the stream worker encodes --split-share, the store worker shares the JSON rest
# with its encoder child as ingestd does (writer.encoder_process: auto).
# A prototype's name may carry its own share or budget: ``prespool-split@0.55`` (several shares
# interleaved in one command); see ``prespool_args``.
DAEMONS = ("ingestd", "ingestd-1core", "prespool", "prespool-split", "prespool-budget",
           "prespool-child")


def prespool_args(name: str) -> tuple[str, float | None]:
    """A prototype contender's name without its ``@share`` suffix, and the suffix (None: none)."""
    base, _, value = name.partition("@")
    return base, float(value) if value else None


def with_encoder(name: str) -> bool:
    """Whether a daemon contender keeps the product's encoder child setting (auto)."""
    return name in ("ingestd", "") or prespool_args(name)[0] == "prespool-child"

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
    """CPU seconds of ``procs`` and of their children that exited: a process's own times end
    with it, and a reaped child's (the encoder child, which ``auto`` stops and starts again
    within a burst) are its parent's ``children_*`` from then on. Taken at the start and the end
    of a run, the difference is the run's CPU whichever children came and went meanwhile."""
    return sum(cpu_by_role(procs).values())


def role_of(proc: psutil.Process) -> str:
    """supervisor, stream, store, or encoder: the store worker's child (a fresh interpreter
    running ``ingestd.sink.encoder_pool``, or forked from the store worker, same command line)."""
    try:
        cmd = proc.cmdline()
        parent = proc.parent()
        parent_cmd = parent.cmdline() if parent is not None else []
    except psutil.Error:
        return "?"
    if any("ingestd.sink.encoder_pool" in part for part in cmd) or _role_in(parent_cmd) == "store":
        return "encoder"
    return _role_in(cmd) or "supervisor"


def _role_in(cmd: list[str]) -> str | None:
    return cmd[cmd.index("--role") + 1] if "--role" in cmd else None


def cpu_by_role(procs: list[psutil.Process]) -> dict[str, float]:
    """``cpu_of`` by role; a store worker's reaped children count as ``encoder``."""
    roles: dict[str, float] = {}
    for p in procs:
        role = role_of(p)
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue  # exited: reaped by a parent in ``procs``, whose children_* hold its CPU
        roles[role] = roles.get(role, 0.0) + t.user + t.system
        if reaped := t.children_user + t.children_system:
            child = "encoder" if role == "store" else role
            roles[child] = roles.get(child, 0.0) + reaped
    return roles


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


def smaps_rollup_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of one process from /proc/PID/smaps_rollup, in KB; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def task_files(pid: int, name: str) -> list[str]:
    """The text of ``/proc/PID/task/*/NAME``, one per thread of ``pid`` that could be read
    (none once it is gone): /proc/PID/NAME alone is often the main thread's only."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    texts = []
    for tid in tids:
        with suppress(OSError), open(f"/proc/{pid}/task/{tid}/{name}") as f:
            texts.append(f.read())
    return texts


def wakeups(pid: int) -> int:
    """Voluntary context switches of all threads of ``pid`` (each is a sleep that ended: a
    wake-up)."""
    return sum(int(line.split()[1]) for text in task_files(pid, "status")
               for line in text.splitlines() if line.startswith("voluntary_ctxt_switches:"))


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
    pss_mb: float = 0.0

    @property
    def us_per_tweet(self) -> float:
        return self.cpu * 1e6 / self.tweets

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
                f"{self.mb_s:7.1f} MB/s  CPU {self.us_per_tweet:5.1f} µs/tweet  "
                f"RSS {self.rss_mb:6.1f} MB  PSS {self.pss_mb:6.1f} MB  "
                f"({self.tweets:,} in {self.seconds:.2f} s, "
                f"load {self.load:.2f})")
        if "cpu_by_role" in self.extra:
            per = ", ".join(f"{k} {v * 1e6 / self.tweets:.1f}"
                            for k, v in self.extra["cpu_by_role"].items())
            mem = ", ".join(f"{k} {v}" for k, v in self.extra["rss_by_role_mb"].items())
            text += f"\n              CPU µs/tweet by process: {per}; RSS MB: {mem}"
        return text


class Bench:
    """Shared fixtures: payload, payload server, blackhole, work folder."""

    def __init__(self, args: argparse.Namespace, payload: Payload, workdir: Path) -> None:
        self.args, self.payload, self.workdir = args, payload, workdir
        # ``--tree``: run the daemon from another source tree (to measure a proposed change)
        self.daemon_env = {"PYTHONPATH": str(args.tree)} if args.tree else {}
        # prespool: this tree's daemon with its workers patched by bench/prespool.py
        self.prespool_env = {"PYTHONPATH": f"{BENCH / 'prespool_site'}:{ROOT}",
                             "INGESTD_BENCH_PRESPOOL": "1"}
        self.server = PayloadServer(payload)
        self.blackhole = Blackhole(workdir / "blackhole")
        self._runs = 0
        self.show_progress = True  # a line every ~2 s while a contender runs

    def env_of(self, prespool: str) -> dict[str, str]:
        """The daemon's extra environment: ``prespool`` names a prototype contender, or is ""."""
        if not prespool:
            return self.daemon_env
        base, value = prespool_args(prespool)
        share = budget = 1.0
        if base in ("prespool-split", "prespool-child"):
            share = self.args.split_share if value is None else value
        if base == "prespool-budget":
            budget = self.args.encode_budget if value is None else value
        return self.prespool_env | {"INGESTD_BENCH_PRESPOOL_SHARE": str(share),
                                    "INGESTD_BENCH_PRESPOOL_BUDGET": str(budget),
                                    "INGESTD_BENCH_PRESPOOL_CHILD":
                                        "1" if base == "prespool-child" else "0"}

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
        # product defaults (batch 1000, flush 1 s, encoder_process auto) unless told otherwise
        doc["writer"] = {} if encoder else {"encoder_process": False}
        return doc

    def run_ingestd(self, gzip: bool, tweets: int, *, rate: float = 0.0,
                    blackhole: Blackhole | None = None, profile: bool = False,
                    track: bool = False, encoder: bool = True, prespool: str = ""
                    ) -> Result:
        bh = blackhole or self.blackhole
        name = prespool or ("ingestd" if encoder else "ingestd-1core")
        workdir = self.next_dir(f"{name}-{'gzip' if gzip else 'plain'}")
        daemon = Daemon(workdir, self.ingestd_doc(bh.uri, gzip,
                                                  encoder and with_encoder(prespool)))
        bh.reset(tweets, track)
        self.server.arm(tweets, rate)
        load = load1()
        daemon.start(self.env_of(prespool))
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
            sampler = MemSampler(procs, daemon.proc.pid)
            stats = bh.wait_reached(tweets, self.progress("ingestd", tweets),
                                    alive=daemon.assert_running,
                                    timeout=60 + tweets / 500)
            procs = grow(procs, daemon.proc.pid)
            cpu1 = cpu_of(procs)
            roles = {k: round(v - roles0.get(k, 0.0), 2) for k, v in cpu_by_role(procs).items()}
            sampler.stop()
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
                 "peak_rss_sum_mb": round(sampler.peak_rss / 1024, 1), "workdir": str(workdir),
                 "store": {k: counters["store"].get(k) for k in ("stored", "duplicates",
                                                                   "batches", "deadlettered")}}
        return Result(name, "gzip" if gzip else "plain", tweets, seconds, cpu1 - cpu0, rss,
                      load, self.payload.decoded_bytes(tweets), extra,
                      pss_mb=sampler.peak_pss / 1024)

    # -- (b)-(d) baselines ------------------------------------------------------------------

    def run_contender(self, kind: str, gzip: bool, tweets: int, rate: float = 0.0) -> Result:
        workdir = self.next_dir(f"{kind}-{'gzip' if gzip else 'plain'}")
        self.blackhole.reset(tweets)
        self.server.arm(tweets, rate)
        load = load1()
        cmd = [sys.executable, str(BENCH / "contenders.py"), kind, "--url", self.server.url,
               "--mongo", self.blackhole.uri, "--database", DATABASE, "--tweets", str(tweets)]
        if gzip:
            cmd.append("--gzip")
        with (workdir / "stderr.txt").open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        sampler = MemSampler([psutil.Process(proc.pid)], proc.pid)
        try:
            self.server.wait_delivery(60)
            self.server.go()
            if kind != "floor":
                self.blackhole.wait_reached(tweets, self.progress(kind, tweets),
                                            alive=lambda: _alive(proc, workdir),
                                            timeout=60 + tweets / 100)
            out, _ = proc.communicate(timeout=600)
        finally:
            sampler.stop()
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
                      report["maxrss_kb"] / 1024, load, self.payload.decoded_bytes(tweets), extra,
                      pss_mb=sampler.peak_pss / 1024)

    def progress(self, name: str, tweets: int) -> Callable[[int, float], None]:
        def show(done: int, elapsed: float) -> None:
            if not self.show_progress:
                return
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


class MemSampler:
    """Samples a process tree every 0.2 s on a thread: the peaks of the summed RSS and PSS
    (/proc/PID/smaps_rollup; PSS splits shared pages between the processes mapping them), and
    each role's own peak PSS and RSS (``peak_by_role``: role -> (RSS KB, PSS KB))."""

    def __init__(self, procs: list[psutil.Process], root: int) -> None:
        import threading

        self.procs, self.root, self.peak_rss, self.peak_pss = procs, root, 0, 0
        self.peak_by_role: dict[str, tuple[int, int]] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.procs = grow(self.procs, self.root)
            sums = [smaps_rollup_kb(p.pid) for p in self.procs]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sums))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in sums))
            for proc, (rss, pss) in zip(self.procs, sums, strict=True):
                role = self._roles.setdefault(proc.pid, role_of(proc))
                old_rss, old_pss = self.peak_by_role.get(role, (0, 0))
                self.peak_by_role[role] = (max(old_rss, rss), max(old_pss, pss))
            if self._stop.wait(0.2):
                return

    def roles_mb(self) -> dict[str, dict[str, float]]:
        """Each role's peak PSS and RSS in MB (peaks of each process, not at the same moment)."""
        return {role: {"pss": round(pss / 1024, 1), "rss": round(rss / 1024, 1)}
                for role, (rss, pss) in sorted(self.peak_by_role.items())}

    def stop(self) -> int:
        """Stop sampling; the peak summed RSS in KB."""
        self._stop.set()
        self._thread.join()
        return self.peak_rss


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


def latencies(bench: Bench, pairs: list[tuple[int, int]], slices: list[tuple[int, int]]
              ) -> list[float]:
    """Each acknowledged tweet's send → acknowledged time, in seconds."""
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
    return lat


def latency_figures(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    if not lat:
        return {}

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))]

    return {"count": len(lat), "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99),
            "max": lat[-1]}


def run_latency(bench: Bench, rate: float, seconds: float, rounds: int) -> dict[str, Any]:
    """``rounds`` paced runs of ingestd and of the one-process pipeline on the same stream (the
    same-run baseline), their order swapped each round. A steady rate's CPU per tweet moves by
    ±6 µs from run to run on this VM (bench/LOG.md): one run cannot say where it sits."""
    if rounds < 1:
        raise SystemExit(f"--steady-rounds must be 1 or more, not {rounds}")
    tweets = min(bench.payload.tweets, int(rate * seconds))
    ours: list[float] = []
    pipes: list[float] = []
    roles: dict[str, list[float]] = {}
    lat: list[float] = []
    p99s: list[float] = []
    loads: list[float] = []
    for i in range(rounds):
        for who in ("ingestd", "pipeline") if i % 2 == 0 else ("pipeline", "ingestd"):
            if who == "pipeline":
                pipes.append(round(
                    bench.run_contender("threaded", True, tweets, rate=rate).us_per_tweet, 1))
                continue
            bh = Blackhole(bench.workdir / f"blackhole-latency-{i}")
            try:
                result = bench.run_ingestd(True, tweets, rate=rate, blackhole=bh, track=True)
                pairs = bh.dump(bench.workdir / f"latency-pairs-{i}.bin")
            finally:
                bh.stop()
            these = latencies(bench, pairs, bench.server.deliveries[0].slices)
            lat += these
            p99s.append(latency_figures(these).get("p99", 0.0))
            ours.append(round(result.us_per_tweet, 1))
            loads.append(result.load)
            for role, cpu in result.extra["cpu_by_role"].items():
                roles.setdefault(role, []).append(cpu * 1e6 / tweets)
        say(f"      steady round {i + 1}: ingestd {ours[-1]:.1f} µs/tweet, pipeline "
            f"{pipes[-1]:.1f}, p99 {p99s[-1]:.3f} s")
    med = statistics.median
    return {"rate": rate, "tweets": tweets, "rounds": rounds, "load": max(loads),
            **latency_figures(lat), "p99_by_round": [round(p, 3) for p in p99s],
            "us_per_tweet": med(ours), "us_per_tweet_by_round": ours,
            "us_per_tweet_by_role": {k: round(med(v), 1) for k, v in roles.items()},
            "pipeline_us_per_tweet": med(pipes), "pipeline_by_round": pipes,
            "ratio_by_round": [round(a / b, 2) for a, b in zip(ours, pipes, strict=True)]}


def latency_text(lat: dict[str, Any]) -> str:
    def listed(values: list[float]) -> str:
        return ", ".join(f"{v:g}" for v in values)

    return (f"send -> acknowledged over {lat.get('count', 0):,} tweets in {lat['rounds']} "
            f"runs at {lat['rate']:,.0f}/s: p50 {lat.get('p50', 0):.3f} s, p90 "
            f"{lat.get('p90', 0):.3f} s, **p99 {lat.get('p99', 0):.3f} s** (by run: "
            f"{listed(lat['p99_by_round'])}), max {lat.get('max', 0):.3f} s (highest load "
            f"{lat['load']:.2f}); CPU at that steady rate, median of the runs **"
            f"{lat['us_per_tweet']:.1f} µs/tweet** (by run: {listed(lat['us_per_tweet_by_round'])};"
            " by process, medians: "
            + ", ".join(f"{k} {v}" for k, v in lat["us_per_tweet_by_role"].items() if v)
            + f"); the pipeline (threaded) on the same paced stream: "
            f"{lat['pipeline_us_per_tweet']:.1f} µs/tweet (by run: "
            f"{listed(lat['pipeline_by_round'])}); ingestd's CPU over the pipeline's, run by run: "
            f"{listed(lat['ratio_by_round'])}")


def run_overload(bench: Bench, rate: float, ack_delay: float, seconds: float,
                 encoder: bool = True, prespool: str = "", tag: str = "overload"
                 ) -> dict[str, Any]:
    """Offer ``rate``/s while every 1000-tweet insert is acked ``ack_delay`` s late
    (``prespool``: a prototype contender's daemon; ``tag`` names the run's folders)."""
    tweets = min(bench.payload.tweets, int(rate * seconds))
    name = prespool or ("ingestd" if encoder else "ingestd-1core")
    bh = Blackhole(bench.workdir / f"blackhole-{tag}-{name}", ack_delay=ack_delay)
    workdir = bench.next_dir(f"{name}-{tag}")
    daemon = Daemon(workdir, bench.ingestd_doc(bh.uri, True, encoder and with_encoder(prespool)))
    bh.reset(0)
    bench.server.arm(tweets, rate)
    load = load1()
    daemon.start(bench.env_of(prespool))
    try:
        bench.server.wait_delivery(60)
        daemon.wait_ready(60)
        time.sleep(0.5)
        assert daemon.proc is not None
        procs = tree(daemon.proc.pid)
        bench.server.go()
        sampler = MemSampler(procs, daemon.proc.pid)
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
            "peak_pss_sum_mb": round(sampler.peak_pss / 1024, 1),
            "pss_sum_mb_at_end": round(pss / 1024, 1),
            "hwm_sum_mb": round(sum(hwm.values()) / 1024, 1),
            "hwm_mb": {role: round(kb / 1024, 1) for role, kb in hwm.items()},
            "peak_by_role_mb": sampler.roles_mb()}


def role_peaks(peaks: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{role} {p['pss']} / {p['rss']}" for role, p in peaks.items())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_quiet(bench: Bench, rate: float, seconds: float, keepalive: float) -> dict[str, Any]:
    """A quiet stream: keep-alives only (``rate`` 0) or ``rate`` tweets/s. The daemon with
    product defaults (metrics served too); after a warm-up, CPU (% of one core) and wake-ups
    (voluntary context switches, all threads) per process from /proc over ``seconds``."""
    tweets = int(rate * (seconds + 60)) if rate else 0
    workdir = bench.next_dir(f"ingestd-quiet-{rate:g}")
    doc = bench.ingestd_doc(bench.blackhole.uri, False)
    doc["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
    daemon = Daemon(workdir, doc)
    bench.blackhole.reset(0)
    bench.server.keepalive = keepalive
    bench.server.arm(tweets, rate)
    load = load1()
    daemon.start(bench.daemon_env)
    try:
        bench.server.wait_delivery(60)
        daemon.wait_ready(60)
        bench.server.go()
        time.sleep(5)  # warm-up: the store worker's first batches, the encoder child if any
        assert daemon.proc is not None
        procs = tree(daemon.proc.pid)
        roles = {p.pid: role_of(p) for p in procs}
        before = {p.pid: (cpu_of([p]), wakeups(p.pid)) for p in procs}
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        after = {p.pid: (cpu_of([p]), wakeups(p.pid)) for p in procs}
        daemon.assert_running()
        stored = int(daemon.counters("store").get("stored", 0))
    finally:
        daemon.stop(60)
        bench.server.keepalive = 0.0
    per: dict[str, dict[str, float]] = {}
    for proc in procs:
        cpu0, wake0 = before[proc.pid]
        cpu1, wake1 = after.get(proc.pid, (cpu0, wake0))
        per[roles[proc.pid]] = {"core_pct": round(100 * (cpu1 - cpu0) / elapsed, 2),
                              "wakeups_s": round((wake1 - wake0) / elapsed, 1)}
    return {"rate": rate, "seconds": round(elapsed, 1), "keepalive_s": keepalive, "load": load,
            "stored": stored, "core_pct": round(sum(v["core_pct"] for v in per.values()), 2),
            "wakeups_s": round(sum(v["wakeups_s"] for v in per.values()), 1),
            "per_process": per}


def quiet_line(q: dict[str, Any]) -> str:
    what = "keep-alives only" if not q["rate"] else f"{q['rate']:g} tweets/s"
    per = ", ".join(f"{role} {v['core_pct']:.2f} % / {v['wakeups_s']:.1f}/s"
                    for role, v in q["per_process"].items())
    return (f"{what}: {q['core_pct']:.2f} % of a core, {q['wakeups_s']:.1f} wake-ups/s over "
            f"{q['seconds']} s (load {q['load']:.2f}); per process: {per}")


def run_standin(bench: Bench, tweets: int, prespool: str = "") -> dict[str, Any]:
    """The same daemon against the nx-27017 stand-in: stored == delivered, each exactly once
    (``prespool``: the prototype contender's daemon)."""
    from ingestd.tools.standin import StandIn

    # a fresh database per run: a second run into the first one's would store nothing new
    standin = StandIn(bench.workdir / f"standin-{prespool or 'ingestd'}").start()
    workdir = bench.next_dir(f"{prespool or 'ingestd'}-standin")
    daemon = Daemon(workdir, bench.ingestd_doc(standin.uri, True, with_encoder(prespool)))
    bench.server.arm(tweets)
    daemon.start(bench.env_of(prespool))
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
    # and the store worker counted each as stored (a rerun into old data finds only duplicates)
    ok = (count == tweets == distinct and ids == expected and not wrong
          and int(store.get("stored", 0)) == tweets and not store.get("duplicates"))
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
                  {"runs": [round(r.rate) for r in results]},
                  pss_mb=statistics.median(r.pss_mb for r in results))


def table(medians: dict[tuple[str, str], Result], encodings: list[str]) -> str:
    # The VM's speed moves by up to 2x over hours under every contender alike (bench/LOG.md):
    # CPU per tweet is also given over the pipeline's in the same run, which moves less.
    head = ("| contender | enc | tweets/s | ÷ pipeline | ÷ tweepy | CPU µs/tweet | "
            "CPU ÷ pipeline | peak RSS MB | peak PSS MB | runs (tweets/s) | load |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for enc in encodings:
        bases = [medians.get((PIPELINE, enc)), medians.get((TWEEPY, enc))]
        for name in CONTENDERS:
            r = medians.get((name, enc))
            if r is None:
                continue
            # three decimals: goal 1's edge (1.5×) must not be rounded onto (1.497 read 1.50)
            ratios = [f"{r.rate / b.rate:.3f}×" if b else "—" for b in bases]
            pipeline = bases[0]
            cpu_ratio = (f"{r.us_per_tweet / pipeline.us_per_tweet:.2f}×"
                         if pipeline and pipeline.us_per_tweet else "—")
            runs = ", ".join(f"{x:,}" for x in r.extra.get("runs", []))
            lines.append(f"| {name} | {enc} | {r.rate:,.0f} | {ratios[0]} | {ratios[1]} | "
                         f"{r.us_per_tweet:.1f} | {cpu_ratio} | {r.rss_mb:.1f} | {r.pss_mb:.1f} | "
                         f"{runs} | {r.load:.2f} |")
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
    a("--tweets", type=int, default=60_000,
      help="tweets per run (a prefix of the payload; 0 = all of it)")
    a("--naive-tweets", type=int, default=50_000,
      help="tweets for the naive contender: a prefix of the same payload (it runs at ~2k/s); "
      "0 = all")
    a("--tweepy-tweets", type=int, default=20_000,
      help="tweets for the tweepy contender: a prefix of the same payload (it runs at a third of "
      "the pipeline's rate: fewer tweets keep make bench within 10 minutes); 0 = all")
    a("--repeats", type=int, default=3)
    a("--encodings", default="plain,gzip")
    a("--contenders", default=",".join(DEFAULT_CONTENDERS),
      help=f"comma list of: {', '.join(CONTENDERS)}")
    a("--latency-rate", type=float, default=5000.0)
    a("--latency-seconds", type=float, default=12.0)
    a("--steady-rounds", type=int, default=3,
      help="paced runs of ingestd and the pipeline at --latency-rate (medians reported)")
    a("--overload-rate", type=float, default=20000.0)
    a("--overload-ack-delay", type=float, default=0.5, help="s per insert (1000 tweets)")
    a("--overload-seconds", type=float, default=10.0)
    a("--overload-1core", action="store_true", help="also the overload without the encoder child")
    a("--drain-ack-delay", type=float, default=0.05,
      help="s per insert of the drain run: a MongoDB with a network and a journal between")
    a("--quiet-seconds", type=float, default=30.0, help="measuring window of the quiet stream")
    a("--quiet-rate", type=float, default=50.0, help="tweets/s of the busy-filter quiet stream")
    a("--keepalive", type=float, default=30.0, help="s between keep-alives (the endpoint: 30)")
    a("--standin-tweets", type=int, default=3000)
    a("--split-share", type=float, default=0.6,
      help="prespool-split: the share of tweets the stream worker encodes")
    a("--encode-budget", type=float, default=0.5,
      help="prespool-budget: the most of its time the stream worker spends encoding")
    a("--profile-contenders", default="ingestd",
      help=f"comma list of the daemons to profile (one extra plain run each): {', '.join(DAEMONS)}")
    a("--skip", default="", help="comma list of: latency, overload, standin, quiet, profile")
    a("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    a("--keep", action="store_true", help="keep the temporary work folder")
    a("--cache", type=Path, default=CACHE,
      help="where the generated payload is kept between runs")
    a("--json", type=Path, help="write all figures here")
    a("--results", type=Path, default=BENCH / "LOG.md",
      help="append a dated section with the figures to this file (\"\" = do not)")
    a("--tree", type=Path, help="run the daemon from this source tree (a folder holding "
      "ingestd/), to measure a proposed change against the same baselines")
    args = parser.parse_args(argv)
    encodings = args.encodings.split(",")
    contenders = [c for c in args.contenders.split(",") if c]
    # a prototype's name with its own share (``prespool-split@0.55``) joins the tables' lists
    extra = tuple(c for c in contenders if c.startswith("prespool") and "@" in c
                  and prespool_args(c)[0] in DAEMONS)
    globals().update(CONTENDERS=CONTENDERS + extra, DAEMONS=DAEMONS + extra)
    skip = set(args.skip.split(","))
    for name, module in (("naive", "requests"), ("tweepy", "tweepy")):
        if name in contenders and importlib.util.find_spec(module) is None:
            say(f"note: the {name} contender needs `{module}` (pip install -e '.[bench]'): "
                "skipped")
            contenders.remove(name)
    if "profile" not in skip and not shutil.which("py-spy", path=str(Path(sys.executable).parent)):
        say("note: the profile needs py-spy (pip install py-spy): no profile")
        skip.add("profile")

    begun = time.monotonic()
    info = machine()
    md = Markdown()
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
    speed = probe()  # the machine's state of the hour (bench/probe.py), again at the end
    say(f"speed probe: {describe(speed)}")
    md.add(f"## `make bench` run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
           f"Machine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}, load average "
           f"{info['loadavg']} at the start; probes (`bench/probe.py`): {describe(speed)}. "
           f"{args.tweets:,} "
           f"tweets per run (a prefix of the {payload.tweets:,}-tweet payload, "
           f"{per_tweet:,.0f} B/tweet), medians of {args.repeats}, contenders interleaved. "
           f"Command: `bench/run.py "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`.")
    failures: list[str] = []
    report: dict[str, Any] = {"machine": info, "payload": manifest, "args": {
        k: str(v) for k, v in vars(args).items()}}
    with workspace(args.workdir, args.keep) as workdir:
        say(f"work folder: {workdir} (spool on {filesystem_of(workdir)})")
        bench = Bench(args, payload, workdir)
        try:
            results = run_throughput(bench, contenders, encodings, failures)
            medians = {}
            for name in contenders:
                for enc in encodings:
                    runs = [r for r in results if r.contender == name and r.encoding == enc]
                    if runs:
                        medians[(name, enc)] = median_result(runs)
            head = (f"### Throughput (medians of {args.repeats}; ÷ = this contender's tweets/s "
                    f"over the pipeline's ({PIPELINE}) and tweepy's in this run; load = 1-min "
                    "load average at the start of each run)")
            if results:  # none with --repeats 0 or --contenders "" (e.g. the overload only)
                say("\n" + head)
                say(table(medians, encodings))
                md.add(head + "\n\n" + table(medians, encodings))
            per_role = ingestd_per_role(results)
            if per_role:
                say(per_role)
                md.add(per_role)
            report["runs"] = [asdict(r) | {"rate": r.rate} for r in results]
            report["table"] = table(medians, encodings)

            if "quiet" not in skip:
                say(f"\n### Quiet stream (product defaults, metrics on; {args.quiet_seconds:g} s "
                    "after a 5 s warm-up) ...")
                lines = []
                for rate in (0.0, args.quiet_rate):
                    q = run_quiet(bench, rate, args.quiet_seconds, args.keepalive)
                    report[f"quiet-{rate:g}"] = q
                    lines.append("* " + quiet_line(q))
                    say("   " + quiet_line(q))
                md.add("### Quiet stream (% of one core and voluntary context switches/s of all "
                       f"daemon processes and threads, from /proc; keep-alive every "
                       f"{args.keepalive:g} s)\n\n" + "\n".join(lines))
            if "latency" not in skip:
                say(f"\n### Latency at a steady {args.latency_rate:,.0f} tweets/s (gzip) ...")
                lat = run_latency(bench, args.latency_rate, args.latency_seconds,
                                  args.steady_rounds)
                report["latency"] = lat
                text = latency_text(lat)
                say("   " + text)
                md.add("### Latency\n\n" + text)
            if "overload" not in skip:
                say(f"\n### Overload: {args.overload_rate:,.0f}/s offered, each insert acked "
                    f"{args.overload_ack_delay} s late ...")
                lines = []
                variants = ["ingestd", *(["ingestd-1core"] if args.overload_1core else []),
                            *(c for c in contenders if c.startswith("prespool"))]
                for who in variants:
                    ov = run_overload(bench, args.overload_rate, args.overload_ack_delay,
                                      args.overload_seconds,
                                      who == "ingestd" or who.startswith("prespool"),
                                      who if who.startswith("prespool") else "")
                    report["overload" if who == "ingestd" else f"overload-{who}"] = ov
                    text = (f"{who}: received "
                            f"{ov['received']:,}, stored {ov['stored']:,} "
                            f"({ov['overload']}x overload), spool backlog "
                            f"{ov['spool_backlog_records']} records; all daemon processes: peak "
                            f"**PSS {ov['peak_pss_sum_mb']} MB**, peak RSS "
                            f"{ov['peak_rss_sum_mb']} MB (sampled sums), {ov['hwm_sum_mb']} MB "
                            f"sum of high-water marks {ov['hwm_mb']}; each process's peak "
                            f"PSS / RSS {role_peaks(ov['peak_by_role_mb'])} (load "
                            f"{ov['load']:.2f})")
                    say("   " + text)
                    lines.append("* " + text)
                md.add("### Memory under overload\n\n" + "\n".join(lines))
                say(f"\n### Drain behind a MongoDB acking each insert {args.drain_ack_delay} s "
                    "late ...")
                dr = run_overload(bench, args.overload_rate, args.drain_ack_delay,
                                  args.overload_seconds, tag="drain")
                report["drain"] = dr
                text = (f"ingestd: stored {dr['stored']:,} of {dr['received']:,} received in "
                        f"{dr['seconds']} s (**{dr['stored'] / dr['seconds']:,.0f} tweets/s**; "
                        f"each 1000-tweet insert acked {args.drain_ack_delay} s late); peak PSS "
                        f"{dr['peak_pss_sum_mb']} MB (load {dr['load']:.2f})")
                say("   " + text)
                md.add("### Drain behind a slower MongoDB\n\n" + text)
            if "standin" not in skip:
                say(f"\n### Correctness against the nx-27017 stand-in ({args.standin_tweets:,} "
                    "tweets, speed not a figure) ...")
                for who in ["ingestd", *(c for c in contenders if c.startswith("prespool"))]:
                    st = run_standin(bench, args.standin_tweets,
                                     "" if who == "ingestd" else who)
                    # ingestd's keeps the name and heading it had before the prototypes
                    tag = "" if who == "ingestd" else f", {who}"
                    report["standin" if who == "ingestd" else f"standin-{who}"] = st
                    say(f"   {who}: {st}")
                    md.add(f"### Stand-in check{tag} ({args.standin_tweets:,} tweets)\n\n`{st}`")
                    if not st["ok"]:
                        failures.append(f"stand-in {who}: {st}")
            for name in [] if "profile" in skip else args.profile_contenders.split(","):
                say(f"\n### Profile (py-spy, non-blocking, 250 Hz), {name} plain ...")
                r = bench.run_ingestd(False, args.tweets, profile=True,
                                      encoder=name == "ingestd" or name.startswith("prespool"),
                                      prespool=name if name.startswith("prespool") else "")
                say("    " + r.line() + "  (under the profiler)")
                run_dir = Path(r.extra["workdir"])
                parts = []
                for role in ("stream", "store"):
                    text = summarize_profile(run_dir / f"profile-{role}.txt")
                    report.setdefault("profiles", {})[f"{name}-{role}-plain"] = text
                    say(f"\n#### {name}: {role} worker (plain)\n{text}")
                    parts.append(f"#### {role} worker (plain)\n\n{text}")
                md.add(f"### Where {name}'s CPU goes (py-spy, one extra plain run: "
                       f"{r.rate:,.0f} tweets/s under the profiler)\n\n" + "\n\n".join(parts))
        finally:
            bench.close()
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        report["probes"] = [speed, probe()]
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    minutes = (time.monotonic() - begun) / 60
    say(f"\nload average at the end: {report['loadavg_end']}; {minutes:.1f} minutes")
    say(f"probes at the end: {describe(report['probes'][1])}")
    md.add(f"Load average at the end {report['loadavg_end']}; probes at the end: "
           f"{describe(report['probes'][1])}; the run took {minutes:.1f} minutes."
           + "".join(f"\n\n**CHECK FAILED**: {f}" for f in failures))
    if str(args.results) not in ("", "."):
        md.append_to(args.results)
        say(f"appended to {args.results}")
    for failure in failures:
        say(f"CHECK FAILED: {failure}")
    return 1 if failures else 0


def run_throughput(bench: Bench, contenders: list[str], encodings: list[str],
                   failures: list[str]) -> list[Result]:
    """Every contender, every encoding, ``--repeats`` times, interleaved."""
    args = bench.args
    results: list[Result] = []
    for rep in range(1, args.repeats + 1):
        for enc in encodings:
            for name in contenders:
                gzip = enc == "gzip"
                n = args.tweets
                say(f"  [{rep}/{args.repeats}] {name} {enc} ...")
                if name in DAEMONS:
                    r = bench.run_ingestd(gzip, n,
                                          encoder=name == "ingestd" or name.startswith("prespool"),
                                          prespool=name if name.startswith("prespool") else "")
                else:
                    if name == "naive" and args.naive_tweets:
                        n = min(n, args.naive_tweets)
                    if name == "tweepy" and args.tweepy_tweets:
                        n = min(n, args.tweepy_tweets)
                    r = bench.run_contender(name, gzip, n)
                say("    " + r.line())
                acked = r.extra.get("acked")
                if acked is not None and acked != n:
                    failures.append(f"{name} {enc}: acked {acked} != {n}")
                results.append(r)
    return results


def ingestd_per_role(results: list[Result]) -> str:
    """Each daemon contender's CPU µs per tweet by process (medians over its runs), per encoding."""
    lines = []
    for name, enc in [(n, e) for n in DAEMONS for e in ("plain", "gzip")]:
        runs = [r for r in results if r.contender == name and r.encoding == enc]
        if not runs:
            continue
        roles = sorted({k for r in runs for k in r.extra["cpu_by_role"]})
        per = ", ".join(
            f"{role} {statistics.median(r.extra['cpu_by_role'].get(role, 0.0) for r in runs) * 1e6 / runs[0].tweets:.1f}"  # noqa: E501
            for role in roles)
        lines.append(f"{name} {enc}, CPU µs/tweet by process (medians): {per}")
    return "\n".join(lines)


class Markdown:
    """The run's figures as a dated section of bench/LOG.md (history is kept above)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def append_to(self, path: Path) -> None:
        with path.open("a") as f:
            f.write("\n\n" + "\n\n".join(self.parts) + "\n")


if __name__ == "__main__":
    sys.exit(main())
