"""A real Prometheus server scraping the real daemon: what an operator's queries see (issue 19).

One scenario for the module: the simulator sends a burst of tweets at full speed (the store
worker reads them in large chunks, which starts its encoder child), then only keep-alives for
``QUIET`` seconds, then one invalid JSON line. Prometheus scrapes every second from the start, so
the dead letter happens after its first scrapes, the case ``increase()`` used to miss.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from ingestd.control.collector import known_labels
from tests.support.daemon import Daemon, metrics_addr, settings_doc
from tests.support.prometheus import Prometheus, find_binary
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

DB = "prometheus_scrape"
BURST = 3000
QUIET = 8  # seconds of keep-alives before the bad line: Prometheus scrapes the zeros first
# (it starts and scrapes within ~2 s; the fixture fails, saying so, if it did not)
SPOOL = {"max_bytes": 96 << 20, "max_records": 400_000}
ROLES = ("supervisor", "stream", "store", "encoder")
LABEL = {"ingestd_worker_restarts_total": "role", "ingestd_control_messages_total": "type"}


@dataclass
class Scenario:
    daemon: Daemon
    sim: SimProcess
    prom: Prometheus
    before_event: float  # Unix time of a scrape taken before any dead letter
    launched: float  # Unix time just before the daemon was started


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str) -> Iterator[Scenario]:
    find_binary()  # skip (or fail under CI) before starting anything
    tmp = tmp_path_factory.mktemp("prometheus")
    script = [[{"deliver": BURST}, {"keepalive_only": QUIET}, {"bad_lines": ["truncated_json"]}]]
    sim = SimProcess(tmp / "sim", "--rate", "0", "--max-tweets", str(BURST), "--control-every",
                     "0", "--keepalive", "1", "--seed", "5", script=script).start()
    doc = settings_doc(sim.url, mongo_uri, DB, metrics={"listen": "127.0.0.1:0"}, spool=SPOOL)
    doc["writer"]["encoder_process"] = True  # a child for the burst, whatever the stand-in's speed
    launched = time.time()
    daemon = Daemon(tmp / "daemon", doc).start()
    prom: Prometheus | None = None
    try:
        daemon.wait_ready()
        prom = Prometheus(tmp / "prom", [metrics_addr(daemon)]).start()
        first = prom.wait_first_scrape()
        # The scenario's premise: that scrape came before the dead letter.
        assert not daemon.counters("store").get("deadlettered"), (
            f"the bad line was dead-lettered before the first scrape: raise QUIET ({QUIET})")
        yield Scenario(daemon, sim, prom, first, launched)
        daemon.stop()
    finally:
        if prom is not None:
            prom.stop()
        daemon.kill()
        sim.stop()


def test_labelled_counters_have_every_known_series_at_zero_before_any_event(
        scenario: Scenario) -> None:
    known = known_labels()
    # The lists come from the producing code; these values must be among them.
    assert {"invalid_json", "invalid_utf8", "mongo_rejected"} <= set(
        known["ingestd_messages_deadlettered_total"])
    assert set(known["ingestd_worker_restarts_total"]) == {"stream", "store"}
    assert {"spool_full", "disk_error", "cut_by_disconnect"} == set(
        known["ingestd_messages_dropped_total"])
    assert {"network", "stall", "http"} <= set(known["ingestd_stream_reconnects_total"])
    for name, values in known.items():
        label = LABEL.get(name, "reason")
        samples = scenario.prom.query(name, at=scenario.before_event)
        seen = {s.labels[label]: s.value for s in samples}
        assert set(values) <= set(seen), f"{name}: no series for {set(values) - set(seen)}"
        assert all(v == 0 for v in seen.values()), f"{name} before any event: {seen}"


def test_a_dead_letter_after_the_first_scrape_shows_in_increase(scenario: Scenario) -> None:
    daemon, prom = scenario.daemon, scenario.prom
    wait_until(lambda: daemon.counters("store").get("deadlettered"), QUIET + 60,
               "the bad line to be dead-lettered")
    assert daemon.counters("store")["deadlettered"] == {"invalid_json": 1}
    assert len(scenario.sim.ground_truth().of("bad_line")) == 1
    lines = [line for f in (daemon.state_dir / "deadletter").glob("*.jsonl")
             for line in f.read_text().splitlines()]
    assert len(lines) == 1, "the dead-letter file holds the one record"
    expr = 'increase(ingestd_messages_deadlettered_total{reason="invalid_json"}[1m])'
    increase = prom.wait_value(f"{expr} > 0", 30, "increase() to see the dead letter")
    # Extrapolated over the window: about 1, never 0.
    assert 0.5 < increase < 3
    assert prom.value('sum(increase(ingestd_messages_deadlettered_total[1m])) > 0') is not None


def test_process_metrics_cover_every_process_of_the_daemon(scenario: Scenario) -> None:
    prom, daemon = scenario.prom, scenario.daemon
    prom.wait_value('ingestd_processes{role="encoder"} == 1', 60, "the encoder child")
    for role in ROLES:
        assert prom.value(f'ingestd_processes{{role="{role}"}}') == 1
        for name in ("resident_memory_bytes", "virtual_memory_bytes", "open_fds", "max_fds",
                     "start_time_seconds", "cpu_seconds_total"):
            value = prom.value(f'ingestd_process_{name}{{role="{role}"}}')
            assert value is not None and value >= 0, f"ingestd_process_{name}{{role={role}}}"
        rss = prom.value(f'ingestd_process_resident_memory_bytes{{role="{role}"}}')
        assert rss is not None and 5e6 < rss < 1e9, f"{role} RSS {rss}"
    # The daemon-wide figures are the sums of the per-role ones (same scrape).
    for total, part in (("process_resident_memory_bytes", "ingestd_process_resident_memory_bytes"),
                        ("process_open_fds", "ingestd_process_open_fds"),
                        ("process_virtual_memory_bytes", "ingestd_process_virtual_memory_bytes")):
        assert prom.value(f"{total} - on() sum({part})") == 0, total
    assert prom.value("process_cpu_seconds_total - on() sum(ingestd_process_cpu_seconds_total)"
                      " >= 0") is not None
    rss = prom.value("process_resident_memory_bytes")
    cpu = prom.value("process_cpu_seconds_total")
    fds = prom.value("process_open_fds")
    start = prom.value("process_start_time_seconds")
    assert rss is not None and 20e6 < rss < 2e9
    assert cpu is not None and cpu > 0
    assert fds is not None and fds >= 4 * 3  # stdio and more in each process
    supervisor = psutil.Process(daemon.pids()["supervisor"])
    # psutil's start time rests on /proc/stat's btime, whole seconds: within 1 s.
    assert start is not None and abs(start - supervisor.create_time()) < 1
    assert scenario.launched - 0.02 <= start <= scenario.before_event
    print(f"\nprocess_resident_memory_bytes={rss:.0f} process_cpu_seconds_total={cpu:.2f} "
          f"process_open_fds={fds:.0f} start={start:.2f} psutil={supervisor.create_time():.2f}")
    assert prom.value("process_max_fds") == min(
        p.rlimit(psutil.RLIMIT_NOFILE)[0] for p in [supervisor, *supervisor.children(True)])


def test_spool_fullness_ratio_can_be_written_from_the_metrics(scenario: Scenario) -> None:
    prom = scenario.prom
    assert prom.value("ingestd_spool_max_bytes") == SPOOL["max_bytes"]
    assert prom.value("ingestd_spool_max_records") == SPOOL["max_records"]
    ratio = prom.value("ingestd_queue_bytes / ingestd_spool_max_bytes")
    assert ratio is not None and 0 <= ratio < 1
    # What an alert rule would say: above 80 % of the bound (not the case here).
    assert prom.value("ingestd_queue_bytes / ingestd_spool_max_bytes > 0.8") is None
    ratio = prom.value("ingestd_queue_records / ingestd_spool_max_records")
    assert ratio is not None and 0 <= ratio < 1


def test_every_scrape_succeeds_at_a_one_second_interval(scenario: Scenario) -> None:
    # Reading /proc for every process must keep a scrape well inside the 1 s timeout: 20 s of
    # scrapes, every one up.
    prom = scenario.prom
    prom.wait_value('count_over_time(up{job="ingestd"}[20s]) >= 16', 30, "20 s of scrapes")
    assert prom.value('min_over_time(up{job="ingestd"}[20s])') == 1
