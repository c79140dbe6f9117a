"""The daemon run's counts: across worker restarts, across a daemon restart that replays a spool
backlog, and the log lines and errors that go with them (real daemon, simulator, Mongo stand-in).

README, "Health and metrics": received + replayed = stored + duplicates + dead-lettered + control +
skipped + dropped + in flight, and the counters never fall while the supervisor runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from ingestd.control.status import collect, render
from tests.support.daemon import Daemon, finish, metrics_addr, settings_doc
from tests.support.mongo import stored_ids, write_target
from tests.support.mongo_proxy import INSERTS, MongoProxy
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until
from tests.test_metrics import OUTCOMES, Samples, scrape, total, value

SIM_ARGS = ("--rate", "200", "--keepalive", "1", "--control-every", "0")


def delivered(sim: SimProcess) -> int:
    truth = sim.ground_truth()
    return len(truth.of("tweet")) + len(truth.of("control")) + len(truth.of("bad_line"))


def reconciliation(daemon: Daemon) -> dict[str, Any]:
    """``ingestd status``'s reconciliation (its ``reconcile`` line)."""
    return dict(collect(daemon.state_dir)["reconciliation"])


def wait_reconciled(daemon: Daemon, received: int, replayed: int = 0) -> dict[str, Any]:
    """Until the run's counts say every message was received and resolved (nothing in flight)
    and the store worker's checkpoint covers all it read (a kill then loses no count)."""
    def done() -> dict[str, Any] | None:
        daemon.assert_running()
        r = reconciliation(daemon)
        store = daemon.status("store")
        checkpointed = (store.get("spool", {}).get("acked_seq")
                        == store.get("counters", {}).get("read_seq"))
        ok = (r["received"] == received and r["replayed"] == replayed and r["in_flight"] == 0
              and r["difference"] == 0 and checkpointed)
        return r if ok else None
    result = wait_until(done, 60, f"{received} received (+{replayed} replayed) and resolved")
    assert result is not None
    return result


def replace(daemon: Daemon, role: str) -> int:
    """SIGKILL ``role``'s worker; the replacement's pid once it has published its status."""
    old = daemon.worker_pid(role)
    os.kill(old, signal.SIGKILL)
    return wait_until(lambda: (pid if (pid := daemon.status(role).get("pid")) not in (None, old)
                               else None), 30, f"a new {role} worker")


def identity(m: Samples) -> float:
    """received + replayed - (the outcomes + in flight): 0 when the counters reconcile."""
    return (value(m, "ingestd_messages_received_total") + value(m, "ingestd_spool_replayed_total")
            - sum(total(m, name) for name in OUTCOMES) - value(m, "ingestd_messages_in_flight"))


