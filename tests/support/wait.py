"""Await conditions with a deadline instead of sleeping a guessed amount."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str = "condition",
               interval: float = 0.05) -> T:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_progressing(cond: Callable[[], T], progress: Callable[[], object], stall: float,
                     cap: float, what: str, interval: float = 0.2) -> T:
    """``wait_until`` for work of unknown length (e.g. the stand-in draining a backlog, whose
    speed is no property of ingestd): fail once ``progress()`` has not changed for ``stall`` s,
    or at ``cap``."""
    start = last_change = time.monotonic()
    last = progress()
    while True:
        value = cond()
        if value:
            return value
        now, seen = time.monotonic(), progress()
        if seen != last:
            last, last_change = seen, now
        if now - last_change >= stall:
            raise AssertionError(f"no progress for {stall}s (at {last!r}) waiting for {what}")
        if now - start >= cap:
            raise AssertionError(f"timed out after {cap}s waiting for {what}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM ``proc`` if it still runs, wait ``timeout`` s, else SIGKILL; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode
