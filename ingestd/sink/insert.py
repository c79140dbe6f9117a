"""``insert_many`` of a batch's tweets until each one is stored, a duplicate, or dead-lettered.

A failed attempt is retried with the *same* documents (``_id`` is the tweet id, so a retry can
only produce duplicates). A failed attempt may still have written documents (a
writeConcernError, a connection lost before the reply): when a retry finds such an ``_id``
present, the stored document's ``_ingest.seq``/``conn`` tell whether that attempt wrote it
(counted as stored) or another record did (a duplicate).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import bson
import structlog
from bson.errors import InvalidDocument
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from ingestd.sink.attempt import Started
from ingestd.sink.batch import Entry, InFlight
from ingestd.sink.counters import StoreCounters, StoreHistograms
from ingestd.sink.mongo import (
    DUPLICATE_KEY,
    TOMBSTONE_TTL_NAME,
    ErrorClass,
    classify_error,
    duplicate_on_id,
    ensure_indexes,
    error_fields,
    index_names,
    indexes_for,
    missing_indexes,
    short_reason,
    write_error_summary,
)
from ingestd.sink.retry import DeadLetterWriter, Retrier
from ingestd.sink.target import MongoTarget
from ingestd.spool.format import RecordRef

log = structlog.get_logger("ingestd.sink.insert")

# Seconds between two looks at the collection's indexes (one listIndexes): one dropped by hand,
# or with the collection, is created again within this.
INDEX_CHECK_SECONDS = 300.0
# MongoDB stores documents nested at most this deep (its documented limit). A deeper one can make
# the server refuse the whole insert_many, not the document (the stand-in does past ~450
# levels): one tweet stalled every batch after it.
MAX_NESTING = 100


class TooDeep(InvalidDocument):
    """The server refused a batch that holds documents nested deeper than ``MAX_NESTING``."""

    def __init__(self, entries: list[Entry]) -> None:
        super().__init__(f"{len(entries)} documents nested deeper than {MAX_NESTING} levels")
        self.entries = entries


def nested_too_deep(raw: bytes | memoryview, limit: int = MAX_NESTING) -> bool:
    """Whether a BSON document nests more than ``limit`` levels (the document itself is one)."""
    level: list[Any] = [bson.decode(raw)]
    for _ in range(limit):  # one level at a time: no recursion
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c)
                 if isinstance(v, dict | list)]
        if not level:
            return False
    return True


def written_from(ingest: object, record: RecordRef) -> bool:
    """Whether a stored document's ``_ingest`` says it was built from ``record``."""
    return (isinstance(ingest, dict) and ingest.get("seq") == record.seq
            and ingest.get("conn") == record.conn_id)