def test_counters_keep_counting_across_worker_restarts(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    # One connection per stream worker: 120 messages, then 80 for the replacement.
    sim = SimProcess(tmp_path / "sim", *SIM_ARGS, script=[
        [{"deliver": 120}, {"keepalive_only": 600}],
        [{"deliver": 80}, {"keepalive_only": 600}]]).start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        addr = metrics_addr(daemon)
        wait_reconciled(daemon, 120)
        before = scrape(addr)
        replace(daemon, "stream")
        # the replacement's first report: it has counted (next to) nothing of its own yet
        after_stream = scrape(addr)
        after_stream_status = collect(daemon.state_dir)
        wait_reconciled(daemon, 200)
        settled = scrape(addr)
        replace(daemon, "store")
        after_store = scrape(addr)
        after_store_status = collect(daemon.state_dir)
        final = wait_reconciled(daemon, 200)
        m = scrape(addr)
        shown = render(collect(daemon.state_dir))
    finally:
        finish(daemon, sim)

    for name in ("ingestd_messages_received_total", "ingestd_tweets_stored_total",
                 "ingestd_records_read_total", "ingestd_stream_connection_attempts_total"):
        assert value(after_stream, name) >= value(before, name), name
        assert value(after_store, name) >= value(settled, name), name
    # the first 120 and what the replacement's connection delivered by its first report
    assert value(after_stream, "ingestd_messages_received_total") >= 120
    assert after_stream_status["counters"]["stream"]["received"] >= 120
    assert value(after_store, "ingestd_tweets_stored_total") == 200
    assert after_store_status["counters"]["store"]["stored"] == 200
    assert value(after_store, "ingestd_insert_batch_size_count") >= value(
        settled, "ingestd_insert_batch_size_count")
    # the whole run, counted once: as delivered, and reconciling
    assert value(m, "ingestd_messages_received_total") == delivered(sim) == 200
    assert value(m, "ingestd_tweets_stored_total") == 200
    assert value(m, "ingestd_tweets_duplicate_total") == 0
    assert value(m, "ingestd_records_read_total") == 200
    assert identity(m) == 0 and final["difference"] == 0
    assert value(m, "ingestd_worker_restarts_total", role="stream") == 1
    assert value(m, "ingestd_worker_restarts_total", role="store") == 1
    assert "stored 200 " in shown
    assert "reconcile   received 200 + replayed 0 = resolved 200 + in flight 0  (holds)" in shown


def test_a_stream_worker_killed_mid_stream_leaves_no_count_behind(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """SIGKILL the stream worker while tweets pour in: the messages it spooled after its last
    report (up to 1 s of them) are read and stored all the same, and the supervisor counts them
    as received from the spool, so the run's reconciliation still holds, with no difference."""
    sim = SimProcess(tmp_path / "sim", "--rate", "1000", "--keepalive", "1", "--control-every",
                     "0", script=[[{"deliver": 4000}, {"keepalive_only": 600}],
                                  [{"deliver": 500}, {"keepalive_only": 600}]]).start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database)
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.status("stream").get("counters", {}).get("received", 0) >= 1000,
                   30, "1000 received")
        replace(daemon, "stream")

        def settled() -> dict[str, Any] | None:
            daemon.assert_running()
            # The stream's status first: the reconciliation read after it holds at least its
            # count (read before, it can lag the store worker's by a report: CI fresh-126).
            stream = daemon.status("stream")
            sent = delivered(sim)
            r = reconciliation(daemon)
            # the replacement's connection delivered its 500 and everything spooled was read
            done = (sent >= 1000 + 500 and stream.get("counters", {}).get("received") == 500
                    and r["in_flight"] == 0)
            return r if done else None
        r = wait_until(settled, 60, "the replacement's 500 received and everything read")
        assert r is not None
        stored = len(stored_ids(mongo_uri, mongo_database))
    finally:
        finish(daemon, sim)
    assert r["difference"] == 0, r
    # what the first worker spooled: all of it counted as received, none of it lost
    assert r["received"] == r["resolved"] == stored
    assert 1500 <= r["received"] <= delivered(sim)


def kill_store_and_look(daemon: Daemon) -> list[dict[str, Any]]:
    """SIGKILL the store worker; the reconciliation once its counts are carried, if its
    successor (1 s of back-off or more) had not reported by then; then wait for that report."""
    old = daemon.worker_pid("store")
    killed_at = time.time()
    os.kill(old, signal.SIGKILL)
    # and a stream report after it: one older than the store's would show records read that
    # were not received yet (the two files are written a second apart at most)
    wait_until(lambda: old in daemon.status("supervisor").get("carried", {}).get(
        "store", {}).get("pids", []) and daemon.status("stream").get("time", 0) > killed_at,
        30, "the dead worker's counts carried, and the stream's next report")
    r = reconciliation(daemon)
    looked = [r] if daemon.status("store").get("pid") == old else []
    wait_until(lambda: daemon.status("store").get("pid") not in (None, old), 30,
               "a new store worker")
    return looked


