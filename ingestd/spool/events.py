"""Coverage markers: spool records (``KIND_EVENT``) that say when the stream stopped delivering.

The stream worker knows when and why its connection ended; the store worker writes the coverage
ledger (``ingestd.sink.coverage``) in spool order. Two event types go through the spool, each a
JSON object:

- ``{"type": "gap", "cause": C, "last_recv_ns": N, ...detail}``: from ``N`` (wall clock, ns, of
  the last record received before it) the stream delivers nothing, because of ``C`` (``CAUSES``).
  A fresh spool (the instance's first start) begins with a ``not_started`` gap from the start of
  that hour: before it the archive did not exist, and until the first connection nothing came.
- ``{"type": "connected", "conn": K[, "backfill_minutes": M][, "rules_pending": true]
  [, "rules_accepted": true]}``: connection K is up (first body byte of a 200): the record's own
  receive time ends an open gap, as the first message after it would; v2 says how many minutes of
  backfill it asked for. v2's ``rules_pending``: no sync of ``stream.rules`` has been accepted in
  this run yet; such a marker (and any message) does not end a ``rules_refused`` gap. One with
  ``rules_accepted`` is written for the live connection when a sync is accepted at last: it ends
  that gap (a connection coming up after the sync ends it as any other).

``GapMarkers`` is the stream worker's writer of them: one gap marker when a live stream stops, a
further one only if a different cause keeps it stopped (a reconnect answered by 420).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import orjson
import structlog

from ingestd.spool.format import KIND_EVENT, Record
from ingestd.spool.writer import SpoolWriteError, SpoolWriter

log = structlog.get_logger("ingestd.spool.events")

GAP = "gap"
CONNECTED = "connected"
# Why the stream stopped delivering. ``takeover``: another instance of a standby pair became
# active (written by the HA code); ``killed``: the supervisor vanished (SIGKILL, OOM);
# ``crashed``: found at startup, the previous stream worker wrote no marker before it ended;
# ``standby``: this instance lost the lease and left the stream to another (ha.mode: standby);
# ``not_started``: the first start on a fresh spool: the archive begins (see ``GapMarkers``);
# ``rules_refused``: v2, the endpoint refused ``stream.rules`` at the run's first sync: the stream
# may be connected, but none of the settings' rules are in force (held until a sync is accepted).
CAUSES = ("reconnect", "stall", "rate_limited", "http_error", "rejected", "reload", "stopped",
          "killed", "crashed", "takeover", "standby", "not_started", "rules_refused")
NOT_STARTED = "not_started"
RULES_REFUSED = "rules_refused"
HOUR_NS = 3600 * 10**9


class BadEvent(ValueError):
    """An event that is not a valid marker (the message says which field)."""


def encode_event(event: Mapping[str, object]) -> bytes:
    """A marker's payload; raises BadEvent if it is not one of the two types."""
    kind = event.get("type")
    if kind == GAP:
        if event.get("cause") not in CAUSES:
            raise BadEvent(f"gap event: cause {event.get('cause')!r} not in {CAUSES}")
        last = event.get("last_recv_ns")
        if type(last) is not int or last <= 0:
            raise BadEvent(f"gap event: last_recv_ns must be a positive int, got {last!r}")
    elif kind != CONNECTED:
        raise BadEvent(f"event type {kind!r}: expected {GAP!r} or {CONNECTED!r}")
    return orjson.dumps(dict(event))


def decode_event(payload: bytes) -> dict[str, Any] | None:
    """The marker in a ``KIND_EVENT`` payload, or None if it is not a valid one."""
    try:
        event = orjson.loads(payload)
        encode_event(event)
    except (orjson.JSONDecodeError, BadEvent, AttributeError):
        return None
    return event if isinstance(event, dict) else None


def append_event(spool: SpoolWriter, event: Mapping[str, object], recv_ns: int | None = None,
                 conn_id: int = 0) -> int:
    """Append one marker record (receive time ``recv_ns``, default now); return its seq.

    ``conn_id`` is the newest connection id so far: the next stream worker numbers on from the
    last record's. Raises BadEvent for an invalid event, SpoolWriteError if the disk refuses it.
    """
    payload = encode_event(event)
    return spool.append(((KIND_EVENT, payload),), conn_id, 0, recv_ns or time.time_ns())


