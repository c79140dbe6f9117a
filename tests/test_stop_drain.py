"""A stop during a long drain, MongoDB not answering (``systemctl stop`` with a backlog).

The store worker gives up at its drain deadline and leaves the backlog in the spool; it must then
*exit* within the stop budget, so the supervisor exits 0 and systemd records a clean stop, and the
next start stores what was left: every delivered tweet stored once. A reload asked for meanwhile
is answered at once (refused: the daemon is stopping).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import MongoStandIn, stored_ids
from tests.support.simulator import SimProcess
from tests.support.wait import wait_progressing, wait_until

DB = "stop_drain"
STOP_TIMEOUT = 4.0


@contextmanager
def backlog_with_mongodb_paused(tmp_path: Path, standin: MongoStandIn,
                                ) -> Iterator[tuple[Daemon, SimProcess]]:
    """A running daemon with records waiting in its spool while the stand-in is SIGSTOPped
    (it accepts connections and answers nothing); the stand-in is resumed on leaving."""
    sim = SimProcess(tmp_path / "sim", "--rate", "200", "--max-tweets", "3000",
                     "--control-every", "10", "--keepalive", "1", "--seed", "11").start()
    doc = settings_doc(sim.url, standin.uri, DB,
                       control={"stop_timeout": STOP_TIMEOUT, "heartbeat_timeout": 10})
    # An insert that gets no reply waits far longer than the stop budget (as with the default 30 s).
    doc["mongo"]["timeout_ms"] = 60000
    daemon = Daemon(tmp_path / "daemon", doc).start()
    server = standin.proc
    assert server is not None
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 50, 60, "first tweets")
        os.kill(server.pid, signal.SIGSTOP)
        try:
            received = daemon.counters("stream").get("received", 0)
            wait_until(lambda: daemon.counters("stream").get("received", 0) >= received + 200,
                       30, "a backlog while MongoDB does not answer")
            yield daemon, sim
        finally:
            os.kill(server.pid, signal.SIGCONT)
    finally:
        daemon.kill()
        sim.stop()


def test_a_stop_while_mongodb_does_not_answer_exits_0_and_the_next_start_stores_the_rest(
        tmp_path: Path, mongo_standin: MongoStandIn) -> None:
    """The store worker gave up at its deadline (``store_gave_up``, ``drained: false``) but its
    process did not end: the interpreter's exit joined the helper thread still waiting on the
    insert MongoDB never answered (up to ``mongo.timeout_ms``), so the supervisor SIGKILLed it
    at its own deadline and exited 1: under systemd, ``Failed with result 'exit-code'`` and the
    unit ``failed`` after a plain ``systemctl stop``."""
    with backlog_with_mongodb_paused(tmp_path, mongo_standin) as (daemon, sim):
        code, took = daemon.stop(timeout=30)
    stopped = daemon.events("stopped")[-1]
    assert daemon.events("store_worker_stopped")[-1]["drained"] is False, daemon.tail()
    assert stopped["killed"] == [], f"a worker was killed at the deadline:\n{daemon.tail()}"
    assert code == 0, daemon.tail()
    assert took < STOP_TIMEOUT + 2, f"the stop took {took:.1f}s"
    # The next start stores the backlog the stop left in the spool (the simulator is gone: its
    # ground truth holds every tweet it delivered; the stream worker's reconnects just fail).
    try:
        daemon.start()
        daemon.wait_ready()
        truth = sim.ground_truth
        wait_progressing(
            lambda: set(stored_ids(mongo_standin.uri, DB)) == (
                set(truth().tweet_ids()) - set(truth().deleted_ids())),
            lambda: len(stored_ids(mongo_standin.uri, DB)), stall=30, cap=300,
            what="every delivered tweet stored after the restart")
        code, _ = daemon.stop()
        assert code == 0, daemon.tail()
    finally:
        daemon.kill()
    ids = stored_ids(mongo_standin.uri, DB)
    assert len(ids) == len(set(ids)), "a tweet was stored twice"


def test_a_reload_during_the_stops_drain_is_refused_at_once(
        tmp_path: Path, mongo_standin: MongoStandIn) -> None:
    """`ingestd reload` from a root shell while the daemon drains (systemd itself refuses to
    reload a stopping unit): the supervisor dropped the SIGHUP, so the command waited until the
    daemon had exited and then said "the daemon gave no verdict within 30s"."""
    with backlog_with_mongodb_paused(tmp_path, mongo_standin) as (daemon, _):
        daemon.send(signal.SIGTERM)
        daemon.wait_log("store_draining")
        started = time.monotonic()
        reload = subprocess.run(
            [sys.executable, "-m", "ingestd", "reload", "--config", str(daemon.config)],
            capture_output=True, text=True, env=daemon.env(), timeout=60, check=False)
        took = time.monotonic() - started
        assert daemon.proc is not None
        alive = daemon.proc.poll() is None
        daemon.proc.wait(30)
    assert reload.returncode == 78, reload.stdout + reload.stderr
    assert "the daemon is stopping" in reload.stderr, reload.stderr
    assert alive and took < STOP_TIMEOUT, f"answered after {took:.1f}s (alive: {alive})"
    assert daemon.events("reload_ignored", reason="stopping"), daemon.tail()
