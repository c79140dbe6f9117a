"""Prometheus metrics and /healthz: served by the real supervisor, checked against ground truth.

The counters are checked against two independent sources: the simulator's ground truth (what was
sent) and MongoDB (what is stored); and against each other (the reconciliation identity).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import bson
import psutil
import pymongo
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingestd.config.schema import SpoolSettings
from ingestd.control.collector import RunStateCollector, known_labels
from ingestd.control.metrics import MAX_REQUESTS
from ingestd.control.procstats import ProcessCollector
from ingestd.control.runstate import run_dir, write_status
from ingestd.sink.batch import Entry
from ingestd.sink.counters import StoreHistograms
from ingestd.sink.histogram import BATCH_SIZE_BUCKETS, LATENCY_SECONDS_BUCKETS, Histogram
from ingestd.spool.format import RecordRef
from tests.support.daemon import Daemon, metrics_addr, settings_doc
from tests.support.simulator import GroundTruthLog, SimProcess
from tests.support.skips import unavailable
from tests.support.wait import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
OUTCOMES = ("ingestd_tweets_stored_total", "ingestd_tweets_duplicate_total",
            "ingestd_messages_deadlettered_total", "ingestd_control_messages_total",
            "ingestd_tweets_skipped_total", "ingestd_messages_dropped_total")
BAD_LINES = ["truncated_json", "json_array", "non_object", "invalid_utf8"]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def total(samples: Samples, name: str) -> float:
    """The sum of every labelled series of ``name`` (0 if it has none)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def scrape(addr: str) -> Samples:
    code, body = http_get(f"http://{addr}/metrics")
    assert code == 200
    return parse(body.decode())


def delivered(truth: GroundTruthLog) -> int:
    """Messages the simulator wrote in full: tweets, control messages and bad lines."""
    return len(truth.of("tweet")) + len(truth.of("control")) + len(truth.of("bad_line"))


def wait_settled(daemon: Daemon, sim: SimProcess, tweets: int) -> int:
    """Until every delivered message was read by the store worker and acknowledged."""
    def settled() -> int:
        daemon.assert_running()
        truth = sim.ground_truth()
        sent = delivered(truth)
        stream, store = daemon.status("stream"), daemon.status("store")
        done = (len(truth.tweet_ids()) >= tweets
                and stream.get("counters", {}).get("received") == sent
                and store.get("counters", {}).get("records_read") == sent
                and store.get("counters", {}).get("pending") == 0
                and stream.get("spool", {}).get("records") == 0)
        return sent if done else 0
    return wait_until(settled, 60, "the daemon to settle")


