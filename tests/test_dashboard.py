"""The shipped Grafana dashboard (deploy/grafana/ingestd.json), checked without Grafana.

It must import anywhere (datasource only through ``${DS_PROMETHEUS}``, declared in ``__inputs``),
lay out without overlaps, use only variables it defines, and every query, with its variables
replaced as Grafana would, must parse (``promtool check rules`` over a generated rules file).
tests/test_monitoring_live.py runs the same queries against a real Prometheus scraping ingestd.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.prometheus import (
    DASHBOARD,
    dashboard_panels,
    dashboard_queries,
    grafana_expr,
    grafana_variables,
    metric_names,
    promtool,
)

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
BUILTIN = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
# What Grafana would send for a concrete selection (job ingestd, every instance).
SELECTION = {**BUILTIN, "job": "ingestd", "instance": ".*"}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def uids(node: object) -> list[str]:
    """Every ``uid`` value nested in ``node``."""
    if isinstance(node, dict):
        return [*([node["uid"]] if "uid" in node else []),
                *(u for v in node.values() for u in uids(v))]
    if isinstance(node, list):
        return [u for v in node for u in uids(v)]
    return []


def test_the_datasource_is_an_import_input() -> None:
    doc = dashboard()
    assert [(i["name"], i["type"], i["pluginId"]) for i in doc["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])
    for var in doc["templating"]["list"]:
        assert var["datasource"] == DATASOURCE, var["name"]
    # No datasource uid of the machine it was made on, anywhere.
    assert set(uids(doc["panels"] + doc["templating"]["list"])) == {"${DS_PROMETHEUS}"}


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_target_has_an_expression_a_ref_and_a_legend() -> None:
    for panel in dashboard_panels():
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
    for query in dashboard_queries():
        assert query.expr.strip() and query.legend.strip(), query


def test_queries_use_only_variables_the_dashboard_defines() -> None:
    defined = {var["name"] for var in dashboard()["templating"]["list"]}
    assert defined == {"job", "instance"}
    for query in dashboard_queries():
        unknown = grafana_variables(query.expr) - defined - set(BUILTIN)
        assert not unknown, f"{query.panel}: {query.expr} uses {unknown}"
        # Every query is scoped to the selected job and instances.
        assert {"job", "instance"} <= grafana_variables(query.expr), query.expr


def test_the_issue_s_panels_are_there() -> None:
    read = {name for q in dashboard_queries() for name in metric_names(q.expr)}
    exprs = " ".join(q.expr for q in dashboard_queries())
    wanted = {
        "ingestd_messages_received_total", "ingestd_tweets_stored_total",
        "ingestd_messages_deadlettered_total", "ingestd_messages_dropped_total",
        "ingestd_queue_records", "ingestd_queue_bytes", "ingestd_spool_max_bytes",
        "ingestd_spool_max_records", "ingestd_stream_reconnects_total",
        "ingestd_stream_backoff_seconds", "ingestd_receive_to_store_seconds_bucket",
        "ingestd_insert_duration_seconds_bucket", "ingestd_limit_missed_total",
        "ingestd_config_generation", "ingestd_config_reload_failures_total",
        "ingestd_worker_restarts_total", "process_cpu_seconds_total",
        "process_resident_memory_bytes", "ingestd_process_cpu_seconds_total",
        "ingestd_process_resident_memory_bytes",
    }
    assert not wanted - read, f"no panel reads {wanted - read}"
    assert "histogram_quantile(0.99, sum by (le) (rate(ingestd_receive_to_store_seconds_bucket" \
        in exprs
    assert "ingestd_queue_bytes{" in exprs and "/ ingestd_spool_max_bytes{" in exprs


def test_every_query_parses(tmp_path: Path) -> None:
    # promtool has no "parse this expression" command: one recording rule per query does it.
    rules = [{"record": f"dashboard:query_{n}", "expr": grafana_expr(q.expr, SELECTION)}
             for n, q in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_grafana_expr_replaces_every_variable_form() -> None:
    expr = 'rate(x{job=~"$job", instance=~"${instance}", a="[[job]]"}[$__rate_interval])'
    assert grafana_expr(expr, SELECTION) == \
        'rate(x{job=~"ingestd", instance=~".*", a="ingestd"}[1m])'
    with pytest.raises(AssertionError, match=r"\$nope"):
        grafana_expr("rate(x[$nope])", SELECTION)
