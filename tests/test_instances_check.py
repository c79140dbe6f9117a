"""``ingestd check`` for streams that outgrow one connection or share a host.

v1.1's per-connection limits are errors (exit 78: the endpoint answers 413), v2's per-app rule
limits and a taken metrics port are warnings (exit 0); every message names the file, the key,
the figure and the limit. The metrics port is checked against real daemons: two instances on one
port, and ``check`` run on the settings of the daemon that holds it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingestd.config.settings import load_settings
from ingestd.config.stream_v2 import V2_ACCESS_LEVELS
from ingestd.tools.instances import rule_warnings
from ingestd.tools.standin import free_port
from tests.support.creds import CREDS
from tests.support.daemon import Daemon, metrics_addr, settings_doc
from tests.support.simulator import SimProcess

V1_URL = "http://127.0.0.1:9/1.1/statuses/filter.json"
V2_URL = "http://127.0.0.1:9/2/tweets/search/stream"
V2_ENV = {"TWITTER_BEARER_TOKEN": "AAAAAAAAAAAAAAAAAAAAAcheck-token"}


def check(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWITTER_")}
    return subprocess.run([sys.executable, "-m", "ingestd", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env=env | CREDS | V2_ENV)


def write(path: Path, doc: dict[str, Any]) -> Path:
    doc.setdefault("state_dir", str(path.parent / "state"))
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def v2_doc(mongo_uri: str, rules: list[str]) -> dict[str, Any]:
    doc = settings_doc(V2_URL, mongo_uri, "check")
    del doc["stream"]["track"]
    doc["stream"].update(api="v2", rules=[{"value": r} for r in rules])
    doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
    return doc


def warnings(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in result.stdout.splitlines() if ln.startswith("warning: ")]


# -- v1.1: over a connection's limits is an error that says how to split ----------------------


@pytest.mark.parametrize(("key", "items", "count", "limit"), [
    ("track", [f"word{i}" for i in range(401)], "401", "400"),
    ("follow", list(range(1, 5002)), "5001", "5000"),
    ("locations", [[i, 0, i + 1, 1] for i in range(-13, 13)], "26", "25"),
])
def test_check_refuses_a_filter_over_one_connections_limit(
        tmp_path: Path, mongo_uri: str, key: str, items: list[Any], count: str,
        limit: str) -> None:
    doc = settings_doc(V1_URL, mongo_uri, "check")
    doc["stream"][key] = items
    config = write(tmp_path / "news.yaml", doc)
    result = check(config)
    assert result.returncode == 78, result.stdout + result.stderr
    line = next(ln for ln in result.stderr.splitlines() if f"stream.{key}:" in ln)
    assert str(config) in line
    assert f"has {count} " in line and f"at most {limit} per connection" in line, line
    assert "split them across instances" in line, line


def test_check_is_quiet_at_exactly_one_connections_limits(tmp_path: Path, mongo_uri: str) -> None:
    doc = settings_doc(V1_URL, mongo_uri, "check")
    doc["stream"].update(track=[f"w{i}" for i in range(400)], follow=list(range(1, 5001)),
                         locations=[[i, 0, i + 1, 1] for i in range(-12, 13)])
    result = check(write(tmp_path / "news.yaml", doc))
    assert result.returncode == 0, result.stderr
    assert warnings(result) == []
    assert "400 track phrases, 5000 follow ids, 25 location boxes" in result.stdout


# -- v2: rules against the access levels (warnings) -------------------------------------------


def test_check_warns_about_v2_rules_over_an_access_levels_limits(
        tmp_path: Path, mongo_uri: str) -> None:
    long_rule = " OR ".join(f"word{i:03}" for i in range(80))  # 8 + 12 * 79 = 956 characters
    rules = [f"topic{i}" for i in range(29)] + [long_rule]
    config = write(tmp_path / "sports.yaml", v2_doc(mongo_uri, rules))
    result = check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    count, length = warnings(result)
    assert count.startswith(f"warning: {config}: stream.rules: 30 rules, over the limit of "
                            f"Essential (5) and Elevated (25) access"), count
    assert "Academic and Pro allow 1,000, Enterprise allows 2,500" in count
    assert "split them across instances, each with its own app" in count
    assert length.startswith(f"warning: {config}: stream.rules[29].value: {len(long_rule)} "
                             f"characters, over the limit of Essential (512) and Elevated "
                             f"(512) access"), length
    assert "Academic and Pro allow 1,024, Enterprise allows 2,048" in length


def test_v2_rules_within_every_level_draw_no_warning(tmp_path: Path, mongo_uri: str) -> None:
    smallest_count = min(level[1] for level in V2_ACCESS_LEVELS)
    smallest_length = min(level[2] for level in V2_ACCESS_LEVELS)
    rules = [(f"t{i} " + "x" * smallest_length)[:smallest_length] for i in range(smallest_count)]
    config = write(tmp_path / "v2.yaml", v2_doc(mongo_uri, rules))
    settings = load_settings(config, {**CREDS, **V2_ENV})
    assert {len(r.value) for r in settings.stream.rules} == {smallest_length}
    assert rule_warnings(settings) == []


def test_more_rules_than_any_level_documents(tmp_path: Path, mongo_uri: str) -> None:
    most = max(level[1] for level in V2_ACCESS_LEVELS)
    config = write(tmp_path / "v2.yaml", v2_doc(mongo_uri, [f"r{i}" for i in range(most + 1)]))
    (warning,) = rule_warnings(load_settings(config, {**CREDS, **V2_ENV}))
    assert f"stream.rules: {most + 1:,} rules" in warning
    assert f"Enterprise ({most:,}) access; no access level documents so many" in warning


# -- the metrics port --------------------------------------------------------------------------


def test_check_warns_when_the_metrics_port_is_taken(tmp_path: Path, mongo_uri: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write(tmp_path / "b.yaml", settings_doc(
            V1_URL, mongo_uri, "check", metrics={"listen": f"127.0.0.1:{port}"}))
        held = check(config)
    free = check(config)
    assert held.returncode == 0, held.stderr
    assert warnings(held) == [
        f"warning: {config}: metrics.listen: 127.0.0.1:{port} is already in use (another "
        f"ingestd instance?); the daemon would run without metrics. Each instance on a host "
        f"needs its own port in its settings file"]
    assert free.returncode == 0 and warnings(free) == []


def test_two_instances_on_one_metrics_port(tmp_path: Path, mongo_uri: str) -> None:
    """The first holds the port (and `check` on its own settings stays quiet); the second
    streams without metrics, says why in its log, and `check` on its settings warns."""
    port = free_port()
    sim = SimProcess(tmp_path / "sim", "--rate", "50", "--keepalive", "1").start()
    daemons = [Daemon(tmp_path / name, settings_doc(
        sim.url, mongo_uri, f"port_{name}", metrics={"listen": f"127.0.0.1:{port}"}))
        for name in ("a", "b")]
    try:
        first, second = daemons
        first.start().wait_ready()
        assert metrics_addr(first) == f"127.0.0.1:{port}"
        second.start().wait_ready()
        failed = second.wait_log("metrics_listen_failed")
        own, other = check(first.config), check(second.config)
    finally:
        for daemon in daemons:
            daemon.stop()
        sim.stop()
    assert failed["listen"] == f"127.0.0.1:{port}"
    assert "another ingestd instance" in failed["hint"] and str(second.config) in failed["hint"]
    assert own.returncode == 0 and warnings(own) == [], own.stdout
    assert other.returncode == 0, other.stderr
    assert [w for w in warnings(other) if "metrics.listen" in w and "already in use" in w]
