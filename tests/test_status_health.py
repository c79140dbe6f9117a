"""What ``ingestd status`` (and ``/healthz``) says, on real processes: a stream that cannot
deliver is degraded, a stopped daemon's queue is the spool's, and a reader that leaves early
(``ingestd status | head -1``) changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import settings_doc
from tests.test_status_check import _base_env, ingestd, write_settings

# -- a reader that leaves early ----------------------------------------------------------------


def closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with its stdout a pipe whose reading end is already closed: every write
    meets EPIPE (``| head -1`` after the first line, without the race)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "ingestd", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, env=_base_env())
    finally:
        os.close(write_end)


@pytest.mark.parametrize(("args", "code"), [
    (("status",), 3), (("status", "--json"), 3), (("check",), 0), (("coverage",), 0),
])
def test_a_closed_stdout_keeps_the_exit_code_and_prints_no_traceback(
        tmp_path: Path, mongo_uri: str, args: tuple[str, ...], code: int) -> None:
    config = write_settings(tmp_path / "settings.yaml", settings_doc(
        "http://127.0.0.1:9/1.1/statuses/filter.json", mongo_uri, "unused"))
    expected = ingestd(*args, "--config", str(config))
    closed = closed_stdout(*args, "--config", str(config))

    assert expected.returncode == code, expected.stdout + expected.stderr
    assert expected.stdout  # something was printed (and met the closed pipe below)
    assert closed.returncode == code, closed.stderr
    assert "Traceback" not in closed.stderr and "BrokenPipe" not in closed.stderr, closed.stderr
