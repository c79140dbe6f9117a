"""v2 rules the endpoint refuses at the first sync (docs/protocol.md §7.3): the stream connects
and delivers nothing the settings' rules match. Before, the coverage ledger closed the archive's
first gap at the connection and counted the hours as covered, and the status said "previous rules
still in force" when there were none. Now the time is a ``rules_refused`` gap, held across
reconnects and restarts until a sync is accepted, and status, metrics and the log say why."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from ingestd.control.collector import RunStateCollector
from tests.support.daemon import Daemon, finish
from tests.support.wait import wait_until
from tests.test_coverage import coverage_cli, ledger, run_coverage_cli
from tests.test_v2 import ENV, RULES, start, v2_doc

BAD = [{"value": "(coffee OR music", "tag": "unbalanced"}]
REASON = "Unbalanced parentheses"


def gaps(uri: str, db: str) -> list[dict[str, Any]]:
    return ledger(uri, db, "gap")


def held_gap(uri: str, db: str) -> dict[str, Any] | None:
    """The open gap, once it records the refusal."""
    return next((g for g in gaps(uri, db)
                 if g["end"] is None and "rules_refused" in g["causes"]), None)


def metric(daemon: Daemon, name: str) -> float:
    return next(s.value for f in RunStateCollector(daemon.state_dir).collect()
                for s in f.samples if s.name == name)


def test_rules_refused_at_the_first_sync_is_a_gap_until_a_sync_is_accepted(
        tmp_path: Path, mongo_uri: str, mongo_database: str) -> None:
    """Refused at the start: the connection comes up (and reconnects, and the daemon restarts),
    yet the archive's gap stays open with cause ``rules_refused`` and the rule and the
    endpoint's reason; a reload with valid rules ends it."""
    sim, daemon = start(tmp_path, mongo_uri, mongo_database, "--rate", "50", rules=BAD)
    try:
        daemon.wait_ready()
        rejected = daemon.wait_log("rules_rejected", generation=1)
        daemon.wait_log("connected", conn=1)
        state = wait_until(lambda: (s := str(daemon.status("stream").get("state", "")))
                           .startswith("degraded") and s, 20, "the degraded state")
        refused_metric = wait_until(
            lambda: metric(daemon, "ingestd_stream_rules_refused") or None, 10, "the gauge")
        first = wait_until(lambda: held_gap(mongo_uri, mongo_database), 30, "the held gap")
        # a restart: the refusal goes on, and so does the gap (the connection comes up again)
        daemon.stop()
        daemon.start(extra_env=ENV).wait_ready()
        daemon.wait_log("rules_rejected", generation=2)
        daemon.wait_log("connected", conn=2)
        wait_until(lambda: (g := held_gap(mongo_uri, mongo_database)) and "stopped" in
                   g["causes"] and g, 30, "the stop recorded in the same gap")
        during = run_coverage_cli(daemon)
        table = coverage_cli(daemon).stdout
        # the settings fixed: the next accepted sync ends the gap on the live connection
        daemon.write_settings_atomically(v2_doc(sim, mongo_uri, mongo_database, RULES))
        daemon.send(signal.SIGHUP)
        daemon.wait_log("rules_synced", generation=3)
        closed = wait_until(lambda: next((g for g in gaps(mongo_uri, mongo_database)
                                          if g["_id"] == first["_id"] and g["end"]), None),
                            30, "the gap closed")
        healthy = wait_until(lambda: not str(daemon.status("stream").get("state", ""))
                             .startswith("degraded"), 10, "the state healthy again")
        after = metric(daemon, "ingestd_stream_rules_refused")
        rows = gaps(mongo_uri, mongo_database)
    finally:
        finish(daemon, sim)
    assert "(coffee OR music" in rejected["errors"][0] and REASON in rejected["errors"][0]
    assert "rules_refused gap" in rejected["effect"]
    assert REASON in state and "previous rules still in force" not in state, state
    assert "none of these settings' rules are in force" in state, state
    assert refused_metric == 1 and after == 0 and healthy
    # one gap from the archive's start to the accepted sync: the connections did not end it
    assert first["cause"] == "not_started" and "rules_refused" in first["causes"], first
    assert first["detail"]["rules"] == ["(coffee OR music"], first
    assert any(REASON in r for r in first["detail"]["refused"]), first
    assert [g["_id"] for g in rows] == [first["_id"]], rows
    assert set(closed["causes"]) >= {"not_started", "rules_refused", "stopped"}, closed
    # while refused, coverage counted no covered time after the first start
    hour = during["hours"][-1]
    assert "rules_refused" in hour["causes"], during
    assert hour["offline_seconds"] >= hour["not_started_seconds"] + 2, hour
    note = next(ln for ln in table.splitlines() if "rules_refused" in ln and "note" in ln)
    assert REASON in note and "until now" in note, table
