"""The stream worker process: reader → ``spool.intake.SpoolIntake`` → spool, with heartbeat and
reloads. Loaded by the stream worker only (pycurl; never prometheus_client, and pymongo only in
``ha.mode: standby``, for the lease: see ``lease``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ingestd.control.lease_gate import LeaseGate, OpenGate, open_gate
from ingestd.control.pipe import Reload
from ingestd.control.worker import (
    STATUS_INTERVAL,
    RateMeter,
    StatusPublisher,
    Ticker,
    WorkerContext,
    run_role,
    start_worker,
    wake_on_signals,
)
from ingestd.source.backoff import outage_grace
from ingestd.source.stream_reader import TICK, StreamReader
from ingestd.source.v2_rules import RulesSync
from ingestd.spool.events import GapMarkers
from ingestd.spool.intake import SpoolIntake
from ingestd.spool.writer import SpoolWriter

if TYPE_CHECKING:
    from ingestd.control.lease import Takeover

log = structlog.get_logger("ingestd.worker")


class StreamRole:
    """Keep a connection open and append every framed message to the spool until SIGTERM."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        settings, sp = ctx.settings, ctx.settings.spool
        self.spool = SpoolWriter(settings.state_dir / "spool", segment_bytes=sp.segment_bytes,
                                 max_bytes=sp.max_bytes, max_records=sp.max_records,
                                 fsync_interval=sp.fsync_interval)
        drop = sp.when_full == "drop_newest"
        # Coverage markers (before the intake writes anything: a crash is told by the last record).
        last = self.spool.last_record
        self.markers = GapMarkers(self.spool, last)
        self.intake = SpoolIntake(self.spool, drop=drop, on_written=self.markers.seen)
        self.reader = StreamReader(settings.stream, settings.auth, ctx.generation, self.intake,
                             is_full=self.intake.is_full, drop_when_full=drop,
                             flush=self.intake.flush, markers=self.markers,
                             first_conn_id=last.conn_id + 1 if last and last.conn_id else 1)
        # The stream worker itself keeps the lease: it alone can close the stream at once, even
        # if the supervisor or the store worker is stuck (docs/design.md, "Standby pairs").
        reader = self.reader
        self.lease: LeaseGate = open_gate(settings, lambda: reader.last_message_ns)
        reader.may_connect = self.lease.may_stream
        reader.stand_down_why = self.lease.stand_down_why
        reader.stand_down_drain = self.lease.drain_budget
        if not isinstance(self.lease, OpenGate):
            reader.gather_seconds = 0.0  # see StreamReader.gather_seconds and max_wait below
        # X API v2: rules live on the server; synced at start and on every reload, on a thread,
        # while the connection keeps streaming (no-op for v1.1).
        self.rules = RulesSync()
        self.rules.request(settings.stream, settings.auth, ctx.generation)
        # Until a sync is accepted, none of the settings' rules may be in force: a connection
        # coming up meanwhile does not end a rules_refused gap (``follow_rules``).
        self.markers.rules_pending = settings.stream.api == "v2"
        self.rules_gap_for: int | None = None  # the refused generation a gap marker records
        self.meter = RateMeter()
        self.write_status = StatusPublisher(settings.state_dir, "stream")
        self.status = Ticker(STATUS_INTERVAL, self.publish)
        self.reader.max_wait = self.max_wait
        self.reader.wake_fds.append(wake_on_signals())
        self.passes = 0  # loop passes: published, so that an idle loop is observable
        # the reader's state and the spool's error in the last status file
        self.published_state: tuple[str, str] | None = None
        # Wall clock since which this instance should stream and has no accepted connection
        # (from the start); None while connected, or standing by (ha.mode: standby).
        self.unconnected_since: float | None = time.time()

    def run(self) -> int:
        log.info("stream_worker_started", generation=self.ctx.generation)
        try:
            self.reader.run(lambda: bool(self.ctx.stop), self.tick)
            self.intake.give_up_held()  # before the stop's marker: they came before it
            # The supervisor vanished without stopping us (SIGKILL, OOM): not a requested stop.
            # The marker carries the newest connection id, also one still unanswered at the
            # stop: the next run numbers on past it (the CI saw a reused id 7).
            self.markers.conn_id = max(self.markers.conn_id, self.reader.last_conn_id)
            self.markers.gap("killed" if self.ctx.control.closed.is_set() else "stopped")
        finally:
            self.lease.close()  # after the reader closed the stream: a standby may take over now
            self.rules.close()
            self.spool.close()
            self.publish()
        log.info("stream_worker_stopped", received=self.counters()["received"])
        return 0

    def tick(self) -> None:
        self.passes += 1
        self.spool.maybe_sync()
        self.intake.retry()
        self.intake.check_bound()  # a full spool's episode ends here when nothing else looks
        while (command := self.ctx.control.poll()) is not None:
            if isinstance(command, Reload):  # the stop budget is the store worker's concern
                self.reload(command)
        for takeover in self.lease.takeovers():
            self._on_takeover(takeover)
        self.follow_rules()
        self.ctx.orphaned()
        if (self.reader.state, self.intake.last_error or self.spool.read_error) \
                != self.published_state:
            self.publish()  # a new state (connected, disk failing…) shows at once, not ≤ 1 s late
        self.status()

    def max_wait(self) -> float:
        """Seconds the reader may sleep on a quiet stream: until the next fsync or heartbeat
        (held records and, in ha.mode standby, the lease are checked every short tick)."""
        if self.intake.held or not isinstance(self.lease, OpenGate):
            return TICK  # the standby lease's margins were set for a check every TICK
        return min(self.spool.sync_due_in(), self.status.due_in())

    def _on_takeover(self, takeover: Takeover) -> None:
        """This instance became active in place of ``takeover.previous_holder``, whose last
        received message was at ``last_recv_ns`` (wall clock, ns; 0 if unknown). Runs on the
        stream loop's thread (the spool's owner) before the new connection delivers anything:
        the place to record the takeover gap."""
        previous, last_recv_ns = takeover.previous_holder, takeover.last_recv_ns
        last_message = last_recv_ns / 1e9 if last_recv_ns else None
        if takeover.counted:
            log.warning("ha_takeover", previous_holder=previous, lease_age=takeover.lease_age,
                        released=takeover.released, previous_last_message_time=last_message)
            # ``released``: the age counts from the release, not from the holder's last renewal
            detail: dict[str, Any] = {"lease_age": takeover.lease_age,
                                      **({"released": True} if takeover.released else {}),
                                      **({"renewed_ns": takeover.renewed_ns}
                                         if takeover.renewed_ns else {})}
        else:  # the lease was free at the first look (the pair had stopped): nobody deposed
            free = takeover.free_since
            free_for = round(max(time.time() - free, 0.0), 3) if free is not None else None
            log.info("ha_lease_was_free", previous_holder=previous, released_at=free,
                     free_seconds=free_for, previous_last_message_time=last_message)
            detail = {"released": True, "free_seconds": free_for}
        # The pair's hole: from the old holder's last message (its last renewal said when) to
        # this instance's first; recorded in this instance's ledger (docs/design.md, coverage).
        self.markers.gap("takeover", last_recv_ns=last_recv_ns or None,
                         detail={"from": previous or "unknown", **detail})

    def follow_rules(self) -> None:
        """v2: the rules sync's verdict in the coverage ledger (the sync runs on its own thread;
        markers are written here, on the spool's owner). A refusal before any sync of this run
        was accepted leaves none of the settings' rules in force: a ``rules_refused`` gap, held
        across reconnects and restarts until a sync is accepted. A later reload's refusal keeps
        the previous rules in force: no gap."""
        status = self.rules.status
        if self.reader.stream.api == "v2" and status.generation is None:
            refused = status.refused_generation
            if refused is not None and refused != self.rules_gap_for:
                self.rules_gap_for = refused
                self.markers.rules_refused({
                    "rules_generation": refused, "refused": status.refused[:5],
                    "rules": [r.value for r in self.reader.stream.rules][:20]})
            return
        if self.markers.rules_pending:
            live = self.reader.active if self.reader.connected else None
            self.markers.rules_accepted(live.conn_id if live is not None else None)

    def reload(self, command: Reload) -> None:
        if (new := self.ctx.reload(command)) is None:
            return
        self.reader.reload(new.settings.stream, new.settings.auth, new.generation)
        self.rules.request(new.settings.stream, new.settings.auth, new.generation)
        log.info("reload_applied", generation=new.generation)

    def publish(self) -> None:
        """``run/stream.json``: the heartbeat, with the counters and the spool's fill."""
        reader, rules = self.reader, self.rules
        self.published_state = (reader.state, self.intake.last_error or self.spool.read_error)
        unreadable = (f"degraded: spool unreadable: {self.spool.read_error}"
                      if self.spool.read_error else "")
        state = self.intake.last_error or unreadable or (
            f"degraded: {rules.error}; {_rules_effect(rules.status.generation)}" if rules.error
            else self.lease.state(reader.state))
        # Taken before the counters: a message received after it is counted in the next report
        # (what a kill loses of it, the supervisor reads back from the spool: tally).
        counted_ns = time.time_ns()
        self.write_status({
            "generation": reader.generation, "state": state, "counted_ns": counted_ns,
            "counters": self.counters(),
            "progress": reader.stats.bytes + reader.stats.attempts,
            "conn": reader.active.conn_id if reader.active else None,
            # A filter change in progress (make-before-break): the new connection, the old ones.
            "pending": reader.pending.conn_id if reader.pending else None,
            "retiring": [c.conn_id for c in reader.retiring],
            # Delivering, whatever the state's words (degraded rules still stream the old ones).
            "delivering": bool(reader.active and reader.active.announced),
            "backoff": reader.backoff.last_delay,
            "rate": round(self.meter.update(reader.stats.received), 1),
            "spool": self.spool_status(),
            "last_message_time": reader.last_message_ns / 1e9 if reader.last_message_ns else None,
            "loop_passes": self.passes,
            **self.connection_health(),
            "gathers": reader.gathers,  # passes followed by a gather pause (a slow stream)
            **({"rules": rules.status.as_dict()} if reader.stream.api == "v2" else {}),
            "ha": self.lease.view(),
        })

    def connection_health(self) -> dict[str, Any]:
        """What ``status`` judges the stream by: since when it has had no accepted connection
        while it should have one, the grace for that, and the HTTP refusals since the last one.
        Called on every state change (``tick``), so ``since`` is exact to a loop pass."""
        reader, expected = self.reader, self.lease.may_stream()
        if reader.connected or not expected:
            self.unconnected_since = None
        elif self.unconnected_since is None:
            self.unconnected_since = time.time()
        refused = reader.refused if expected else None  # a standby's past refusals are moot
        return {"unconnected_since": self.unconnected_since,
                "outage_grace": outage_grace(reader.stream.backoff),
                "refused": refused.as_dict() if refused else None}

    def counters(self) -> dict[str, Any]:
        """The reader's counters; ``received`` counts records that reached the spool: the
        intake's disk-error drops were framed by the reader but never spooled, so they move to
        ``dropped``."""
        stats = self.reader.stats.as_dict()
        dropped = self.intake.dropped
        stats["received"] -= dropped
        stats["dropped"] = {**stats["dropped"], **({"disk_error": dropped} if dropped else {})}
        stats["spool_read_failures"] = self.spool.read_failures
        return stats

    def spool_status(self) -> dict[str, Any]:
        spool = self.spool
        records, nbytes = spool.backlog()
        # Coverage markers are records but not messages: the queue gauges count messages.
        markers = self.markers.after(spool.acked_seq)
        return {"records": max(0, records - len(markers)), "bytes": nbytes,
                "next_seq": spool.next_seq, "markers": markers,
                "held": sum(len(h[0]) for h in self.intake.held),
                "max_bytes": spool.max_bytes, "max_records": spool.max_records,
                # Since when the bound has held the intake back (None: there is room).
                "full_since": self.intake.full_since, "when_full": self.intake.policy}


def _rules_effect(in_force: int | None) -> str:
    """What the endpoint filters by while a sync is refused: the last accepted generation's rules
    (a refused reload), or none of the settings' (refused since the start of the run)."""
    if in_force is not None:
        return "previous rules still in force"
    return ("none of these settings' rules are in force: the stream delivers nothing they match "
            "(coverage: rules_refused gap)")


def run_stream_worker(config_path: Path, generation: int) -> int:
    """``ingestd worker --role stream``: the process's body; its exit code."""
    ctx = start_worker(config_path, "stream", generation)
    return ctx if isinstance(ctx, int) else run_role(ctx, "stream", StreamRole)