class Inserter:
    """Stores a batch's tweets in the current target and counts where each one went."""

    def __init__(self, target: MongoTarget, retrier: Retrier, deadletters: DeadLetterWriter,
                 counters: StoreCounters, histograms: StoreHistograms, *,
                 on_stored: Callable[[list[Entry]], None] = lambda entries: None,
                 on_duplicates: Callable[[list[Entry]], None] = lambda entries: None) -> None:
        # Told of the entries newly stored, and of those found already stored (coverage ledger).
        self._on_stored, self._on_duplicates = on_stored, on_duplicates
        self._target = target
        self._retrier = retrier
        self._deadletters = deadletters
        self._counters = counters
        self._histograms = histograms
        self.index_check_seconds = INDEX_CHECK_SECONDS
        self._index_check_at = 0.0  # monotonic: when the indexes are looked at again

    def begin(self, entries: list[Entry]) -> InFlight:
        """Start the first ``insert_many`` of ``entries`` on the helper thread; ``finish`` waits
        for it and sorts out the outcome (the caller takes the next batch meanwhile)."""
        tried: set[int] = set()  # ids an earlier, failed attempt of this batch may have written
        return InFlight(entries, tried, self._retrier.start(
            functools.partial(self._attempt, entries, tried), "insert"))

    def finish(self, flight: InFlight) -> None:
        """Wait for ``flight``'s first attempt, then retry until every document is stored, a
        duplicate, or dead-lettered."""
        c = self._counters
        c.last_batch_size = len(flight.entries)
        retries = c.retries
        entries = docs = flight.entries
        first: Started[object] | None = flight.attempt
        clean = True  # the first attempt stored the whole batch: it took until it ended
        while docs:
            try:
                self._retrier.with_retry("insert", functools.partial(
                    self._attempt, docs, flight.tried), first)
                c.stored += len(docs)
                self._on_stored(docs)
            except BulkWriteError as exc:
                clean = False
                self._resolve_bulk(exc, docs, flight.tried)
            except (InvalidDocument, OverflowError) as exc:
                clean, first = False, None
                entries = docs = self._drop_unencodable(exc, docs)
                continue
            docs = []
        c.batches += 1
        clean = clean and c.retries == retries
        elapsed = (flight.attempt.ended if clean else time.monotonic()) - flight.attempt.started
        c.insert_seconds_total += elapsed
        self._histograms.observe_batch(elapsed, entries)
        if self._index_check_due():
            self._ensure_indexes()

    def _attempt(self, docs: list[Entry], tried: set[int]) -> object:
        """One insert_many; when it fails in a way that is retried, note the ids it may have
        written anyway (a writeConcernError, a connection lost before the reply)."""
        try:
            return self._insert_many(docs)
        except PyMongoError as exc:
            if classify_error(exc) not in (ErrorClass.PER_DOCUMENT, ErrorClass.DUPLICATES_ONLY):
                tried.update([e.tweet_id for e in docs])
                # The server refused the command as a whole: a document it can never store
                # (looked for only then: decoding every document costs ~20 µs each) is the
                # cause to remove, not an outage to wait out.
                if type(exc) is OperationFailure and (deep := _too_deep(docs)):
                    raise TooDeep(deep) from exc
            raise

    def _insert_many(self, docs: list[Entry]) -> object:
        # The collection is looked up at call time: a retry may have switched the Mongo target.
        return self._target.collection.insert_many(docs, ordered=False)

    def _resolve_bulk(self, exc: BulkWriteError, docs: list[Entry], tried: set[int]) -> None:
        """Sort a final BulkWriteError into stored, duplicates and dead letters (no retry)."""
        c = self._counters
        details = exc.details or {}
        c.stored += int(details.get("nInserted", 0))
        unsure: list[int] = []
        rejected: list[tuple[Entry, int, str]] = []
        errors = details.get("writeErrors", ())
        failed = {int(err["index"]) for err in errors}
        duplicates: list[Entry] = []
        for err in errors:
            index, code = int(err["index"]), int(err.get("code", 0))
            on_id = duplicate_on_id(err) if code == DUPLICATE_KEY else False
            if on_id and docs[index].tweet_id not in tried:
                c.duplicates += 1
                duplicates.append(docs[index])
            elif on_id or on_id is None:
                unsure.append(index)
            else:
                rejected.append((docs[index], code, short_reason(err)))
        rejected += self._check_duplicates([docs[i] for i in unsure], tried, duplicates)
        self._on_duplicates(duplicates)
        self._on_stored([d for i, d in enumerate(docs) if i not in failed])
        for entry, code, reason in rejected:
            self._deadletters.add_ref("mongo_rejected", entry.record, code=code, detail=reason)
        if rejected:
            log.error("insert_documents_rejected", errors=write_error_summary(exc)[:50],
                      ids=[e.tweet_id for e, _, _ in rejected][:50], count=len(rejected))

    def _check_duplicates(self, unsure: list[Entry], tried: set[int], duplicates: list[Entry]
                          ) -> list[tuple[Entry, int, str]]:
        """11000s to look up: the server did not name the index, or an earlier attempt of this
        batch may have written the document. Present and written from this very record (same
        spool seq and connection): stored; present otherwise: a duplicate; absent: the key is
        another unique index, rejected."""
        if not unsure:
            return []
        ids = [e.tweet_id for e in unsure]
        # The whole (small) ``_ingest``: the stand-in flattens dotted projections.
        found = self._retrier.with_retry("check duplicates", lambda: {
            d["_id"]: d.get("_ingest") for d in self._target.collection.find(
                {"_id": {"$in": ids}}, {"_id": 1, "_ingest": 1})})
        rejected = []
        for entry in unsure:
            if entry.tweet_id not in found:
                rejected.append((entry, DUPLICATE_KEY, "DuplicateKey on another unique index"))
            elif entry.tweet_id in tried and written_from(found[entry.tweet_id], entry.record):
                self._counters.stored += 1
                self._on_stored([entry])
            else:
                self._counters.duplicates += 1
                duplicates.append(entry)
        return rejected

    def _drop_unencodable(self, exc: Exception, docs: list[Entry]) -> list[Entry]:
        """The driver refused the batch: dead-letter the documents over the server's size limit
        (documents are encoded when taken, so only a server limit below ``MAX_BSON_SIZE`` can get
        here); the server refused it whole (``TooDeep``): those nested too deeply."""
        limit = self._max_bson_size()
        bad = [e for e in docs if len(e.raw) > limit]
        deep = [e for e in exc.entries if len(e.raw) <= limit] if isinstance(exc, TooDeep) else []
        if not bad and not deep:  # not reproducible per document: transient rather than drop
            self._retrier.failed("insert", exc, ErrorClass.TRANSIENT)
            self._retrier.backoff(0, ErrorClass.TRANSIENT)
            return docs
        for entry in bad:
            self._deadletters.add_ref("unencodable", entry.record, detail="DocumentTooLarge")
        for entry in deep:
            self._deadletters.add_ref("unencodable", entry.record,
                                      detail=f"nested deeper than MongoDB's {MAX_NESTING} levels")
        dropped = {id(e) for e in bad + deep}
        log.error("insert_documents_unencodable", ids=[e.tweet_id for e in bad + deep][:50],
                  count=len(dropped))
        return [e for e in docs if id(e) not in dropped]

    def _max_bson_size(self) -> int:
        return self._target.max_bson_size()

    def _index_check_due(self) -> bool:
        return not self._target.indexes_done or time.monotonic() >= self._index_check_at

    def _ensure_indexes(self) -> None:
        """Create the analysts' indexes the collection lacks: at the first batch of a target,
        and every ``index_check_seconds`` after (an index or the collection dropped by hand
        while the daemon runs was missing until the next start; the TTL is looked at too).
        A re-check leaves alone those refused before (tried again at the next start)."""
        target, missing = self._target, self._counters.indexes_missing
        api = target.settings.stream.api
        recheck = target.indexes_done
        self._index_check_at = time.monotonic() + self.index_check_seconds
        if recheck and TOMBSTONE_TTL_NAME not in missing:
            target.tombstone_ttl = None  # the next batch looks for the TTL index again
        try:
            models = self._retrier.call(lambda: missing_indexes(target.collection, api))
        except PyMongoError as exc:  # no listIndexes (a role without it): create them all
            log.warning("index_list_failed", **error_fields(exc))
            models = list(indexes_for(api))
        if recheck:
            models = [m for m in models if str(m.document["name"]) not in missing]
            if models:
                log.warning("index_missing", indexes=[str(m.document["name"]) for m in models],
                            action="created again (dropped by hand, or with the collection)")
        failures = self._retrier.call(lambda: ensure_indexes(target.collection, models))
        self._counters.index_failures += len(failures)
        # What status says is missing now: this target's analysts' indexes.
        if not recheck:  # each was looked for
            for name in index_names(api):
                missing.pop(name, None)
        for model in models:
            missing.pop(str(model.document["name"]), None)
        missing.update((name, why) for name, _, why in failures)
        # A transient failure is tried again after the next batch; a refusal is not.
        target.indexes_done = all(cls is not ErrorClass.TRANSIENT for _, cls, _ in failures)


def _too_deep(docs: list[Entry]) -> list[Entry]:
    return [e for e in docs if nested_too_deep(e.raw)]
