"""Compliance notices (delete, scrub_geo, status_withheld, user_withheld) applied in stream order.

Deletes and ``scrub_geo`` are applied after the batch they arrived in is inserted: both commute
with the tweets around them (a tweet after its delete is filtered by the tombstone set; a later
tweet inside a scrub range is scrubbed as it is built). A scrub reaches every copy of the user's
tweets: the tweets themselves, and the originals that retweets and quotes carry
(``EMBEDDED_PATHS``). Withheld messages, which do not commute,
end the batch: the store worker flushes it first, then they are applied. A notice whose MongoDB
effect is rejected is dead-lettered (``control_rejected``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import structlog
from bson import DatetimeMS
from pymongo import UpdateMany
from pymongo.errors import BulkWriteError, PyMongoError

from ingestd.documents.encoder import Encoded, received_at
from ingestd.documents.labels import SkipReason
from ingestd.documents.messages import EMBEDDED_PATHS, InvalidTweet, embedded_copies, parse_id
from ingestd.sink.batch import Batch, Entry, Op
from ingestd.sink.counters import StoreCounters, bump
from ingestd.sink.mongo import (
    TOMBSTONE_TTL_NAME,
    Document,
    ErrorClass,
    classify_error,
    ensure_tombstone_ttl,
    index_failed,
    write_error_summary,
)
from ingestd.sink.retry import DeadLetterWriter, GiveUp, Retrier
from ingestd.sink.target import MongoTarget
from ingestd.spool.format import Record

log = structlog.get_logger("ingestd.sink.compliance")

# Ids of deleted tweets kept in memory to filter a tweet whose delete came first (~70 bytes each
# in a set of ints: ~14 MB at the limit); older ones stay in the ``<collection>_deleted`` store,
# each until ``writer.tombstone_retention`` after its delete was received (a TTL index).
TOMBSTONE_LIMIT = 200_000
SCRUB_RULE_LIMIT = 100_000
WITHHELD = ("status_withheld", "user_withheld")
GEO_FIELDS = ("coordinates", "geo", "place")


class BadControl(ValueError):
    """A control message without the fields its effect needs."""


def int_field(body: object, *names: str) -> int | None:
    """The first of ``names`` in ``body`` that is an id (int or digit string), else None."""
    if not isinstance(body, dict):
        return None
    for name in names:
        try:
            return parse_id(body.get(name))
        except InvalidTweet:
            continue
    return None


def scrub_updates(user_id: int, up_to: int) -> list[tuple[Document, Document]]:
    """A scrub_geo's (filter, update) pairs: the user's tweets up to ``up_to``, then each place a
    retweet or a quote carries a copy of one (each filter served by an index, ``mongo.INDEXES``)."""
    updates = [({"user.id": user_id, "_id": {"$lte": up_to}}, _unset_geo(""))]
    updates += [({f"{path}.user.id": user_id, f"{path}.id": {"$lte": up_to}},
                 _unset_geo(f"{path}.")) for path in EMBEDDED_PATHS]
    return updates


def _unset_geo(prefix: str) -> Document:
    return {"$unset": {prefix + key: "" for key in GEO_FIELDS}}


def _drop_geo(doc: Document) -> None:
    for key in GEO_FIELDS:
        doc.pop(key, None)


class Compliance:
    """Turns notices into a batch's effects, filters and scrubs tweets, applies the effects."""

    def __init__(self, target: MongoTarget, retrier: Retrier, deadletters: DeadLetterWriter,
                 counters: StoreCounters, tombstone_limit: int = TOMBSTONE_LIMIT) -> None:
        self._target = target
        self._retrier = retrier
        self._deadletters = deadletters
        self._counters = counters
        self._tombstones: set[int] = set()
        self._tombstone_limit = tombstone_limit
        self.scrub_rules: dict[int, int] = {}  # user id -> up_to_status_id (never rebound)

    # ------------------------------------------------------------------ taking notices

    def on_delete(self, body: object, record: Record, batch: Batch) -> None:
        status = body.get("status") if isinstance(body, dict) else None
        tweet_id = int_field(status, "id", "id_str")
        if tweet_id is None:
            raise BadControl("no status id")
        if not self._target.settings.writer.apply_deletes:
            return
        self._tombstones.add(tweet_id)
        batch.deletes.append(tweet_id)
        batch.tombstones.append({
            "_id": tweet_id,
            "user_id": int_field(status, "user_id", "user_id_str"),
            # A BSON date (never text: the TTL index ignores a document whose field is not a
            # date, and keeps it forever); a record without a receive time counts from now.
            "deleted_at": received_at(record.recv_ns if record.recv_ns > 0 else time.time_ns()),
        })

    def on_scrub_geo(self, body: object, record: Record, batch: Batch) -> None:
        user_id = int_field(body, "user_id", "user_id_str")
        up_to = int_field(body, "up_to_status_id", "up_to_status_id_str")
        if user_id is None or up_to is None:
            raise BadControl("no user_id or up_to_status_id")
        self.scrub_rules[user_id] = max(up_to, self.scrub_rules.pop(user_id, 0))
        if len(self.scrub_rules) > SCRUB_RULE_LIMIT:  # oldest rule first (dict order)
            del self.scrub_rules[next(iter(self.scrub_rules))]
        writes = [UpdateMany(query, unset) for query, unset in scrub_updates(user_id, up_to)]
        # One round trip; unordered: a copy MongoDB refuses does not keep the others unscrubbed.
        batch.ops.append(Op("scrub_geo", record, lambda c: c.bulk_write(writes, ordered=False)))

    @staticmethod
    def withheld_op(kind: str, body: object, record: Record) -> Op:
        """The effect of a withheld notice; it must reach the tweets before it and none after."""
        target = int_field(body, "id", "id_str")
        countries = body.get("withheld_in_countries") if isinstance(body, dict) else None
        if target is None or not isinstance(countries, list):
            raise BadControl("no id or withheld_in_countries")
        # copied into stored tweets as is: anything but codes (a list nested 500 deep) made
        # MongoDB refuse the whole update, retried for ever
        if not all(type(code) is str for code in countries):
            raise BadControl("withheld_in_countries is not a list of country codes")
        if kind == "status_withheld":
            update: dict[str, Any] = {"$set": {"withheld_in_countries": countries}}
            return Op(kind, record, lambda c: c.update_one({"_id": target}, update))
        update = {"$set": {"user.withheld_in_countries": countries}}
        return Op(kind, record, lambda c: c.update_many({"user.id": target}, update))

    def scrubbed(self, encoded: Encoded) -> bytes:
        """A tweet without the geo fields of each copy in it that a scrub_geo seen before it
        covers: its own, or a retweeted or quoted tweet's (rare: decoded only then)."""
        rules = self.scrub_rules
        up_to = rules.get(encoded.user_id) if encoded.user_id is not None else None
        own = up_to is not None and encoded.tweet_id <= up_to
        if not own and not any(uid in rules for uid in encoded.embedded_users):
            return encoded.raw
        doc: Document = bson.decode(encoded.raw)
        if own:
            _drop_geo(doc)
        for copy in embedded_copies(doc):
            if self._covers(copy):
                _drop_geo(copy)
        return bson.encode(doc)

    def _covers(self, copy: Document) -> bool:
        """Whether a scrub rule covers an embedded copy, by the fields ``scrub_updates`` filters
        stored copies on (``user.id``, ``id``)."""
        user = copy.get("user")
        author = user.get("id") if isinstance(user, dict) else None
        tweet_id = copy.get("id")
        if not isinstance(author, int) or not isinstance(tweet_id, int):
            return False
        up_to = self.scrub_rules.get(author)
        return up_to is not None and tweet_id <= up_to

    # ------------------------------------------------------------------ applying a batch

    def before_insert(self, batch: Batch) -> list[Entry]:
        """Persist the batch's tombstones; its tweets that no delete has removed."""
        self._ensure_ttl()
        self._ensure_loaded()
        if batch.tombstones:
            self._persist_tombstones(batch.tombstones)
        return self._drop_tombstoned(batch.entries)

    def after_insert(self, batch: Batch) -> None:
        """Apply the batch's deletes, then its other effects in stream order."""
        if batch.deletes:
            self._apply_deletes(batch.deletes)
        for op in batch.ops:
            self._apply_op(op)

    def _ensure_ttl(self) -> None:
        """Set the tombstones' TTL index to ``writer.tombstone_retention``: once per target, and
        again when a reload changes the retention (``collMod``). Never fatal: a failure is logged
        and counted (``index_failures``); a transient one is tried again at the next batch."""
        target = self._target
        seconds = target.settings.writer.tombstone_retention
        if target.tombstone_ttl == seconds:
            return
        try:
            # The collection is looked up at call time: a retry may switch the Mongo target.
            done = self._retrier.call(lambda: ensure_tombstone_ttl(target.tombstones(), seconds))
        except PyMongoError as exc:
            cls, why = index_failed(TOMBSTONE_TTL_NAME, exc)
            self._counters.index_failures += 1
            self._counters.indexes_missing[TOMBSTONE_TTL_NAME] = why
            if cls is not ErrorClass.TRANSIENT:
                target.tombstone_ttl = seconds  # refused: not asked again for this retention
            return
        self._counters.indexes_missing.pop(TOMBSTONE_TTL_NAME, None)
        target.tombstone_ttl = seconds
        if done != "kept":
            log.info("tombstone_ttl", action=done, retention_seconds=seconds)

    def _ensure_loaded(self) -> None:
        """Load the newest tombstones once per target, before the first insert filters on them:
        those the retention keeps (younger than ``writer.tombstone_retention``), at most
        ``tombstone_limit`` of them, newest deletes first."""
        target = self._target
        if target.ready:
            return
        if target.settings.writer.apply_deletes:
            limit = self._tombstone_limit
            retention = target.settings.writer.tombstone_retention
            # The collection is looked up at call time: a retry may switch the Mongo target.
            def load() -> list[int]:
                since = DatetimeMS(datetime.now(UTC) - timedelta(seconds=retention))
                cursor = target.tombstones().find({"deleted_at": {"$gte": since}}, {"_id": 1})
                return [d["_id"] for d in cursor.sort("deleted_at", -1).limit(limit)]
            ids = self._retrier.with_retry("load tombstones", load)
            self._tombstones.update(ids)
            log.info("tombstones_loaded", count=len(ids), retention_seconds=retention)
        target.ready = True

    def _persist_tombstones(self, tombstones: list[Document]) -> None:
        try:
            self._retrier.with_retry("tombstones", lambda: self._target.tombstones().insert_many(
                tombstones, ordered=False))
        except BulkWriteError as exc:
            if classify_error(exc) is not ErrorClass.DUPLICATES_ONLY:
                log.error("tombstones_rejected", errors=write_error_summary(exc)[:50])
        if len(self._tombstones) > self._tombstone_limit:
            # Keep the newest ids: a delete that precedes its tweet is for a recent tweet.
            keep = sorted(self._tombstones)[-(self._tombstone_limit * 3 // 4):]
            self._tombstones = set(keep)

    def _drop_tombstoned(self, entries: list[Entry]) -> list[Entry]:
        tombstones = self._tombstones
        if not tombstones or not self._target.settings.writer.apply_deletes:
            return entries
        keep = [e for e in entries if e.tweet_id not in tombstones]
        if len(keep) == len(entries):
            return entries
        deleted: SkipReason = "deleted"
        bump(self._counters.skipped, deleted, len(entries) - len(keep))
        return keep

    def _apply_deletes(self, ids: list[int]) -> None:
        result = self._retrier.with_retry(
            "delete", lambda: self._target.collection.delete_many({"_id": {"$in": ids}}))
        self._counters.deletes_applied += len(ids)
        self._counters.deleted_documents += result.deleted_count

    def _apply_op(self, op: Op) -> None:
        try:
            self._retrier.with_retry(op.kind, lambda: op.apply(self._target.collection))
        except GiveUp:
            raise
        except Exception as exc:  # classified PER_DOCUMENT/DUPLICATES: this message cannot apply
            code = getattr(exc, "code", None)
            self._counters.control_rejected += 1
            self._deadletters.put("control_rejected", op.record,
                                  code=code if isinstance(code, int) else None,
                                  detail=f"{op.kind}: {type(exc).__name__}")
