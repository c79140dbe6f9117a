"""A worker that obeys the supervisor contract and nothing else, for supervisor tests.

    python fake_worker.py --role stream --generation 1 --state-dir STATE

- publishes ``run/<role>.json`` every ``BEAT_INTERVAL`` (state, progress, counters, reloads);
- reads JSON-line commands on stdin and records reloads in its status and in the event log;
  stdin EOF (supervisor gone) makes it stop, as the real workers do;
- SIGTERM: keeps heartbeating for the drain delay, then exits 0.

Every event goes to ``STATE/fake/events.jsonl`` (one O_APPEND write per line, so the file order is
the order in time across both workers). Misbehaviour is chosen per role by environment variables
(``FAKE_STREAM_*`` / ``FAKE_STORE_*``):

    HANG_AFTER=S     stop heartbeating after S seconds, stay alive
    IGNORE_ABRT=1    ignore SIGABRT (so only SIGKILL ends a hung worker)
    CRASH_AFTER=S    exit after S seconds with EXIT_CODE (default 3)
    IGNORE_TERM=1    ignore SIGTERM
    DRAIN=S          on SIGTERM keep working S seconds before exiting
    TIMES=N          misbehave only in the first N processes of this role (default: all)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ingestd.control.runstate import write_status

BEAT_INTERVAL = 0.2


class FakeWorker:
    """One fake worker process."""

    def __init__(self, role: str, generation: int, state_dir: Path) -> None:
        self.role, self.generation, self.state_dir = role, generation, state_dir
        self.fake_dir = state_dir / "fake"
        self.fake_dir.mkdir(parents=True, exist_ok=True)
        self.incarnation = self.count_incarnation()
        self.stop = threading.Event()
        self.reloads: list[dict[str, Any]] = []
        self.progress = 0
        self.started = time.monotonic()

    def option(self, name: str) -> str | None:
        """``FAKE_<ROLE>_<NAME>``, if this process is one of the first ``TIMES`` of its role."""
        times = os.environ.get(f"FAKE_{self.role.upper()}_TIMES")
        if times is not None and self.incarnation > int(times):
            return None
        return os.environ.get(f"FAKE_{self.role.upper()}_{name}")

    def count_incarnation(self) -> int:
        """How many processes of this role have started so far, this one included."""
        with (self.fake_dir / f"{self.role}.pids").open("a+") as fh:
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            fh.seek(0)
            return len(fh.read().split())

    def event(self, name: str, **fields: Any) -> None:
        """Append one event line to the shared event log."""
        line = orjson.dumps({"event": name, "role": self.role, "pid": os.getpid(),
                             "mono": time.monotonic(), **fields}) + b"\n"
        fd = os.open(self.fake_dir / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def publish(self) -> None:
        self.progress += 1
        write_status(self.state_dir, self.role, {
            "state": "connected" if self.role == "stream" else "storing",
            "generation": self.generation,
            "progress": self.progress,
            "counters": {"stored": self.progress * 10} if self.role == "store" else {},
            "reloads": self.reloads,
        })

    def read_control(self) -> None:
        """Control channel: JSON lines on stdin; EOF means the supervisor is gone."""
        for line in read_lines(sys.stdin.fileno()):
            cmd = orjson.loads(line)
            if cmd.get("cmd") == "reload":
                digest = hashlib.sha256(cmd["text"].encode()).hexdigest()
                self.reloads.append({"generation": cmd["generation"], "sha256": digest})
                self.event("reload", generation=cmd["generation"], sha256=digest)
        self.event("control_eof")
        self.stop.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor orders the stop
        if self.option("IGNORE_TERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        if self.option("IGNORE_ABRT"):
            signal.signal(signal.SIGABRT, signal.SIG_IGN)

    def misbehave(self) -> None:
        """Crash or hang when the environment says so."""
        elapsed = time.monotonic() - self.started
        crash_after = self.option("CRASH_AFTER")
        if crash_after is not None and elapsed >= float(crash_after):
            code = int(self.option("EXIT_CODE") or 3)
            self.event("crash", exit_code=code)
            os._exit(code)
        hang_after = self.option("HANG_AFTER")
        if hang_after is not None and elapsed >= float(hang_after):
            self.event("hang")
            while True:  # alive, but never beats again
                time.sleep(3600)

    def run(self) -> int:
        self.install_signals()
        inherited = sorted(k for k in os.environ if k.startswith(("NOTIFY_", "WATCHDOG_")))
        self.event("started", generation=self.generation, incarnation=self.incarnation,
                   notify_env=inherited)
        threading.Thread(target=self.read_control, daemon=True).start()
        while not self.stop.is_set():
            self.misbehave()
            self.publish()
            self.stop.wait(BEAT_INTERVAL)
        self.event("term")
        drain_until = time.monotonic() + float(self.option("DRAIN") or 0)
        while time.monotonic() < drain_until:
            self.publish()
            time.sleep(min(BEAT_INTERVAL, max(drain_until - time.monotonic(), 0)))
        self.event("exit", code=0)
        return 0


def read_lines(fd: int) -> Iterator[bytes]:
    """Lines from ``fd`` with raw reads: a daemon thread blocked inside ``sys.stdin``'s buffered
    reader holds its lock, and interpreter shutdown then aborts ("could not acquire lock")."""
    pending = b""
    while chunk := os.read(fd, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", required=True)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args()
    return FakeWorker(args.role, args.generation, args.state_dir).run()


if __name__ == "__main__":
    raise SystemExit(main())