def test_store_workers_killed_mid_stream_leave_no_count_behind(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """SIGKILL the store worker three times while tweets pour in. Each successor reads again
    from the checkpoint on disk, behind or ahead of the dead worker's last report; the
    supervisor carries the dead worker's counts at that checkpoint, so every record is counted
    once: no difference, and stored + duplicates = received (before: off by -111 to -200 in 3
    of 5 runs, the records between the checkpoint and the report counted twice)."""
    sim = SimProcess(tmp_path / "sim", "--rate", "1000", "--keepalive", "1", "--control-every",
                     "0", script=[[{"deliver": 9000}, {"keepalive_only": 600}]]).start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database)
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        gaps = []  # the reconciliation while a dead worker's file is still the store's
        for kill in range(3):
            # a successor that has stored, checkpointed and reported some of its own first
            wait_until(lambda: daemon.counters("store").get("stored", 0) >= 300
                       and daemon.status("store").get("spool", {}).get("acked_seq", 0) > 0,
                       60, f"tweets stored before kill {kill + 1}")
            gaps += kill_store_and_look(daemon)

        def settled() -> dict[str, Any] | None:
            daemon.assert_running()
            r = reconciliation(daemon)
            return r if delivered(sim) >= 9000 and r["in_flight"] == 0 \
                and r["received"] >= 9000 else None
        r = wait_until(settled, 90, "all 9000 received and read")
        assert r is not None
        totals = collect(daemon.state_dir)["counters"]["store"]
        stored = len(stored_ids(mongo_uri, mongo_database))
    finally:
        finish(daemon, sim)
    assert r["difference"] == 0, r
    # before its successor reports, the records after the checkpoint are in flight, not lost
    # (before the fix: +58, +79, +1, "counts a worker crash lost")
    assert gaps and all(g["difference"] == 0 for g in gaps), gaps
    assert r["received"] == r["resolved"] == 9000 == stored
    # each record resolved once: a successor's re-insert of what its predecessor stored after
    # the checkpoint counts as a duplicate (a replay), and that predecessor's count of it not
    assert totals["stored"] + totals["duplicates"] == 9000 == totals["records_read"], totals
    killed = {e["pid"] for e in daemon.events("worker_exited", role="store", signal="SIGKILL")}
    carried = daemon.events("worker_counts_settled")
    assert len(killed) == 3 and {e["pid"] for e in carried} <= killed, carried
    assert not daemon.events("worker_counts_unsettled")


def test_a_replayed_backlog_reconciles_and_a_stop_while_mongo_hangs_names_the_error(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = SimProcess(tmp_path / "sim", *SIM_ARGS, script=[
        [{"deliver": 50}, {"keepalive_only": 600}],
        [{"deliver": 30}, {"keepalive_only": 600}]]).start()
    with MongoProxy(write_target(mongo_uri)) as proxy:
        # Run 1: MongoDB takes the first insert and never answers (paused): the 50 messages stay
        # in the spool, and the stop gives up draining after its budget.
        proxy.delay_writes(600.0, count=1, commands=INSERTS)
        doc = settings_doc(sim.url, proxy.uri, mongo_database,
                           metrics={"listen": "127.0.0.1:0"})
        doc["mongo"]["timeout_ms"] = 120_000
        doc["control"]["stop_timeout"] = 2
        first = Daemon(tmp_path / "daemon", doc).start()
        try:
            first.wait_ready()
            wait_until(lambda: first.counters("stream").get("received") == 50
                       and first.counters("store").get("pending", 0) > 0, 60,
                       "50 messages received, a batch waiting for MongoDB")
            first.stop()  # the store worker, stuck closing its client, may be killed
        finally:
            first.kill()
        (gave_up,) = first.events("store_gave_up")
        stopped = collect(first.state_dir)["workers"]["store"]

        # Run 2: MongoDB answers again; the new connection delivers 30 more.
        proxy.pass_through()
        doc = {**doc, "mongo": {**doc["mongo"], "timeout_ms": 10000},
               "control": {**doc["control"], "stop_timeout": 10}}
        second = Daemon(tmp_path / "daemon", doc).start()
        try:
            second.wait_ready()
            addr = metrics_addr(second)
            wait_reconciled(second, 30, replayed=50)
            m = scrape(addr)
            view = collect(second.state_dir)
            shown = render(view)
        finally:
            finish(second, sim)

    assert gave_up["last_error"].startswith("insert: no reply from MongoDB after "), gave_up
    assert stopped["state"].startswith("stopped: mongo unavailable"), stopped
    assert stopped["last_error"] == gave_up["last_error"]
    assert value(m, "ingestd_messages_received_total") == 30
    assert value(m, "ingestd_spool_replayed_total") == 50
    assert value(m, "ingestd_records_read_total") == 80
    assert (value(m, "ingestd_tweets_stored_total") + value(m, "ingestd_tweets_duplicate_total")
            == 80 == delivered(sim))
    assert identity(m) == 0
    store = view["counters"]["store"]
    assert view["counters"]["stream"]["received"] + store["replayed"] == store["records_read"]
    assert "replayed 50" in shown
    assert "reconcile   received 30 + replayed 50 = resolved 80 + in flight 0  (holds)" in shown


def test_a_stall_warning_is_logged_once_at_warning_level(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    sim = SimProcess(tmp_path / "sim", *SIM_ARGS, script=[
        [{"deliver": 5}, {"control": "warning"}, {"deliver": 5}, {"control": "warning"},
         {"keepalive_only": 600}]]).start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database)).start()
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.counters("store").get("control", {}).get("warning") == 2, 60,
                   "both warnings handled by the store worker")
    finally:
        finish(daemon, sim)
    notices = len(sim.ground_truth().control("warning"))
    lines = [e for e in daemon.log_events()
             if e.get("level") == "warning" and "warning" in str(e.get("event"))]
    assert notices == 2
    assert len(lines) == notices, lines
    assert all(e["event"] == "stream_warning" and e["role"] == "stream" and e.get("conn") == 1
               for e in lines), lines
    assert {e["code"] for e in lines} == {"FALLING_BEHIND"}


