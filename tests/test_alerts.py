"""The shipped alert rules (deploy/prometheus/ingestd-alerts.yml), checked with promtool.

``promtool check rules`` parses them; ``promtool test rules`` runs ingestd-alerts.test.yml, where
every alert has a case in which it fires (labels and rendered annotations compared) and one in
which it must stay quiet. Skipped without promtool (Debian package ``prometheus``), except under
``CI=true``. tests/test_monitoring_live.py runs the same rules in a real Prometheus.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.support.prometheus import ALERT_RULES, ALERT_TESTS, alert_rules, promtool

SEVERITIES = {"page", "ticket"}
ANNOTATIONS = ("summary", "description", "runbook")


def unit_cases() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    return [case for test in doc["tests"] for case in test.get("alert_rule_test", [])]


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    result = promtool("check", "rules", ALERT_RULES)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_alert_has_a_severity_and_a_runbook() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        for key in ANNOTATIONS:
            assert len(rule["annotations"].get(key, "").strip()) > 20, f"{rule['alert']}: {key}"
        # A runbook says what to check and what to do: at least two sentences.
        assert len(re.findall(r"[.:;] ", rule["annotations"]["runbook"])) >= 1, rule["alert"]


def test_the_issue_s_alerts_are_all_there() -> None:
    # Issue 16's list: what each named situation is called in the rules file.
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "IngestdStreamDisconnected": "ingestd_stream_connected",
        "IngestdStreamDegraded": "ingestd_stream_state",
        "IngestdNothingStored": "ingestd_tweets_stored_total",
        "IngestdSpoolNearlyFull": "ingestd_spool_max_bytes",
        "IngestdSpoolGrowing": "deriv(ingestd_queue_bytes",
        "IngestdDeadLetters": "ingestd_messages_deadlettered_total",
        "IngestdReloadFailed": "ingestd_config_reload_failures_total",
        "IngestdWorkerRestarting": "ingestd_worker_restarts_total",
        "IngestdLimitMissed": "ingestd_limit_missed_total",
        "IngestdDown": "up{",
        "IngestdMetricsAbsent": "absent(up{",
    }
    for name, needle in wanted.items():
        assert needle in exprs.get(name, ""), f"{name} missing or not on {needle}"


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    cases = unit_cases()
    names = {rule["alert"] for rule in alert_rules()}
    tested = {case["alertname"] for case in cases}
    assert tested <= names, f"unit tests for unknown alerts: {tested - names}"
    for name in sorted(names):
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name}: no case where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{name}: no quiet case"


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    # The harness can fail: the same tests against rules with one threshold moved.
    for path in (ALERT_RULES, ALERT_TESTS):
        shutil.copy(path, tmp_path / path.name)
    rules = tmp_path / ALERT_RULES.name
    text = rules.read_text()
    assert text.count("increase(ingestd_worker_restarts_total[30m])) >= 3") == 1
    rules.write_text(text.replace("[30m])) >= 3", "[30m])) >= 4"))
    result = promtool("test", "rules", tmp_path / ALERT_TESTS.name)
    assert result.returncode != 0, result.stdout
    assert "alertname: IngestdWorkerRestarting" in result.stdout + result.stderr


def test_the_readme_lists_every_alert_with_its_severity() -> None:
    readme = (ALERT_RULES.parents[2] / "README.md").read_text()
    section = readme.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    rows = {m[0]: m[1] for m in re.findall(r"^\| `(\w+)` \| (\w+) \|", section, re.M)}
    assert rows == {r["alert"]: r["labels"]["severity"] for r in alert_rules()}


def test_the_settings_values_the_alerts_name_are_real() -> None:
    """An operator copies ``spool.when_full: …`` from an alert into the settings: it must be a
    value the settings accept (the alerts said ``drop``, the setting is ``drop_newest``)."""
    from ingestd.config.schema import WHEN_FULL_CHOICES

    for path in (ALERT_RULES, ALERT_TESTS):
        named = re.findall(r"when_full: ([a-z_]+)", path.read_text())
        assert named, path
        assert set(named) <= set(WHEN_FULL_CHOICES), (path.name, named)