class GapMarkers:
    """The stream worker's gap markers: written once per gap, after the spooled records.

    ``last_recv_ns`` is the receive time of the newest record that proves the stream was live (a
    message or a ``connected`` marker); ``open_cause`` is the cause of the open gap, or None.
    A fresh spool is the instance's first start: its archive begins with a ``not_started`` gap
    from the start of the current hour (``covered`` is the share of the hour with a connection,
    and there was none before), open until the first connection, whatever else keeps it open
    (420s, a stop) added to its causes.
    """

    def __init__(self, spool: SpoolWriter, last: Record | None) -> None:
        self._spool = spool
        self.conn_id = last.conn_id if last is not None else 0
        self.last_recv_ns = last.recv_ns if last is not None else 0
        self.open_cause: str | None = "none" if last is None else None
        self.written = 0
        # v2: no sync of ``stream.rules`` accepted in this run yet (set by the stream worker);
        # ``pending_since_ns``: when the first connection came up while so (None: none did).
        self.rules_pending = False
        self.pending_since_ns: int | None = None
        # Seqs of the markers written lately: the queue gauges count messages, not markers.
        self.seqs: deque[int] = deque(maxlen=256)
        self._resume(last)

    def _resume(self, last: Record | None) -> None:
        """The previous run ended without a marker after its last record: it crashed. No record
        at all: the instance's archive begins now (its first start)."""
        if last is None:
            now = time.time_ns()
            self.gap(NOT_STARTED, last_recv_ns=now - now % HOUR_NS, detail={"started_ns": now})
            return
        event = decode_event(last.payload) if last.kind == KIND_EVENT else None
        if event is not None and event["type"] == GAP:
            self.open_cause = str(event["cause"])  # its gap is still open
            self.last_recv_ns = int(event["last_recv_ns"])
            return
        self.gap("crashed")

    def seen(self, recv_ns: int) -> None:
        """Records received at ``recv_ns`` reached the spool: the stream is live."""
        self.last_recv_ns = max(self.last_recv_ns, recv_ns)
        self.open_cause = None

    def gap_start_ns(self) -> int | None:
        """Start of the open gap (the last record received before it), or None (also for the
        archive's first gap: nothing was missed before the instance existed)."""
        if self.open_cause in (None, NOT_STARTED):
            return None
        return self.last_recv_ns or None

    def connected(self, conn_id: int, *, backfill_minutes: int = 0) -> None:
        """Connection ``conn_id`` is up; ``backfill_minutes`` (v2) it asked the endpoint for."""
        now = time.time_ns()
        self.conn_id = max(self.conn_id, conn_id)
        event: dict[str, object] = {"type": CONNECTED, "conn": conn_id}
        if backfill_minutes:
            event["backfill_minutes"] = backfill_minutes
        if self.rules_pending:
            event["rules_pending"] = True
        if self._append(event, now):
            self.seen(now)
            if self.rules_pending and self.pending_since_ns is None:
                self.pending_since_ns = now

    def rules_refused(self, detail: Mapping[str, object]) -> None:
        """v2: the endpoint refused ``stream.rules`` and none of them is in force: a
        ``rules_refused`` gap from when the connection came up with the rules unsettled (or the
        open gap's start), held by the ledger until ``rules_accepted``."""
        self.gap(RULES_REFUSED, last_recv_ns=self.pending_since_ns, detail=detail)

    def rules_accepted(self, live_conn: int | None) -> None:
        """v2: a sync of ``stream.rules`` was accepted (or the API is no longer v2). A connection
        that came up before it (``live_conn``, still up) streams the settings' rules from now:
        its ``rules_accepted`` marker ends a ``rules_refused`` gap. Without a live connection
        the next one's marker, no longer pending, ends it."""
        pending, self.rules_pending, self.pending_since_ns = (
            self.pending_since_ns, False, None)
        if pending is None or live_conn is None:
            return
        now = time.time_ns()
        event = {"type": CONNECTED, "conn": live_conn, "rules_accepted": True}
        if self._append(event, now):
            self.seen(now)

    def gap(self, cause: str, *, last_recv_ns: int | None = None,
            detail: Mapping[str, object] | None = None) -> None:
        """The stream stopped delivering because of ``cause`` (one of ``CAUSES``).

        Nothing is written if a gap with this cause is already open, or if no start is known
        (a fresh spool whose ``not_started`` marker the disk refused). ``last_recv_ns``
        overrides the start (a takeover knows it from the lease); ``detail`` (small JSON values)
        is kept in the ledger.
        """
        start = last_recv_ns or self.last_recv_ns
        conn = (detail or {}).get("conn")
        if isinstance(conn, int):  # a refused attempt's id too: the next run numbers on past it
            self.conn_id = max(self.conn_id, conn)
        if not start or cause == self.open_cause:
            return
        event = {**(detail or {}), "type": GAP, "cause": cause, "last_recv_ns": start}
        if self._append(event, None):
            self.open_cause = cause
            self.last_recv_ns = start

    def after(self, seq: int) -> list[int]:
        """The seqs of the recent markers past ``seq`` (not yet acknowledged, or not yet read)."""
        return [s for s in self.seqs if s > seq]

    def _append(self, event: dict[str, object], recv_ns: int | None) -> bool:
        try:
            self.seqs.append(append_event(self._spool, event, recv_ns, self.conn_id))
        except SpoolWriteError as exc:  # the disk is failing: the intake reports it too
            if exc.kept:  # written (a failed fsync after it): the marker is in the spool
                self.seqs.append(self._spool.next_seq - 1)
            else:
                log.error("coverage_marker_lost", marker=event["type"],
                          cause=event.get("cause"), error=str(exc))
                return False
        self.written += 1
        return True
