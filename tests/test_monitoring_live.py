"""The operators' kit against a real Prometheus scraping the real daemon (issue 16).

Prometheus (tests/support/prometheus.py) scrapes ``ingestd run`` every second with
deploy/prometheus/ingestd-alerts.yml loaded, while the simulator sends keep-alives (Prometheus
scrapes the counters at 0 first, so ``rate()``/``increase()`` see what follows), a burst of
tweets mixed with control messages (limit notices among them), then one invalid line. The test
then refuses one reload (a broken settings file) and kills the store worker three times, so
that the ticket alerts have something to report, and finally stops the daemon for IngestdDown.

Every dashboard query (Grafana variables replaced) and every alert expression is evaluated
through Prometheus' HTTP API: each must parse; the dashboard's and the provoked alerts' must
return data, the other alerts must be quiet on this healthy daemon, and every series they read
must exist. The table of expressions and answers is printed (``-s``) and written to
``monitoring-queries.txt`` in the test's tmp folder.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, metrics_addr, settings_doc
from tests.support.prometheus import (
    ALERT_RULES,
    Prometheus,
    alert_rules,
    dashboard_queries,
    describe,
    find_binary,
    grafana_expr,
    metric_names,
)
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

DB = "monitoring_live"
BURST = 2000
QUIET = 6  # seconds of keep-alives before the burst: Prometheus scrapes the zeros first
# (it starts and scrapes within ~2 s; the fixture fails, saying so, if it did not)
SPOOL = {"max_bytes": 96 << 20, "max_records": 400_000}
KILLS = 3  # store-worker kills: IngestdWorkerRestarting's threshold
# Alerts this run provokes (their expression must return data) ...
PROVOKED = {"IngestdDeadLetters", "IngestdReloadFailed", "IngestdWorkerRestarting",
            "IngestdLimitMissed"}
# ... and those that fire at once (no ``for:``), so Prometheus itself must report them firing.
FIRING_AT_ONCE = {"IngestdDeadLetters", "IngestdReloadFailed", "IngestdWorkerRestarting"}
# $__rate_interval: Grafana derives it from the time range; one that still covers the burst
# after the reload and the kills, so the rates and quantiles have something to show.
RATE_INTERVAL = "5m"


@dataclass
class Live:
    daemon: Daemon
    sim: SimProcess
    prom: Prometheus
    instance: str
    table: Path
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def evaluate(self, kind: str, name: str, expr: str, at: float) -> str:
        """Run ``expr`` at ``at``; record and return the account of its answer."""
        answer = describe(self.prom.query(expr, at))
        self.rows.append((f"{kind}: {name}", " ".join(expr.split()), answer))
        return answer

    def write_table(self) -> str:
        """The rows so far as a Markdown table (for the issue note), also written to a file."""
        def cell(text: str) -> str:
            return text.replace("|", "\\|")
        lines = ["| what | expression | Prometheus answered |", "| --- | --- | --- |",
                 *(f"| {cell(w)} | `{cell(e)}` | {cell(a)} |" for w, e, a in self.rows)]
        text = "\n".join(lines) + "\n"
        self.table.write_text(text)
        return text


def refuse_one_reload(daemon: Daemon) -> None:
    """A settings file that does not parse, then SIGHUP: the daemon keeps its settings."""
    good = daemon.doc
    daemon.write_settings_atomically("stream: [unclosed\n")
    daemon.send(signal.SIGHUP)
    daemon.wait_log("reload_failed", reload_failures=1)
    daemon.write_settings_atomically(good)


def kill_store_worker(daemon: Daemon, times: int) -> None:
    for n in range(1, times + 1):
        pid = daemon.worker_pid("store")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda n=n: daemon.status("supervisor").get("restarts", {}).get("store") == n,
                   30, f"store worker restart {n}")
        wait_until(lambda pid=pid: daemon.status("store").get("pid") not in (None, pid), 30,
                   "a new store worker")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str) -> Iterator[Live]:
    find_binary()  # skip (or fail under CI) before starting anything
    tmp = tmp_path_factory.mktemp("monitoring")
    script = [[{"keepalive_only": QUIET}, {"deliver": BURST}, {"bad_lines": ["truncated_json"]}]]
    sim = SimProcess(tmp / "sim", "--rate", "0", "--max-tweets", str(BURST), "--control-every",
                     "10", "--keepalive", "1", "--seed", "16", script=script).start()
    doc = settings_doc(sim.url, mongo_uri, DB, metrics={"listen": "127.0.0.1:0"}, spool=SPOOL)
    daemon = Daemon(tmp / "daemon", doc).start()
    prom: Prometheus | None = None
    try:
        daemon.wait_ready()
        instance = metrics_addr(daemon)
        prom = Prometheus(tmp / "prom", [instance], rule_files=[ALERT_RULES]).start()
        prom.wait_first_scrape()
        # The scenario's premise: that scrape came before the burst.
        assert not daemon.counters("stream").get("received"), (
            f"messages arrived before the first scrape: raise QUIET ({QUIET})")
        wait_until(lambda: daemon.counters("store").get("deadlettered"), QUIET + 60,
                   "the bad line to be dead-lettered")
        refuse_one_reload(daemon)
        kill_store_worker(daemon, KILLS)
        yield Live(daemon, sim, prom, instance, tmp / "monitoring-queries.txt")
    finally:
        if prom is not None:
            prom.stop()
        daemon.kill()
        sim.stop()


def wait_healthy_scrape(live: Live) -> float:
    """Until a scrape shows the provoked events and a healthy daemon; that scrape's time."""
    prom = live.prom
    prom.wait_value(f'sum(ingestd_worker_restarts_total{{role="store"}}) >= {KILLS}', 30,
                    "the store restarts")
    prom.wait_value("ingestd_config_reload_failures_total >= 1", 30, "the refused reload")
    prom.wait_value("min(ingestd_worker_up) == 1 and on() min(ingestd_stream_connected) == 1", 60,
                    "every worker up and the stream connected")
    return prom.query('timestamp(up{job="ingestd"})')[0].value


