"""The store worker: spool records → documents → MongoDB, acking the spool only behind MongoDB.

Every record read from the spool ends in exactly one bucket, so the counters reconcile::

    records_read == stored + duplicates + Σ deadlettered + Σ control + Σ skipped + pending

``pending`` is tweets in the batch not yet flushed; ``skipped{deleted}`` is tweets not stored
because a delete for them was already seen (a tombstone). A control message whose MongoDB effect is
rejected stays counted under ``control`` and is also dead-lettered (``control_rejected``).

Ordering. Tweets are batched. Deletes and ``scrub_geo`` are applied after the batch they arrived in
is inserted: both commute with the tweets around them (a tweet after its delete is filtered by the
tombstone set; a later tweet inside a scrub range is scrubbed as it is built). Withheld messages,
which do not commute, end the batch: it is flushed first, then they are applied.

Failures. A write that fails transiently is retried with the *same* documents (``_id`` is the tweet
id, so a retry can only produce duplicates) with exponential back-off and jitter, forever; auth
and configuration errors back off at the cap and set ``state`` to ``degraded: …``. A failed attempt
may still have written documents (a writeConcernError, a connection lost before the reply): when a
retry finds such an ``_id`` present, the stored document's ``_ingest.seq``/``conn`` tell whether
that attempt wrote it (counted as stored) or another record did (a duplicate). A write that took
``mongo.slow_write_seconds`` or longer is logged with what pymongo saw meanwhile, and counted.
Every MongoDB call runs on a helper thread while this thread keeps calling ``tick`` (the
heartbeat) at least every 0.5 s.
"""

from __future__ import annotations

import concurrent.futures
import errno
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import bson
import orjson
import structlog
from bson.errors import InvalidDocument
from bson.raw_bson import RawBSONDocument
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, PyMongoError

from ingestd.config.schema import MongoSettings, Settings
from ingestd.documents.encoder import (
    DEAD,
    MAX_BSON_SIZE,
    PUNT,
    Encoded,
    MatcherSpec,
    encode,
    encode_document,
    encode_tweet,
    received_at,
)
from ingestd.documents.matching import Matcher
from ingestd.documents.messages import (
    InvalidTweet,
    MessageReason,
    SkipReason,
    classify,
    parse_id,
)
from ingestd.documents.v2_messages import V2_TWEET, v2_document, v2_kind
from ingestd.sink.deadletter import DeadLetterStore, Reason
from ingestd.sink.encoder_pool import EncoderProcess
from ingestd.sink.histogram import (
    BATCH_SIZE_BUCKETS,
    INSERT_SECONDS_BUCKETS,
    LATENCY_SECONDS_BUCKETS,
    Histogram,
)
from ingestd.sink.mongo import (
    DRIVER_EVENTS,
    DUPLICATE_KEY,
    Document,
    ErrorClass,
    classify_error,
    duplicate_on_id,
    ensure_indexes,
    error_fields,
    error_name,
    short_reason,
    write_error_summary,
)
from ingestd.spool.format import (
    KIND_BADFRAME,
    KIND_MESSAGE,
    KIND_OVERSIZE,
    KIND_PARTIAL,
    Checkpoint,
    Record,
)

log = structlog.get_logger("ingestd.sink.worker")

T = TypeVar("T")
CollectionFactory = Callable[[MongoSettings], Collection[Document]]

TICK_INTERVAL = 0.25  # well under the 0.5 s heartbeat promise
# Memory bound of the store worker: one batch (records + parsed documents) is all it holds, however
# large the spool backlog. A parsed tweet takes several times its JSON size in Python objects, so
# the batch's payload bytes are capped well under what the process may use.
BATCH_MAX_BYTES = 8 * 1024 * 1024
# Ids of deleted tweets kept in memory to filter a tweet whose delete came first (~70 bytes each
# in a set of ints: ~14 MB at the limit); older ones stay in the ``<collection>_deleted`` store.
TOMBSTONE_LIMIT = 200_000
SCRUB_RULE_LIMIT = 100_000
MATCHER_GENERATIONS = 16
LIMIT_CONNECTIONS = 1024
FRAME_REASONS: dict[int, MessageReason] = {
    KIND_OVERSIZE: "oversize",
    KIND_BADFRAME: "bad_frame",
    KIND_PARTIAL: "partial_message",
}
# Reads smaller than this are encoded in-process: at low rates a round trip to the encoder child
# would only add latency.
OFFLOAD_MIN = 64
SHARE_STEP = 0.02  # how fast the split between the two encoders adapts
ENCODER_RESTART_INTERVAL = 10.0  # seconds between restarts of a lost encoder child


class SpoolSource(Protocol):
    """What the writer needs from ``ingestd.spool.reader.SpoolReader``."""

    @property
    def acked(self) -> Checkpoint | None: ...
    @property
    def checkpoint_resets(self) -> int: ...
    def read(self, max_records: int, max_bytes: int) -> list[Record]: ...
    def wait_for_data(self, timeout: float) -> object: ...
    def ack(self, record: Record) -> None: ...
    def maybe_flush(self) -> None: ...


class GiveUp(Exception):
    """Stop was requested and the drain deadline passed while MongoDB was failing."""


class _BadControl(ValueError):
    pass


