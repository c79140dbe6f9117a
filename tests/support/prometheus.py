"""A real Prometheus server for tests: scrapes the daemon, answers PromQL over its HTTP API.

    prom = Prometheus(tmp_path / "prom", ["127.0.0.1:9464"]).start()  # skips if not installed
    try:
        prom.wait_first_scrape()
        prom.wait_value('increase(ingestd_messages_deadlettered_total[1m]) > 0', 30, "...")
        prom.query("ingestd_queue_bytes / ingestd_spool_max_bytes")
    finally:
        prom.stop()

Debian's ``prometheus`` package (``/usr/bin/prometheus``, ``/usr/bin/promtool``). Without it the
test is skipped, except under ``CI=true``, where CI installs it and a missing binary fails the test.
``rule_files`` are loaded with the configuration (alert-rule tests read them back with
``rules()``/``alerts()``).

The shipped operators' kit is read here too: ``alert_rules()`` (deploy/prometheus/),
``dashboard_queries()`` and ``grafana_expr()`` (deploy/grafana/, with Grafana's variables replaced
by concrete values so Prometheus can run the queries), ``metric_names()`` (what a query reads).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.skips import unavailable
from tests.support.wait import terminate, wait_until

BINARY = "prometheus"
START_TRIES = 3  # a free port picked here may be taken before Prometheus binds it
REPO = Path(__file__).resolve().parents[2]
ALERT_RULES = REPO / "deploy" / "prometheus" / "ingestd-alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "ingestd-alerts.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "ingestd.json"


def find_binary(name: str = BINARY) -> str:
    """``prometheus`` or ``promtool``; skips the test if absent (fails it under CI=true)."""
    fallback = f"/usr/bin/{name}"
    path = shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)
    if path is None:
        unavailable(f"{name} is not installed (Debian package `prometheus`)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector (or a scalar, with no labels)."""

    labels: dict[str, str]
    value: float


class Prometheus:
    """One Prometheus process with its own configuration and TSDB under ``workdir``."""

    def __init__(self, workdir: Path, targets: Sequence[str], *, job: str = "ingestd",
                 scrape_interval: str = "1s", rule_files: Sequence[Path] = ()) -> None:
        self.workdir, self.job = workdir, job
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                       "scrape_timeout": scrape_interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    # -- process -------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Prometheus:
        binary = find_binary()
        for _ in range(START_TRIES):
            self.port = free_port()
            self._launch(binary)
            if self._wait_ready(timeout):
                return self
        raise AssertionError(f"prometheus did not start:\n{self.tail()}")

    def _launch(self, binary: str) -> None:
        cmd = [binary, f"--config.file={self.config}",
               f"--storage.tsdb.path={self.workdir / 'data'}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.workdir)

    def _wait_ready(self, timeout: float) -> bool:
        """True once ``/-/ready`` answers; False if the process exited (e.g. port taken)."""
        def ready() -> str:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return "exited"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as resp:
                    return "ready" if resp.status == 200 else ""
            except (OSError, urllib.error.URLError):
                return ""
        return wait_until(ready, timeout, "prometheus to be ready", 0.1) == "ready"

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tail(self, n: int = 30) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- HTTP API ------------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a ``/api/v1/<path>`` answer; fails on an error status (e.g. bad PromQL)."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"prometheus /api/v1/{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """An instant query (at ``at``, Unix time, if given): its samples (empty if none)."""
        data = self.api("query", query=expr, **({"time": f"{at:.3f}"} if at else {}))
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr}: expected an instant vector, got {data['resultType']}")
        return [Sample(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The value of a query that yields at most one sample (None if it yields none)."""
        samples = self.query(expr, at)
        if len(samples) > 1:
            raise AssertionError(f"{expr}: expected one sample, got {samples}")
        return samples[0].value if samples else None

    def wait_value(self, expr: str, timeout: float, what: str) -> float:
        """Until ``expr`` yields a sample (a comparison without ``bool`` filters): its value."""
        def found() -> list[float]:
            self._assert_running()
            value = self.value(expr)
            return [value] if value is not None else []
        return wait_until(found, timeout, f"{what} ({expr})", 0.2)[0]

    def wait_first_scrape(self, timeout: float = 30.0) -> float:
        """Until the target was scraped successfully; the Unix time of that sample."""
        expr = f'up{{job="{self.job}"}} == 1'
        self.wait_value(expr, timeout, "the first successful scrape")
        return self.query(f'timestamp(up{{job="{self.job}"}})')[0].value

    def rules(self) -> Any:
        """``/api/v1/rules``: the loaded rule groups with their state."""
        return self.api("rules")

    def alerts(self) -> list[dict[str, Any]]:
        """``/api/v1/alerts``: pending and firing alerts."""
        return list(self.api("alerts")["alerts"])

    def _assert_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.tail()}")


def wait_scraped_since(prom: Prometheus, since: float, timeout: float = 30.0) -> None:
    """Until Prometheus holds a sample of its target newer than ``since`` (Unix time)."""
    prom.wait_value(f'timestamp(up{{job="{prom.job}"}}) > {since:.3f}', timeout,
                    "a scrape after the event")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``promtool`` (skipping the test if absent) and return its result, never raising."""
    return subprocess.run([find_binary("promtool"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False)


# -- the operators' kit (deploy/) ------------------------------------------------------------------


def alert_rules(path: Path = ALERT_RULES) -> list[dict[str, Any]]:
    """Every alerting rule of a rules file, in file order."""
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


@dataclass(frozen=True)
class PanelQuery:
    """One query of a dashboard panel, as written in the JSON (Grafana variables included)."""

    panel: str
    ref: str
    expr: str
    legend: str


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels, with those inside collapsed rows."""
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))
    return found


def dashboard_panels(path: Path = DASHBOARD) -> list[dict[str, Any]]:
    return _panels(json.loads(path.read_text())["panels"])


def dashboard_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    return [PanelQuery(panel["title"], t["refId"], t["expr"], t.get("legendFormat", ""))
            for panel in dashboard_panels(path) for t in panel.get("targets", [])]


GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def grafana_variables(expr: str) -> set[str]:
    """Names of the Grafana variables a query uses (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``)."""
    return {next(g for g in m.groups() if g) for m in GRAFANA_VARIABLE.finditer(expr)}


def grafana_expr(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` as Grafana would send it, every variable replaced; an unknown one fails."""
    def sub(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise AssertionError(f"{expr}: no value for Grafana variable ${name}")
        return values[name]
    return GRAFANA_VARIABLE.sub(sub, expr)


# Every series ingestd exports starts with one of these; ``up`` is Prometheus' own.
METRIC_NAME = re.compile(r"\b(?:ingestd|process)_[a-z_]+\b|\bup\b(?=\s*[{\[)=])")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (``ingestd_*``, ``process_*``, ``up``)."""
    return set(METRIC_NAME.findall(expr))


def describe(samples: Sequence[Sample], limit: int = 4) -> str:
    """A one-line account of a query's answer, for the tables tests print."""
    if not samples:
        return "(no data)"
    parts = []
    for s in samples[:limit]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                          if k not in ("job", "instance", "__name__"))
        parts.append(f"{{{labels}}} {s.value:.6g}" if labels else f"{s.value:.6g}")
    more = f" (+{len(samples) - limit} more)" if len(samples) > limit else ""
    return f"{len(samples)} series: " + "; ".join(parts) + more
