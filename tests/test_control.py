"""Control and systemd on the REAL daemon: signals, reloads, worker replacement, notify, lock.

Every test runs ``ingestd run`` (supervisor + stream worker + store worker) against the simulator
and MongoDB (stand-in or ``INGESTD_TEST_MONGO_URI``), sends real signals, and reconciles what was
stored with the simulator's ground truth. Each prints its measured figure on a ``[figure]`` line
(run with ``-s`` to see them).

Reconciling under a live stream: the simulator logs a tweet as delivered once its bytes are in
the socket, but bytes the daemon never read (it stopped, or its reader was killed) are not
received. Where the stream keeps flowing, the checks use what the stream worker counted as
received; where exactness is needed the simulator runs with ``--max-tweets`` so the stream goes
quiet and everything delivered must be stored.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import certifi
import psutil
import pymongo
import pytest
import yaml

from ingestd.config.errors import ConfigError
from ingestd.config.settings import load_settings_text
from ingestd.control.supervisor import Supervisor
from ingestd.documents.matching import Matcher
from ingestd.spool.generations import GenerationRecord
from tests.support.counters import resolved
from tests.support.creds import CREDS
from tests.support.daemon import Daemon, settings_doc
from tests.support.mongo import stored_ids
from tests.support.notify import NotifySocket, kinds
from tests.support.simulator import GroundTruthLog, SimProcess
from tests.support.wait import wait_until

Launch = Callable[..., tuple[SimProcess, Daemon]]


# -- harness --------------------------------------------------------------------------------------


@pytest.fixture
def launch(tmp_path: Path, mongo_uri: str, mongo_database: str) -> Iterator[Launch]:
    """Start the simulator (with ``sim_args``) and the daemon (settings ``sections``)."""
    started: list[tuple[SimProcess, Daemon]] = []

    def launch(*sim_args: str, script: list[list[dict[str, Any]]] | None = None,
               env: dict[str, str] | None = None, **sections: Any) -> tuple[SimProcess, Daemon]:
        sim = SimProcess(tmp_path / "sim", *sim_args, script=script).start()
        doc = settings_doc(sim.url, mongo_uri, mongo_database, **sections)
        daemon = Daemon(tmp_path / "daemon", doc)
        started.append((sim, daemon))
        daemon.start(env)
        return sim, daemon

    yield launch
    for sim, daemon in started:
        kill_tree(daemon)
        sim.stop()


def kill_tree(daemon: Daemon) -> None:
    """SIGKILL the supervisor and every worker (a SIGSTOPped one would never exit by itself)."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    try:
        children = psutil.Process(daemon.proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    daemon.kill()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


def figure(text: str) -> None:
    print(f"\n[figure] {text}")


def log_time(event: dict[str, Any]) -> float:
    """A log event's timestamp as epoch seconds."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def stored_count(daemon: Daemon) -> int:
    return int(daemon.counters("store").get("stored", 0))


def wait_stored(daemon: Daemon, at_least: int, timeout: float = 60) -> int:
    def enough() -> int:
        daemon.assert_running()
        n = stored_count(daemon)
        return n if n >= at_least else 0
    return wait_until(enough, timeout, f"{at_least} tweets stored")


def wait_quiet(daemon: Daemon, sim: SimProcess, conn: int, tweets: int, mongo_uri: str,
               database: str, timeout: float = 90) -> GroundTruthLog:
    """Until connection ``conn`` delivered its ``tweets`` and the store worker has acked
    everything the reader appended (the simulator then only sends keep-alives)."""
    def quiet() -> GroundTruthLog | None:
        daemon.assert_running()
        truth = sim.ground_truth()
        if len(truth.tweet_ids(conn)) < tweets:
            return None
        stream = daemon.status("stream")
        store = daemon.counters("store")
        if stream.get("spool", {}).get("records") != 0 or store.get("pending") != 0:
            return None
        expected = set(truth.tweet_ids(conn)) - set(truth.deleted_ids())
        return truth if expected <= set(stored_ids(mongo_uri, database)) else None
    result: GroundTruthLog = wait_until(quiet, timeout, f"connection {conn} stored", 0.25)
    return result


def connect_tracks(truth: GroundTruthLog) -> list[list[str]]:
    return [list(c["params"]["track"]) for c in truth.connections() if c["status"] == 200]


def proc_figures(pid: int) -> tuple[int, int]:
    proc = psutil.Process(pid)
    return proc.num_fds(), proc.memory_info().rss


# -- 1, 2: SIGTERM --------------------------------------------------------------------------------


def test_sigterm_under_load_drains_everything_received(
        launch: Launch, mongo_uri: str, mongo_database: str) -> None:
    # --rate 0: the simulator writes as fast as TCP takes it. The spool bound (block policy)
    # keeps the backlog drainable within stop_timeout; the rest waits in the sockets until the
    # stop, which reads it to the endpoint's close and counts what the full spool cannot take.
    sim, daemon = launch("--rate", "0", "--control-every", "50", "--seed", "21",
                         spool={"max_records": 1000}, control={"stop_timeout": 10})
    daemon.wait_ready()
    wait_stored(daemon, 2000)
    backlog = wait_until(lambda: daemon.status("stream").get("spool", {}).get("records", 0),
                         30, "a spool backlog")
    code, took = daemon.stop(timeout=30)
    stream, store = daemon.counters("stream"), daemon.counters("store")
    truth = sim.ground_truth()
    ids = stored_ids(mongo_uri, mongo_database)
    draining = daemon.events("store_draining")[-1]
    stopped = daemon.events("store_worker_stopped")[-1]
    stream_drained = daemon.events("stream_stop_drained")[-1]

    assert code == 0, daemon.tail()
    assert took < 10, f"stop took {took:.2f}s, stop_timeout is 10s"
    assert stopped["drained"] is True
    assert store["pending"] == 0
    # Every message the reader spooled was read by the store worker and ended in exactly one
    # bucket (a message cut by the stop's abort is not spooled: it is counted as dropped).
    assert resolved(store) == store["records_read"] == stream["received"]
    assert stream["partial"] == stream["dropped"].get("cut_by_disconnect", 0)
    # One connection. The stop half-closed it and read on to the endpoint's close, the full
    # spool no longer pushing back: every message it delivered was spooled or, where the spool
    # had no room, counted as dropped (spool_full). Before, what TCP held back (tens of thousands
    # of gzip'd tweets) was discarded unread by the close, and counted nowhere.
    assert len(truth.connections()) == 1
    delivered, controls = truth.tweet_ids(1), truth.of("control", 1)
    dropped = stream["dropped"].get("spool_full", 0)
    assert stream_drained["endpoint_closed"] is True, stream_drained
    assert stream["received"] + dropped == len(delivered) + len(controls)
    assert stream["partial"] == len(truth.of("partial", 1))  # a write the endpoint gave up
    assert len(ids) == len(set(ids)) == store["stored"] - store["deleted_documents"]
    assert set(ids) <= set(delivered)
    figure(f"SIGTERM under load: exit {code} in {took:.2f}s; drain "
           f"{log_time(stopped) - log_time(draining):.2f}s of a {backlog}-record backlog; "
           f"received={stream['received']} stored={store['stored']} "
           f"control={sum(store['control'].values())} dup={store['duplicates']} "
           f"delivered={len(delivered)} dropped_at_stop={dropped} "
           f"(stream drain {stream_drained['seconds'] * 1000:.0f} ms, "
           f"{stream_drained['messages']} messages)")


def test_sigterm_on_a_silent_stream_aborts_the_transfer_within_1s(launch: Launch) -> None:
    # One tweet, then nothing at all (not even keep-alives): the transfer is idle in select().
    _, daemon = launch("--rate", "50", "--keepalive", "600",
                       script=[[{"deliver": 1}, {"stall": 600}]])
    daemon.wait_ready()
    wait_stored(daemon, 1, 30)
    code, took = daemon.stop()
    stopping = daemon.events("stopping")[-1]
    reader_done = daemon.events("stream_worker_stopped")[-1]
    abort = log_time(reader_done) - log_time(stopping)

    assert code == 0
    assert abort < 1.0, f"the in-flight transfer was aborted after {abort:.3f}s"
    assert took < 2.0, f"stop took {took:.2f}s on a silent stream"
    assert daemon.counters("stream")["endings"] == {"aborted": 1}
    figure(f"silent stream: transfer aborted {abort * 1000:.0f} ms after the supervisor "
           f"handled SIGTERM; exit {code} in {took:.2f}s")


def sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM waits, undelivered, for ``pid`` (a stopped process: /proc's masks)."""
    fields = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGTERM - 1)
    return any(int(fields.get(mask, "0"), 16) & bit for mask in ("SigPnd", "ShdPnd"))


