"""``ingestd coverage``: how complete the archive is, hour by hour, from the coverage ledger.

Reads ``mongo.coverage_collection`` (written by ``ingestd.sink.coverage``) and prints, per hour
and instance: tweets stored, tweets the endpoint said it did not deliver (limit notices), seconds
without a connection, the share of the hour covered, and the causes of its gaps. The hour in
which an instance first started counts the time before that start as offline (``not_started``:
the archive did not exist; ``--json`` gives that part as ``not_started_seconds``). Rows are whole
hours: the window is widened to the hours it touches (``whole_hours``). Needs only the
MongoDB URI (from the settings, with ``${...}`` resolved): no stream credentials.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingestd.config.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, ConfigError
from ingestd.config.schema import Settings
from ingestd.config.settings import load_settings, secret_values
from ingestd.logs import register_secret
from ingestd.sink.coverage import (
    SEEN_EVERY,
    hour_start_ns,
    instance_name,
    offline_span,
    split_hours,
)
from ingestd.spool.events import HOUR_NS, NOT_STARTED
from ingestd.tools.check import explain_mongo_error

if TYPE_CHECKING:
    from pymongo.collection import Collection

Document = dict[str, Any]
EXIT_MONGO = EXIT_UNAVAILABLE  # MongoDB unreachable or refusing (as check --online)
DEFAULT_WINDOW = timedelta(hours=24)
# An instance without an open gap whose last ``seen_ns`` stamp is older than this has not
# reported since: the ledger cannot say the stream was up (a few missed idle stamps: not a
# store worker merely busy between two checkpoints).
UNREPORTED_AFTER_NS = int(3 * SEEN_EVERY * 1e9)
UNREPORTED = "unreported"


@dataclass
class HourRow:
    hour: str  # ISO 8601, UTC, start of the hour
    instance: str
    tweets: int = 0
    undelivered: int = 0
    offline_seconds: float = 0.0
    # Of offline_seconds: before the instance first started (its archive did not exist yet).
    not_started_seconds: float = 0.0
    covered_percent: float = 100.0
    causes: list[str] = field(default_factory=list)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def ns(when: datetime) -> int:
    return int(when.timestamp() * 1e9)


def _at(ns_: int) -> datetime:
    return datetime.fromtimestamp(ns_ // 10**9, UTC)


def _iso(ns_: int) -> str:
    return datetime.fromtimestamp(ns_ / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def whole_hours(since_ns: int, until_ns: int) -> tuple[int, int]:
    """The table's window: from the start of ``since``'s hour to the end of the hour ``until``
    falls in. Every row is a whole hour, so an hour's offline seconds come from all of its gaps,
    not only those after a ``--since`` inside it (the default window starts mid-hour)."""
    first = hour_start_ns(since_ns)
    last = hour_start_ns(until_ns)
    return first, (last if last == until_ns else last + HOUR_NS)


def undelivered_by_hour(hours: Iterable[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """(instance, hour ns) → tweets undelivered per the limit notices of that hour.

    ``limit_max`` holds each connection's cumulative count as seen in that hour: the hour's share
    is the increase over the connection's count in earlier hours.
    """
    out: dict[tuple[str, int], int] = {}
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for doc in sorted(hours, key=lambda d: d["hour_ns"]):
        total = 0
        for conn, track in doc.get("limit_max", {}).items():
            key = (doc["instance"], conn)
            total += max(0, int(track) - seen[key])
            seen[key] = max(seen[key], int(track))
        out[(doc["instance"], doc["hour_ns"])] = total
    return out


def build_rows(hours: list[dict[str, Any]], gaps: list[dict[str, Any]], since_ns: int,
               until_ns: int, now_ns: int) -> list[HourRow]:
    """The per-hour table for the whole hours of [since, until) (``whole_hours``): hour documents
    for the tweets and limit counts (all earlier hours too: limit counts are cumulative), gap
    documents for the offline time (an open gap counts until now)."""
    undelivered = undelivered_by_hour(hours)
    rows: dict[tuple[str, int], HourRow] = {}

    def row(instance: str, hour: int) -> HourRow:
        if (instance, hour) not in rows:
            rows[(instance, hour)] = HourRow(_iso(hour), instance)
        return rows[(instance, hour)]

    first, until_ns = whole_hours(since_ns, until_ns)
    for doc in hours:
        if first <= doc["hour_ns"] < until_ns:
            r = row(doc["instance"], doc["hour_ns"])
            r.tweets = int(doc.get("tweets", 0))
            r.undelivered = undelivered[(doc["instance"], doc["hour_ns"])]
    for gap in gaps:
        if gap["cause"] == "limit":  # undelivered tweets (from the hours), not offline time
            continue
        start, end = offline_span(gap, gap["end_ns"] if gap.get("end_ns") is not None else now_ns)
        for hour, seconds in split_hours(max(start, first), min(end, until_ns)):
            r = row(gap["instance"], hour)
            r.offline_seconds = round(r.offline_seconds + seconds, 3)
            # Every cause the gap lasted through (``causes``), not only its main one.
            for cause in (gap["cause"], *(gap.get("causes") or ())):
                if cause not in r.causes:
                    r.causes.append(cause)
        _before_start(gap, first, until_ns, row)
    for (_, hour), r in rows.items():
        span = (min(hour + HOUR_NS, max(now_ns, hour + 1)) - hour) / 1e9  # the current hour: so far
        r.covered_percent = round(max(0.0, 100.0 * (1 - r.offline_seconds / span)), 2)
    return [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))]


def _before_start(gap: dict[str, Any], first: int, until_ns: int,
                  row: Callable[[str, int], HourRow]) -> None:
    """A ``not_started`` gap's part before the instance's first start (``detail.started_ns``)."""
    started = (gap.get("detail") or {}).get("started_ns")
    if gap["cause"] != NOT_STARTED or not isinstance(started, int):
        return
    for hour, seconds in split_hours(max(gap["start_ns"], first), min(started, until_ns)):
        r = row(gap["instance"], hour)
        r.not_started_seconds = round(r.not_started_seconds + seconds, 3)


def last_seen(hours: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Instance → its latest ``seen_ns`` stamp (versions before the stamps wrote none)."""
    seen: dict[str, int] = {}
    for doc in hours:
        if isinstance(stamp := doc.get("seen_ns"), int):
            seen[doc["instance"]] = max(stamp, seen.get(doc["instance"], 0))
    return seen


