"""What every soak proof shares: the stand-in, the daemon, process sampling, the summary table.

The proofs run the real ``ingestd run`` (tests/support/daemon.py) against ``ingestd simulate``
(tests/support/simulator.py) and the nx-27017 stand-in, directly or through the fault-injecting
wire proxy (tests/support/mongo_proxy.py), and reconcile MongoDB with the simulator's ground truth.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import stored_ids
from tests.support.simulator import GroundTruthLog, SimProcess
from tests.support.wait import wait_until

__all__ = ["Daemon", "SimProcess", "settings_doc", "stored_ids", "wait_until"]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def say(text: str) -> None:
    """A progress line, stamped and flushed at once (the runs are followed with tail -f)."""
    print(f"{datetime.now(UTC):%H:%M:%S} {text}", flush=True)


def soak_doc(sim: SimProcess, uri: str, database: str, **sections: Any) -> dict[str, Any]:
    """Test settings with quick retries; product-default batches (as tests/test_durability)."""
    doc = settings_doc(sim.url, uri, database, **sections)
    doc["writer"].update(batch_size=1000, retry_start=0.2, retry_cap=2.0)
    doc["mongo"].update(timeout_ms=5000)
    # The product's heartbeat timeout, not the tests' 10 s: on this shared machine (load 20 on
    # 2 vCPU) a worker was seen to need > 10 s to start, and was killed as hung.
    doc["control"]["heartbeat_timeout"] = 30
    return doc


# ---------------------------------------------------------------- processes and their figures


def daemon_processes(daemon: Daemon) -> dict[str, psutil.Process]:
    """Supervisor, workers and the encoder child (when there is one), by role."""
    assert daemon.proc is not None
    out: dict[str, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(daemon.proc.pid)
        out["supervisor"] = root
        workers = {p: r for r, p in daemon.status("supervisor").get("workers", {}).items()}
        for child in root.children(recursive=True):
            role = workers.get(child.pid)
            if role is None and "encoder_pool" in " ".join(child.cmdline()):
                role = "encoder"
            if role is not None:
                out[role] = child
    return out


def encoder_child(daemon: Daemon) -> psutil.Process | None:
    return daemon_processes(daemon).get("encoder")


def pss_bytes(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (0 if unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class ProcSample:
    at: float  # seconds since the run started
    pid: int
    fds: int
    rss: int
    pss: int
    cpu_s: float  # user + system seconds so far


def sample_process(proc: psutil.Process, at: float) -> ProcSample | None:
    try:
        with proc.oneshot():
            cpu = proc.cpu_times()
            return ProcSample(at, proc.pid, proc.num_fds(), proc.memory_info().rss,
                              pss_bytes(proc.pid), cpu.user + cpu.system)
    except psutil.Error:
        return None


@dataclass
class Trend:
    """Per-role samples over a run; ``flat`` compares the 2nd-quarter and last-quarter medians."""

    samples: dict[str, list[ProcSample]] = field(default_factory=dict)

    def add(self, daemon: Daemon, at: float) -> dict[str, ProcSample]:
        got = {}
        for role, proc in daemon_processes(daemon).items():
            s = sample_process(proc, at)
            if s is not None:
                self.samples.setdefault(role, []).append(s)
                got[role] = s
        return got

    def cpu_percent(self, role: str) -> list[float]:
        """CPU % between consecutive samples of the same process."""
        out = []
        for a, b in zip(self.samples.get(role, []), self.samples.get(role, [])[1:], strict=False):
            if a.pid == b.pid and b.at > a.at:
                out.append(100.0 * (b.cpu_s - a.cpu_s) / (b.at - a.at))
        return out

    def quarters(self, values: list[float]) -> tuple[float, float]:
        """Median of the 2nd quarter and of the last quarter (the 1st is warm-up)."""
        n = len(values)
        if n < 4:
            return (values[0], values[-1]) if values else (0.0, 0.0)
        q = n // 4
        return statistics.median(values[q:2 * q]), statistics.median(values[-q:])

    def series(self, role: str, what: str) -> list[float]:
        if what == "cpu":
            return self.cpu_percent(role)
        return [float(getattr(s, what)) for s in self.samples.get(role, [])]

    def verdicts(self) -> list[tuple[str, str, float, float, bool]]:
        """(role, metric, q2 median, q4 median, flat?) for fds, RSS, PSS and CPU.

        Flat means: fds q4 <= q2 + 2; RSS and PSS q4 <= q2 * 1.10 + 4 MiB; CPU q4 <= q2 * 1.5 + 2
        (percentage points: the machine is shared, CPU is noisy).
        """
        out = []
        for role in sorted(self.samples):
            for what in ("fds", "rss", "pss", "cpu"):
                a, b = self.quarters(self.series(role, what))
                if what == "fds":
                    ok = b <= a + 2
                elif what == "cpu":
                    ok = b <= a * 1.5 + 2
                else:
                    ok = b <= a * 1.10 + (4 << 20)
                out.append((role, what, a, b, ok))
        return out

    def lines(self) -> list[str]:
        rows = []
        for role, what, a, b, ok in self.verdicts():
            unit = 2**20 if what in ("rss", "pss") else 1
            suffix = " MiB" if unit > 1 else (" %" if what == "cpu" else "")
            rows.append(f"  {role:10s} {what:4s} q2-median {a / unit:8.1f}{suffix:4s} "
                        f"q4-median {b / unit:8.1f}{suffix:4s} {'flat' if ok else 'GROWING'}")
        return rows

    def summary(self, what: str) -> str:
        """One cell for the table: 'q2 → q4' summed over roles."""
        total_a = total_b = 0.0
        for role in self.samples:
            a, b = self.quarters(self.series(role, what))
            total_a, total_b = total_a + a, total_b + b
        if what in ("rss", "pss"):
            return f"{total_a / 2**20:.0f}→{total_b / 2**20:.0f} MiB"
        return f"{total_a:.0f}→{total_b:.0f}"


# ---------------------------------------------------------------- reconciliation and the table


def tweets_delivered(truth: GroundTruthLog) -> set[int]:
    return set(truth.tweet_ids())


def deadletter_count(daemon: Daemon) -> int:
    folder = daemon.state_dir / "deadletter"
    files = folder.glob("*.jsonl") if folder.exists() else []
    return sum(len(p.read_bytes().splitlines()) for p in files)


def reconcile_base(summary: Summary, daemon: Daemon, sim: SimProcess, uri: str, db: str,
                   store: dict[str, Any], stream: dict[str, Any]
                   ) -> tuple[set[int], list[int], set[int]]:
    """The figures every proof reconciles the same way: (delivered, stored ids, missing), with
    delivered / stored / duplicates / dead-lettered / dropped / deleted filled into ``summary``."""
    truth = sim.ground_truth()
    delivered, deleted = set(truth.tweet_ids()), set(truth.deleted_ids())
    ids = stored_ids(uri, db)
    summary.delivered, summary.stored = len(delivered), len(set(ids))
    summary.duplicates = int(store.get("duplicates", 0))
    summary.deadlettered = deadletter_count(daemon)
    summary.dropped = sum(int(v) for v in dict(stream.get("dropped", {})).values())
    summary.extra["deleted by compliance"] = len(delivered & deleted)
    return delivered, ids, (delivered - deleted) - set(ids)


@dataclass
class Summary:
    """The row every proof prints at the end; ``problems`` non-empty means the proof failed."""

    proof: str
    delivered: int = 0
    stored: int = 0
    duplicates: int = 0
    deadlettered: int = 0
    dropped: int = 0
    lost: int = 0
    restarts: str = "-"
    peak_spool: str = "-"
    rss: str = "-"
    fds: str = "-"
    extra: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def print(self) -> None:
        took = time.time() - self.started
        head = ("proof", "delivered", "stored", "duplicates", "dead-lettered", "dropped", "lost",
                "restarts", "peak spool", "RSS trend", "fd trend")
        row = (self.proof, self.delivered, self.stored, self.duplicates, self.deadlettered,
               self.dropped, self.lost, self.restarts, self.peak_spool, self.rss, self.fds)
        print(f"\n==== SOAK SUMMARY {self.proof} {datetime.now(UTC):%Y-%m-%d %H:%M UTC} "
              f"({took / 60:.1f} min, host {os.uname().nodename}, {os.cpu_count()} vCPU) ====")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        print("| " + " | ".join(str(v) for v in row) + " |")
        for k, v in self.extra.items():
            print(f"  {k}: {v}")
        print(f"  verdict: {'PASS' if not self.problems else 'FAIL'}")
        for p in self.problems:
            print(f"  PROBLEM: {p}")
        print(flush=True)


def drained(daemon: Daemon, since: float) -> bool:
    """The stream ended (or idles) and the store worker acked everything: statuses newer than
    ``since``, spool empty, nothing pending."""
    daemon.assert_running()
    stream, store = daemon.status("stream"), daemon.status("store")
    fresh = stream.get("time", 0) > since + 1 and store.get("time", 0) > since + 1
    idle = store.get("counters", {}).get("pending") == 0
    return bool(fresh and idle and stream.get("spool", {}).get("records") == 0)


@contextlib.contextmanager
def cleanup(daemon: Daemon, sim: SimProcess) -> Iterator[None]:
    try:
        yield
    finally:
        daemon.kill()
        sim.stop()


def check_no_records_missing(summary: Summary, daemon: Daemon) -> None:
    """No proof but the corruption one damages the spool: a record number skipped there is a
    record lost, or a false count (the daemon logs each ``spool_records_missing``)."""
    lines = [line for line in daemon.logs().splitlines() if "spool_records_missing" in line]
    summary.check(not lines, f"{len(lines)} spool_records_missing lines, no damage was made: "
                  f"{lines[:1]}")
