"""Hostile or broken answers from the upstream, on the real daemon: each gets a clear, counted
outcome (a logged, backed-off reconnect), never a crash of the stream worker or a hang.

Each test reproduces a fault that crashed or hung the stream worker before its fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon, finish
from tests.support.wait import wait_until
from tests.test_resilience import QUIET_AFTER_3, caught_up, run_pair

CRASHES = ("uncaught_exception", "uncaught_thread_exception", "worker_exited")


def crashes(daemon: Daemon) -> list[dict[str, Any]]:
    """Uncaught exceptions and unrequested worker exits (the stop's own exits are info)."""
    return [e for e in daemon.log_events()
            if e.get("event") in CRASHES and e.get("level") != "info"]


def ended(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == "stream_ended"]


def test_a_401_whose_date_header_overflows_is_diagnosed_without_a_crash(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """email.utils raises OverflowError for a zone offset or a field too large for a C int:
    the 401's diagnosis crashed the stream worker, on every attempt (a crash loop)."""
    dates = ["Mon, 01 Jan 2024 00:00:00 +99999999999999",
             "Mon, 99999999999999999999 Jan 2024 00:00:00 GMT"]
    script = [[{"status": 401, "body": "Unauthorized", "headers": {"Date": d}}] for d in dates]
    sim, daemon = run_pair(tmp_path, mongo_uri, mongo_database, [*script, QUIET_AFTER_3],
                           "--control-every", "0")
    try:
        daemon.wait_ready()
        wait_until(lambda: caught_up(daemon, sim, 3), 60, "tweets after the two 401s")
    finally:
        finish(daemon, sim)
    assert crashes(daemon) == []
    reasons = [e["reason"] for e in ended(daemon)[:2]]
    assert all("HTTP 401" in r and "no Date to compare" in r for r in reasons), reasons


def test_a_rate_limit_answer_with_a_huge_remaining_count_backs_off_without_a_crash(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """x-rate-limit-remaining of 5000 digits: int() refuses over 4300 digits (ValueError), which
    crashed the stream worker while it picked the wait, on every attempt."""
    headers = {"x-rate-limit-remaining": "0" * 5000, "x-rate-limit-reset": "1"}
    script = [[{"status": 429, "body": "Too Many Requests", "headers": headers}], QUIET_AFTER_3]
    sim, daemon = run_pair(tmp_path, mongo_uri, mongo_database, script, "--control-every", "0")
    try:
        daemon.wait_ready()
        wait_until(lambda: caught_up(daemon, sim, 3), 60, "tweets after the 429")
    finally:
        finish(daemon, sim)
    assert crashes(daemon) == []
    (first, *_) = ended(daemon)
    assert first["ending"] == "rate_limited" and "HTTP 429" in first["reason"]