def unreported_gaps(seen: dict[str, int], gaps: list[dict[str, Any]], now_ns: int
                    ) -> list[dict[str, Any]]:
    """An open gap for each instance that has neither an open gap nor a ``seen_ns`` stamp in the
    last ``UNREPORTED_AFTER_NS``: from its last stamp (or the end of its last gap, if later) to
    now. Such a daemon died without recording why (every process killed, its host lost: its
    next start records the ``crashed`` gap), or its store worker has fallen behind or cannot
    reach MongoDB: either way nothing says the stream was up, so the time is not counted as
    covered (it was, silently, before the stamps)."""
    found = []
    for instance, stamp in sorted(seen.items()):
        mine = [g for g in gaps if g["instance"] == instance and g["cause"] != "limit"]
        if any(g.get("end_ns") is None for g in mine) or now_ns - stamp <= UNREPORTED_AFTER_NS:
            continue
        start = max([stamp, *(int(g["end_ns"]) for g in mine)])
        found.append({"_id": f"{instance}:{UNREPORTED}", "kind": "gap", "instance": instance,
                      "start_ns": start, "end_ns": None, "seconds": None, "cause": UNREPORTED,
                      "causes": [UNREPORTED], "detail": {"seen_ns": stamp}})
    return found


class UnknownInstance(Exception):
    """``--instance`` names no instance of the ledger, under either of its names."""


