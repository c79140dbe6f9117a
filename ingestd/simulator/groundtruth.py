"""The simulator's record of what it did: one JSON line per event, written as it happens.

Tests and benchmarks compare it with what the daemon stored. A ``tweet`` line is written only
after the tweet's last byte went to the socket, so the file is exactly the set of ids a perfect
client could have received. No secret ever goes in here (credentials are never passed in).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson


class GroundTruth:
    """Thread-safe JSONL event log; each call is one unbuffered ``write`` of whole lines."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "ab", buffering=0) if path else None  # noqa: SIM115

    def event(self, event: str, conn: int | None = None, **fields: Any) -> None:
        record: dict[str, Any] = {"t": round(time.time(), 6), "event": event}
        if conn is not None:
            record["conn"] = conn
        record.update(fields)
        self._write(orjson.dumps(record) + b"\n")

    def tweets(self, conn: int, ids: Iterable[int]) -> None:
        """One ``tweet`` line per id, written together (the ``--rate 0`` path)."""
        line = b'{"t":%.6f,"conn":%d,"event":"tweet","id":%%d}\n' % (time.time(), conn)
        lines = b"".join([line % i for i in ids])
        if lines:
            self._write(lines)

    def _write(self, data: bytes) -> None:
        if self._file is None:
            return
        with self._lock:
            if not self._file.closed:
                self._file.write(data)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