def test_sigterm_stores_what_was_already_in_the_socket(
        launch: Launch, mongo_uri: str, mongo_database: str) -> None:
    # One tweet, then a burst of 40 that the stream worker cannot read before the stop: it is
    # SIGSTOPped (as a loop held in a gather pause, a slow fsync or a busy machine is) while the
    # simulator writes the burst, and continued only once the supervisor's SIGTERM is pending.
    # The burst is in the socket when the stop comes: every tweet sent must be stored.
    burst = 40
    sim, daemon = launch("--rate", "0", "--keepalive", "600", "--seed", "23",
                         script=[[{"deliver": 1}, {"stall": 5}, {"deliver": burst},
                                  {"stall": 600}]])
    daemon.wait_ready()
    wait_until(lambda: daemon.counters("stream").get("received", 0) >= 1, 30, "the first tweet")
    worker = daemon.worker_pid("stream")
    os.kill(worker, signal.SIGSTOP)
    try:
        early = sim.ground_truth().tweet_ids(1)
        assert len(early) == 1, f"the burst came before the worker was stopped: {len(early)}"
        sent = wait_until(lambda: (ids := sim.ground_truth().tweet_ids(1)) and
                          len(ids) == 1 + burst and ids, 30, "the simulator sent the burst")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: sigterm_pending(worker), 10, "SIGTERM pending at the stream worker")
    finally:
        os.kill(worker, signal.SIGCONT)
    code = daemon.proc.wait(30)
    stream, store = daemon.counters("stream"), daemon.counters("store")
    ids = set(stored_ids(mongo_uri, mongo_database))
    drained = daemon.events("stream_stop_drained")

    assert code == 0, daemon.tail()
    assert set(sent) <= ids, f"{len(set(sent) - ids)} of {len(sent)} sent tweets not stored"
    controls = len(sim.ground_truth().of("control", 1))  # sent among the tweets (none lost)
    assert stream["received"] == len(sent) + controls == resolved(store)
    assert store["stored"] == len(sent)
    assert drained and drained[-1]["messages"] >= burst
    assert daemon.events("store_worker_stopped")[-1]["drained"] is True
    figure(f"SIGTERM with {burst} tweets in the socket: all {len(sent)} sent stored; drain "
           f"{drained[-1]['seconds'] * 1000:.0f} ms, {drained[-1]['reads']} reads")


def test_a_stop_in_the_middle_of_a_burst_stores_every_tweet_the_endpoint_sent(
        launch: Launch, mongo_uri: str, mongo_database: str) -> None:
    # --rate 0: the simulator writes as fast as the reader takes it, so when the stop comes its
    # socket buffers hold tweets the endpoint counts as delivered, and it is writing more. The
    # stop half-closes the connection and reads on until the endpoint closes it: every tweet
    # written is stored. Before, the drain read what had arrived and closed: what the simulator
    # wrote after that last read was lost (seen under a real systemd: restarts mid-burst).
    burst = 30000
    sim, daemon = launch("--rate", "0", "--control-every", "0", "--seed", "25",
                         script=[[{"deliver": burst}, {"stall": 600}]],
                         control={"stop_timeout": 120})
    daemon.wait_ready()
    wait_until(lambda: len(sim.ground_truth().tweet_ids(1)) >= 2000, 60, "the burst under way")
    code, _ = daemon.stop(timeout=180)
    truth = sim.ground_truth()
    delivered, ids = truth.tweet_ids(1), stored_ids(mongo_uri, mongo_database)
    drained = daemon.events("stream_stop_drained")[-1]
    stream = daemon.counters("stream")

    assert code == 0, daemon.tail()
    assert len(delivered) < burst, "the burst ended before the stop: nothing was tested"
    assert drained["endpoint_closed"] is True, drained
    assert truth.closes(1)[0]["reason"].startswith("client closed"), truth.closes(1)
    assert not truth.of("partial", 1)
    missing = set(delivered) - set(ids)
    assert not missing, f"{len(missing)} of {len(delivered)} delivered tweets not stored"
    assert sorted(ids) == sorted(delivered)
    assert stream["received"] == len(delivered)
    assert daemon.counters("store")["stored"] == len(delivered)
    figure(f"stop mid-burst: {len(delivered)} of {burst} written before the endpoint closed, "
           f"{len(ids)} stored; drain {drained['seconds'] * 1000:.0f} ms, "
           f"{drained['messages']} messages")


# -- 3, 4, 5: SIGHUP ------------------------------------------------------------------------------


def test_sighup_changing_track_switches_make_before_break_without_loss(
        launch: Launch, mongo_uri: str, mongo_database: str) -> None:
    per_conn = 2000
    sim, daemon = launch("--rate", "250", "--max-tweets", str(per_conn), "--keepalive", "1",
                         "--control-every", "25", "--seed", "31",
                         stream={"track": ["iphone", "ipad"]})
    daemon.wait_ready()
    wait_until(lambda: len(sim.ground_truth().tweet_ids(1)) >= 300, 30, "tweets flowing")
    doc = dict(daemon.doc)
    doc["stream"] = {**doc["stream"], "track": ["ipad", "ipod"]}
    daemon.write_settings_atomically(doc)
    daemon.send(signal.SIGHUP)
    applied = daemon.wait_log("reload_applied", role="supervisor", generation=2)
    truth = wait_quiet(daemon, sim, 2, per_conn, mongo_uri, mongo_database)
    ids = stored_ids(mongo_uri, mongo_database)
    store = daemon.counters("store")

    # The simulator saw the new parameters on a second connection, and only there.
    assert connect_tracks(truth) == [["iphone", "ipad"], ["ipad", "ipod"]]
    assert applied["filter_diff"]["track"] == {"added": ["ipod"], "removed": ["iphone"]}
    wait_until(lambda: daemon.status("stream").get("conn", 0) >= 2, 10, "conn 2 in stream.json")
    assert daemon.status("stream")["conn"] == 2
    # Nothing delivered on either connection is missing: in particular every tweet matching
    # the common term "ipad", whichever connection carried it.
    delivered = set(truth.tweet_ids())
    missing = delivered - set(truth.deleted_ids()) - set(ids)
    by_conn = {c: len(missing & set(truth.tweet_ids(c))) for c in (1, 2)}
    assert not missing, f"lost across the switch: {by_conn}"
    assert set(ids) <= delivered and len(ids) == len(set(ids))
    # Each generation's filters were recorded before it ran, and every tweet's matched phrases
    # are those of the filters its connection was opened with (the switch's first tweets too).
    record = GenerationRecord(daemon.state_dir)
    assert [record.lookup(g) for g in (1, 2)] == [(["iphone", "ipad"], [], []),
                                                  (["ipad", "ipod"], [], [])]
    wrong = wrongly_matched(mongo_uri, mongo_database, dict(enumerate(connect_tracks(truth), 1)))
    assert not wrong, f"matched by another connection's filters: {wrong[:5]}"
    gap = truth.of("tweet", 2)[0]["t"] - truth.of("tweet", 1)[-1]["t"]
    common = count_matching(mongo_uri, mongo_database, "ipad")
    figure(f"SIGHUP track change: reload gap {gap * 1000:.0f} ms (old conn's last tweet → new "
           f"conn's first; negative = overlap); duplicates={store['duplicates']}; "
           f"delivered conn1={len(truth.tweet_ids(1))} conn2={len(truth.tweet_ids(2))}, "
           f"lost=0; stored matching the common term 'ipad': {common}")