@dataclass(slots=True)
class _Op:
    """A control message's effect on MongoDB, applied after the batch it arrived in."""

    kind: str
    record: Record
    apply: Callable[[Collection[Document]], object]


@dataclass(slots=True)
class _Batch:
    # Tweets are held encoded: the parsed dict dies at once, so the cyclic GC never walks a batch
    # of ~200k live objects and the batch weighs its BSON size (~4 MB), not several times that.
    docs: list[RawBSONDocument] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # parallel to docs: _id without decoding
    records: list[Record] = field(default_factory=list)  # parallel to docs (for dead letters)
    deletes: list[int] = field(default_factory=list)
    tombstones: list[Document] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)
    last: Record | None = None  # newest record taken: acked when the batch is flushed
    started: float | None = None
    closed: bool = False  # holds an effect that must not reach later tweets: flush now
    nbytes: int = 0  # payload bytes of the records whose effect is held here

    def has_writes(self) -> bool:
        return bool(self.docs or self.deletes or self.ops)

    def size(self) -> int:
        """Writes held: tweets plus control effects (a run of deletes must not grow unbounded)."""
        return len(self.docs) + len(self.deletes) + len(self.ops)


def _bump(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


def _int_field(body: object, *names: str) -> int | None:
    """The first of ``names`` in ``body`` that is an id (int or digit string), else None."""
    if not isinstance(body, dict):
        return None
    for name in names:
        try:
            return parse_id(body.get(name))
        except InvalidTweet:
            continue
    return None


def _written_from(ingest: object, record: Record) -> bool:
    """Whether a stored document's ``_ingest`` says it was built from ``record``."""
    return (isinstance(ingest, dict) and ingest.get("seq") == record.seq
            and ingest.get("conn") == record.conn_id)


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
    ) -> None:
        self._settings = settings
        self._next_settings: Settings | None = None
        self._reader = spool_reader
        self._factory = collection_factory
        self._deadletters = deadletters
        if spool_reader.acked is None or spool_reader.checkpoint_resets:
            deadletters.forget_spool()  # the spool's seqs may have started again
        self._rng = rng or random.Random()
        self._collection = collection_factory(settings.mongo)
        self._target_ready = False  # tombstones loaded for this target
        self._indexes_done = False
        self._generation = generation
        self._matchers: dict[int, Matcher] = {generation: self._matcher(settings)}
        self._matcher_specs: dict[int, MatcherSpec] = {generation: self._matcher_spec(settings)}
        self._encoder_choice = encoder_process  # None: settings.writer.encoder_process decides
        self._offload_min = offload_min
        self._encoder: EncoderProcess | None = None
        self._encoder_retry_at = 0.0  # monotonic time before which no new child is started
        self._share = 0.5  # fraction of a read sent to the encoder child
        self._tombstones: set[int] = set()
        self._tombstone_limit = tombstone_limit
        self._scrub_rules: dict[int, int] = {}  # user id -> up_to_status_id
        self._limits: dict[int, int] = {}  # conn id -> latest cumulative limit.track
        self._limit_base = 0  # folded-in totals of connections evicted from _limits
        self._batch = _Batch()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mongo")
        self._should_stop: Callable[[], bool] = lambda: False
        self._tick: Callable[[], None] = lambda: None
        self._drain_deadline: Callable[[], float | None] = lambda: None
        self._next_tick = 0.0
        self._init_counters()
        # Nothing read yet: all up to the checkpoint is resolved (the in-flight gauge reads this).
        self.read_seq = spool_reader.acked.seq if spool_reader.acked else 0

    def _init_counters(self) -> None:
        self.records_read = self.stored = self.duplicates = 0
        self.read_seq = 0  # seq of the last spool record read (exact in-flight for metrics)
        self._target_epoch = 0  # bumped on every Mongo target switch: ends a back-off early
        self.hist_batch = Histogram(BATCH_SIZE_BUCKETS)
        self.hist_insert = Histogram(INSERT_SECONDS_BUCKETS)
        self.hist_latency = Histogram(LATENCY_SECONDS_BUCKETS)
        self.deadlettered: dict[str, int] = {}
        self.control: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.disconnects: dict[str, int] = {}
        self.deletes_applied = self.deleted_documents = self.control_rejected = 0
        self.batches = self.retries = self.last_batch_size = 0
        self.index_failures = self.match_errors = self.encoder_restarts = 0
        self.slow_writes = 0  # MongoDB operations that took mongo.slow_write_seconds or longer
        self.offloaded = 0  # records encoded by the encoder child
        self.insert_seconds_total = 0.0
        self.state = "starting"
        self.last_error = ""
        self.last_warning: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public API

    def run(
        self,
        should_stop: Callable[[], bool],
        tick: Callable[[], None],
        drain_deadline: Callable[[], float | None],
    ) -> bool:
        """Store until ``should_stop()``, then drain; True if the spool was drained and acked."""
        self._should_stop, self._tick, self._drain_deadline = should_stop, tick, drain_deadline
        self.state = "running"
        self._log_notices(self._settings)
        try:
            while not should_stop():
                self._step()
            return self._drain()
        except GiveUp:
            self.state = "stopped: mongo unavailable, backlog left in spool"
            log.warning("store_gave_up", pending=len(self._batch.docs), last_error=self.last_error)
            return False

    def apply_settings(self, generation: int, settings: Settings) -> None:
        """Use ``settings`` from the next batch on; match ``generation``'s records by them."""
        self._matchers[generation] = self._matcher(settings)
        self._matcher_specs[generation] = self._matcher_spec(settings)
        for old in sorted(self._matchers)[:-MATCHER_GENERATIONS]:
            del self._matchers[old]
            self._matcher_specs.pop(old, None)
        self._generation = max(self._generation, generation)
        self._next_settings = settings
        if self._batch.last is None:
            self._switch_settings()

    def counters(self) -> dict[str, Any]:
        """A snapshot for ``run/store.json`` (safe to call from another thread)."""
        return {
            "records_read": self.records_read,
            "read_seq": self.read_seq,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "deadlettered": dict(self.deadlettered),
            "control": dict(self.control),
            "skipped": dict(self.skipped),
            "pending": len(self._batch.docs),
            "deletes_applied": self.deletes_applied,
            "deleted_documents": self.deleted_documents,
            "control_rejected": self.control_rejected,
            "limit_missed": self._limit_base + sum(self._limits.values()),
            "disconnects": dict(self.disconnects),
            "last_warning": self.last_warning,
            "batches": self.batches,
            "insert_seconds_total": round(self.insert_seconds_total, 6),
            "insert_seconds": round(self.insert_seconds_total, 6),  # design.md name
            "retries": self.retries,
            "slow_writes": self.slow_writes,
            "index_failures": self.index_failures,
            "match_errors": self.match_errors,
            "encoder_restarts": self.encoder_restarts,
            "offloaded": self.offloaded,
            "state": self.state,
            "last_error": self.last_error,
            "last_batch_size": self.last_batch_size,
            "deadletter_raw_dropped": self._deadletters.raw_dropped,
            "deadletter_lines_dropped": self._deadletters.lines_dropped,
        }

    def close(self) -> None:
        """Release the MongoDB client and the helper thread (not the spool or dead letters)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._collection.database.client.close()
        self._stop_encoder()

    # ------------------------------------------------------------------ main loop

    def _step(self) -> None:
        if self._batch_due():
            self._flush()
        else:
            records = self._reader.read(self._room(), self._room_bytes())
            self._take_all(records)
            if self._batch_due():
                self._flush()
            elif not records:
                self._reader.wait_for_data(self._wait_time())
        self._maybe_tick()

    def _drain(self) -> bool:
        """Read until the spool is empty (or the deadline passes), flush, ack."""
        self.state = "draining"
        drained = False
        while not drained and not self._past_deadline():
            records = self._reader.read(self._room(), self._room_bytes())
            self._take_all(records)
            drained = not records
            if self._batch_full():
                self._flush()
            self._maybe_tick()
        self._flush()
        self.state = "stopped"
        return drained

    def _room(self) -> int:
        return max(1, self._settings.writer.batch_size - self._batch.size())

    def _room_bytes(self) -> int:
        return max(1, BATCH_MAX_BYTES - self._batch.nbytes)

    def _batch_full(self) -> bool:
        batch = self._batch
        return batch.size() >= self._settings.writer.batch_size or batch.nbytes >= BATCH_MAX_BYTES

    def _batch_due(self) -> bool:
        batch = self._batch
        if batch.last is None:
            return False
        if not batch.has_writes() or self._batch_full():
            return True
        started = batch.started if batch.started is not None else 0.0
        return time.monotonic() - started >= self._settings.writer.flush_interval

    def _wait_time(self) -> float:
        started = self._batch.started
        if started is None:
            return TICK_INTERVAL
        left = started + self._settings.writer.flush_interval - time.monotonic()
        return max(0.0, min(TICK_INTERVAL, left))

    # ------------------------------------------------------------------ taking records

    def _take_all(self, records: list[Record]) -> None:
        for record, encoded in zip(records, self._encode_all(records), strict=True):
            self.records_read += 1
            self.read_seq = record.seq
            if record.kind == KIND_MESSAGE:
                self._take_message(record, encoded)
            else:
                self._dead_letter(FRAME_REASONS.get(record.kind, "bad_frame"), record,
                                  detail=f"spool record kind {record.kind}")
            batch = self._batch  # a withheld message may have flushed and replaced it
            batch.last = record
            batch.nbytes += len(record.payload)
            if batch.started is None:
                batch.started = time.monotonic()
            if batch.closed:
                self._flush()
            self._maybe_tick()  # dead letters fsync: a run of them must not starve the heartbeat

    # ------------------------------------------------------------------ encoding

    def _encode_all(self, records: list[Record]) -> list[Encoded | None]:
        """The encoder child's results for the first part of ``records``, in order; None for the
        records this process parses and encodes itself, as it takes them."""
        encoder = self._encoder_for(len(records))
        if encoder is None:
            return [None] * len(records)
        split = max(1, min(len(records) - 1, round(len(records) * self._share)))
        theirs = records[:split]
        try:
            encoder.submit([r for r in theirs if r.kind == KIND_MESSAGE], self._matcher_specs)
        except OSError as exc:
            self._encoder_lost(exc)
            return [None] * len(records)
        # Encoded now, not as taken: the child's part, which comes first, is being encoded too.
        ours = [self._encode_here(r) for r in records[split:]]
        # Balance the split so that neither side waits for the other.
        self._share += SHARE_STEP if encoder.ready() else -SHARE_STEP
        self._share = min(0.9, max(0.1, self._share))
        try:
            done = iter(encoder.result())
        except (EOFError, OSError) as exc:
            self._encoder_lost(exc)
            return [None] * len(theirs) + ours
        self.offloaded += len(theirs)
        return [next(done) if r.kind == KIND_MESSAGE else None for r in theirs] + ours

    def _encode_here(self, record: Record) -> Encoded | None:
        if record.kind != KIND_MESSAGE:
            return None
        return encode(record, self._matcher_for(record.generation))  # a control message: PUNT

    def _matcher_for(self, generation: int) -> Matcher:
        return self._matchers.get(generation) or self._matchers[self._generation]

    def _encoder_for(self, records: int) -> EncoderProcess | None:
        """The encoder child when this read is worth sharing with it (started on first use)."""
        if records < self._offload_min or not self._encoder_wanted():
            return None
        if self._encoder is None:
            if time.monotonic() < self._encoder_retry_at:
                return None  # lost recently: encode here for a while rather than spin
            try:
                self._encoder = EncoderProcess()
            except OSError as exc:
                log.error("encoder_start_failed", error=type(exc).__name__)
                self._encoder_retry_at = time.monotonic() + ENCODER_RESTART_INTERVAL
                return None
            # The child gets every matcher again: it is new.
            log.info("encoder_started", pid=self._encoder.pid)
        return self._encoder

    def _encoder_wanted(self) -> bool:
        choice = self._encoder_choice
        return self._settings.writer.encoder_process if choice is None else choice

    def _stop_encoder(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None

    def _encoder_lost(self, exc: BaseException) -> None:
        """The child died or its pipe broke: its part is encoded here, a new one starts later."""
        self.encoder_restarts += 1
        log.error("encoder_lost", error=type(exc).__name__, restarts=self.encoder_restarts)
        self._encoder_retry_at = time.monotonic() + ENCODER_RESTART_INTERVAL
        if self._encoder is not None:
            self._encoder.close(timeout=0.5)
            self._encoder = None

    # ------------------------------------------------------------------ taking records

    def _take_message(self, record: Record, encoded: Encoded | None) -> None:
        if encoded is not None and encoded.status != PUNT:
            self._take_encoded(encoded, record)
            return
        try:
            obj = orjson.loads(record.payload)
        except orjson.JSONDecodeError:
            self._dead_letter(_json_failure(record.payload), record)
            return
        kind = classify(obj)
        if kind == "unknown":
            kind = v2_kind(obj) or kind  # X API v2: v2_tweet, or v2_error counted as control
        if kind == "tweet":  # not encoded yet (or punted by the child: an unknown generation)
            self._take_encoded(encode_tweet(obj, record, self._matcher_for(record.generation)),
                               record)
        elif kind == V2_TWEET:
            self._take_v2_tweet(obj, record)
        elif kind == "invalid":
            self._dead_letter("not_an_object", record, detail=type(obj).__name__)
        else:
            try:
                self._take_control(kind, obj, record)
            except _BadControl as exc:
                self._dead_letter("invalid_control", record, detail=f"{kind}: {exc}")
                return
            _bump(self.control, kind)

    def _take_v2_tweet(self, obj: dict[str, Any], record: Record) -> None:
        try:
            doc = v2_document(obj, received_at=received_at(record.recv_ns),
                              conn_id=record.conn_id, generation=record.generation, seq=record.seq)
        except InvalidTweet as exc:
            self._dead_letter("invalid_tweet", record, detail=exc.reason)
            return
        self._take_encoded(encode_document(doc), record)

    def _take_encoded(self, encoded: Encoded, record: Record) -> None:
        """Hold an encoded tweet in the batch (only its BSON: the parsed objects are gone)."""
        if encoded.match_error:
            self.match_errors += 1
        if encoded.status == DEAD:
            self._dead_letter(encoded.reason or "unencodable", record, detail=encoded.detail)
            return
        raw = encoded.raw
        if self._scrub_rules and encoded.user_id is not None:
            raw = self._scrubbed(raw, encoded.user_id, encoded.tweet_id)
        batch = self._batch
        batch.docs.append(RawBSONDocument(raw))
        batch.ids.append(encoded.tweet_id)
        batch.records.append(record)

    def _scrubbed(self, raw: bytes, user_id: int, tweet_id: int) -> bytes:
        """A tweet without its geo fields if a scrub_geo seen before it covers it (rare)."""
        up_to = self._scrub_rules.get(user_id)
        if up_to is None or tweet_id > up_to:
            return raw
        doc: Document = bson.decode(raw)
        for key in ("coordinates", "geo", "place"):
            doc.pop(key, None)
        return bson.encode(doc)

    def _dead_letter(self, reason: MessageReason, record: Record, *, code: int | None = None,
                     detail: str = "") -> None:
        self._put_dead_letter(reason, record, code=code, detail=detail)
        _bump(self.deadlettered, reason)

    def _put_dead_letter(self, reason: Reason, record: Record, *, code: int | None = None,
                         detail: str = "") -> None:
        """Write a dead letter, retrying while the disk refuses it (full, I/O error).

        The spool is acked past a dead letter only once it is on disk, so waiting here loses
        nothing: the spool keeps absorbing the stream meanwhile.
        """
        if self._deadletters.holds(record.seq):
            log.info("dead_letter_replayed", reason=reason, seq=record.seq)
            return  # written before a crash that came ahead of the spool checkpoint
        attempt = 0
        while True:
            try:
                self._deadletters.put(reason, record.payload, conn_id=record.conn_id,
                                      generation=record.generation, seq=record.seq, code=code,
                                      detail=detail)
            except OSError as exc:
                self._deadletter_failed(exc)
                self._backoff(attempt, ErrorClass.TRANSIENT)
                attempt += 1
                continue
            if self.state.startswith("degraded: dead-letter"):
                log.info("deadletter_write_recovered", after_retries=attempt)
                self.state = "draining" if self._should_stop() else "running"
            return

    def _deadletter_failed(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        self.last_error = f"dead-letter write: {name}"
        self.state = f"degraded: dead-letter store unwritable ({name})"
        self.retries += 1
        log.error("deadletter_write_failed", error=name, retries=self.retries)

    # ------------------------------------------------------------------ control messages

    def _take_control(self, kind: str, obj: dict[str, Any], record: Record) -> None:
        body = obj.get(kind)
        if kind == "delete":
            self._on_delete(body, record)
        elif kind == "scrub_geo":
            self._on_scrub_geo(body, record)
        elif kind in ("status_withheld", "user_withheld"):
            self._on_withheld(kind, body, record)
        elif kind == "limit":
            self._on_limit(body, record)
        elif kind == "disconnect":
            code = body.get("code") if isinstance(body, dict) else None
            _bump(self.disconnects, str(code))
        elif kind == "warning":
            self._on_warning(body)
        # "unknown": counted by the caller, nothing to apply

    def _on_delete(self, body: object, record: Record) -> None:
        status = body.get("status") if isinstance(body, dict) else None
        tweet_id = _int_field(status, "id", "id_str")
        if tweet_id is None:
            raise _BadControl("no status id")
        if not self._settings.writer.apply_deletes:
            return
        self._tombstones.add(tweet_id)
        self._batch.deletes.append(tweet_id)
        self._batch.tombstones.append({
            "_id": tweet_id,
            "user_id": _int_field(status, "user_id", "user_id_str"),
            "deleted_at": received_at(record.recv_ns),
        })

    def _on_scrub_geo(self, body: object, record: Record) -> None:
        user_id = _int_field(body, "user_id", "user_id_str")
        up_to = _int_field(body, "up_to_status_id", "up_to_status_id_str")
        if user_id is None or up_to is None:
            raise _BadControl("no user_id or up_to_status_id")
        self._scrub_rules[user_id] = max(up_to, self._scrub_rules.pop(user_id, 0))
        if len(self._scrub_rules) > SCRUB_RULE_LIMIT:  # oldest rule first (dict order)
            del self._scrub_rules[next(iter(self._scrub_rules))]
        query = {"user.id": user_id, "_id": {"$lte": up_to}}
        unset = {"$unset": {"coordinates": "", "geo": "", "place": ""}}
        self._batch.ops.append(_Op("scrub_geo", record, lambda c: c.update_many(query, unset)))

    def _on_withheld(self, kind: str, body: object, record: Record) -> None:
        target = _int_field(body, "id", "id_str")
        countries = body.get("withheld_in_countries") if isinstance(body, dict) else None
        if target is None or not isinstance(countries, list):
            raise _BadControl("no id or withheld_in_countries")
        # The update must reach the tweets before it and none after it: flush on both sides.
        if self._batch.docs:
            self._flush()
        self._batch.closed = True
        if kind == "status_withheld":
            update = {"$set": {"withheld_in_countries": countries}}
            self._batch.ops.append(
                _Op(kind, record, lambda c: c.update_one({"_id": target}, update)))
        else:
            update = {"$set": {"user.withheld_in_countries": countries}}
            self._batch.ops.append(
                _Op(kind, record, lambda c: c.update_many({"user.id": target}, update)))

    def _on_limit(self, body: object, record: Record) -> None:
        track = body.get("track") if isinstance(body, dict) else None
        if type(track) is not int:
            raise _BadControl("no track count")
        # Cumulative per connection: keep the latest, sum over connections.
        self._limits[record.conn_id] = track
        if len(self._limits) > LIMIT_CONNECTIONS:
            oldest = next(iter(self._limits))
            self._limit_base += self._limits.pop(oldest)

    def _on_warning(self, body: object) -> None:
        if isinstance(body, dict):
            self.last_warning = {"code": str(body.get("code")),
                                 "percent_full": body.get("percent_full")}
            log.warning("stream_warning", code=self.last_warning["code"],
                        percent_full=self.last_warning["percent_full"])

    # ------------------------------------------------------------------ flushing

    def _flush(self) -> None:
        """Write the batch (tombstones, tweets, deletes, other effects), then ack its last one."""
        batch = self._batch
        if batch.has_writes():
            self._ensure_target_ready()
            if batch.tombstones:
                self._persist_tombstones(batch.tombstones)
            docs, ids, records = self._drop_tombstoned(batch.docs, batch.ids, batch.records)
            batch.docs, batch.ids, batch.records = docs, ids, records
            if docs:
                self._insert(docs, ids, records)
            batch.docs, batch.ids, batch.records = [], [], []
            if batch.deletes:
                self._apply_deletes(batch.deletes)
            for op in batch.ops:
                self._apply_op(op)
        if batch.last is not None:
            self._reader.ack(batch.last)
        self._batch = _Batch()
        if self._next_settings is not None:
            self._switch_settings()

    def _drop_tombstoned(self, docs: list[RawBSONDocument], ids: list[int],
                         records: list[Record]
                         ) -> tuple[list[RawBSONDocument], list[int], list[Record]]:
        tombstones = self._tombstones
        if not tombstones or not self._settings.writer.apply_deletes:
            return docs, ids, records
        keep = [i for i, tweet_id in enumerate(ids) if tweet_id not in tombstones]
        if len(keep) == len(docs):
            return docs, ids, records
        deleted: SkipReason = "deleted"
        _bump(self.skipped, deleted, len(docs) - len(keep))
        return [docs[i] for i in keep], [ids[i] for i in keep], [records[i] for i in keep]

    def _insert(self, docs: list[RawBSONDocument], ids: list[int], records: list[Record]
                ) -> None:
        """insert_many until every document is stored, a duplicate, or dead-lettered."""
        self.last_batch_size = len(docs)
        started = time.monotonic()
        tried: set[int] = set()  # ids an earlier, failed attempt of this batch may have written
        while docs:
            try:
                self._with_retry("insert", functools.partial(self._insert_attempt, docs, ids,
                                                             tried))
                self.stored += len(docs)
            except BulkWriteError as exc:
                self._resolve_bulk(exc, ids, records, tried)
            except (InvalidDocument, OverflowError) as exc:
                docs, ids, records = self._drop_unencodable(exc, docs, ids, records)
                continue
            docs = []
        self.batches += 1
        elapsed = time.monotonic() - started
        self.insert_seconds_total += elapsed
        self._observe_batch(len(records), elapsed, records)
        if not self._indexes_done:
            self._ensure_indexes()

    def _insert_attempt(self, docs: list[RawBSONDocument], ids: list[int], tried: set[int]
                        ) -> object:
        """One insert_many; when it fails in a way that is retried, note the ids it may have
        written anyway (a writeConcernError, a connection lost before the reply)."""
        try:
            return self._insert_many(docs)
        except PyMongoError as exc:
            if classify_error(exc) not in (ErrorClass.PER_DOCUMENT, ErrorClass.DUPLICATES_ONLY):
                tried.update(ids)
            raise

    def _insert_many(self, docs: list[RawBSONDocument]) -> object:
        # The collection is looked up at call time: a retry may have switched the Mongo target.
        return self._collection.insert_many(docs, ordered=False)

    def _observe_batch(self, size: int, elapsed: float, records: list[Record]) -> None:
        """Batch size, ack time, and each tweet's time from the wire to MongoDB's ack."""
        self.hist_batch.observe(size)
        self.hist_insert.observe(elapsed)
        now_ns = time.time_ns()
        for record in records:
            self.hist_latency.observe((now_ns - record.recv_ns) / 1e9)

    def histograms(self) -> dict[str, Any]:
        """For run/store.json "hist" (see metrics.HISTOGRAMS)."""
        return {"batch_size": self.hist_batch.as_dict(),
                "insert_seconds": self.hist_insert.as_dict(),
                "store_latency_seconds": self.hist_latency.as_dict()}

    def _resolve_bulk(self, exc: BulkWriteError, ids: list[int], records: list[Record],
                      tried: set[int]) -> None:
        """Sort a final BulkWriteError into stored, duplicates and dead letters (no retry)."""
        details = exc.details or {}
        self.stored += int(details.get("nInserted", 0))
        unsure: list[int] = []
        rejected: list[tuple[int, int, str]] = []
        for err in details.get("writeErrors", ()):
            index, code = int(err["index"]), int(err.get("code", 0))
            on_id = duplicate_on_id(err) if code == DUPLICATE_KEY else False
            if on_id and ids[index] not in tried:
                self.duplicates += 1
            elif on_id or on_id is None:
                unsure.append(index)
            else:
                rejected.append((index, code, short_reason(err)))
        rejected += self._check_duplicates(unsure, ids, records, tried)
        for index, code, reason in rejected:
            self._dead_letter("mongo_rejected", records[index], code=code, detail=reason)
        if rejected:
            log.error("insert_documents_rejected", errors=write_error_summary(exc)[:50],
                      ids=[ids[i] for i, _, _ in rejected][:50], count=len(rejected))

    def _check_duplicates(self, indexes: list[int], ids: list[int], records: list[Record],
                          tried: set[int]) -> list[tuple[int, int, str]]:
        """11000s to look up: the server did not name the index, or an earlier attempt of this
        batch may have written the document. Present and written from this very record (same
        spool seq and connection): stored; present otherwise: a duplicate; absent: the key is
        another unique index, rejected."""
        if not indexes:
            return []
        unsure = [ids[i] for i in indexes]
        # The whole (small) ``_ingest``: the stand-in flattens dotted projections.
        found = self._with_retry("check duplicates", lambda: {
            d["_id"]: d.get("_ingest") for d in self._collection.find(
                {"_id": {"$in": unsure}}, {"_id": 1, "_ingest": 1})})
        rejected = []
        for i in indexes:
            if ids[i] not in found:
                rejected.append((i, DUPLICATE_KEY, "DuplicateKey on another unique index"))
            elif ids[i] in tried and _written_from(found[ids[i]], records[i]):
                self.stored += 1
            else:
                self.duplicates += 1
        return rejected

    def _drop_unencodable(self, exc: Exception, docs: list[RawBSONDocument], ids: list[int],
                          records: list[Record]
                          ) -> tuple[list[RawBSONDocument], list[int], list[Record]]:
        """The driver refused the batch: dead-letter the documents over the server's size limit.

        Documents are encoded when taken (``_hold``), so only a server limit below
        ``MAX_BSON_SIZE`` can get here.
        """
        limit = self._max_bson_size()
        bad = {i for i, doc in enumerate(docs) if len(doc.raw) > limit}
        if not bad:  # not reproducible per document: treat as transient rather than drop anything
            self._failed("insert", exc, ErrorClass.TRANSIENT)
            self._backoff(0, ErrorClass.TRANSIENT)
            return docs, ids, records
        for i in bad:
            self._dead_letter("unencodable", records[i], detail="DocumentTooLarge")
        log.error("insert_documents_unencodable", ids=[ids[i] for i in bad][:50], count=len(bad))
        keep = [i for i in range(len(docs)) if i not in bad]
        return [docs[i] for i in keep], [ids[i] for i in keep], [records[i] for i in keep]

    def _max_bson_size(self) -> int:
        """The smallest document limit the known servers announced (16 MiB on any mongod)."""
        servers = self._collection.database.client.topology_description.server_descriptions()
        sizes = [s.max_bson_size for s in servers.values() if s.max_bson_size > 0]
        return min([MAX_BSON_SIZE, *sizes])

    def _persist_tombstones(self, tombstones: list[Document]) -> None:
        try:
            self._with_retry("tombstones", lambda: self._tombstone_collection().insert_many(
                tombstones, ordered=False))
        except BulkWriteError as exc:
            if classify_error(exc) is not ErrorClass.DUPLICATES_ONLY:
                log.error("tombstones_rejected", errors=write_error_summary(exc)[:50])
        if len(self._tombstones) > self._tombstone_limit:
            # Keep the newest ids: a delete that precedes its tweet is for a recent tweet.
            keep = sorted(self._tombstones)[-(self._tombstone_limit * 3 // 4):]
            self._tombstones = set(keep)

    def _apply_deletes(self, ids: list[int]) -> None:
        result = self._with_retry(
            "delete", lambda: self._collection.delete_many({"_id": {"$in": ids}}))
        self.deletes_applied += len(ids)
        self.deleted_documents += result.deleted_count

    def _apply_op(self, op: _Op) -> None:
        try:
            self._with_retry(op.kind, lambda: op.apply(self._collection))
        except GiveUp:
            raise
        except Exception as exc:  # classified PER_DOCUMENT/DUPLICATES: this message cannot apply
            code = getattr(exc, "code", None)
            self.control_rejected += 1
            self._put_dead_letter("control_rejected", op.record,
                                  code=code if isinstance(code, int) else None,
                                  detail=f"{op.kind}: {type(exc).__name__}")

    # ------------------------------------------------------------------ target lifecycle

    def _tombstone_collection(self) -> Collection[Document]:
        return self._collection.database[self._collection.name + "_deleted"]

    def _ensure_target_ready(self) -> None:
        """Load the newest tombstones once per target, before the first insert filters on them."""
        if self._target_ready:
            return
        if self._settings.writer.apply_deletes:
            limit = self._tombstone_limit
            # The collection is looked up at call time: a retry may switch the Mongo target.
            ids = self._with_retry("load tombstones", lambda: [
                d["_id"] for d in self._tombstone_collection().find({}, {"_id": 1})
                .sort("_id", -1).limit(limit)])
            self._tombstones.update(ids)
            log.info("tombstones_loaded", count=len(ids))
        self._target_ready = True

    def _ensure_indexes(self) -> None:
        failures = self._call(lambda: ensure_indexes(self._collection))
        self.index_failures += len(failures)
        # A transient failure is tried again after the next batch; a refusal is not.
        self._indexes_done = all(cls is not ErrorClass.TRANSIENT for _, cls in failures)

    def _switch_failing_target(self) -> bool:
        """A reload brought a new Mongo target while the current one fails: use it now.

        Normally a batch finishes against the target it was taken for; but when that target keeps
        failing (a wrong URI being fixed by the operator is the usual case), waiting for it would
        block the new settings forever. The same documents are retried against the new target.
        """
        if not self._new_target_pending():
            return False
        new = self._next_settings
        assert new is not None
        log.warning("mongo_target_switched_during_retry", database=new.mongo.database,
                    collection=new.mongo.collection)
        self._switch_settings()
        return True

    def _switch_settings(self) -> None:
        new, self._next_settings = self._next_settings, None
        if new is None:
            return
        old = self._settings
        self._settings = new
        self._log_notices(new)
        if not self._encoder_wanted():
            self._stop_encoder()
        if new.mongo != old.mongo:
            log.info("mongo_target_changed", database=new.mongo.database,
                     collection=new.mongo.collection)
            self._collection.database.client.close()
            self._collection = self._factory(new.mongo)
            self._target_epoch += 1
            self._target_ready = self._indexes_done = False

    @staticmethod
    def _log_notices(settings: Settings) -> None:
        """Settings keys that are accepted but do nothing: said once per load, never fatal."""
        for notice in settings.mongo.notices:
            log.warning("settings_key_ignored", detail=notice)

    @staticmethod
    def _matcher(settings: Settings) -> Matcher:
        return Matcher(*StoreWorker._matcher_spec(settings))

    @staticmethod
    def _matcher_spec(settings: Settings) -> MatcherSpec:
        stream = settings.stream
        return (list(stream.track), list(stream.follow), list(stream.locations))

    # ------------------------------------------------------------------ retries

    def _with_retry(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on the helper thread, retried while it fails transiently or for config reasons.

        Failures classified per document or as duplicates are raised for the caller to sort out.
        """
        attempt = 0
        started = time.monotonic()
        while True:
            # Only ``fn``'s own failure is MongoDB's: one raised by a tick (heartbeat, status file)
            # while waiting must propagate as itself, not be retried as a MongoDB error.
            future = self._await(fn)
            try:
                result = future.result()
            except Exception as exc:
                cls = classify_error(exc)
                if cls in (ErrorClass.PER_DOCUMENT, ErrorClass.DUPLICATES_ONLY):
                    self._check_slow(what, started, attempt, exc)
                    raise
                self._failed(what, exc, cls)
                if not self._switch_failing_target():
                    self._backoff(attempt, cls)  # cut short if a reload brings a new target
                    attempt = 0 if self._switch_failing_target() else attempt + 1
                continue
            self._check_slow(what, started, attempt, None)
            if self.state.startswith("degraded"):
                log.info("mongo_recovered", after_retries=attempt)
                self.state = "draining" if self._should_stop() else "running"
            return result

    def _check_slow(self, what: str, started: float, retries: int,
                    exc: BaseException | None) -> None:
        """Warn about (and count) an operation that took ``mongo.slow_write_seconds`` or more.

        pymongo retries inside ``timeoutMS`` without raising, so an outage shorter than that
        shows only as time: the warning names what pymongo saw meanwhile (failed commands,
        cleared pools, servers lost) from its monitoring events.
        """
        elapsed = time.monotonic() - started
        threshold = self._settings.mongo.slow_write_seconds
        if elapsed < threshold:
            return
        self.slow_writes += 1
        log.warning("mongo_write_slow", op=what, seconds=round(elapsed, 3), threshold=threshold,
                    retries=retries, outcome="ok" if exc is None else error_name(exc),
                    causes=DRIVER_EVENTS.since(started) or ["none reported by pymongo"],
                    slow_writes=self.slow_writes)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the helper thread, ticking here while it is in flight."""
        return self._await(fn).result()

    def _await(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Submit ``fn`` to the helper thread and tick until it is done; its future."""
        future = self._executor.submit(fn)
        while True:
            done, _ = concurrent.futures.wait([future], timeout=TICK_INTERVAL)
            if done:
                return future
            self._maybe_tick(force=True)
            self._check_give_up()

    def _failed(self, what: str, exc: BaseException, cls: ErrorClass) -> None:
        name = error_name(exc)
        self.last_error = f"{what}: {name}"
        if cls is ErrorClass.FATAL_CONFIG:
            self.state = f"degraded: mongo rejects our configuration ({name})"
        else:
            self.state = f"degraded: mongo unavailable ({name})"
        self.retries += 1
        # What the server said (codes, names, messages, errInfo); write errors by code only:
        # their messages can quote document contents.
        log.error("mongo_write_failed", op=what, error_class=cls.value, retries=self.retries,
                  **error_fields(exc))

    def _backoff(self, attempt: int, cls: ErrorClass) -> None:
        ws = self._settings.writer
        if cls is ErrorClass.FATAL_CONFIG:
            delay = ws.retry_cap  # retrying fast cannot fix credentials
        else:
            delay = min(ws.retry_cap, ws.retry_start * 2 ** min(attempt, 30))
            delay *= self._rng.uniform(0.5, 1.0)
        self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        """Back-off wait; cut short when a reload brings a new Mongo target to try."""
        end, epoch = time.monotonic() + seconds, self._target_epoch
        while ((left := end - time.monotonic()) > 0 and epoch == self._target_epoch
               and not self._new_target_pending()):
            self._check_give_up()
            self._maybe_tick(force=True)
            time.sleep(min(TICK_INTERVAL, left))
        self._check_give_up()

    def _new_target_pending(self) -> bool:
        new = self._next_settings
        return new is not None and new.mongo != self._settings.mongo

    def _maybe_tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_tick:
            self._next_tick = now + TICK_INTERVAL
            self._tick()
            # A coalesced checkpoint must not wait for the next ack (e.g. during a MongoDB
            # back-off): the stream worker sizes the backlog from it.
            self._reader.maybe_flush()

    def _past_deadline(self) -> bool:
        deadline = self._drain_deadline()
        return deadline is not None and time.monotonic() >= deadline

    def _check_give_up(self) -> None:
        if self._should_stop() and self._past_deadline():
            raise GiveUp(self.last_error)
