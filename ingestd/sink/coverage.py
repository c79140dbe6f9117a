"""The coverage ledger: gaps in the stream and per-hour figures, next to the tweets.

Collection ``mongo.coverage_collection`` (default ``coverage``), two kinds of document, both
written by the store worker in spool order (before the spool is acked, like the tweets):

- gap ``{_id: "<instance>:<start_ns>", kind: "gap", instance, start, end, start_ns, end_ns,
  seconds, cause, causes, detail}``: the stream delivered nothing from ``start`` (the last record
  received before the gap marker) to ``end`` (the first record after it: a message or a
  connection coming up); ``end`` is null while the gap is open. Dates are BSON dates (UTC).
  ``last_message_time``: the own timestamp (``timestamp_ms``) of the last message before the gap;
  ``first_message_time`` that of the first message after it, and ``message_seconds`` the hole by
  those own times (longer than ``seconds`` when the connection lagged behind the endpoint);
  ``previous_end_ns`` the end of the gap before in this run, which such a lag never reaches past.
  In ``ha.mode: standby`` also ``ha_instance``; a ``takeover`` gap has ``start_basis``: ``lease``
  (the previous holder's last receive time, as its last lease renewal said) until the previous
  holder's own ledger reports the gap in which it stopped (see ``Handover``): then
  ``previous_holder``, and ``start`` is its last message's timestamp (``lease_start`` keeps the
  first estimate). The instance's first gap, ``not_started``, starts at the start of the hour of
  its first start (``started_at``): the archive did not exist before.
- hour ``{_id: "hour:<instance>:<YYYY-MM-DDTHH>", kind: "hour", instance, hour, tweets,
  hour_ns, tweets, seq, limit_max: {conn: cumulative limit.track}, gap_seconds: {start_ns:
  seconds in this hour}, offline_seconds, seen_ns, seen}``: ``tweets`` newly stored (duplicates
  not counted) that were received in that hour, counted up to spool record ``seq``; a gap's
  seconds are those of its ``offline_span`` (a lagging connection's reach back by its
  ``message_seconds``); ``seen_ns``: the ledger is complete up to then (the last stored tweet's
  receive time, or now on an idle pass with everything stored, once per ``SEEN_EVERY``).

Replaying the spool after a crash rewrites the same documents: gap documents are replaced by
their ``_id``; limit counts and gap seconds are maxima keyed by connection and gap; a replayed
tweet is counted only if its record is past the hour's ``seq`` and the stored copy was written
from that very record (an insert whose ledger write the crash prevented).

The store worker is the only writer of its instance's documents, so an hour document is kept in
memory and replaced whole (no update operators: the MongoDB stand-in mishandles dotted upserts).
"""

from __future__ import annotations

import functools
import operator
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog
from pymongo import ASCENDING
from pymongo.collection import Collection

from ingestd.documents import surrogates
from ingestd.documents.messages import MAX_DATE_MS, timestamp_ms
from ingestd.sink.batch import ENTRY_RECV_NS, Entry
from ingestd.sink.insert import written_from
from ingestd.sink.mongo import Document
from ingestd.sink.retry import Retrier
from ingestd.sink.target import MongoTarget
from ingestd.spool.events import CONNECTED, GAP, HOUR_NS, NOT_STARTED, RULES_REFUSED, decode_event
from ingestd.spool.format import KIND_MESSAGE, Record

log = structlog.get_logger("ingestd.sink.coverage")

_KEEP_HOURS = 4  # hour documents cached (replay and late records touch recent hours only)
# A plain reconnect that then met something more specific (420, 401…) takes that cause.
_WEAK_CAUSE = "reconnect"
# Causes with which an instance stops streaming for good (until restarted or active again).
_LAST_CAUSES = ["standby", "crashed", "killed", "stopped"]
_SEQ = operator.attrgetter("record.seq")
_RECENT = 8  # records remembered before a gap: the last one with a time may not be the very last
HANDOVER_LOOK_EVERY = 2.0  # s between looks for a previous holder's report
HANDOVER_WAIT = 600.0  # s after a takeover: a previous holder that returns later is not awaited
# s between an idle, caught-up store worker's ``seen_ns`` stamps: a daemon that dies without a
# word (SIGKILL of every process, a host lost) records no gap until it starts again, so the
# stamps say how far the ledger is known to be complete (``ingestd coverage``'s ``unreported``)
SEEN_EVERY = 60.0