@pytest.mark.parametrize("late", [False, True], ids=["logout_after_first_byte",
                                                     "logout_before_first_byte"])
def test_the_endpoints_logout_of_a_replaced_connection_is_a_planned_end(
        launch: Launch, late: bool) -> None:
    """The endpoint logs the old connection of a filter switch out (disconnect code 7) once the
    new one is up, as the real one does for a second connection of an account: no warning, no
    `disconnect` reconnect; each switch ends one connection as `retired`. The notice is still a
    delivered control message, counted as such. ``late``: each new connection's first byte
    comes a second after its 200, so the logout is read while the old one is still active."""
    switches = 3
    script = [[{"then": "normal"}], *[[{"stall": 1}]] * switches] if late else None
    sim, daemon = launch("--rate", "100", "--keepalive", "1", "--control-every", "0",
                         "--seed", "37", script=script)
    daemon.wait_ready()
    wait_stored(daemon, 10)
    for n in range(2, 2 + switches):
        doc = dict(daemon.doc)
        doc["stream"] = {**doc["stream"], "track": ["ipad", f"ipod{n}"]}
        daemon.write_settings_atomically(doc)
        daemon.send(signal.SIGHUP)
        wait_until(lambda n=n: (s := daemon.status("stream")).get("conn") == n
                   and s.get("pending") is None and not s.get("retiring"), 30, f"conn {n} alone")
    wait_until(lambda: len(sim.ground_truth().control("disconnect")) == switches, 10,
               "the endpoint's logouts")
    wait_until(lambda: daemon.counters("store").get("control", {}).get("disconnect") == switches,
               30, "the logouts counted as control messages")
    stream = daemon.counters("stream")
    notices = daemon.events("stream_disconnect")

    assert [e["code"] for e in sim.ground_truth().control("disconnect")] == [7] * switches
    assert stream["endings"] == {"retired": switches}, stream["endings"]
    assert stream["disconnect_codes"] == {}
    assert [(e["level"], e["code"], e.get("planned")) for e in notices] == [
        ("info", 7, "filter switch")] * switches
    assert daemon.events("stream_ended") == [], "a logged-out old connection was reconnected"
    switched = daemon.events("filters_switched")
    assert [e["old_conn"] for e in switched] == ([None] * switches if late else [1, 2, 3])
    figure(f"{switches} filter switches (logout {'before' if late else 'after'} the new "
           f"connection's first byte): connection ends {stream['endings']}, logouts counted as "
           f"control messages: {switches}")


def wrongly_matched(mongo_uri: str, database: str,
                    tracks: dict[int, list[str]]) -> list[tuple[int, int, list[str], list[str]]]:
    """Stored tweets whose ``_ingest.matched.track`` is not what their connection's track
    (``tracks``, by connection id) matches: (conn, generation, expected, stored)."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        wrong = []
        for d in client[database].tweets.find():
            ingest = d["_ingest"]
            expected = Matcher(tracks[ingest["conn"]]).match(d).track
            if ingest["matched"]["track"] != expected:
                wrong.append((ingest["conn"], ingest["generation"], expected,
                              ingest["matched"]["track"]))
        return wrong
    finally:
        client.close()


def count_matching(mongo_uri: str, database: str, term: str) -> dict[int, int]:
    """Stored tweets whose ``_ingest.matched.track`` holds ``term``, per connection."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        docs = client[database].tweets.find({}, {"_ingest": 1})
        counts: dict[int, int] = {}
        for d in docs:
            if term in d["_ingest"]["matched"]["track"]:
                counts[d["_ingest"]["conn"]] = counts.get(d["_ingest"]["conn"], 0) + 1
        return counts
    finally:
        client.close()


