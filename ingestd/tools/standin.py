"""An embedded MongoDB stand-in (nx-27017, a wire-protocol server over SQLite) for demos and tests.

It is a stand-in, not a MongoDB: good enough to show the data path and to test against over real
TCP with real pymongo, never a basis for throughput figures (it is ~20x slower than the client).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pymongo
from pymongo.errors import PyMongoError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nx_command() -> str:
    """The nx-27017 executable next to this Python (the venv), or on PATH."""
    local = Path(sys.executable).with_name("nx-27017")
    if local.exists():
        return str(local)
    found = shutil.which("nx-27017")
    if not found:
        raise RuntimeError("nx-27017 is not installed: pip install 'ingestd[standin]'")
    return found


class StandIn:
    """nx-27017 on loopback with its database in ``directory``; restartable on the same port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> StandIn:
        d = self.directory
        with (d / "nx-27017.out").open("ab") as out:
            self.proc = subprocess.Popen(
                # --data-dir: one file per database; the single-file mode mixes databases up.
                [nx_command(), "--data-dir", str(d / "data"), "--host", "127.0.0.1",
                 "-p", str(self.port), "--log-file", str(d / "nx-27017.log"),
                 "--pid-file", str(d / "nx-27017.pid")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=300, connectTimeoutMS=300)
        try:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"nx-27017 exited with {self.proc.returncode}")
                try:
                    client.admin.command("ping")
                    return
                except PyMongoError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nx-27017 not answering on {self.uri}") from None
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL only if it does not exit in time)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
