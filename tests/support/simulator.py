"""Run ``ingestd simulate`` as a subprocess for tests, and read its ground truth.

with SimProcess(tmp_path, "--rate", "200", script=[[{"deliver": 3}, {"close": True}]]) as sim:
    ...  # sim.url, sim.port, sim.ground_truth().tweet_ids(conn=1)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.creds import CREDS
from tests.support.wait import terminate, wait_until


class GroundTruthLog:
    """Parsed ground-truth events (a snapshot of the file at the time it was read)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    @classmethod
    def read(cls, path: Path) -> GroundTruthLog:
        if not path.exists():
            return cls([])
        lines = path.read_bytes().split(b"\n")
        # A line still being written has no newline yet: ignore the incomplete tail.
        return cls([json.loads(line) for line in lines[:-1] if line])

    def of(self, event: str, conn: int | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["event"] == event and (conn is None or e.get("conn") == conn)
        ]

    def connections(self) -> list[dict[str, Any]]:
        """The ``connect`` events, in order (``status`` says how each was answered)."""
        return self.of("connect")

    def tweet_ids(self, conn: int | None = None) -> list[int]:
        return [e["id"] for e in self.of("tweet", conn)]

    def control(self, kind: str, conn: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of("control", conn) if e["type"] == kind]

    def deleted_ids(self) -> list[int]:
        return [e["id"] for e in self.control("delete")]

    def partial_ids(self, conn: int | None = None) -> list[int]:
        return [e["id"] for e in self.of("partial", conn)]

    def reset_unacked_ids(self, conn: int | None = None) -> set[int]:
        """Tweets delivered to the socket whose bytes the client's kernel had not acknowledged
        when a ``reset`` discarded them: a client that lagged never got them."""
        return {i for e in self.of("reset_unacked", conn) for i in e["ids"]}

    def closes(self, conn: int | None = None) -> list[dict[str, Any]]:
        return self.of("close", conn)


class SimProcess:
    """The simulator on a free loopback port; credentials come from ``tests.support.creds``."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        script: Sequence[Sequence[object]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.gt_path = workdir / "ground_truth.jsonl"
        self.port_file = workdir / "sim.port"
        self.stderr_path = workdir / "sim.err"
        self.args = list(args)
        if script is not None:
            script_path = workdir / "script.json"
            script_path.write_text(json.dumps(script))
            self.args += ["--script", str(script_path)]
        self.env = {**os.environ, **CREDS, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 20.0) -> SimProcess:
        cmd = [
            sys.executable, "-m", "ingestd.simulator.cli",
            "--port", "0",
            "--port-file", str(self.port_file),
            "--ground-truth", str(self.gt_path),
            *self.args,
        ]  # fmt: skip
        # Files, not pipes: a chatty child can never block on a full pipe nobody reads.
        with open(self.workdir / "sim.out", "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=err)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.stderr_path.read_text(errors="replace")
                raise AssertionError(f"simulator exited {self.proc.returncode}: {err}")
            return self.port_file.exists()

        wait_until(ready, timeout, "the simulator's port file")
        self.port = int(self.port_file.read_text())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/1.1/statuses/filter.json"

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_sim/state", timeout=10) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def ground_truth(self) -> GroundTruthLog:
        return GroundTruthLog.read(self.gt_path)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        return 0 if self.proc is None else terminate(self.proc, timeout)

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