def bad_settings(daemon: Daemon) -> dict[str, Callable[[], None]]:
    """Ways to break the settings file, each applied in place (not atomically)."""
    good = yaml.safe_dump(daemon.doc, sort_keys=False)
    half = good[: len(good) // 2]
    with pytest.raises(ConfigError):  # the test only means something if half is invalid
        load_settings_text(half, daemon.config, CREDS)
    schema = dict(daemon.doc)
    # The interpolated secret is where a number belongs: the reason must not echo it.
    schema["writer"] = {**schema["writer"], "batch_size": "${TWITTER_CONSUMER_SECRET}"}

    # A user id past 64 bits: loaded, it crashed the supervisor recording the generation.
    huge = dict(daemon.doc)
    huge["stream"] = {**huge["stream"], "follow": [1 << 70]}
    # A state folder the next start would refuse (a file): start-only, so it was "applied".
    state = {**daemon.doc, "state_dir": str(daemon.config)}
    # A CA file pymongo cannot read: its OSError escaped the URI check and stopped the daemon.
    uri = daemon.doc["mongo"]["uri"]
    uri += ("&" if "?" in uri else "/?" if uri.count("/") == 2 else "?") \
        + "tls=true&tlsCAFile=/nonexistent/ca.pem"
    ca = {**daemon.doc, "mongo": {**daemon.doc["mongo"], "uri": uri}}

    def unreadable() -> None:
        daemon.config.unlink()
        daemon.config.mkdir()  # reading a directory fails even for root

    return {
        "syntax": lambda: daemon.config.write_text(good + "writer: [unclosed\n"),
        "half-written": lambda: daemon.config.write_text(half),
        "schema": lambda: daemon.config.write_text(yaml.safe_dump(schema, sort_keys=False)),
        "huge follow id": lambda: daemon.config.write_text(yaml.safe_dump(huge, sort_keys=False)),
        "state_dir a file": lambda: daemon.config.write_text(
            yaml.safe_dump(state, sort_keys=False)),
        "unreadable CA file": lambda: daemon.config.write_text(
            yaml.safe_dump(ca, sort_keys=False)),
        "unreadable": unreadable,
    }


def test_sighup_with_bad_settings_keeps_running_on_the_old_ones(launch: Launch) -> None:
    sim, daemon = launch("--rate", "150", "--keepalive", "1", "--seed", "41")
    daemon.wait_ready()
    wait_stored(daemon, 50)
    figures = []
    for n, (kind, breaker) in enumerate(bad_settings(daemon).items(), start=1):
        breaker()
        before = stored_count(daemon)
        daemon.send(signal.SIGHUP)
        failed = daemon.wait_log("reload_failed", reload_failures=n)
        wait_until(lambda n=n: daemon.status("supervisor").get("reload_failures") == n, 10,
                   "reload_failures in run/supervisor.json")
        assert str(daemon.config) in failed["error"], failed
        keys = {"schema": "writer.batch_size", "huge follow id": "stream.follow[0]",
                "state_dir a file": "state_dir", "unreadable CA file": "mongo.uri"}
        if kind in keys:
            assert failed["key"] == keys[kind], failed
        wait_stored(daemon, before + 30)  # still storing, with the old settings
        figures.append(f"{kind}: {failed['error']!r}")
        if kind == "unreadable":
            daemon.config.rmdir()
    # A bad file is refused by `ingestd reload` itself: no signal is sent.
    cli = run_cli("reload", daemon)
    assert cli.returncode == 78 and "not reloading" in cli.stderr
    daemon.write_settings_atomically(daemon.doc)
    daemon.send(signal.SIGHUP)
    daemon.wait_generation("stream", 2)
    daemon.wait_generation("supervisor", 2)
    truth = sim.ground_truth()
    supervisor = daemon.status("supervisor")

    assert supervisor["reload_failures"] == len(figures) == 7 and supervisor["generation"] == 2
    assert daemon.status("stream")["conn"] == 1
    assert len(truth.connections()) == 1, "a rejected or unchanged reload reconnected"
    logs = daemon.logs()
    for name, secret in CREDS.items():
        assert secret not in logs, f"{name} leaked into the log"
    assert daemon.proc is not None and daemon.proc.poll() is None
    figure("bad reloads rejected, still one connection, still storing; logged reasons: "
           + "; ".join(figures))


def run_cli(command: str, daemon: Daemon) -> subprocess.CompletedProcess[str]:
    """``ingestd COMMAND --config`` with the daemon's settings, as an operator would run it."""
    return subprocess.run([sys.executable, "-m", "ingestd", command, "--config",
                           str(daemon.config)], env=daemon.env(), capture_output=True,
                          text=True, timeout=60, check=False)


def operator_shell() -> dict[str, str]:
    """An operator's environment: no TWITTER_* secrets, no $CREDENTIALS_DIRECTORY (under
    systemd, ExecReload= and a root shell get neither; only the daemon has its credentials)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("TWITTER_") and k not in ("CREDENTIALS_DIRECTORY",
                                                           "NOTIFY_SOCKET")}


def operator_cli(*args: str, daemon: Daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingestd", *args, "--config",
                           str(daemon.config)], env=operator_shell(), capture_output=True,
                          text=True, timeout=60, check=False)


def test_a_reload_with_numbers_past_64_bits_is_refused_and_the_workers_run_on(
        launch: Launch) -> None:
    """The settings audit (D1, D2, D4): ``w: 99999999999999999999`` passed ``check`` and a
    reload put it in force as generation 2; the store worker then crash-looped logging it and
    the daemon exited 75. A spool bound past 64 bits did the same to the stream worker, and a
    400-digit batch size made the reload check crash. Now `ingestd reload` refuses them, and so
    does the daemon at a bare SIGHUP, naming file and key; generation 1 runs on, unharmed."""
    _sim, daemon = launch("--rate", "100", "--keepalive", "1", "--seed", "114")
    daemon.wait_ready()
    wait_stored(daemon, 20)
    pids = daemon.pids()
    good = daemon.doc
    bad = {
        "mongo.write_concern.w": {**good, "mongo": {**good["mongo"],
                                                    "write_concern": {"w": 10**20 - 1}}},
        "spool.max_bytes": {**good, "spool": {"max_bytes": "99999999999999TiB"}},
        "deadletter.max_bytes": {**good, "deadletter": {"max_bytes": 10**26}},
        "writer.batch_size": {**good, "writer": {**good["writer"], "batch_size": 10**400}},
    }
    for n, (key, doc) in enumerate(bad.items(), start=1):
        daemon.write_settings_atomically(doc)
        refused = operator_cli("reload", daemon=daemon)
        assert refused.returncode == 78, refused.stdout + refused.stderr
        assert f"{daemon.config}: {key}: must be " in refused.stderr, refused.stderr
        daemon.send(signal.SIGHUP)  # what `systemctl kill -s HUP` does: the daemon judges
        failed = daemon.wait_log("reload_failed", reload_failures=n)
        assert failed["key"] == key and failed["error"].startswith(f"{daemon.config}: {key}: ")
        assert len(failed["error"].split(": ", 2)[2]) < 200, failed  # 400 digits: shortened
    before = stored_count(daemon)
    wait_stored(daemon, before + 20)  # still storing, on generation 1's settings

    assert not daemon.events("reload_check_crashed") and not daemon.events("reload_applied")
    assert {role: daemon.status(role)["generation"] for role in ("supervisor", "stream",
                                                                "store")} == dict.fromkeys(
        ("supervisor", "stream", "store"), 1)
    assert daemon.pids() == pids and not daemon.events("worker_exited")
    figure(f"reloads past 64 bits refused by `ingestd reload` and by the daemon: {len(bad)}; "
           "generation 1 in force, no worker restarted")


def test_a_reload_of_the_log_level_takes_effect_in_every_process(launch: Launch) -> None:
    """The settings audit (D5): `logging.level: error` was reported applied by a reload while
    every process went on logging info lines. Now each process applies a reload's logging
    section, and logs its own ``reload_applied`` at the new level."""
    _sim, daemon = launch("--rate", "20", "--keepalive", "1", "--seed", "115")
    daemon.wait_ready()
    start = dict(daemon.doc)
    roles = ("supervisor", "stream", "store")

    def reload(doc: dict[str, Any], generation: int) -> None:
        daemon.write_settings_atomically(doc)
        result = operator_cli("reload", daemon=daemon)  # waits for both workers to adopt it
        assert result.returncode == 0, result.stdout + result.stderr
        for role in roles:
            daemon.wait_generation(role, generation)

    quiet = {**start, "logging": {**start["logging"], "level": "warning"}}
    reload(quiet, 2)
    # Generation 3 changes a writer key (an info line in every process) and a start-only key
    # (a warning from the supervisor).
    reload({**quiet, "writer": {**start["writer"], "batch_size": 50},
            "spool": {"max_records": 100_000}}, 3)
    needs_restart = daemon.wait_log("reload_needs_restart", generation=3)
    reload({**start, "writer": {**start["writer"], "batch_size": 50},
            "spool": {"max_records": 100_000}}, 4)
    applied = {role: daemon.wait_log("reload_applied", role=role, generation=4) for role in roles}

    info = [e for e in daemon.log_events() if e.get("level") in ("info", "debug")
            and e.get("generation") in (2, 3)]
    assert not info, info  # reload_applied of 2 and 3 included: each logged at its new level
    assert needs_restart["level"] == "warning" and needs_restart["role"] == "supervisor"
    assert {role: (e["level"], e["pid"]) for role, e in applied.items()} == {
        role: ("info", pid) for role, pid in daemon.pids().items()}, applied
    figure("log level reloaded to warning and back to info in the supervisor and both workers")


def test_reload_command_says_a_language_change_reconnects(launch: Launch) -> None:
    """What ``ingestd reload`` says about the connection is what the daemon does: a key outside
    track/follow/locations (``language``) reconnects too."""
    sim, daemon = launch("--rate", "100", "--keepalive", "1", "--seed", "112")
    daemon.wait_ready()
    wait_stored(daemon, 20)
    doc = dict(daemon.doc)
    doc["stream"] = {**doc["stream"], "language": ["en"]}
    daemon.write_settings_atomically(doc)
    result = operator_cli("reload", daemon=daemon)
    applied = daemon.wait_log("reload_applied", role="supervisor", generation=2)
    wait_until(lambda: len(connect_tracks(sim.ground_truth())) == 2, 30, "the new connection")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "; new connection (stream.language changed)" in result.stdout
    assert "filters unchanged" not in result.stdout
    assert applied["filter_changed"] is True and applied["reconnect"] == ["stream.language"]


def test_reload_command_with_a_new_state_dir_finds_the_daemon_in_its_own(
        launch: Launch, tmp_path: Path) -> None:
    """The re-audit: a file naming another state_dir (applied at the next start only) sent
    `ingestd reload --pid` (the unit's ExecReload) to wait for a verdict in the new folder, where
    none comes: 30 s, then exit 69, for an applied reload and a refused one alike."""
    sim, daemon = launch("--rate", "100", "--keepalive", "1", "--seed", "113")
    daemon.wait_ready()
    wait_stored(daemon, 20)
    pid = str(daemon.proc.pid)  # type: ignore[union-attr]
    moved = {**daemon.doc, "state_dir": str(tmp_path / "elsewhere" / "state")}
    moved["stream"] = {**moved["stream"], "track": ["ipad"]}
    daemon.write_settings_atomically(moved)
    good = operator_cli("reload", "--pid", pid, "--timeout", "20", daemon=daemon)
    unusable = {**moved, "state_dir": str(daemon.config)}  # a file
    daemon.write_settings_atomically(unusable)
    bad = operator_cli("reload", "--pid", pid, "--timeout", "20", daemon=daemon)
    wait_until(lambda: len(connect_tracks(sim.ground_truth())) == 2, 30, "the new connection")

    assert good.returncode == 0, good.stdout + good.stderr
    assert "reload applied: generation 2" in good.stdout
    # ha too: its instance name defaults to one made of the state folder
    assert "note: state_dir, ha take effect only after a restart" in good.stdout, good.stdout
    assert bad.returncode == 78, bad.stdout + bad.stderr
    assert f"state_dir: {daemon.config} cannot be used" in bad.stderr, bad.stderr
    assert not (tmp_path / "elsewhere").exists()  # nothing moved before a restart


def test_reload_command_reports_the_daemons_verdict_without_secrets(launch: Launch) -> None:
    """`ingestd reload` (the unit's ExecReload) exits 0 only once the daemon applied the file
    and both workers run it, and 78 with the daemon's reasons when the daemon rejected it, even
    for a problem that only the holder of the secrets can see."""
    sim, daemon = launch("--rate", "100", "--keepalive", "1", "--seed", "111")
    daemon.wait_ready()
    wait_stored(daemon, 20)
    doc = dict(daemon.doc)
    doc["stream"] = {**doc["stream"], "track": ["ipad"]}
    doc["spool"] = {"max_records": 123_456}  # read at start only: the verdict must say so
    daemon.write_settings_atomically(doc)
    good = operator_cli("reload", daemon=daemon)
    stream, store = daemon.status("stream"), daemon.status("store")
    wait_until(lambda: len(connect_tracks(sim.ground_truth())) == 2, 30, "the new connection")

    assert good.returncode == 0, good.stdout + good.stderr
    assert f"reload applied: generation 2 (pid {daemon.proc.pid}" in good.stdout  # type: ignore[union-attr]
    assert "track -iphone -ipod" in good.stdout
    assert stream["generation"] == 2 and store["generation"] == 2  # it waited for both
    assert "note: spool.max_records takes effect only after a restart" in good.stdout
    assert stream["spool"]["max_records"] == 2_000_000  # the bound in force, as exported
    assert connect_tracks(sim.ground_truth()) == [["iphone", "ipad", "ipod"], ["ipad"]]

    # A secret that exists nowhere: the command cannot tell, the daemon can.
    broken = {**doc, "auth": {**doc["auth"], "consumer_key": "${INGESTD_TEST_NEVER_SET}"}}
    daemon.write_settings_atomically(broken)
    before = stored_count(daemon)
    bad = operator_cli("reload", daemon=daemon)
    looked = operator_cli("status", daemon=daemon)

    assert bad.returncode == 78, bad.stdout + bad.stderr
    assert "reload rejected by the daemon" in bad.stderr
    assert (f"{daemon.config}: auth.consumer_key: ${{INGESTD_TEST_NEVER_SET}} is not set"
            in bad.stderr)
    wait_until(lambda: daemon.status("supervisor").get("reload_failures") == 1, 10,
               "the failure in run/supervisor.json")
    assert daemon.status("supervisor")["generation"] == 2
    wait_stored(daemon, before + 20)  # still streaming on generation 2's settings
    assert len(connect_tracks(sim.ground_truth())) == 2
    # degraded until a later reload is applied (README "Health"), the reason the daemon's
    assert looked.returncode == 1, looked.stdout + looked.stderr
    assert looked.stdout.startswith(f"ingestd: degraded (last reload refused: {daemon.config}: "
                                    "auth.consumer_key: ${INGESTD_TEST_NEVER_SET} is not set")
    assert "; generation 2 in force)\n" in looked.stdout
    assert f"state dir   {daemon.state_dir}" in looked.stdout
    figure(f"reload verdicts: {good.stdout.strip()!r}; {bad.stderr.strip()!r}")


def test_restart_note_judges_start_only_keys_against_the_values_in_force(
        launch: Launch) -> None:
    """A start-only key is judged against what the running processes started with, not against
    the previous file: reverting ``spool.max_records`` needs no restart. A stream worker replaced
    meanwhile opened its spool with the file's bound: reverting then does need one."""
    _sim, daemon = launch("--rate", "50", "--keepalive", "1", "--seed", "113")
    daemon.wait_ready()
    started = dict(daemon.doc)
    changed = {**started, "spool": {"max_records": 100_000}}
    note = "note: spool.max_records takes effect only after a restart"
    daemon.write_settings_atomically(changed)
    first = operator_cli("reload", daemon=daemon)
    daemon.write_settings_atomically(started)
    reverted = operator_cli("reload", daemon=daemon)

    assert first.returncode == 0 and note in first.stdout, first.stdout + first.stderr
    assert reverted.returncode == 0, reverted.stdout + reverted.stderr
    assert "restart" not in reverted.stdout, "the file equals the value in force"
    assert [e["generation"] for e in daemon.events("reload_needs_restart")] == [2]
    assert daemon.status("stream")["spool"]["max_records"] == 2_000_000

    # The file says 100000 when the stream worker is replaced: that bound is now in force.
    daemon.write_settings_atomically(changed)
    assert note in operator_cli("reload", daemon=daemon).stdout  # generation 4
    old = daemon.worker_pid("stream")
    os.kill(old, signal.SIGKILL)
    new_worker(daemon, "stream", old)
    wait_until(lambda: daemon.status("stream").get("spool", {}).get("max_records") == 100_000,
               30, "the replacement's spool bound")
    daemon.write_settings_atomically(started)
    back = operator_cli("reload", daemon=daemon)

    assert back.returncode == 0 and note in back.stdout, back.stdout + back.stderr
    needs = daemon.events("reload_needs_restart")
    assert [(e["generation"], e["keys"]) for e in needs] == [
        (2, ["spool.max_records"]), (4, ["spool.max_records"]), (5, ["spool.max_records"])]
    figure(f"start-only key reverted: {reverted.stdout.strip()!r}; reverted after the stream "
           f"worker restarted with the new bound: {back.stdout.strip()!r}")


def test_unchanged_and_writer_only_reloads_do_not_reconnect(
        launch: Launch, mongo_uri: str, mongo_database: str) -> None:
    # Enough tweets that both reloads land while the stream still flows, even on a loaded box.
    per_conn = 4000
    sim, daemon = launch("--rate", "400", "--max-tweets", str(per_conn), "--keepalive", "1",
                         "--seed", "51", writer={"batch_size": 200, "flush_interval": 0.5})
    daemon.wait_ready()
    wait_until(lambda: daemon.counters("store").get("last_batch_size", 0) > 8, 30,
               "batches larger than the new batch size")
    # Unchanged file, via `ingestd reload` (people not under systemd).
    cli = run_cli("reload", daemon)
    assert cli.returncode == 0, cli.stderr
    daemon.wait_generation("stream", 2)
    daemon.wait_generation("store", 2)
    # Only writer.batch_size changes.
    doc = dict(daemon.doc)
    doc["writer"] = {**doc["writer"], "batch_size": 8}
    daemon.write_settings_atomically(doc)
    daemon.send(signal.SIGHUP)
    daemon.wait_generation("store", 3)
    # New settings apply "from the next batch on": the batch open at the reload ends first.
    sample_batch_sizes(daemon, samples=1)
    sizes = sample_batch_sizes(daemon, samples=3)
    truth = wait_quiet(daemon, sim, 1, per_conn, mongo_uri, mongo_database)
    ids = stored_ids(mongo_uri, mongo_database)
    applied = daemon.events("reload_applied", role="supervisor")

    assert [e["filter_changed"] for e in applied] == [False, False]
    assert len(truth.connections()) == 1, "an unchanged or writer-only reload reconnected"
    assert max(sizes) <= 8, f"batch_size 8 not applied: {sizes}"
    assert set(ids) == set(truth.tweet_ids(1)) - set(truth.deleted_ids())
    assert len(ids) == len(set(ids))
    figure(f"unchanged + writer-only reloads: connections={len(truth.connections())}, "
           f"batch sizes after batch_size=8: {sizes}, stored={len(ids)} of "
           f"{len(truth.tweet_ids(1))} delivered ({len(set(truth.deleted_ids()))} deletes)")


def sample_batch_sizes(daemon: Daemon, samples: int) -> list[int]:
    """``last_batch_size`` of ``samples`` successive new batches (one per status update)."""
    sizes: list[int] = []
    seen = daemon.counters("store")["batches"]

    def next_batch() -> bool:
        nonlocal seen
        counters = daemon.counters("store")
        if counters["batches"] > seen:
            seen = counters["batches"]
            sizes.append(counters["last_batch_size"])
        return len(sizes) >= samples

    wait_until(next_batch, 30, f"{samples} batches")
    return sizes


# -- 6: many reloads ------------------------------------------------------------------------------

FILTER_CHANGES = {25: ["ipad", "ipod"], 50: ["iphone", "ipad", "ipod"], 75: ["iphone", "ipad"]}


def reload_many(daemon: Daemon, first: int, count: int) -> None:
    """``count`` SIGHUPs, each awaited until the supervisor applied it: writer-only changes
    (batch size, flush interval), plus filter changes at ``FILTER_CHANGES``."""
    for n in range(first, first + count):
        doc = dict(daemon.doc)
        doc["writer"] = {**doc["writer"], "batch_size": 100 + n % 2 * 50,
                         "flush_interval": 0.2 + n % 3 * 0.1}
        if n in FILTER_CHANGES:
            doc["stream"] = {**doc["stream"], "track": FILTER_CHANGES[n]}
        daemon.write_settings_atomically(doc)
        generation = daemon.status("supervisor")["generation"]
        daemon.send(signal.SIGHUP)
        daemon.wait_generation("supervisor", generation + 1, 10)


def filters_generation(generation: int) -> int:
    """The generation whose reload last changed the filters, as of ``generation`` (reload ``n``
    of ``reload_many`` makes generation ``n + 1``; generation 1 is the start)."""
    return max([1] + [n + 1 for n in FILTER_CHANGES if n + 1 <= generation])


def settled_figures(daemon: Daemon, generation: int) -> dict[str, tuple[int, int]]:
    """fds and RSS of the three processes once both workers run ``generation`` and the stream
    is connected on its newest filters."""
    daemon.wait_generation("store", generation)
    daemon.wait_generation("stream", generation)
    # The worker adopts a filter change at once but keeps reading the old connection until the
    # new one delivers (make-before-break): wait for the connection opened on the newest filters.
    filters = filters_generation(generation)
    newest = rf"connected conn=\d+ gen={filters}"

    def switched() -> bool:
        status = daemon.status("stream")
        return (re.fullmatch(newest, str(status.get("state"))) is not None
                and status.get("pending") is None and not status.get("retiring"))
    wait_until(switched, 30, f"the stream connected on generation {filters}'s filters, the old "
               "connection closed")
    wait_until(lambda: daemon.status("supervisor")["status"].startswith("connected"), 10,
               "the supervisor's summary")
    return {role: proc_figures(pid) for role, pid in daemon.pids().items()}


def encoder_children(daemon: Daemon) -> int:
    """1 while the store worker's encoder child runs, else 0."""
    return len(psutil.Process(daemon.pids()["store"]).children())


@pytest.mark.parametrize("reloads", [
    pytest.param(40, id="40"),
    pytest.param(100, id="100", marks=pytest.mark.slow),
])
def test_many_reloads_leak_no_fds_or_memory(
        launch: Launch, mongo_uri: str, mongo_database: str, reloads: int) -> None:
    sim, daemon = launch("--rate", "100", "--keepalive", "1", "--seed", "61")
    daemon.wait_ready()
    wait_stored(daemon, 20)
    reload_many(daemon, 1, 10)  # warm-up: first-use imports, caches, allocator arenas
    before = settled_figures(daemon, 11)
    encoder_before = encoder_children(daemon)
    reload_many(daemon, 11, reloads)
    after = settled_figures(daemon, 11 + reloads)
    encoder_after = encoder_children(daemon)
    assert daemon.status("supervisor")["reload_failures"] == 0
    # Reconcile on a stopped daemon: on a live stream a tweet delivered after the ground
    # truth was read can be stored before the collection is read.
    assert daemon.stop()[0] == 0
    truth = sim.ground_truth()
    ids = stored_ids(mongo_uri, mongo_database)

    changes = sum(1 for n in FILTER_CHANGES if 11 <= n < 11 + reloads)
    assert len(truth.connections()) == 1 + changes, "a writer-only reload reconnected"
    assert set(ids) <= set(truth.tweet_ids()) and len(ids) == len(set(ids))
    # The encoder child starts on the first read large enough to share (its two pipes): a
    # one-time start between the two measurements is not a leak.
    started = encoder_after - encoder_before
    for role, (fds, rss) in before.items():
        fds_after, rss_after = after[role]
        allowed = (1 + 2 * max(started, 0)) if role == "store" else 0
        assert fds_after <= fds + allowed, f"{role}: fds {fds} → {fds_after}"
        assert rss_after - rss < 4 << 20, f"{role}: RSS {rss} → {rss_after}"
    figure(f"{reloads} reloads ({changes} filter changes): " + "; ".join(
        f"{role} fds {before[role][0]}→{after[role][0]} RSS {before[role][1] / 2**20:.1f}→"
        f"{after[role][1] / 2**20:.1f} MiB" for role in before))


# -- 7, 8: dead and hung workers ------------------------------------------------------------------


def new_worker(daemon: Daemon, role: str, old: int, timeout: float = 30) -> int:
    """The pid of ``role``'s replacement, once it has published its own heartbeat."""
    def replaced() -> int:
        daemon.assert_running()
        pid = daemon.status(role).get("pid")
        return pid if isinstance(pid, int) and pid != old else 0
    pid: int = wait_until(replaced, timeout, f"a new {role} worker")
    return pid


@pytest.mark.parametrize("role", ["stream", "store"])
def test_sigkilled_worker_is_replaced_and_nothing_in_the_spool_is_lost(
        launch: Launch, mongo_uri: str, mongo_database: str, role: str) -> None:
    per_conn = 1500
    sim, daemon = launch("--rate", "300", "--max-tweets", str(per_conn), "--keepalive", "1",
                         "--seed", "71")
    daemon.wait_ready()
    wait_stored(daemon, 200)
    # An edit broke the file since the last (re)load: the replacement must run the settings in
    # force, not exit 78 and halt the service.
    daemon.config.write_text("stream: [broken\n")
    old = daemon.worker_pid(role)
    os.kill(old, signal.SIGKILL)
    new = new_worker(daemon, role, old)
    exited = daemon.wait_log("worker_exited", role=role, pid=old)
    daemon.wait_log("settings_file_invalid", role=role, pid=new)
    # The stream worker's replacement opens connection 2, which delivers its own quota.
    last = 2 if role == "stream" else 1
    truth = wait_quiet(daemon, sim, last, per_conn, mongo_uri, mongo_database)
    ids = stored_ids(mongo_uri, mongo_database)
    deleted = set(truth.deleted_ids())
    missing = set(truth.tweet_ids()) - deleted - set(ids)

    assert exited["signal"] == "SIGKILL"
    wait_until(lambda: daemon.status("supervisor")["restarts"].get(role, 0) >= 1, 10,
               f"the {role} restart in run/supervisor.json")
    assert daemon.status("supervisor")["restarts"][role] == 1
    assert len(truth.connections()) == last
    assert len(ids) == len(set(ids)), "a tweet stored twice"
    assert set(ids) <= set(truth.tweet_ids())
    if role == "store":
        assert not missing, "the spool is durable: a store worker crash loses nothing"
    else:
        # Only what the killed reader had not read yet: a tail of its connection.
        conn1 = truth.tweet_ids(1)
        assert missing <= set(conn1)
        read_up_to = max(i for i, t in enumerate(conn1) if t in set(ids))
        assert all(conn1.index(t) > read_up_to for t in missing), "a hole, not a tail"
    figure(f"SIGKILL {role} worker: replaced, ingestion resumed; delivered="
           f"{len(truth.tweet_ids())} stored={len(ids)} deleted={len(deleted)} "
           f"lost_in_killed_reader's_socket={len(missing)} "
           f"replayed_duplicates={daemon.counters('store')['duplicates']}")


def test_a_replacement_worker_runs_the_settings_in_force_not_an_unreloaded_edit(
        launch: Launch, mongo_uri: str, mongo_database: str) -> None:
    """An edit nobody reloaded must not reach the stream: the stream worker's replacement opens
    its connection with the filters in force (those its generation recorded), not the file's."""
    sim, daemon = launch("--rate", "200", "--max-tweets", "600", "--keepalive", "1",
                         "--seed", "73", stream={"track": ["iphone", "ipad"]})
    daemon.wait_ready()
    wait_stored(daemon, 100)
    doc = dict(daemon.doc)
    doc["stream"] = {**doc["stream"], "track": ["ipod"]}  # valid, but not reloaded
    daemon.write_settings_atomically(doc)
    old = daemon.worker_pid("stream")
    os.kill(old, signal.SIGKILL)
    new = new_worker(daemon, "stream", old)
    noted = daemon.wait_log("settings_file_not_in_force", role="stream", pid=new)
    truth = wait_quiet(daemon, sim, 2, 600, mongo_uri, mongo_database)

    assert noted["generation"] == 1
    assert connect_tracks(truth) == [["iphone", "ipad"], ["iphone", "ipad"]]
    wrong = wrongly_matched(mongo_uri, mongo_database, dict(enumerate(connect_tracks(truth), 1)))
    assert not wrong, f"matched by another connection's filters: {wrong[:5]}"
    assert not daemon.events("reload_applied", role="stream"), "no reload was asked for"


def test_sigstopped_worker_is_detected_and_replaced(launch: Launch) -> None:
    notify = NotifySocket()
    try:
        _, daemon = launch("--rate", "100", "--keepalive", "1", "--seed", "81",
                           control={"heartbeat_timeout": 3},
                           env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "1000000"})
        notify.wait_for("READY=1", 30)
        notify.wait_for("WATCHDOG=1", 5)
        old = daemon.worker_pid("stream")
        stopped_at = time.time()
        os.kill(old, signal.SIGSTOP)
        hung = daemon.wait_log("worker_hung", role="stream", pid=old)
        beats_after_hang = notify.drain()
        daemon.wait_log("worker_exited", role="stream", pid=old, signal="SIGKILL")
        # From the hang decision until the worker is gone, no keep-alive for systemd.
        assert "WATCHDOG=1" not in notify.drain()
        new = new_worker(daemon, "stream", old)
        replaced_at = time.time()
        notify.wait_for("WATCHDOG=1", 10)  # fresh heartbeats again
        before = stored_count(daemon)
        wait_stored(daemon, before + 50)
    finally:
        notify.close()
    detection = log_time(hung) - stopped_at
    assert 3 - 1.5 <= detection <= 3 + 5, f"detected after {detection:.2f}s"
    assert new != old
    figure(f"SIGSTOP stream worker, heartbeat_timeout=3s: hang detected after {detection:.2f}s, "
           f"replacement heartbeating {replaced_at - stopped_at:.2f}s after the stop; "
           f"WATCHDOG=1 messages between stop and detection: "
           f"{sum(m == 'WATCHDOG=1' for m in beats_after_hang)}")


# -- 9: systemd notify ----------------------------------------------------------------------------


def test_notify_messages_arrive_in_order(launch: Launch) -> None:
    notify = NotifySocket()
    try:
        _, daemon = launch("--rate", "100", "--keepalive", "1", "--seed", "91",
                           env={"NOTIFY_SOCKET": notify.name})
        ready = notify.wait_for("READY=1", 30)
        # READY=1 only once both workers run and published their status.
        assert daemon.status("stream").get("pid") and daemon.status("store").get("pid")
        status = notify.wait_for("STATUS=", 30, contains="connected conn=1 gen=1")
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.send(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify.wait_for("READY=1")
        daemon.config.write_text("{{ broken")
        daemon.send(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        rejected = notify.wait_for("READY=1")  # a failed reload leaves the service ready
        code, _ = daemon.stop()
        notify.drain()
    finally:
        notify.close()
    fields = dict(line.split("=", 1) for line in reloading.split("\n"))

    assert code == 0
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    assert kinds(notify.received) == [
        "READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert "tweets/s" in status and "stored" in status and "settings gen=1" in status
    # STATUS= says the present: the latest attempt was refused (the count is in the metrics)
    assert re.search(r"last reload refused at \d\d:\d\d:\d\d UTC, generation 2 in force",
                     rejected), rejected
    figure(f"notify: {kinds(notify.received)}; first READY: {ready!r}; STATUS example: "
           f"{status!r}; after a bad reload: {rejected!r}")


# -- lock -----------------------------------------------------------------------------------------


def test_second_supervisor_on_the_same_state_dir_is_refused(launch: Launch) -> None:
    _, daemon = launch("--rate", "50", "--keepalive", "1", "--seed", "101")
    daemon.wait_ready()
    first = daemon.pids()
    second = run_cli("run", daemon)
    status = daemon.status("supervisor")

    assert second.returncode == Supervisor.EXIT_LOCKED, second.stdout + second.stderr
    assert "state_dir_locked" in second.stdout + second.stderr
    assert f'"holder_pid":{first["supervisor"]}' in second.stdout + second.stderr
    # The running daemon is untouched: its pid file, status and workers.
    pidfile = daemon.state_dir / "run" / "supervisor.pid"
    assert int(pidfile.read_text()) == first["supervisor"]
    assert status["state"] == "ready" and daemon.pids() == first
    code, _ = daemon.stop()
    assert code == 0
    # Released on exit: the same state folder starts again.
    daemon.start()
    daemon.wait_ready()
    figure(f"second supervisor refused with exit {second.returncode}: "
           f"{(second.stdout + second.stderr).strip()[:300]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("port", ["any", "fixed"])
def test_a_refused_second_supervisor_leaves_the_metrics_listener_alone(launch: Launch,
                                                                      port: str) -> None:
    """The second run takes the state-folder lock before it binds a port or writes in run/: the
    running daemon keeps its run/metrics.addr and the status line that points at it, and the
    refused one says only why it was refused."""
    listen = "127.0.0.1:0" if port == "any" else f"127.0.0.1:{free_port()}"
    _, daemon = launch("--rate", "20", "--keepalive", "1", metrics={"listen": listen})
    daemon.wait_ready()
    addr_file = daemon.state_dir / "run" / "metrics.addr"
    addr = wait_until(lambda: addr_file.exists() and addr_file.read_text().strip(), 10,
                      "run/metrics.addr")
    line = f"metrics     http://{addr}/metrics"
    assert line in run_cli("status", daemon).stdout

    second = run_cli("run", daemon)
    output = second.stdout + second.stderr
    assert second.returncode == Supervisor.EXIT_LOCKED, output
    events = [json.loads(line).get("event") for line in second.stdout.splitlines()]
    assert events == ["state_dir_locked"], output  # no metrics_listen_failed before it
    assert addr_file.read_text().strip() == addr
    assert line in run_cli("status", daemon).stdout
    host, _, number = addr.rpartition(":")
    with socket.create_connection((host, int(number)), timeout=5) as sock:  # still served
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.0 200")
    assert daemon.stop()[0] == 0


def test_reload_fixing_a_wrong_mongo_uri_takes_effect_while_the_batch_retries(
    tmp_path: Path, mongo_uri: str, mongo_database: str, launch: Launch
) -> None:
    """The operator's usual mistake: a wrong MongoDB address. The daemon keeps the tweets in the
    spool, reports degraded, and a reload with the right address stores every one of them."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    wrong = f"mongodb://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there now
    script = [[{"deliver": 150}, {"keepalive_only": 120}]]
    sim, daemon = launch("--rate", "300", "--control-every", "0", "--keepalive", "1",
                         script=script, mongo={"uri": wrong, "timeout_ms": 1000})
    daemon.wait_ready()
    wait_until(lambda: daemon.counters("stream").get("received", 0) >= 150, 30, "150 received")
    wait_until(lambda: str(daemon.status("store").get("state", "")).startswith("degraded"), 30,
               "the store worker to report degraded")
    assert stored_count(daemon) == 0
    doc = dict(daemon.doc)
    doc["mongo"] = {**doc["mongo"], "uri": mongo_uri}
    daemon.write_settings(doc)
    fixed_at = time.monotonic()
    daemon.send(signal.SIGHUP)
    wait_stored(daemon, 150, timeout=60)
    recovered = time.monotonic() - fixed_at
    code, _ = daemon.stop()
    assert code == 0
    assert sorted(stored_ids(mongo_uri, mongo_database)) == sorted(sim.ground_truth().tweet_ids())
    assert any(e.get("event") == "mongo_target_switched_during_retry" for e in daemon.log_events())
    # An insert in flight against the wrong address is not cancelled: it ends at timeout_ms.
    figure(f"wrong mongo.uri fixed by reload: 150/150 stored {recovered:.2f}s after SIGHUP "
           "(timeout_ms 1 s)")


# -- the settings audit: a file that fails later, read_timeout, signals during start-up ---------


def test_replaced_workers_run_the_settings_in_force_when_the_unchanged_file_fails_now(
        launch: Launch, tmp_path: Path) -> None:
    """Validation depends on the world: the untouched file names a CA file deleted since the
    start. A replaced worker runs the settings in force and warns why the file fails now; it
    used to exit 78, which halted the daemon with 78 (systemd then left it down)."""
    ca = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), ca)
    _, daemon = launch("--rate", "100", "--keepalive", "1", "--seed", "75",
                       stream={"ca_file": str(ca)})
    daemon.wait_ready()
    wait_stored(daemon, 50)
    ca.unlink()
    for role in ("store", "stream"):
        old = daemon.worker_pid(role)
        os.kill(old, signal.SIGKILL)
        new = new_worker(daemon, role, old)
        noted = daemon.wait_log("settings_file_invalid", role=role, pid=new)
        assert noted["file_unchanged"] is True, noted
        assert f"stream.ca_file: '{ca}' is not an existing file" in noted["error"], noted
    wait_stored(daemon, stored_count(daemon) + 50)  # the new workers' connection is stored
    status = run_cli("status", daemon)
    code, _ = daemon.stop()

    assert code == 0
    assert "is not an existing file" in status.stdout, status.stdout
    assert [e["reason"] for e in daemon.events("stopping")] == ["SIGTERM"]
    assert not daemon.events("settings_invalid")


@pytest.fixture
def tls_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and closes them: a TLS client gets as far
    as loading its CA bundle, then finds no server."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                server.accept()[0].close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    done.set()
    thread.join()
    server.close()


def test_a_deleted_ca_file_is_a_connection_error_of_the_replaced_stream_worker(
        tmp_path: Path, tls_port: int, mongo_uri: str, mongo_database: str) -> None:
    """The CA file is gone for good: the replaced stream worker still starts, and its
    connections fail with a reason naming stream.ca_file, retried with back-off, in the log and
    the status; the daemon stays up."""
    ca = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), ca)
    url = f"https://127.0.0.1:{tls_port}/1.1/statuses/filter.json"
    daemon = Daemon(tmp_path / "daemon", settings_doc(url, mongo_uri, mongo_database,
                                                      stream={"ca_file": str(ca)}))
    try:
        daemon.start().wait_ready()
        ca.unlink()
        old = daemon.worker_pid("stream")
        os.kill(old, signal.SIGKILL)
        new = new_worker(daemon, "stream", old)
        ended = daemon.wait_log("stream_ended", role="stream", pid=new)
        def stated() -> str | None:
            state = str(daemon.status("stream").get("state", ""))
            return state if "curl error 77" in state else None
        state = wait_until(stated, 30, "the CA bundle's error in the status")
        code, _ = daemon.stop()
    finally:
        daemon.kill()
    assert code == 0
    assert ended["ending"] == "tls_certificate" and ended["backoff"] > 0, ended
    for text in (ended["reason"], state):
        assert "the CA bundle could not be read (check stream.ca_file)" in text, text
    assert state.startswith("reconnecting in"), state


def test_a_reload_of_read_timeout_alone_reaches_the_open_connection(launch: Launch) -> None:
    """Only read_timeout changes (no reconnect): the open connection stalls by the new timeout,
    measured from its last byte, not only the connections opened after it."""
    _, daemon = launch("--rate", "5", "--max-tweets", "2", "--keepalive", "1000")
    daemon.wait_ready()
    daemon.wait_log("connected", role="stream", conn=1)
    doc = dict(daemon.doc)
    doc["stream"] = {**doc["stream"], "read_timeout": 3}
    daemon.write_settings_atomically(doc)
    reloaded = operator_cli("reload", daemon=daemon)
    assert reloaded.returncode == 0, reloaded.stderr
    stalled = daemon.wait_log("stream_stalled", role="stream", conn=1, timeout=30)
    again = daemon.wait_log("connected", role="stream", conn=2)
    code, _ = daemon.stop()

    assert code == 0
    assert "filters unchanged" in reloaded.stdout, reloaded.stdout
    assert 3 <= stalled["silent_for"] < 30, stalled  # not the 90 s the connection opened with
    assert again["generation"] == 2
    figure(f"read_timeout 90 → 3 by reload: the open connection stalled after "
           f"{stalled['silent_for']} s silent")


def start_reading_its_settings(daemon: Daemon) -> int:
    """Start the daemon with its settings file a FIFO: ``ingestd run`` is then held in its first
    read of the file, past its first line and before the supervisor takes its signals. Returns
    the FIFO's write end, open once the daemon has opened the read end."""
    daemon.config.unlink()
    os.mkfifo(daemon.config)
    daemon.start()

    def opened() -> int | None:
        daemon.assert_running()
        try:
            return os.open(daemon.config, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no reader yet
                return None
            raise
    fd: int = wait_until(opened, 30, "the daemon to open its settings file")
    return fd


def finish_reading(daemon: Daemon, fd: int, read: dict[str, Any], then: dict[str, Any]) -> None:
    """Put the file ``then`` in the FIFO's place (what the operator leaves), then let the daemon
    read ``read`` (what the start read before the edit) to its end."""
    daemon.write_settings_atomically(then)
    os.set_blocking(fd, True)
    try:
        os.write(fd, yaml.safe_dump(read, sort_keys=False).encode())
    except BrokenPipeError:
        assert daemon.proc is not None
        code = daemon.proc.wait(10)
        raise AssertionError(f"the daemon died reading its settings ({code}):\n"
                             f"{daemon.tail()}") from None
    finally:
        os.close(fd)


def test_a_sighup_while_the_daemon_starts_reloads_the_file_it_finds(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """A SIGHUP in the first moments of ``ingestd run`` (before the supervisor took its
    signals) ended it without a line. It is held now, and acted on before the workers start:
    they start with the file the operator left, not the one the start read before the edit."""
    sim = SimProcess(tmp_path / "sim", "--rate", "50", "--keepalive", "1").start()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database))
    try:
        fd = start_reading_its_settings(daemon)
        daemon.send(signal.SIGHUP)
        read = daemon.doc
        finish_reading(daemon, fd, read, {**read, "stream": {**read["stream"],
                                                             "track": ["ipod"]}})
        daemon.wait_ready()
        daemon.wait_log("connected", role="stream", conn=1)
        held = daemon.wait_log("signals_during_startup", role="supervisor")
        applied = daemon.wait_log("reload_applied", role="supervisor")
        started = daemon.events("worker_started")
        tracks = connect_tracks(sim.ground_truth())
        code, _ = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    assert code == 0
    assert held["signals"] == ["SIGHUP"]
    assert applied["generation"] == 2 and applied["filter_diff"]["track"]["removed"]
    assert {e["generation"] for e in started} == {2}, started
    assert tracks == [["ipod"]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_the_daemon_starts_is_a_clean_stop(tmp_path: Path,
                                                        sig: signal.Signals) -> None:
    """SIGTERM in the first moments of ``ingestd run`` ended it without a line, SIGINT with a
    traceback: now either is a clean stop, exit 0, before any worker starts."""
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", "mongodb://127.0.0.1:9",
                       "startup_stop")
    daemon = Daemon(tmp_path / "daemon", doc)
    try:
        fd = start_reading_its_settings(daemon)
        daemon.send(sig)
        finish_reading(daemon, fd, daemon.doc, daemon.doc)
        assert daemon.proc is not None
        code = daemon.proc.wait(30)
    finally:
        daemon.kill()
    assert code == 0, daemon.tail()
    assert daemon.events("signals_during_startup")[0]["signals"] == [sig.name]
    assert [e["reason"] for e in daemon.events("stopping")] == [sig.name]
    assert not daemon.events("worker_started")
    assert "Traceback" not in daemon.logs()