def test_the_limit_missed_metric_matches_the_simulator_s_notices(live: Live) -> None:
    # What IngestdLimitMissed reads, reconciled with ground truth: per connection the
    # endpoint's `track` count is cumulative, so the missed tweets are its largest value.
    truth = live.sim.ground_truth()
    missed = sum(max((e["track"] for e in truth.control("limit", conn=c["conn"])), default=0)
                 for c in truth.connections())
    assert missed > 0, "the simulator sent no limit notice: raise --control-every's frequency"
    live.prom.wait_value(f"ingestd_limit_missed_total == {missed}", 30, "the missed count")
    assert len(truth.of("bad_line")) == 1
    assert len({r["seq"] for r in dead_letters(live.daemon)}) == 1, "one bad line, one record"


def dead_letters(daemon: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted((daemon.state_dir / "deadletter").glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def test_the_loaded_rules_are_healthy_and_the_provoked_alerts_fire(live: Live) -> None:
    wait_healthy_scrape(live)
    groups = live.prom.rules()["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert set(loaded) == {r["alert"] for r in alert_rules()}

    def firing() -> set[str]:
        return {a["labels"]["alertname"] for a in live.prom.alerts() if a["state"] == "firing"}
    got = wait_until(lambda: firing() >= FIRING_AT_ONCE and firing(), 30,
                     f"Prometheus to fire {FIRING_AT_ONCE}")
    print(f"\nfiring: {sorted(got)}")
    assert got == FIRING_AT_ONCE, f"unexpected alerts firing on a healthy daemon: {got}"
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    pending = {a["labels"]["alertname"] for a in live.prom.alerts() if a["state"] == "pending"}
    assert "IngestdLimitMissed" in pending  # for: 10m


def test_every_dashboard_query_and_alert_expression_against_the_real_daemon(live: Live) -> None:
    at = wait_healthy_scrape(live)
    values = {"__rate_interval": RATE_INTERVAL, "job": "ingestd", "instance": live.instance}
    empty = []
    for query in dashboard_queries():
        expr = grafana_expr(query.expr, values)
        live.evaluate("panel", f"{query.panel} [{query.legend}]", expr, at)
        if all(math.isnan(s.value) for s in live.prom.query(expr, at)):  # also true if none
            empty.append(f"{query.panel}: {expr}")
    for rule in alert_rules():
        answer = live.evaluate("alert", rule["alert"], rule["expr"].strip(), at)
        provoked = rule["alert"] in PROVOKED
        assert (answer != "(no data)") == provoked, (
            f"{rule['alert']} ({'provoked' if provoked else 'healthy daemon'}): {answer}")
    every = {n for q in dashboard_queries() for n in metric_names(q.expr)} | {
        n for r in alert_rules() for n in metric_names(r["expr"])}
    missing = [n for n in sorted(every)
               if live.evaluate("series", n, f'count({{__name__="{n}"}})', at) == "(no data)"]
    print("\n" + live.write_table() + f"(also in {live.table})")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    assert not missing, f"series the kit reads that ingestd does not export: {missing}"


def test_ingestd_down_once_the_daemon_stops(live: Live) -> None:
    stopped = time.time()
    code, _ = live.daemon.stop()
    assert code == 0
    rule = next(r for r in alert_rules() if r["alert"] == "IngestdDown")
    live.prom.wait_value(f'timestamp(up{{job="ingestd"}}) > {stopped:.3f} '
                         f'and on() up{{job="ingestd"}} == 0', 30, "a failed scrape")
    at = live.prom.query('timestamp(up{job="ingestd"})')[0].value
    answer = live.evaluate("alert", "IngestdDown (daemon stopped)", rule["expr"], at)
    print("\n" + live.write_table().splitlines()[-1] + f"\n(table in {live.table})")
    assert answer != "(no data)"
    wait_until(lambda: any(a["labels"]["alertname"] == "IngestdDown" and a["state"] == "pending"
                           for a in live.prom.alerts()), 30, "IngestdDown pending (for: 2m)")