def test_metrics_reconcile_with_ground_truth_and_mongo(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    sim = SimProcess(tmp_path / "sim", "--rate", "400", "--max-tweets", "150",
                     "--control-every", "7", "--keepalive", "1", "--seed", "3",
                     script=[[{"deliver": 30}, {"bad_lines": BAD_LINES}]]).start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        addr = metrics_addr(daemon)
        sent = wait_settled(daemon, sim, 150)
        m = scrape(addr)
        health = http_get(f"http://{addr}/healthz")
        # A broken settings file on SIGHUP: counted, the old settings stay in force.
        daemon.config.write_text(daemon.config.read_text() + "\nnot_a_section: [\n")
        daemon.send(signal.SIGHUP)
        wait_until(lambda: total(scrape(addr), "ingestd_config_reload_failures_total") == 1,
                   30, "the reload failure to be counted")
        after = scrape(addr)
        code, _ = daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    truth = sim.ground_truth()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        in_mongo = client[mongo_database].tweets.count_documents({})
    finally:
        client.close()
    deleted = len(set(truth.tweet_ids()) & set(truth.deleted_ids()))

    assert code == 0
    received = value(m, "ingestd_messages_received_total")
    assert received == sent, "received ≠ messages the simulator wrote"
    resolved = sum(total(m, name) for name in OUTCOMES)
    assert received == resolved + value(m, "ingestd_messages_in_flight")
    assert value(m, "ingestd_messages_in_flight") == 0 == value(m, "ingestd_queue_records")
    assert value(m, "ingestd_control_messages_total", type="delete") == len(truth.control("delete"))
    # Each bad line is dead-lettered under its own reason; none is stored.
    assert total(m, "ingestd_messages_deadlettered_total") == len(BAD_LINES)
    assert value(m, "ingestd_messages_deadlettered_total", reason="invalid_json") >= 1
    assert (value(m, "ingestd_tweets_stored_total") + total(m, "ingestd_tweets_skipped_total")
            == len(truth.tweet_ids()))
    # Deleted tweets were stored then removed, unless their delete came first (skipped).
    skipped = total(m, "ingestd_tweets_skipped_total")
    assert value(m, "ingestd_tweets_stored_total") - (deleted - skipped) == in_mongo
    assert value(m, "ingestd_stream_connected") == 1
    assert value(m, "ingestd_stream_state", state="connected") == 1
    assert value(m, "ingestd_config_generation") == 1
    assert value(m, "ingestd_config_reload_failures_total") == 0
    assert value(m, "ingestd_worker_up", role="store") == 1
    assert value(m, "ingestd_spool_disk_bytes") > 0
    assert 0 <= value(m, "ingestd_last_message_age_seconds") < 60
    assert health == (200, json.dumps({"status": "ok", "reasons": []},
                                      separators=(",", ":")).encode())
    assert value(after, "ingestd_config_generation") == 1, "a refused reload must not count"
    print(f"\nreceived={received:.0f} stored={value(m, 'ingestd_tweets_stored_total'):.0f} "
          f"deadlettered={total(m, 'ingestd_messages_deadlettered_total'):.0f} "
          f"control={total(m, 'ingestd_control_messages_total'):.0f} in_mongo={in_mongo}")


def test_in_flight_and_health_while_mongo_is_down(tmp_path: Path) -> None:
    sim = SimProcess(tmp_path / "sim", "--rate", "500", "--max-tweets", "60",
                     "--control-every", "0", "--keepalive", "1").start()
    # Nothing listens on port 9 (discard) on loopback: every write fails, nothing is acked.
    doc = settings_doc(sim.url, "mongodb://127.0.0.1:9/?connectTimeoutMS=300", "down",
                       metrics={"listen": "127.0.0.1:0"})
    doc["mongo"].update(timeout_ms=1000)
    doc["control"]["stop_timeout"] = 2  # the store gives up draining (spool keeps it) quickly
    daemon = Daemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        addr = metrics_addr(daemon)
        wait_until(lambda: value(scrape(addr), "ingestd_messages_received_total") == 60
                   and value(scrape(addr), "ingestd_store_degraded") == 1,
                   60, "60 messages received while the store is degraded")
        m = scrape(addr)
        degraded = http_get(f"http://{addr}/healthz")
        # A dead worker makes the daemon "down" (503) until the supervisor replaces it.
        stream_pid = daemon.worker_pid("stream")
        os.kill(stream_pid, signal.SIGKILL)
        def answered_503() -> tuple[int, bytes] | None:
            answer = http_get(f"http://{addr}/healthz")
            return answer if answer[0] == 503 else None
        down = wait_until(answered_503, 30, "/healthz to answer 503")
        assert down is not None
        daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    assert value(m, "ingestd_tweets_stored_total") == 0
    assert value(m, "ingestd_messages_in_flight") == 60 == value(m, "ingestd_queue_records")
    assert value(m, "ingestd_queue_bytes") > 0
    assert degraded[0] == 200
    assert json.loads(degraded[1])["status"] == "degraded"
    assert any("mongo" in r for r in json.loads(degraded[1])["reasons"])
    body = json.loads(down[1])
    assert body["status"] == "down" and "stream worker not running" in body["reasons"]


def test_readme_metrics_table_names_every_exported_family(tmp_path: Path) -> None:
    """README's table of metric families is the collectors' list, with each one's type: no more,
    no less. Run files that make every conditional family appear (histograms, the HA section,
    the last message's age, the spool bounds)."""
    import re

    run_dir(tmp_path)
    hist = Histogram(BATCH_SIZE_BUCKETS).as_dict()
    write_status(tmp_path, "supervisor", {"pid": os.getpid()})
    write_status(tmp_path, "stream", {"state": "connected", "counters": {},
                                      "ha": {"mode": "standby", "lease": "k", "role": "active"}})
    write_status(tmp_path, "store", {"counters": {}, "hist": dict.fromkeys(
        ("batch_size", "insert_seconds", "store_latency_seconds"), hist)})
    families = [*RunStateCollector(tmp_path, SpoolSettings()).collect(),
                *ProcessCollector(tmp_path).collect()]
    # prometheus_client names a counter family without its samples' ``_total``
    exported = {f.name + ("_total" if f.type == "counter" else ""): f.type for f in families}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = dict(re.findall(r"^\| `([a-z_]+)` \| (counter|gauge|histogram) \|", readme, re.M))
    assert table == exported


def test_histograms_published_by_a_worker_become_prometheus_histograms(tmp_path: Path) -> None:
    batch = Histogram(BATCH_SIZE_BUCKETS)
    observed = [1, 5, 7, 200, 200, 10_000, 50_000]
    for n in observed:
        batch.observe(n)
    run_dir(tmp_path)
    write_status(tmp_path, "store", {"counters": {}, "hist": {"batch_size": batch.as_dict()}})
    families = {f.name: f for f in RunStateCollector(tmp_path).collect()}
    samples = {(s.name, s.labels.get("le")): s.value
               for s in families["ingestd_insert_batch_size"].samples}
    for le in BATCH_SIZE_BUCKETS:
        expected = sum(1 for n in observed if n <= le)
        assert samples[("ingestd_insert_batch_size_bucket", repr(float(le)))] == expected
    assert samples[("ingestd_insert_batch_size_bucket", "+Inf")] == len(observed)
    assert samples[("ingestd_insert_batch_size_count", None)] == len(observed)
    assert samples[("ingestd_insert_batch_size_sum", None)] == sum(observed)


def test_in_flight_uses_spool_positions_when_published(tmp_path: Path) -> None:
    run_dir(tmp_path)
    # Spool records 1..100 appended, 80 read by the store (5 of them still in its batch).
    write_status(tmp_path, "stream", {"counters": {"received": 100},
                                      "spool": {"records": 40, "bytes": 1, "next_seq": 101}})
    write_status(tmp_path, "store", {"counters": {"read_seq": 80, "pending": 5, "stored": 75}})
    families: Mapping[str, Any] = {f.name: f for f in RunStateCollector(tmp_path).collect()}
    assert families["ingestd_messages_in_flight"].samples[0].value == 25


def test_every_known_label_value_has_a_series_from_the_start(tmp_path: Path) -> None:
    run_dir(tmp_path)
    write_status(tmp_path, "store", {"counters": {"deadlettered": {"invalid_json": 2}}})
    samples = parse(generate_latest(RunStateCollector(tmp_path)).decode())
    for name, values in known_labels().items():
        label = {"ingestd_worker_restarts_total": "role",
                 "ingestd_control_messages_total": "type"}.get(name, "reason")
        seen = {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}
        assert set(seen) == set(values), name
    assert value(samples, "ingestd_messages_deadlettered_total", reason="invalid_json") == 2
    assert total(samples, "ingestd_messages_deadlettered_total") == 2
    assert value(samples, "ingestd_messages_dropped_total", reason="spool_full") == 0
    assert value(samples, "ingestd_worker_restarts_total", role="stream") == 0


def test_spool_bounds_are_exported_next_to_the_queue_gauges(tmp_path: Path) -> None:
    run_dir(tmp_path)
    write_status(tmp_path, "stream", {"spool": {"records": 10, "bytes": 4096}})
    bounds = SpoolSettings(max_bytes=1 << 20, max_records=1000)
    m = parse(generate_latest(RunStateCollector(tmp_path, bounds)).decode())
    assert value(m, "ingestd_spool_max_bytes") == 1 << 20
    assert value(m, "ingestd_spool_max_records") == 1000
    assert value(m, "ingestd_queue_bytes") / value(m, "ingestd_spool_max_bytes") == 4096 / (1 << 20)
    # A stream worker that publishes the bounds of the spool it opened is believed first.
    write_status(tmp_path, "stream", {"spool": {"records": 10, "bytes": 4096, "max_bytes": 8192}})
    m = parse(generate_latest(RunStateCollector(tmp_path, bounds)).decode())
    assert value(m, "ingestd_spool_max_bytes") == 8192


def generate_latest(collector: Any) -> bytes:
    from prometheus_client import CollectorRegistry
    from prometheus_client import generate_latest as render

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return bytes(render(registry))


def test_process_collector_on_the_real_daemon_matches_psutil(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    sim = SimProcess(tmp_path / "sim", "--rate", "200", "--max-tweets", "100",
                     "--control-every", "0", "--keepalive", "1").start()
    launched = time.time()
    daemon = Daemon(tmp_path / "daemon", settings_doc(sim.url, mongo_uri, mongo_database)).start()
    try:
        daemon.wait_ready()
        pids = wait_until(lambda: daemon.pids() if len(daemon.pids()) == 3 else None, 30,
                          "the supervisor to publish its workers' pids")
        collector = ProcessCollector(daemon.state_dir, pids["supervisor"])
        m = parse(generate_latest(collector).decode())
        scraped = time.time()
        procs = {role: psutil.Process(pid) for role, pid in pids.items()}
        truth = {role: (p.memory_info().rss, sum(p.cpu_times()[:2]), p.num_fds(),
                        p.create_time()) for role, p in procs.items()}
    finally:
        daemon.kill()
        sim.stop()
    for role, (rss, cpu, fds, started) in truth.items():
        assert value(m, "ingestd_processes", role=role) == 1
        assert value(m, "ingestd_process_resident_memory_bytes", role=role) == pytest.approx(
            rss, rel=0.2), role
        assert value(m, "ingestd_process_cpu_seconds_total", role=role) == pytest.approx(
            cpu, abs=0.3), role
        assert abs(value(m, "ingestd_process_open_fds", role=role) - fds) <= 3, role
        # psutil's start times rest on /proc/stat's btime, whole seconds: within 1 s.
        start = value(m, "ingestd_process_start_time_seconds", role=role)
        assert launched - 0.02 <= start <= scraped and abs(start - started) < 1, role
    assert value(m, "process_start_time_seconds") == value(
        m, "ingestd_process_start_time_seconds", role="supervisor")
    assert value(m, "process_resident_memory_bytes") == sum(
        value(m, "ingestd_process_resident_memory_bytes", role=r) for r in truth)
    assert value(m, "process_cpu_seconds_total") >= sum(
        value(m, "ingestd_process_cpu_seconds_total", role=r) for r in truth)
    assert value(m, "ingestd_processes", role="other") == 0


UNSHARE = shutil.which("unshare")
SUBSET_PID = ("umount /proc && mount -t proc -o subset=pid proc /proc && test ! -e /proc/stat "
              '&& test ! -e /proc/meminfo && exec "$0" "$@"')


class ProcSubsetDaemon(Daemon):
    """The daemon in its own PID and mount namespaces whose /proc is mounted ``subset=pid``
    (what systemd's ``ProcSubset=pid`` gives the service): no /proc/stat, meminfo, cpuinfo."""

    def start(self, extra_env: dict[str, str] | None = None) -> Daemon:
        assert UNSHARE is not None
        self.started_at = time.time()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [UNSHARE, "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "sh", "-c", SUBSET_PID, sys.executable, "-m", "ingestd", "run", "--config",
                 str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env() | (extra_env or {}),
                cwd=self.workdir)
        return self


def test_process_metrics_where_proc_stat_is_hidden(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    if os.geteuid() != 0 or UNSHARE is None:
        unavailable("needs root and unshare(1) to mount a /proc with subset=pid")
    sim = SimProcess(tmp_path / "sim", "--rate", "200", "--max-tweets", "100",
                     "--control-every", "0", "--keepalive", "1").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"})
    launched = time.time()
    daemon = ProcSubsetDaemon(tmp_path / "daemon", doc).start()
    try:
        daemon.wait_ready()
        addr = metrics_addr(daemon)

        def workers_seen() -> Samples | None:
            m = scrape(addr)
            return m if value(m, "ingestd_processes", role="store") == 1 else None
        m = wait_until(workers_seen, 30, "both workers in the process metrics")
    finally:
        daemon.kill()
        sim.stop()
    assert "proc_stat_unreadable" not in daemon.logs()
    for role in ("supervisor", "stream", "store"):
        assert value(m, "ingestd_processes", role=role) == 1
        assert value(m, "ingestd_process_resident_memory_bytes", role=role) > 5e6
    assert value(m, "process_resident_memory_bytes") > 20e6
    assert value(m, "process_open_fds") > 10
    assert value(m, "process_cpu_seconds_total") > 0
    assert launched - 1 <= value(m, "process_start_time_seconds") <= time.time()


def test_a_batchs_store_latency_counts_each_tweet_from_its_own_receipt() -> None:
    """Tweets sharing a network read's receive time are counted together: the histogram is the
    one observing each tweet's latency would give."""
    now = time.time_ns()
    ages = [0.001, 0.001, 0.001, 0.3, 0.3, 2.0, 7200.0]  # seconds before now
    entries = []
    for seq, age in enumerate(ages):
        entry = Entry(bson.encode({"_id": seq}))
        entry.tweet_id = seq
        entry.record = RecordRef(seq, 1, 1, now - int(age * 1e9), "s", 0)
        entries.append(entry)
    hist = StoreHistograms()
    hist.observe_batch(0.01, entries)
    latency = hist.as_dict()["store_latency_seconds"]
    one_by_one = Histogram(LATENCY_SECONDS_BUCKETS)
    for age in ages:
        one_by_one.observe(age)
    assert latency["count"] == len(ages) == sum(latency["counts"])
    assert latency["counts"] == one_by_one.counts
    assert sum(ages) <= latency["sum"] < sum(ages) + 0.5  # observed a moment after ``now``


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (EOF or a reset waiting to be read)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_to_the_metrics_port_hold_a_bounded_number_of_threads(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """150 connections that send nothing (a port scanner, a stuck client) held a supervisor
    thread each for HTTP_TIMEOUT: under systemd's TasksMax=128, shared with the workers, that
    would starve them of threads and forks. Those past MAX_REQUESTS are closed at once, and the
    listener serves again as soon as the idle ones go."""
    sim = SimProcess(tmp_path / "sim", "--rate", "20", "--keepalive", "1").start()
    doc = settings_doc(sim.url, mongo_uri, mongo_database, metrics={"listen": "127.0.0.1:0"})
    daemon = Daemon(tmp_path / "daemon", doc).start()
    idle: list[socket.socket] = []
    try:
        daemon.wait_ready()
        addr = metrics_addr(daemon)
        host, port = addr.rsplit(":", 1)
        assert daemon.proc is not None
        supervisor = psutil.Process(daemon.proc.pid)
        before = supervisor.num_threads()
        idle = [socket.create_connection((host, int(port))) for _ in range(150)]
        refused = wait_until(
            lambda: (n := sum(map(closed_by_peer, idle))) >= 150 - MAX_REQUESTS and n, 10,
            "the connections past MAX_REQUESTS closed by the listener")
        threads = supervisor.num_threads()
        for sock in idle:
            sock.close()
        code, _ = wait_until(lambda: http_get(f"http://{addr}/healthz"), 10, "a health check")
        scrape(addr)
        logged = [e for e in daemon.log_events() if e.get("event") == "metrics_connection_refused"]
    finally:
        for sock in idle:
            sock.close()
        daemon.stop()
        sim.stop()
    assert refused == 150 - MAX_REQUESTS
    # the handlers, and the log's fold thread (started by the first refusal line it folds)
    assert threads <= before + MAX_REQUESTS + 1, (before, threads)
    assert code == 200 and logged  # folded by the log's rate limit: at least one line
    print(f"\n[metrics flood] threads {before} → {threads} with 150 idle connections, "
          f"{refused} closed at once, {len(logged)} log lines")