def instance_name(state_dir: Path) -> str:
    """This daemon in the ledger: host name and state folder (stable across restarts)."""
    return f"{socket.gethostname()}:{state_dir.resolve()}"


def utc(ns: int) -> datetime:
    """A BSON-date-ready UTC datetime (milliseconds kept; BSON stores no finer)."""
    return datetime.fromtimestamp(ns // 10**6 / 1000, UTC)


def hour_start_ns(ns: int) -> int:
    return ns - ns % HOUR_NS


def message_time_ns(record: Record | None) -> int | None:
    """The message's own time (``timestamp_ms``, top level or one level down as in limit and
    delete notices), in ns; None if the record is no message or carries none."""
    if record is None or record.kind != KIND_MESSAGE:
        return None
    try:
        obj, _ = surrogates.loads(record.payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    inner = [v for v in obj.values() if isinstance(v, dict)] if "timestamp_ms" not in obj else []
    for value in [obj.get("timestamp_ms"), *(v.get("timestamp_ms") for v in inner[:1])]:
        # as a tweet's created_at reads it, and only a time a date holds: the ledger stores it
        # as one (``utc``), which raised on "99999999999999999999" and crash-looped the worker
        millis = timestamp_ms(value)
        if millis is not None and 0 <= millis <= MAX_DATE_MS:
            return millis * 10**6
    return None


def split_hours(start_ns: int, end_ns: int) -> list[tuple[int, float]]:
    """(hour start ns, seconds of [start, end) in that hour) for every hour it touches."""
    parts = []
    hour = hour_start_ns(start_ns)
    while hour < end_ns:
        lo, hi = max(start_ns, hour), min(end_ns, hour + HOUR_NS)
        if hi > lo:
            parts.append((hour, (hi - lo) / 1e9))
        hour += HOUR_NS
    return parts


LAG_SECONDS = 1.0  # a hole by the messages' own times this much longer: the connection lagged


# Seconds by which the previous holder's clock may seem apart from this host's without being so:
# this host sees a renewal up to a look (0.25 s) late and records the takeover up to a stream
# loop's tick (0.1 s) after it won the lease.
SKEW_TOLERANCE = 1.0


def _gap_start(event: Mapping[str, Any], record: Record) -> tuple[int, int]:
    """A gap marker's start (ns), by this host's clock; for a takeover, also how far ahead of
    this host's the previous holder's clock is, if beyond ``SKEW_TOLERANCE`` (ns; else 0).

    A takeover gap starts at the previous holder's last receive time, by its clock, and ends at
    this host's first message, by this one's. With the clocks apart by more than the hole, the gap
    came out too long, or (the holder's clock ahead) started after this host's records and was
    never closed: coverage said the pair was offline while it streamed. The holder's last renewal
    carries its clock (``renewed_ns``); this host saw it ``lease_age`` before the marker, by its
    monotonic clock: the difference is the skew, taken off the start. (A released lease's age
    counts from the release: there, and without ``renewed_ns``, only a start later than the
    marker itself is moved, to the marker.)"""
    start_ns = int(event["last_recv_ns"])
    age, renewed = event.get("lease_age"), event.get("renewed_ns")
    if event.get("cause") != "takeover" or not isinstance(age, int | float):
        return start_ns, 0
    if isinstance(renewed, int) and renewed and not event.get("released"):
        skew = renewed - (record.recv_ns - round(age * 1e9))
        if abs(skew) > SKEW_TOLERANCE * 1e9 or start_ns - skew > record.recv_ns:
            return min(start_ns - skew, record.recv_ns), skew
    if start_ns > record.recv_ns:
        return record.recv_ns, start_ns - record.recv_ns
    return start_ns, 0


def offline_span(gap: Document, end_ns: int | None = None) -> tuple[int, int]:
    """The receive-time span a gap's offline seconds count: ``start`` to ``end`` (``end_ns`` for
    an open gap), reaching back from ``end`` by ``message_seconds`` when that hole, by the
    messages' own times, is ``LAG_SECONDS`` or more longer. Then the connection lagged: the
    endpoint dropped what it had queued for it, tweets published before ``start``. Anchored at
    ``end``, whose first message is fresh, so the endpoint's clock is never mixed with ours.
    Never past ``previous_end_ns``, the end of the gap before: the lagging connection came up
    then, so nothing older is this gap's (and odd message times cannot stretch it further)."""
    start = gap["start_ns"]
    end = gap["end_ns"] if end_ns is None else end_ns
    held, floor = gap.get("message_seconds"), gap.get("previous_end_ns")
    if held is not None and floor is not None and held >= (end - start) / 1e9 + LAG_SECONDS:
        start = max(min(start, end - round(held * 1e9)), min(start, floor))
    return start, end


def _takes_over(gap: Document, cause: str) -> bool:
    """A takeover ends a standby's first gap (``not_started``) even when the previous holder's
    last message came before that gap's start: the pair's hole gets its own takeover gap."""
    return cause == "takeover" and gap["cause"] == NOT_STARTED


def _held(gap: Document | None, event: Mapping[str, Any] | None) -> bool:
    """A ``rules_refused`` gap (v2: the endpoint refused ``stream.rules`` at the run's first
    sync) is not ended by a connection coming up while the rules are still unsettled
    (``rules_pending``), nor by messages (what the endpoint streams meanwhile is not what the
    settings' rules match): only by a connection once a sync was accepted. It survives
    reconnects and restarts while the refusal lasts."""
    return gap is not None and RULES_REFUSED in gap["causes"] and (
        event is None or bool(event.get("rules_pending")))


LIMIT_CONNECTIONS = 8  # connections whose limit counts LimitSpans keeps in memory


class LimitSpans:
    """Limit notices as ``limit`` gap documents: tweets the filters matched and the endpoint did
    not deliver, one document per connection and hour, from the notice before (or the connection
    coming up) to the latest one. The stream was not offline: these carry ``undelivered``, and
    no offline seconds count for them. A notice's count is cumulative per connection, so a
    replayed notice (not above the last count seen) changes nothing."""

    def __init__(self, collection: Callable[[], Collection[Document]], retrier: Retrier,
                 instance: str) -> None:
        self._collection, self._retry, self.instance = collection, retrier, instance
        self._up: dict[int, int] = {}  # conn -> when it came up (ns)
        self._last: dict[int, tuple[int, int]] = {}  # conn -> (count, ns) of its last notice
        self._docs: dict[str, Document] = {}  # the current hour's documents, by _id

    def connected(self, conn: int, ns: int) -> None:
        """A connection came up. Only the last ``LIMIT_CONNECTIONS`` are remembered: a daemon
        makes one per reconnect or reload for months, and a late notice comes from the one
        before at most (an older one's count is read back from its document, ``_load_last``)."""
        self._up[conn] = ns
        if len(self._up) > LIMIT_CONNECTIONS:
            kept = list(self._up)[-LIMIT_CONNECTIONS:]  # in the order they came up
            self._up = {c: self._up[c] for c in kept}
            self._last = {c: v for c, v in self._last.items() if c in self._up}

    def notice(self, conn: int, count: int, ns: int) -> Document | None:
        """The document changed by this notice, or None if it adds nothing."""
        before, since = self._last.get(conn) or self._load_last(conn, ns)
        if count <= before:
            return None
        self._last[conn] = (count, ns)
        hour = utc(hour_start_ns(ns)).strftime("%Y-%m-%dT%H")
        doc_id = f"{self.instance}:limit:{conn}:{hour}"
        doc = self._docs.get(doc_id) or self._retry.with_retry(
            "coverage load", lambda: self._collection().find_one({"_id": doc_id}))
        if doc is None:
            doc = {"_id": doc_id, "kind": "gap", "instance": self.instance, "cause": "limit",
                   "causes": ["limit"], "conn": conn, "start": utc(since), "start_ns": since,
                   "undelivered": 0, "detail": {"conn": conn}}
            # Earlier hours' documents are complete: keep only this hour's.
            self._docs = {k: v for k, v in self._docs.items() if k.endswith(hour)}
        doc.update(end=utc(ns), end_ns=ns, seconds=round((ns - doc["start_ns"]) / 1e9, 3),
                   undelivered=doc["undelivered"] + count - before, limit_track=count)
        self._docs[doc_id] = doc
        return doc

    def _load_last(self, conn: int, ns: int) -> tuple[int, int]:
        """After a restart: the connection's last count from its latest document."""
        found = self._retry.with_retry("coverage load", lambda: list(self._collection().find(
            {"kind": "gap", "cause": "limit", "instance": self.instance, "conn": conn},
            {"limit_track": 1, "end_ns": 1}).sort("end_ns", -1).limit(1)))
        if found:
            return int(found[0]["limit_track"]), int(found[0]["end_ns"])
        return 0, self._up.get(conn, ns)


class Handovers:
    """Takeover gaps waiting for the previous holder's report.

    A takeover gap starts at the previous holder's last receive time as its last lease renewal
    said. The endpoint may have delivered more to it after that (a frozen holder's socket kept
    filling; it reads and stores those when it wakes). Once the previous holder's own ledger has
    the gap in which it stopped (a final cause), its last message's own time is where the pair's
    hole began. Looked for every ``HANDOVER_LOOK_EVERY`` s, for ``HANDOVER_WAIT`` s at most."""

    def __init__(self, collection: Callable[[], Collection[Document]], retrier: Retrier,
                 clock: Callable[[], float]) -> None:
        self._collection, self._retry, self._clock = collection, retrier, clock
        self.waiting: list[tuple[Document, float]] = []  # (takeover gap, deadline)
        self._next_look = 0.0

    def watch(self, gap: Document) -> None:
        self.waiting.append((gap, self._clock() + HANDOVER_WAIT))

    def reports(self) -> list[tuple[Document, int | None]]:
        """(gap, the previous holder's last message ns or None) for every gap reported since
        the last look; a gap past its deadline is given up (it keeps the lease's start)."""
        now = self._clock()
        if not self.waiting or now < self._next_look:
            return []
        self._next_look = now + HANDOVER_LOOK_EVERY
        reported, waiting = [], []
        for gap, deadline in self.waiting:
            report = self._retry.with_retry("coverage handover",
                                            functools.partial(self._report, gap))
            if report is not None:
                reported.append((gap, report[0]))
            elif now < deadline:
                waiting.append((gap, deadline))
            else:
                log.info("coverage_handover_unreported", gap=gap["_id"],
                         previous_holder=gap["detail"].get("from"),
                         effect="the takeover gap keeps the start its lease said")
        self.waiting = waiting
        return reported

    def _report(self, gap: Document) -> tuple[int | None] | None:
        """``(last message ns,)`` from the previous holder's gaps since the lease's start, once
        one of them says it stopped (``_LAST_CAUSES``); None while none has."""
        holder = gap["detail"].get("from")
        if not holder or holder == "unknown":
            return (None,)
        docs = self._collection().find(
            {"kind": "gap", "ha_instance": holder, "start_ns": {"$gte": gap["lease_start_ns"]}},
            {"causes": 1, "last_message_ns": 1, "start_ns": 1}).sort("start_ns", ASCENDING)
        last: int | None = None
        for doc in docs:
            if doc.get("last_message_ns"):
                last = max(last or 0, int(doc["last_message_ns"]))
            if set(doc.get("causes") or ()) & set(_LAST_CAUSES):
                return (last,)
        return None


class CoverageLedger:
    """Turns spool markers, stored tweets and limit notices into ledger documents.

    ``on_event``/``on_live``/``on_limit`` are called while records are taken (no I/O);
    ``on_stored``/``on_duplicates`` by the inserter; ``flush`` writes what changed, before the
    store worker acks the spool.
    """

    def __init__(self, target: MongoTarget, retrier: Retrier, instance: str,
                 ha_instance: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._target, self._retry, self.instance = target, retrier, instance
        self.ha_instance = ha_instance
        self._recent: deque[Record] = deque(maxlen=_RECENT)  # the last live records
        self._handovers = Handovers(self.collection, retrier, clock)
        self._limits = LimitSpans(self.collection, retrier, instance)
        self._open: Document | None = None  # the open gap
        self._last_closed: Document | None = None
        self._loaded = False
        # Markers, limit notices and the first record after a marker, taken but not applied:
        # MongoDB is only touched by ``flush`` (a record is taken even while MongoDB is down).
        self._queue: list[tuple[Record, dict[str, Any] | None]] = []
        self._maybe_open = True  # a gap may be open: the next live record is queued
        # After a gap marker or a connection coming up, the next live record is queued too: its
        # own time is where the gap ends by the messages' times (``_first_message``).
        self._first_after = False
        self._dirty_gaps: dict[str, Document] = {}
        self._hours: dict[int, Document] = {}
        self._dirty_hours: set[int] = set()
        self._persisted: dict[int, int] = {}  # hour -> spool seq its stored ``tweets`` count to
        self.gaps_recorded = 0
        self._clock = clock
        self._seen_at = -SEEN_EVERY  # clock time of the last idle stamp

    def collection(self) -> Collection[Document]:
        db = self._target.collection.database
        return db[self._target.settings.mongo.coverage_collection]

    # ---------------------------------------------------------------- records

    def on_event(self, record: Record) -> bool:
        """A ``KIND_EVENT`` record; False if it is not a valid marker (the caller logs it)."""
        event = decode_event(record.payload)
        if event is None:
            return False
        if event["type"] == CONNECTED:  # queued as itself: it may carry the backfill asked for
            self._queue.append((record, event))
            self._maybe_open, self._first_after = False, True
        elif event["type"] == GAP:
            if event["cause"] != "takeover":  # the previous holder's messages are not ours
                event["last_message_ns"] = self._last_message_ns()
            self._queue.append((record, event))
            self._maybe_open = self._first_after = True
        return True

    def _last_message_ns(self) -> int | None:
        """The own time of the last message before the gap (a disconnect notice has none)."""
        for record in reversed(self._recent):
            if (ns := message_time_ns(record)) is not None:
                return ns
        return None

    def on_live(self, record: Record) -> None:
        """A record the stream delivered: the first after a gap marker (or after a restart, when
        a gap may have been left open) ends that gap. Called for every record: O(1)."""
        self._recent.append(record)
        if self._maybe_open or self._first_after:
            self._queue.append((record, None))
            self._maybe_open = self._first_after = False

    def on_limit(self, record: Record, track: int) -> None:
        """A limit notice: ``track`` tweets undelivered so far on this connection (cumulative)."""
        self._queue.append((record, {"type": "limit", "track": track}))

    def on_stored(self, entries: Sequence[Entry]) -> None:
        """Tweets newly stored (not duplicates): counted in the hour they were received. A batch
        nearly always falls within one hour: then it is counted at once, not tweet by tweet (this
        runs on the store worker's busy thread for every tweet)."""
        if not entries:
            return
        received = list(map(ENTRY_RECV_NS, entries))
        first, last = min(received), max(received)
        # the markers before these tweets are applied before they are written: the ledger is
        # complete up to them
        self._seen(last)
        if hour_start_ns(first) == hour_start_ns(last):
            self._count(first, len(entries), max(map(_SEQ, entries)))
            return
        for entry in entries:
            self._count(entry.record.recv_ns, 1, entry.record.seq)

    def _count(self, ns: int, tweets: int, seq: int) -> None:
        doc = self._hour(ns)
        doc["tweets"] += tweets
        doc["seq"] = max(doc["seq"], seq)

    def on_duplicates(self, entries: list[Entry]) -> None:
        """Tweets found already stored. One stored from this very record (same spool seq and
        connection) by an insert whose ledger write a crash prevented is counted now: its seq is
        past what the hour document counted. Others are true duplicates."""
        unsure = []
        for entry in entries:
            self._hour(entry.record.recv_ns)  # loads the hour's persisted ``seq``
            if entry.record.seq > self._persisted[hour_start_ns(entry.record.recv_ns)]:
                unsure.append(entry)
        if not unsure:
            return
        ids = [e.tweet_id for e in unsure]
        tweets = self._target.collection
        found = self._retry.with_retry("coverage check", lambda: {
            d["_id"]: d.get("_ingest") for d in tweets.find({"_id": {"$in": ids}},
                                                             {"_id": 1, "_ingest": 1})})
        self.on_stored([e for e in unsure if written_from(found.get(e.tweet_id), e.record)])

    # ---------------------------------------------------------------- writing

    def mark(self) -> int:
        """Where the records taken so far end: ``flush(mark)`` applies those and no later ones
        (the store worker takes the next batch while this one's insert is in flight)."""
        return len(self._queue)

    def apply(self, upto: int | None = None) -> None:
        """Apply the markers and notices taken (up to ``upto``, a ``mark()``), in spool order, to
        the documents held here (``write`` stores them)."""
        if not self._loaded:
            self._load_open_gap()
        cut = len(self._queue) if upto is None else upto
        queue, self._queue = self._queue[:cut], self._queue[cut:]
        for record, event in queue:
            self._apply(record, event)
        self._settle_handovers()

    def write(self) -> None:
        """Write the changed gap and hour documents (retried like every MongoDB write).

        The store worker calls this before each spool checkpoint
        (``SpoolReader.before_checkpoint``), not after each batch: a checkpoint never passes
        records whose counts are not stored, and a crash between two checkpoints replays the
        records after the last one, counted again by their provenance (see the module
        docstring). In a burst that is one write per checkpoint interval instead of one per
        batch, each a round trip the store loop waited for (bench/LOG.md, "The coverage
        ledger written with the checkpoint")."""
        self._write_dirty()

    def settle(self, caught_up: bool = False) -> None:
        """On an idle pass: a takeover gap's start may still await the previous holder's
        report, which can come while this stream is quiet. ``caught_up``: every record the
        spool holds is stored and applied, so the ledger is complete until now: stamped once
        every ``SEEN_EVERY`` in the current hour's document (a quiet hour gets one too). Only
        while MongoDB answers (the ledger read from it this run, no failure since): an idle
        worker must not sit in a retry for a stamp while the records it should read wait."""
        if self._handovers.waiting and self._loaded:
            self._settle_handovers()
            self._write_dirty()
        if caught_up and not self._queue and self._loaded and self._retry.healthy() \
                and self._clock() - self._seen_at >= SEEN_EVERY:
            self._seen_at = self._clock()
            self._seen(time.time_ns())
            self._write_dirty()

    def _seen(self, ns: int) -> None:
        """The ledger is complete up to ``ns``: kept in its hour's document (``seen_ns``)."""
        doc = self._hour(ns)
        if ns > doc.get("seen_ns", 0):
            doc.update(seen_ns=ns, seen=utc(ns))

    def _write_dirty(self) -> None:
        if self._dirty_gaps:
            gaps, self._dirty_gaps = list(self._dirty_gaps.values()), {}
            self._retry.with_retry("coverage gaps", lambda: self._replace_all(gaps))
        if self._dirty_hours:
            hours = [self._hours[h] for h in sorted(self._dirty_hours)]
            self._dirty_hours.clear()
            self._retry.with_retry("coverage hours", lambda: self._replace_all(hours))
            for doc in hours:
                self._persisted[hour_start_ns(doc["hour_ns"])] = doc["seq"]
            for old in sorted(self._hours)[:-_KEEP_HOURS]:
                del self._hours[old], self._persisted[old]

    def _replace_all(self, docs: list[Document]) -> None:
        collection = self.collection()
        for doc in docs:  # the whole document with its _id: the stand-in drops a filter's _id
            collection.replace_one({"_id": doc["_id"]}, doc, upsert=True)

    # ---------------------------------------------------------------- gaps

    def _apply(self, record: Record, event: dict[str, Any] | None) -> None:
        if event is None or event["type"] == CONNECTED:
            gap = self._open
            if gap is not None and record.recv_ns > gap["start_ns"] and not _held(gap, event):
                self._close(gap, record.recv_ns, record.conn_id)
            closed = self._last_closed  # by this record, or by the connection's first message
            if event is not None and event.get("backfill_minutes") and closed is not None \
                    and closed.get("conn_after") == record.conn_id:
                self._backfilled(closed, int(event["backfill_minutes"]))
            if event is not None and not event.get("rules_accepted"):  # not a new connection
                self._limits.connected(int(event.get("conn") or record.conn_id), record.recv_ns)
            else:
                self._first_message(record)
        elif event["type"] == "limit":
            doc = self._hour(record.recv_ns)
            key = str(record.conn_id)
            doc["limit_max"][key] = max(doc["limit_max"].get(key, 0), event["track"])
            if (span := self._limits.notice(record.conn_id, int(event["track"]), record.recv_ns)):
                self._dirty_gaps[span["_id"]] = span
        else:
            self._on_gap(event, record)

    def _on_gap(self, event: dict[str, Any], record: Record) -> None:
        cause = str(event["cause"])
        start_ns, skew_ns = _gap_start(event, record)
        gap = self._open
        if gap is not None and cause == NOT_STARTED:
            # The spool began again under an open gap (replayed from its first record, or emptied
            # by hand): that gap goes on; its hour was no fresh archive's.
            return
        detail = {k: v for k, v in event.items()
                  if k not in ("type", "cause", "last_recv_ns", "last_message_ns")}
        if gap is not None and (start_ns <= gap["start_ns"] or _held(gap, None)) \
                and not _takes_over(gap, cause):
            self._more_cause(gap, cause)  # the same gap, kept open by something else
            if cause == RULES_REFUSED:  # the latest refusal's rules and reasons
                gap["detail"].update(detail)
                self._dirty_gaps[gap["_id"]] = gap
            return
        if gap is not None:  # the record that ended it was lost: it ended by this start at last
            self._close(gap, max(start_ns, gap["start_ns"]), record.conn_id)
        last_ns = event.get("last_message_ns")
        self._open = {
            "_id": f"{self.instance}:{start_ns}", "kind": "gap", "instance": self.instance,
            "start": utc(start_ns), "end": None, "start_ns": start_ns, "end_ns": None,
            "seconds": None, "cause": cause, "causes": [cause], "detail": detail,
            "marker_recv": utc(record.recv_ns),
            "last_message_time": utc(last_ns) if last_ns else None, "last_message_ns": last_ns,
            **({"previous_end_ns": self._last_closed["end_ns"]} if self._last_closed else {}),
            **({"ha_instance": self.ha_instance} if self.ha_instance else {}),
            **({"started_at": utc(int(detail["started_ns"]))}
               if cause == NOT_STARTED and isinstance(detail.get("started_ns"), int) else {}),
        }
        if cause == "takeover":
            self._open.update(start_basis="lease", lease_start=self._open["start"],
                              lease_start_ns=start_ns)
            if skew_ns:  # the previous holder's times are read through it (``_take_report``)
                self._open.update(start_basis="lease_age", clock_skew_ns=skew_ns)
                log.warning("coverage_clock_skew", previous_holder=detail.get("from"),
                            ahead_seconds=round(skew_ns / 1e9, 3),
                            effect="the takeover gap is timed by this host's clock and the "
                            "lease's age", action="synchronise the hosts' clocks (NTP)")
            self._handovers.watch(self._open)
        self._dirty_gaps[self._open["_id"]] = self._open
        self.gaps_recorded += 1
        log.info("coverage_gap_opened", cause=cause, start=self._open["start"].isoformat(),
                 **detail)

    def _more_cause(self, gap: Document, cause: str) -> None:
        if cause in gap["causes"]:
            return
        gap["causes"].append(cause)
        if gap["cause"] == _WEAK_CAUSE:
            gap["cause"] = cause
        self._dirty_gaps[gap["_id"]] = gap

    def _close(self, gap: Document, end_ns: int, conn_after: int) -> None:
        gap.update(end=utc(end_ns), end_ns=end_ns, conn_after=conn_after)
        self._dirty_gaps[gap["_id"]] = gap
        self._open, self._last_closed = None, gap
        self._count_hours(gap, +1)
        log.info("coverage_gap_closed", cause=gap["cause"], seconds=gap["seconds"])

    def _first_message(self, record: Record) -> None:
        """The first message after the last gap closed, on the connection that closed it: the
        hole by the messages' own times is ``message_seconds``, from the last message's
        ``timestamp_ms`` before the gap to this one's. It is longer than ``seconds`` (receive
        times) when the connection lagged behind the endpoint: a code-4 disconnect after
        FALLING_BEHIND drops the endpoint's queue, tweets published before the gap's ``start``."""
        gap = self._last_closed
        if gap is None or "first_message_ns" in gap or gap.get("conn_after") != record.conn_id:
            return
        first_ns, last_ns = message_time_ns(record), gap.get("last_message_ns")
        gap["first_message_ns"] = first_ns
        gap["first_message_time"] = utc(first_ns) if first_ns else None
        if first_ns and last_ns:
            gap["message_seconds"] = round(max(0, first_ns - last_ns) / 1e9, 3)
            if gap.get("end_ns") is not None and offline_span(gap)[0] < gap["start_ns"]:
                self._count_hours(gap, +1)  # a lag reaches back: it spans more than it did
        self._dirty_gaps[gap["_id"]] = gap

    def _count_hours(self, gap: Document, sign: int) -> None:
        """Add (+1) or take back (-1) a closed gap's seconds in the hours it spans (its
        ``offline_span``). Keyed by the gap's first start (its ``_id``): a replay or a corrected
        start never counts it twice."""
        gap["seconds"] = round((gap["end_ns"] - gap["start_ns"]) / 1e9, 3)
        key = str(gap["_id"]).rsplit(":", 1)[-1]
        for hour, seconds in split_hours(*offline_span(gap)):
            doc = self._hour(hour)
            if sign > 0:
                doc["gap_seconds"][key] = round(seconds, 3)
            else:
                doc["gap_seconds"].pop(key, None)
            doc["offline_seconds"] = round(sum(doc["gap_seconds"].values()), 3)

    # ---------------------------------------------------------------- handovers

    def _settle_handovers(self) -> None:
        """Takeover gaps whose previous holder has reported: their start moves (see
        ``Handovers``)."""
        for gap, last_ns in self._handovers.reports():
            self._take_report(gap, last_ns)

    def _take_report(self, gap: Document, last_ns: int | None) -> None:
        """Move the gap's start to the previous holder's last message, within [start, end]."""
        gap["start_basis"] = "previous_holder"
        self._dirty_gaps[gap["_id"]] = gap
        end_ns = gap["end_ns"]
        if last_ns is not None:  # the previous holder's clock, as this host's
            last_ns -= int(gap.get("clock_skew_ns") or 0)
        if last_ns is None or last_ns <= gap["start_ns"]:
            return
        start_ns = min(last_ns, end_ns) if end_ns is not None else last_ns
        if end_ns is not None:
            self._count_hours(gap, -1)
        gap.update(start=utc(start_ns), start_ns=start_ns)
        if end_ns is not None:
            self._count_hours(gap, +1)
        log.info("coverage_handover_settled", gap=gap["_id"], start=gap["start"].isoformat(),
                 moved=round((start_ns - gap["lease_start_ns"]) / 1e9, 3))

    def _backfilled(self, gap: Document, minutes: int) -> None:
        """v2: the connection that ended the gap asked for ``minutes`` of backfill: the endpoint
        resends what it published in the last minutes, so that much of the gap is recovered."""
        gap["backfill_minutes"] = minutes
        gap["backfilled_seconds"] = round(min(gap["seconds"], minutes * 60.0), 3)
        self._dirty_gaps[gap["_id"]] = gap

    def _load_open_gap(self) -> None:
        """After a restart: the gap this instance left open (a replay may re-open it too)."""
        def find() -> Document | None:
            docs = list(self.collection().find(
                {"kind": "gap", "instance": self.instance, "end": None}))
            return max(docs, key=lambda d: d.get("start_ns", 0), default=None)
        self._open = self._retry.with_retry("coverage load", find)
        self._loaded = True

    # ---------------------------------------------------------------- hours

    def _hour(self, ns: int) -> Document:
        """The hour document of ``ns`` (loaded once, then kept), marked to be written."""
        hour = hour_start_ns(ns)
        self._dirty_hours.add(hour)
        if (doc := self._hours.get(hour)) is not None:
            return doc
        hour_id = f"hour:{self.instance}:{utc(hour).strftime('%Y-%m-%dT%H')}"
        found = self._retry.with_retry(
            "coverage load", lambda: self.collection().find_one({"_id": hour_id}))
        doc = found or {"_id": hour_id, "kind": "hour", "instance": self.instance,
                        "hour": utc(hour), "hour_ns": hour, "tweets": 0, "seq": 0,
                        "limit_max": {}, "gap_seconds": {}, "offline_seconds": 0.0}
        self._persisted.setdefault(hour, doc["seq"])
        self._hours[hour] = doc
        return doc


