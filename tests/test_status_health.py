"""What ``ingestd status`` (and ``/healthz``) says, on real processes: a stream that cannot
deliver is degraded, a stopped daemon's queue is the spool's, and a reader that leaves early
(``ingestd status | head -1``) changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingestd.spool.format import read_checkpoint
from tests.support.daemon import Daemon, settings_doc
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until
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


# -- a stopped daemon's queue --------------------------------------------------------------------


def test_status_after_a_drained_stop_shows_what_the_spool_holds(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """The stream worker stops first and writes its last status then; the store worker drains
    after it. With batches held back (30 s) every record read is unacknowledged when the stream
    worker writes that status: its figure is the whole intake, the spool's is nothing."""
    sim = SimProcess(tmp_path / "sim", "--rate", "400", "--keepalive", "0.5",
                     "--seed", "11").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database,
                       writer={"batch_size": 100_000, "flush_interval": 30})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("stream").get("received", 0) >= 100, 60,
                   "100 messages received")
        code, _ = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    (stopped,) = daemon.events("store_worker_stopped")
    text = ingestd("status", "--config", str(daemon.config))
    as_json = ingestd("status", "--config", str(daemon.config), "--json")
    last_word = daemon.status("stream")["spool"]
    checkpoint = read_checkpoint(daemon.state_dir / "spool")
    print("\n" + text.stdout)

    assert code == 0 and stopped["drained"] is True
    assert last_word["records"] > 0, "the stream worker's figure predates the drain"
    # Durability: the last checkpoint covers every record the stream worker appended.
    assert checkpoint is not None and checkpoint.seq == last_word["next_seq"] - 1
    assert text.returncode == 3 and text.stdout.startswith("ingestd: down")
    assert "  queue       0 records / 0.0 MB waiting in the spool" in text.stdout
    assert json.loads(as_json.stdout)["queue"] == {"records": 0, "bytes": 0}
