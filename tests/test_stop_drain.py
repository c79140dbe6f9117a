"""A stop during a long drain, MongoDB not answering (``systemctl stop`` with a backlog).

The store worker gives up at its drain deadline and leaves the backlog in the spool; it must then
*exit* within the stop budget, so the supervisor exits 0 and systemd records a clean stop, and the
next start stores what was left: every delivered tweet stored once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import MongoStandIn, stored_ids
from tests.support.simulator import SimProcess
from tests.support.wait import wait_progressing, wait_until

DB = "stop_drain"
STOP_TIMEOUT = 4.0


def test_a_stop_while_mongodb_does_not_answer_exits_0_and_the_next_start_stores_the_rest(
        tmp_path: Path, mongo_standin: MongoStandIn) -> None:
    """The store worker gave up at its deadline (``store_gave_up``, ``drained: false``) but its
    process did not end: the interpreter's exit joined the helper thread still waiting on the
    insert MongoDB never answered (up to ``mongo.timeout_ms``), so the supervisor SIGKILLed it
    at its own deadline and exited 1: under systemd, ``Failed with result 'exit-code'`` and the
    unit ``failed`` after a plain ``systemctl stop``."""
    sim = SimProcess(tmp_path / "sim", "--rate", "200", "--max-tweets", "3000",
                     "--control-every", "10", "--keepalive", "1", "--seed", "11").start()
    doc = settings_doc(sim.url, mongo_standin.uri, DB,
                       control={"stop_timeout": STOP_TIMEOUT, "heartbeat_timeout": 10})
    # An insert that gets no reply waits far longer than the stop budget (as with the default 30 s).
    doc["mongo"]["timeout_ms"] = 60000
    daemon = Daemon(tmp_path / "daemon", doc).start()
    server = mongo_standin.proc
    assert server is not None
    paused = False
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("stored", 0) >= 50, 60, "first tweets")
        os.kill(server.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        paused = True
        received = daemon.counters("stream").get("received", 0)
        wait_until(lambda: daemon.counters("stream").get("received", 0) >= received + 200, 30,
                   "a backlog while MongoDB does not answer")
        code, took = daemon.stop(timeout=30)
        os.kill(server.pid, signal.SIGCONT)
        paused = False
        stopped = daemon.events("stopped")[-1]
        assert daemon.events("store_worker_stopped")[-1]["drained"] is False, daemon.tail()
        assert stopped["killed"] == [], f"a worker was killed at the deadline:\n{daemon.tail()}"
        assert code == 0, daemon.tail()
        assert took < STOP_TIMEOUT + 2, f"the stop took {took:.1f}s"
        # The next start stores the backlog the stop left in the spool.
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
        if paused:
            os.kill(server.pid, signal.SIGCONT)
        daemon.kill()
        sim.stop()
    ids = stored_ids(mongo_standin.uri, DB)
    assert len(ids) == len(set(ids)), "a tweet was stored twice"
