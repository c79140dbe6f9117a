"""The store worker: spool records → documents → MongoDB, acking the spool only behind MongoDB.

Every record read ends in exactly one bucket of the counters (``sink.counters``); ``pending`` is
tweets in the batch not yet flushed; ``skipped{deleted}`` is tweets not stored because a delete
for them was already seen (a tombstone). A control message whose MongoDB effect is rejected stays
counted under ``control`` and is also dead-lettered (``control_rejected``).

This module reads and batches: tweets are batched and flushed on size, bytes or interval;
control messages go to ``sink.compliance`` (deletes, scrub_geo, withheld: applied in stream
order) or ``sink.notices``; the MongoDB writes go through ``sink.insert`` and ``sink.retry``;
encoding is shared with the encoder child by ``sink.encoder_split``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson
import structlog

from ingestd.config.schema import Settings
from ingestd.documents import surrogates
from ingestd.documents.encoder import (
    DEAD,
    PUNT,
    Encoded,
    encode_document,
    encode_tweet,
    received_at,
)
from ingestd.documents.labels import MessageReason
from ingestd.documents.messages import InvalidTweet, classify
from ingestd.documents.v2_messages import V2_TWEET, v2_document, v2_kind
from ingestd.memory import trim_heap
from ingestd.sink.batch import Batch, Entry, Flight
from ingestd.sink.compliance import TOMBSTONE_LIMIT, WITHHELD, BadControl, Compliance
from ingestd.sink.counters import Settled, StoreCounters, StoreHistograms, bump
from ingestd.sink.coverage import CoverageLedger, instance_name
from ingestd.sink.deadletter import DeadLetterStore
from ingestd.sink.encoder_split import OFFLOAD_MIN, EncoderSplit, Matchers
from ingestd.sink.insert import Inserter
from ingestd.sink.notices import StreamNotices
from ingestd.sink.retry import TICK_INTERVAL, DeadLetterWriter, GiveUp, Retrier
from ingestd.sink.target import CollectionFactory, MongoTarget, log_notices
from ingestd.spool.format import (
    KIND_BADFRAME,
    KIND_BADFRAME_SIZED,
    KIND_EVENT,
    KIND_MESSAGE,
    KIND_OVERSIZE,
    KIND_OVERSIZE_SIZED,
    KIND_PARTIAL,
    Checkpoint,
    Record,
    RecordRef,
)
from ingestd.spool.generations import GenerationRecord

log = structlog.get_logger("ingestd.sink.worker")

# Memory bound of the store worker: one batch (records + parsed documents), the batch in flight and
# at most one read's part held with the encoder child are all it holds, however large the spool
# backlog. A parsed tweet takes several times its JSON size in Python objects, so the batch's
# payload bytes are capped well under what the process may use.
BATCH_MAX_BYTES = 8 * 1024 * 1024
IDLE_WAIT_MAX = 1.0  # seconds: the longest idle sleep, whatever ``idle_wait`` says
# With a batch open and nothing more to read, the worker pauses before reading again: until the
# batch could be full at the rate its writes arrived so far, at least GATHER_SECONDS (the rate is
# unknown at the first read), never past the batch's flush time nor the next heartbeat. A slow
# stream is read about twice per flush, a fast one every GATHER_SECONDS.
GATHER_SECONDS = 0.1
# The workers keep batch-sized buffers in the heap (``control.pool.WORKER_MALLOC_ENV``): once
# this many payload bytes were flushed since the last trim, the worker gives its heap's free pages
# back the next time it is idle (nothing open, nothing in flight): after a burst, not per tweet.
TRIM_AFTER_BYTES = 16 * 1024 * 1024
OVERSIZE_KINDS = (KIND_OVERSIZE_SIZED, KIND_OVERSIZE)  # the second in older spools only
FRAME_REASONS: dict[int, MessageReason] = {
    KIND_BADFRAME: "bad_frame",  # an older spool's: the head only (KIND_BADFRAME_SIZED now)
    KIND_PARTIAL: "partial_message",
}


class SpoolSource(Protocol):
    """What the writer needs from ``ingestd.spool.reader.SpoolReader``."""

    @property
    def acked(self) -> Checkpoint | None: ...
    @property
    def checkpoint_resets(self) -> int: ...
    before_checkpoint: Callable[[Checkpoint], None]
    on_missing: Callable[[int, int], None]
    def read(self, max_records: int, max_bytes: int) -> list[Record]: ...
    def wait_for_data(self, timeout: float) -> object: ...
    def unread_bytes(self) -> int: ...
    def ack(self, record: Record) -> None: ...
    def maybe_flush(self) -> None: ...
    def reread(self, ref: RecordRef) -> Record | None: ...


def _json_failure(payload: bytes) -> MessageReason:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return "invalid_json"


class StoreWorker:
    """Drains spool records into MongoDB. Single-threaded except for the MongoDB call helper.

    ``run(should_stop, tick, drain_deadline)`` loops until ``should_stop()``, then drains the spool
    and returns True; it returns False if it had to give up at ``drain_deadline()`` (a monotonic
    time, or None for no deadline) because MongoDB kept failing — the spool keeps the rest.
    ``totals`` are the counters (read ``counters()`` for the published snapshot).
    """

    def __init__(
        self,
        settings: Settings,
        spool_reader: SpoolSource,
        collection_factory: CollectionFactory,
        deadletters: DeadLetterStore,
        *,
        generation: int = 0,
        tombstone_limit: int = TOMBSTONE_LIMIT,
        rng: random.Random | None = None,
        encoder_process: bool | None = None,
        offload_min: int = OFFLOAD_MIN,
        replay: tuple[int, int] = (0, 0),
    ) -> None:
        self._reader = spool_reader
        # (through, counted): records numbered up to ``through`` were received by an earlier
        # daemon run; those up to ``counted`` an earlier store worker of this run counted already.
        self._replay_through, self._replay_counted = replay
        spool_reader.on_missing = self.lost
        if spool_reader.acked is None or spool_reader.checkpoint_resets:
            deadletters.forget_spool()  # the spool's seqs may have started again
        else:
            deadletters.remember_replays(spool_reader.acked.seq)
        self.totals = totals = StoreCounters()
        self.hist = StoreHistograms()
        # Nothing read yet: all up to the checkpoint is resolved (the in-flight gauge reads this).
        totals.read_seq = spool_reader.acked.seq if spool_reader.acked else 0
        # This worker's counts of the records up to its last ack (``Settled``; control.settled).
        self.settled = Settled(totals, totals.read_seq)
        self._losses: list[tuple[int, int]] = []  # runs of lost records, counted with the next
        self._matchers = Matchers(generation, settings, GenerationRecord(settings.state_dir),
                                  totals)
        self._encoding = EncoderSplit(self._matchers, totals, encoder_process, offload_min)
        self._target = MongoTarget(settings, collection_factory, self._encoding.apply)
        self._retry = retry = Retrier(self._target, totals, spool_reader.maybe_flush, rng)
        self._maybe_tick = retry.maybe_tick
        self._letters = DeadLetterWriter(deadletters, totals, retry, spool_reader.reread)
        self._compliance = Compliance(self._target, retry, self._letters, totals,
                                      tombstone_limit)
        self._scrub_rules = self._compliance.scrub_rules  # the same dict: read per tweet
        self._notices = StreamNotices(totals)
        ha = settings.ha.instance if settings.ha.mode == "standby" else None
        self._ledger = CoverageLedger(self._target, retry, instance_name(settings.state_dir), ha)
        spool_reader.before_checkpoint = self._before_checkpoint
        # Told the seq of each checkpoint about to be written, after the ledger: the store role
        # keeps this worker's counts at it (``settled``) beside the checkpoint (control.settled).
        self.on_checkpoint: Callable[[int], None] = lambda seq: None
        self._inserter = Inserter(self._target, retry, self._letters, totals, self.hist,
                                  on_stored=self._ledger.on_stored,
                                  on_duplicates=self._ledger.on_duplicates)
        self._batch = Batch()
        self._flight: Flight | None = None  # the batch before, its insert still running
        self._held: list[Record] = []  # a read's part left with the encoder child, newest first
        # How long to sleep with no batch open when the spool is empty: the caller's next
        # housekeeping (heartbeat) is due then; new records end the sleep at once.
        self.idle_wait: Callable[[], float] = lambda: TICK_INTERVAL
        # The gather pause; the store worker's ends at once on SIGTERM (a signal wake-up pipe).
        self.pause: Callable[[float], None] = time.sleep
        self.passes = 0  # main loop passes: published, so that an idle loop is observable
        self._taking = 0.0  # seconds spent taking records since the last insert
        self._idle = 0.0  # seconds spent waiting for data since the last insert
        self._since = time.monotonic()  # when the time since the last insert began
        self.trim_heap: Callable[[], None] = trim_heap
        self.trim_after_bytes = TRIM_AFTER_BYTES
        self._untrimmed = 0  # payload bytes flushed since the heap was last trimmed

    # ------------------------------------------------------------------ public API

    def run(
        self,
        should_stop: Callable[[], bool],
        tick: Callable[[], None],
        drain_deadline: Callable[[], float | None],
    ) -> bool:
        """Store until ``should_stop()``, then drain; True if the spool was drained and acked."""
        retry = self._retry
        retry.should_stop, retry.tick, retry.drain_deadline = should_stop, tick, drain_deadline
        self.totals.state = "running"
        self._since = time.monotonic()  # the shares of time count from here
        log_notices(self._target.settings)
        try:
            while not should_stop():
                self._step()
            return self._drain()
        except GiveUp:
            self.totals.state = "stopped: mongo unavailable, backlog left in spool"
            log.warning("store_gave_up", pending=self._pending(),
                        last_error=self.totals.last_error)
            return False

    def apply_settings(self, generation: int, settings: Settings) -> None:
        """Use ``settings`` from the next batch on; match ``generation``'s records by them."""
        self._matchers.add(generation, settings)
        self._target.next_settings = settings
        self._letters.store.resize(settings.deadletter.max_bytes)  # the next dead letter's
        self._maybe_switch()

    def counters(self) -> dict[str, Any]:
        """A snapshot for ``run/store.json`` (safe to call from another thread)."""
        return self.totals.as_dict(
            pending=self._pending(),
            limit_missed=self._notices.limit_missed(),
            coverage_gaps=self._ledger.gaps_recorded,
            deadletter_raw_dropped=self._letters.store.raw_dropped,
            deadletter_lines_dropped=self._letters.store.lines_dropped)

    def lost(self, first: int, last: int) -> None:
        """Spool records ``first``..``last`` are lost to damage (``SpoolReader.on_missing``).

        Counted in ``spool_missing_records``; those an earlier daemon run received (within the
        replay boundary) in ``replayed`` as well: this run's ``received`` never counted them, and
        the reconciliation (``control.tally``) takes every lost record off its received side. The
        numbers up to ``counted`` an earlier store worker of this run counted already.
        """
        first = max(first, self._replay_counted + 1)
        if first <= last:
            # Counted when the next record is taken (``_count_losses``): the read that finds a
            # loss may bring records before it, and a batch acked there must not include it.
            self._losses.append((first, last))

    def _count_losses(self, before: int | None) -> None:
        """Count the runs of lost records numbered below ``before`` (None: all of them, once
        every record taken before them is acked: a loss at the spool's end, found with no record
        after it, must not be settled by an ack of the records before it)."""
        later = []
        for first, last in self._losses:
            if before is None or last < before:
                self._count_lost(first, last)
            else:
                later.append((first, last))
        self._losses = later

    def _count_lost(self, first: int, last: int) -> None:
        self.totals.spool_missing_records += last - first + 1
        if first <= self._replay_through:
            self.totals.replayed += min(last, self._replay_through) - first + 1

    def _before_checkpoint(self, ckpt: Checkpoint) -> None:
        self._ledger.write()
        self.on_checkpoint(ckpt.seq)

    def _pending(self) -> int:
        """Tweets taken, not yet stored: the open batch's and the one in flight."""
        flight = self._flight
        return len(self._batch.entries) + (len(flight.batch.entries) if flight else 0)

    def histograms(self) -> dict[str, Any]:
        """For run/store.json "hist" (see metrics.HISTOGRAMS)."""
        return self.hist.as_dict()

    def close(self) -> None:
        """Release the MongoDB client and the helper thread (not the spool or dead letters)."""
        self._retry.close()
        self._target.close()
        self._encoding.stop()

    # ------------------------------------------------------------------ main loop

    def _step(self) -> None:
        self.passes += 1
        if self._batch_due():
            self._flush()
        else:
            room, room_bytes = self._read_size()
            records = self._reader.read(room, room_bytes)
            read = self._take_all(records, hold=len(records) >= room)
            if self._batch_due():
                self._flush()
            elif not read:
                self._finish_flight()
                caught_up = self._batch.last is None
                if caught_up:  # all taken is acked: a loss after it is unsettled
                    self._count_losses(None)
                self._ledger.settle(caught_up)
                self._maybe_trim()
                started = time.monotonic()
                self._reader.wait_for_data(self._wait_time())
                self._idle += time.monotonic() - started
            elif read < room:
                self._finish_flight()
                self._gather()
        self._maybe_tick()

    def _maybe_trim(self) -> None:
        """Idle after a burst: give the batches' freed buffers back to the OS."""
        if self._batch.last is None and self._untrimmed >= self.trim_after_bytes:
            self._untrimmed = 0
            self.trim_heap()
            self._encoding.release()

    def _gather(self) -> None:
        """Caught up with a batch open: let more records arrive before the next read.

        On a slow stream this takes many tweets per pass instead of waking for each append; on a
        fast one a pass reads a full batch and never comes here. It never delays a flush.
        """
        batch = self._batch
        started = batch.started
        if started is None or not batch.has_writes():
            return
        now = time.monotonic()
        flush_in = started + self._target.settings.writer.flush_interval - now
        # seconds until the room left fills at the rate the batch's writes came in so far
        fill_in = self._room() * (now - started) / batch.size()
        self.pause(max(0.0, min(max(GATHER_SECONDS, fill_in), flush_in, self._until_tick())))
        self._idle += time.monotonic() - now

    def _drain(self) -> bool:
        """Read until the spool is empty (or the deadline passes), flush, ack."""
        self.totals.state = "draining"
        drained = False
        while not drained and not self._retry.past_deadline():
            # a batch is flushed as it fills (``_take``)
            drained = not self._take_all(self._reader.read(self._room(), self._room_bytes()))
            self._maybe_tick()
        self._take_held()
        self._flush()
        self._finish_flight()
        self._count_losses(None)  # after the last ack: a successor finds them again
        self.totals.state = "stopped"
        return drained

    def _room(self) -> int:
        return max(1, self._target.settings.writer.batch_size - self._batch.size())

    def _room_bytes(self) -> int:
        return max(1, BATCH_MAX_BYTES - self._batch.nbytes)

    def _read_size(self) -> tuple[int, int]:
        """Records and bytes the next read may bring: the open batch's room, or a whole batch's
        while records are held with the encoder child (behind the stream: the batch is flushed
        when it fills up as records are taken)."""
        if self._held:
            return self._target.settings.writer.batch_size, BATCH_MAX_BYTES
        return self._room(), self._room_bytes()

    def _batch_full(self) -> bool:
        batch = self._batch
        return (batch.size() >= self._target.settings.writer.batch_size
                or batch.nbytes >= BATCH_MAX_BYTES)

    def _batch_due(self) -> bool:
        batch = self._batch
        if batch.last is None:
            return False
        if not batch.has_writes() or self._batch_full():
            return True
        started = batch.started if batch.started is not None else 0.0
        return time.monotonic() - started >= self._target.settings.writer.flush_interval

    def _wait_time(self) -> float:
        started = self._batch.started
        if started is None:
            return min(IDLE_WAIT_MAX, self._until_tick())
        left = started + self._target.settings.writer.flush_interval - time.monotonic()
        return max(0.0, min(TICK_INTERVAL, left))

    def _until_tick(self) -> float:
        """Seconds until the housekeeping ``idle_wait`` names can run: it runs on the retrier's
        tick (every ``TICK_INTERVAL``), so a heartbeat falling due between two ticks waits for the
        next one. Waking at the heartbeat itself would spin with zero-second waits until then (a
        record taken just before the heartbeat moves the tick: up to 0.25 s of empty passes)."""
        return max(self.idle_wait(), self._retry.tick_due_in())

    # ------------------------------------------------------------------ taking records

    def _take_all(self, records: list[Record], hold: bool = False) -> int:
        """Encode and take a read's records in spool order; how many there were.

        ``records`` is emptied as they are taken: a batch keeps each tweet's BSON and a
        ``RecordRef``, so a tweet's payload dies once it is encoded and its memory holds the next
        document. Peak memory is one read's documents, not its documents and its payloads (plus,
        while a read is held, that read's part's payloads).

        With ``hold`` (a full read: the worker is behind the stream) the encoder child's part of
        this read is left with it, and taken at the start of the next call, once the next read's
        part has been sent: the child encodes while this process reads, flushes and takes,
        instead of waiting for it. Nothing is held across a wait, a reload or the drain's end.
        """
        count = len(records)
        started = time.monotonic()
        encoding = self._encoding
        theirs = encoding.submit(records, self._target.settings)  # the last ``theirs`` records
        self._take_held()  # the part of the read before: earlier in the spool than this one
        records.reverse()  # popped oldest first
        for _ in range(count - theirs):
            self._take(records.pop(), None)  # encoded here as it is taken
        if theirs:
            if hold and self._target.next_settings is None and encoding.may_hold():
                self._held = records
            else:
                self._take_from_child(records)
        self._taking += time.monotonic() - started  # for ``EncoderSplit.inserts``
        return count

    def _take_held(self) -> None:
        """Take the read's part left with the encoder child, if any (``_take_all``)."""
        if self._held:
            held, self._held = self._held, []
            self._take_from_child(held)

    def _take_from_child(self, records: list[Record]) -> None:
        for record, encoded in self._encoding.collect(records):
            self._take(record, encoded)

    def _take(self, record: Record, encoded: Encoded | None) -> None:
        totals = self.totals
        totals.read_seq = record.seq
        if record.kind == KIND_EVENT:  # a coverage marker, not a message: not counted
            if self._losses:
                self._count_losses(record.seq)
            self._take_event(record)
            return
        self._ledger.on_live(record)
        if record.kind == KIND_MESSAGE:
            self._take_message(record, encoded)
        elif record.kind in OVERSIZE_KINDS:
            self._letters.add_oversize(record)
        elif record.kind == KIND_BADFRAME_SIZED:
            self._letters.add_bad_frame(record)
        else:
            self._letters.add(FRAME_REASONS.get(record.kind, "bad_frame"), record,
                              detail=f"spool record kind {record.kind}")
        # Counted as read only now: a withheld message flushes the batch before it (``Settled``
        # gives the flight what was counted until then), and this record is the next batch's.
        totals.records_read += 1
        if self._replay_counted < record.seq <= self._replay_through:
            totals.replayed += 1
        if self._losses:
            self._count_losses(record.seq)
        batch = self._batch  # a withheld message may have flushed and replaced it
        batch.last = record
        batch.nbytes += len(record.payload)
        if batch.started is None:
            batch.started = time.monotonic()
        if batch.closed or self._batch_full():  # a read may bring more than the batch's room
            self._flush()
        self._maybe_tick()  # dead letters fsync: a run of them must not starve the heartbeat

    def _take_event(self, record: Record) -> None:
        if not self._ledger.on_event(record):
            log.error("coverage_marker_invalid", seq=record.seq, payload=record.payload[:200])
        batch = self._batch
        batch.last = record
        if batch.started is None:
            batch.started = time.monotonic()

    def _take_message(self, record: Record, encoded: Encoded | None) -> None:
        if encoded is not None and encoded.status != PUNT:
            self._take_encoded(encoded, record)
            return
        try:
            obj = orjson.loads(record.payload)
        except orjson.JSONDecodeError as exc:
            try:
                obj = surrogates.loads_repaired(record.payload, exc)
            except orjson.JSONDecodeError:  # its text says where and why, never the content
                self._letters.add(_json_failure(record.payload), record, detail=str(exc)[:200])
                return
            self.totals.repaired += 1
        kind = classify(obj)
        if kind == "unknown":
            kind = v2_kind(obj) or kind  # X API v2: v2_tweet, or v2_error counted as control
        if kind == "tweet":  # not encoded yet (or punted by the child: an unknown generation)
            self._take_encoded(encode_tweet(obj, record, self._matchers.get(record.generation)),
                               record)
        elif kind == V2_TWEET:
            self._take_v2_tweet(obj, record)
        elif kind == "invalid":
            self._letters.add("not_an_object", record, detail=type(obj).__name__)
        else:
            try:
                self._take_control(kind, obj.get(kind), record)
            except BadControl as exc:
                self._letters.add("invalid_control", record, detail=f"{kind}: {exc}")
                return
            bump(self.totals.control, kind)

    def _take_v2_tweet(self, obj: dict[str, Any], record: Record) -> None:
        try:
            doc = v2_document(obj, received_at=received_at(record.recv_ns),
                              conn_id=record.conn_id, generation=record.generation, seq=record.seq)
        except InvalidTweet as exc:
            self._letters.add("invalid_tweet", record, detail=exc.reason)
            return
        self._take_encoded(encode_document(doc), record)

    def _take_encoded(self, encoded: Encoded, record: Record) -> None:
        """Hold an encoded tweet in the batch (only its BSON: the parsed objects are gone)."""
        if encoded.match_error:
            self.totals.match_errors += 1
        if encoded.status == DEAD:
            self._letters.add(encoded.reason or "unencodable", record, detail=encoded.detail)
            return
        raw = self._compliance.scrubbed(encoded) if self._scrub_rules else encoded.raw
        entry = Entry(raw)
        entry.tweet_id = encoded.tweet_id
        entry.record = record.ref()  # not the payload: it is re-read from the spool if needed
        self._batch.entries.append(entry)

    def _take_control(self, kind: str, body: object, record: Record) -> None:
        """Apply a control message's effect; raises ``BadControl`` if it cannot have one."""
        compliance, notices = self._compliance, self._notices
        if kind == "delete":
            compliance.on_delete(body, record, self._batch)
        elif kind == "scrub_geo":
            compliance.on_scrub_geo(body, record, self._batch)
        elif kind in WITHHELD:
            op = compliance.withheld_op(kind, body, record)
            if self._batch.entries:  # flush on both sides: the tweets before it, none after
                self._flush()
            self._batch.closed = True
            self._batch.ops.append(op)
        elif kind == "limit":
            self._ledger.on_limit(record, notices.on_limit(body, record.conn_id))
        elif kind == "disconnect":
            notices.on_disconnect(body)
        elif kind == "warning":
            notices.on_warning(body)
        # "unknown": counted by the caller, nothing to apply

    # ------------------------------------------------------------------ flushing

    def _flush(self) -> None:
        """Write the batch: its tombstones now, its tweets' insert started on the helper thread,
        the rest (deletes, other effects, coverage, the ack) once that insert is done.

        The batch before it is finished first, so MongoDB sees every batch's writes in spool
        order and the spool is acked in order; what overlaps the insert is only the taking
        (reading and encoding) of the next batch. A worker about to wait finishes it at once.
        """
        self._finish_flight()
        batch, self._batch = self._batch, Batch()
        self._untrimmed += batch.nbytes
        self._flight = flight = Flight(batch, None, self._ledger.mark())
        if batch.has_writes():
            batch.entries = self._compliance.before_insert(batch)
            if batch.entries:
                flight.insert = self._inserter.begin(batch.entries)
        self.settled.flushed()  # after its tombstoned tweets are counted: they are its own
        if self._target.next_settings is not None:
            self._finish_flight()  # a reload's settings apply from the next batch on

    def _finish_flight(self) -> None:
        """Finish the batch whose insert is in flight: its outcome, its deletes and other effects,
        its coverage, then its ack."""
        flight = self._flight
        if flight is None:
            return
        batch = flight.batch
        open_part = self.settled.finishing()
        if flight.insert is not None:
            started = time.monotonic()
            self._inserter.finish(flight.insert)
            self._note_shares(started)
        batch.entries = []
        self._compliance.after_insert(batch)
        # behind the tweets; written before the checkpoint that passes them (``before_checkpoint``)
        self._ledger.apply(flight.ledger_mark)
        self.settled.finished(open_part, None if batch.last is None else batch.last.seq)
        if batch.last is not None:
            self._reader.ack(batch.last)
        self._flight = None  # counted as pending until here (``counters`` may run meanwhile)
        self._maybe_switch()

    def _note_shares(self, insert_started: float) -> None:
        """What the time since the last insert says about the encoder child (``EncoderSplit``):
        the wait for this insert against the time spent taking records, the time not spent
        waiting for data against that, and how far behind the stream the worker is."""
        now = time.monotonic()
        unread = None
        with contextlib.suppress(OSError):  # a hint: the last value stands until a look works
            unread = self._reader.unread_bytes()
        self._encoding.note(now - insert_started, self._taking, now - self._since - self._idle,
                            self._idle, unread)
        self._taking = self._idle = 0.0
        self._since = now

    def _maybe_switch(self) -> None:
        """Take a reload's settings between batches: none open, none in flight, no records held
        with the encoder child (the next read takes them and holds none)."""
        if self._target.next_settings is not None and self._flight is None \
                and self._batch.last is None and not self._held:
            self._target.switch()