def resolve_instance(coverage: Collection[Document], settings: Settings, name: str
                     ) -> tuple[str, str | None]:
    """The ledger's name (``host:state folder``) for ``name``, which may also be an ``ha.instance``
    (what ``status`` and ``ha_takeover`` show): this daemon's own, or one its gaps record. With a
    note to print when it was mapped; raises ``UnknownInstance`` (listing the ledger's names)."""
    if coverage.find_one({"instance": name}, {"_id": 1}) is not None:
        return name, None
    if name == settings.ha.instance:
        ledger = instance_name(settings.state_dir)
    else:
        found = sorted(coverage.distinct("instance", {"kind": "gap", "ha_instance": name}))
        if len(found) != 1:
            known = sorted(coverage.distinct("instance"))
            raise UnknownInstance(
                f"coverage: --instance {name}: no such instance in the ledger, which names "
                f"instances <host>:<state folder> ({', '.join(known) or 'none yet'}); an "
                "ha.instance is accepted once one of its gaps names it")
        ledger = found[0]
    return ledger, f"coverage: ha.instance {name} is the ledger's instance {ledger}"


def fetch(settings: Settings, since: datetime, until: datetime, instance: str | None
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Hour documents before ``until``, gap documents overlapping [since, until) (callers pass
    whole hours) and the last ``seen_ns`` stamp (``last_seen``, of every hour) of each instance
    that has no open gap, wherever that gap is (one after ``until`` too: a stop says why)."""
    from ingestd.sink.mongo import make_client

    client = make_client(settings.mongo)
    try:
        coverage = client[settings.mongo.database][settings.mongo.coverage_collection]
        if instance:
            instance, note = resolve_instance(coverage, settings, instance)
            if note:
                print(note, file=sys.stderr)
        mine = {"instance": instance} if instance else {}
        hours = list(coverage.find({"kind": "hour", "hour": {"$lt": until}, **mine}))
        since_ns = ns(since)  # ``end_ns``, not ``end``: an integer compares on every server
        gaps = [g for g in coverage.find({"kind": "gap", "start": {"$lt": until}, **mine})
                if g.get("end_ns") is None or g["end_ns"] >= since_ns]
        stamps = last_seen(coverage.find({"kind": "hour", **mine}, {"instance": 1, "seen_ns": 1}))
        open_ = {g["instance"] for g in coverage.find({"kind": "gap", "end": None, **mine},
                                                       {"instance": 1})}
        seen = {name: ns_ for name, ns_ in stamps.items() if name not in open_}
    finally:
        client.close()
    return hours, gaps, seen


def render(rows: list[HourRow]) -> str:
    # The whole instance name (host:state folder): a cut one hid the host, and two hosts'
    # rows read the same (the analyst audit).
    wide = max([len("instance"), *(len(r.instance) for r in rows)])
    head = (f"{'hour (UTC)':<21} {'instance':<{wide}} {'tweets':>8} {'undelivered':>11} "
            f"{'offline s':>9} {'covered':>8}  causes")
    lines = [head]
    for r in rows:
        lines.append(f"{r.hour:<21} {r.instance:<{wide}} {r.tweets:>8} {r.undelivered:>11} "
                     f"{r.offline_seconds:>9.1f} {r.covered_percent:>7.2f}%  "
                     f"{','.join(r.causes) or '-'}")
    if not rows:
        lines.append("(no coverage records in this period)")
    return "\n".join(lines)


def gap_json(gap: dict[str, Any]) -> dict[str, Any]:
    return {"id": gap["_id"], "instance": gap["instance"], "start": _iso(gap["start_ns"]),
            "end": _iso(gap["end_ns"]) if gap.get("end_ns") is not None else None,
            "start_ns": gap["start_ns"], "end_ns": gap.get("end_ns"),
            "seconds": gap.get("seconds"), "cause": gap["cause"], "causes": gap.get("causes"),
            "detail": gap.get("detail", {}),
            **({"started_at": _iso(gap["detail"]["started_ns"])} if "started_at" in gap else {}),
            **{k: gap[k] for k in ("backfill_minutes", "backfilled_seconds", "undelivered",
                                   "message_seconds") if k in gap},
            **{k: _iso(gap[f"{k}_ns"]) for k in ("last_message", "first_message")
               if gap.get(f"{k}_ns")}}


def lag_notes(gaps: list[dict[str, Any]]) -> list[str]:
    """Gaps whose hole by the messages' own times is longer than by receive times: the
    connection lagged behind the endpoint (its queue dropped, code 4). The hours count such a gap
    by that longer hole (``offline_span``); the note says why an hour's offline seconds exceed
    the gap's own."""
    notes = []
    for gap in sorted(gaps, key=lambda g: g["start_ns"]):
        if gap.get("end_ns") is None or offline_span(gap)[0] >= gap["start_ns"]:
            continue  # open, or no lag: the hours count it as it is
        by_messages, by_receipt = gap["message_seconds"], gap["seconds"]
        notes.append(f"note: the {gap['cause']} gap at {_iso(gap['start_ns'])} lasted "
                     f"{by_receipt:.1f} s by receipt but {by_messages:.1f} s by the messages' own "
                     f"times (from {_iso(gap['last_message_ns'])}): the connection lagged behind "
                     f"the endpoint, and the tweets published meanwhile are missing (the "
                     f"hours count the longer hole)")
    return notes


def unreported_notes(gaps: list[dict[str, Any]]) -> list[str]:
    return [f"note: {g['instance']} has not reported since {_iso(g['detail']['seen_ns'])}: it "
            "was stopped without a word (killed, its host lost) and not started again, or it "
            "cannot store into MongoDB; counted offline (unreported) from "
            f"{_iso(g['start_ns'])} until now" for g in gaps if g["cause"] == UNREPORTED]


def rules_notes(gaps: list[dict[str, Any]]) -> list[str]:
    """v2 ``rules_refused`` gaps: the stream may have been connected, so the cause is said with
    the endpoint's reasons (an analyst would otherwise look for a network problem)."""
    notes = []
    for gap in gaps:
        if "rules_refused" not in (gap.get("causes") or ()):
            continue
        detail = gap.get("detail") or {}
        refused = "; ".join(str(r) for r in detail.get("refused") or ()) or "no reason recorded"
        until = _iso(gap["end_ns"]) if gap.get("end_ns") is not None else "now"
        notes.append(f"note: from {_iso(gap['start_ns'])} until {until} the endpoint refused "
                     f"stream.rules ({refused}): none of the settings' rules were in force, so "
                     "nothing they match was streamed, connected or not (rules_refused)")
    return notes


def run_coverage(config: Path, *, since: str | None, until: str | None, instance: str | None,
                 as_json: bool) -> int:
    now = datetime.now(UTC)
    try:
        end = parse_time(until) if until else now
        start = parse_time(since) if since else end - DEFAULT_WINDOW
    except ValueError as exc:
        print(f"--since/--until: not an ISO 8601 time: {exc}", file=sys.stderr)
        return 2
    if start >= end:
        print(f"--since {start.isoformat()} is not before --until {end.isoformat()}",
              file=sys.stderr)
        return 2
    try:
        first, last = whole_hours(ns(start), ns(end))
        start, end = _at(first), _at(last)
    except (ValueError, OverflowError, OSError):  # whole hours past year 9999 (or before 1)
        print(f"--since/--until: out of range: {start.isoformat()} to {end.isoformat()}",
              file=sys.stderr)
        return 2
    try:
        settings = load_settings(config, secrets=False, resolve=("mongo.uri",))
    except ConfigError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    for secret in secret_values(settings):
        register_secret(secret)  # a driver error's text may quote the password
    try:
        hours, gaps, seen = fetch(settings, start, end, instance)
    except UnknownInstance as exc:
        print(exc, file=sys.stderr)
        return 2
    except Exception as exc:  # a driver error is a finding to report, not a traceback
        print(f"coverage: {explain_mongo_error(exc, settings)}", file=sys.stderr)
        return EXIT_MONGO
    gaps += [g for g in unreported_gaps(seen, gaps, ns(now)) if g["start_ns"] < ns(end)]
    rows = build_rows(hours, gaps, ns(start), ns(end), ns(now))
    if as_json:
        period = {"since": start.isoformat(), "until": end.isoformat()}
        print(json.dumps({**period, "hours": [asdict(r) for r in rows],
                          "gaps": [gap_json(g) for g in sorted(gaps, key=lambda g: g["start_ns"])]},
                         indent=2))
    else:
        print("\n".join([render(rows), *lag_notes(gaps), *unreported_notes(gaps),
                         *rules_notes(gaps)]))
    return 0
