"""Run-state files: how workers tell the supervisor (and `ingestd status`) what they are doing.

Each worker rewrites ``<state_dir>/run/<role>.json`` at least once a second. The file doubles as the
heartbeat: a worker whose loop hangs stops rewriting it, and the supervisor replaces the worker.
Writes are atomic (temp file + rename) so a reader never sees half a file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

RUN_DIR = "run"


def run_dir(state_dir: Path) -> Path:
    path = state_dir / RUN_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def status_path(state_dir: Path, role: str) -> Path:
    return state_dir / RUN_DIR / f"{role}.json"


def write_status(state_dir: Path, role: str, status: dict[str, Any]) -> None:
    """Atomically publish ``status`` (plus pid, role and wall-clock time) for ``role``."""
    doc = {"role": role, "pid": os.getpid(), "time": time.time(), **status}
    target = status_path(state_dir, role)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(doc))
    os.replace(tmp, target)


def read_status(state_dir: Path, role: str) -> dict[str, Any] | None:
    """The last status ``role`` published, or None if there is none (or it is unreadable)."""
    try:
        data = orjson.loads(status_path(state_dir, role).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