def test_a_worker_file_already_carried_is_not_counted_twice() -> None:
    """The supervisor publishes a reaped worker's counts before the replacement overwrites its
    file: meanwhile the collector must see them once, not twice."""
    from ingestd.control.tally import Carried, role_totals

    dead = {"pid": 11, "counters": {"stored": 7, "records_read": 9, "pending": 2,
                                    "read_seq": 12, "deadlettered": {"invalid_json": 1}}}
    carried = Carried()
    carried.carry("store", 11, dead)
    carried.carry("store", 11, dead)  # reaped once; a second look adds nothing
    supervisor = {"carried": {"store": carried.as_dict()}}
    same = role_totals(dead, supervisor, "store")["counters"]
    assert (same["stored"], same["records_read"], same["pending"]) == (7, 7, 2)
    new = {"pid": 12, "counters": {"stored": 1, "records_read": 3, "pending": 2, "read_seq": 14,
                                   "deadlettered": {"invalid_json": 2, "oversize": 1}}}
    both = role_totals(new, supervisor, "store")["counters"]
    assert (both["stored"], both["records_read"], both["read_seq"]) == (8, 10, 14)
    assert both["deadlettered"] == {"invalid_json": 3, "oversize": 1}
    assert carried.read_seq == 12


def test_a_worker_on_a_reused_pid_is_carried_and_counted() -> None:
    """A supervisor that runs for months restarts workers on pids the kernel hands out again.
    Worker A (pid 11) is carried; a later worker B gets pid 11 too. B's own file is counted
    while it runs and carried when it dies; a B that died before its first report leaves A's
    file, which is not carried twice."""
    from ingestd.control.tally import Carried, role_totals

    a = {"pid": 11, "proc": "11-1", "counters": {"stored": 7, "records_read": 7, "pending": 0,
                                                 "read_seq": 7}}
    b = {"pid": 11, "proc": "11-2", "counters": {"stored": 5, "records_read": 5, "pending": 0,
                                                 "read_seq": 12}}
    carried = Carried()
    carried.carry("store", 11, a)
    running = role_totals(b, {"carried": {"store": carried.as_dict()}}, "store")["counters"]
    assert running["stored"] == 12  # A's carried 7 and B's own 5
    carried.carry("store", 11, a)  # B died before it reported: A's file, carried already
    assert carried.counters["stored"] == 7
    carried.carry("store", 11, b)  # B reported, then died
    assert carried.counters["stored"] == 12
    after = role_totals(b, {"carried": {"store": carried.as_dict()}}, "store")["counters"]
    assert after["stored"] == 12  # B's file, still there, is not counted again
    for n in range(100):  # the identities kept stay bounded
        carried.carry("stream", 1000 + n, {"pid": 1000 + n, "proc": f"{n}", "counters": {}})
    assert len(carried.as_dict()["procs"]) == len(carried.as_dict()["pids"]) == 20


def test_status_files_name_the_process_that_wrote_them(tmp_path: Path) -> None:
    from ingestd.control import runstate

    runstate.run_dir(tmp_path)
    runstate.write_status(tmp_path, "store", {"counters": {}})
    doc = runstate.read_status(tmp_path, "store")
    assert doc is not None and doc["proc"] == runstate.process_token()
    assert doc["proc"].startswith(f"{os.getpid()}-")
