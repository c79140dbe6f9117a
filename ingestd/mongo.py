"""MongoDB client construction, the analysts' indexes, and how pymongo errors are classified.

The classification follows reliability.md §3.4. It is the one place that decides whether a failed
write is retried (nothing is lost: ``_id`` is the tweet id, so a retry can only produce duplicates),
counted as already stored, dead-lettered per document, or reported as a configuration problem.
Nothing here ever formats a failed document: pymongo puts the whole document in
``BulkWriteError.details["writeErrors"][i]["op"]``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import pymongo
import structlog
from bson.errors import InvalidDocument
from pymongo import IndexModel
from pymongo.collection import Collection
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from ingestd.settings import MongoSettings

log = structlog.get_logger("ingestd.mongo")

Document = dict[str, Any]

DUPLICATE_KEY = 11000
FATAL_CODES = frozenset({18, 13})  # AuthenticationFailed, Unauthorized
# Not-primary/recovering/interrupted/timeout codes (pymongo's _RETRYABLE_ERROR_CODES, plus 50
# MaxTimeMSExpired): the server did not judge the document, so retrying is right.
TRANSIENT_CODES = frozenset(
    {6, 7, 50, 89, 91, 134, 189, 262, 9001, 10058, 10107, 11600, 11602, 13435, 13436}
)
CODE_NAMES = {
    2: "BadValue",
    50: "MaxTimeMSExpired",
    121: "DocumentValidationFailure",
    10334: "BSONObjectTooLarge",
    16755: "CannotExtractGeoKeys",
    17280: "KeyTooLong",
    DUPLICATE_KEY: "DuplicateKey",
}


class ErrorClass(enum.Enum):
    """What to do about a failed MongoDB operation (reliability.md §3.4)."""

    TRANSIENT = "transient"  # keep the batch, retry the same documents with back-off
    DUPLICATES_ONLY = "duplicates_only"  # every failure is a duplicate _id: already stored
    PER_DOCUMENT = "per_document"  # only some documents are bad: dead-letter those, ack the rest
    FATAL_CONFIG = "fatal_config"  # auth/config: retrying fast cannot help; degrade, retry slowly


def classify_error(exc: BaseException) -> ErrorClass:
    """Map an exception raised by a write to what the writer should do about it."""
    if isinstance(exc, BulkWriteError):
        return _classify_bulk(exc)
    if isinstance(exc, ConfigurationError):  # includes InvalidURI
        return ErrorClass.FATAL_CONFIG
    if isinstance(exc, (InvalidDocument, OverflowError)):
        # Raised by the BSON encoder (DocumentTooLarge is an InvalidDocument; an integer beyond
        # int64 is an OverflowError) before anything is sent: a property of one document.
        return ErrorClass.PER_DOCUMENT
    if isinstance(exc, (ConnectionFailure, WriteConcernError)):
        return ErrorClass.TRANSIENT
    if isinstance(exc, PyMongoError) and (
        exc.has_error_label("RetryableWriteError") or exc.timeout
    ):
        return ErrorClass.TRANSIENT
    if isinstance(exc, OperationFailure) and exc.code in FATAL_CODES:
        return ErrorClass.FATAL_CONFIG
    # Anything else (unknown server or driver errors): retrying loses nothing (the spool keeps the
    # records) and back-off keeps it from spinning; dead-lettering could lose good data.
    return ErrorClass.TRANSIENT


def _classify_bulk(exc: BulkWriteError) -> ErrorClass:
    details = exc.details or {}
    if details.get("writeConcernErrors") or exc.has_error_label("RetryableWriteError"):
        return ErrorClass.TRANSIENT
    codes = {err.get("code") for err in details.get("writeErrors", ())}
    if not codes or codes & TRANSIENT_CODES:
        return ErrorClass.TRANSIENT
    if codes & FATAL_CODES:
        return ErrorClass.FATAL_CONFIG
    if codes == {DUPLICATE_KEY}:
        return ErrorClass.DUPLICATES_ONLY
    return ErrorClass.PER_DOCUMENT


def write_error_summary(bwe: BulkWriteError) -> list[tuple[int, int, str]]:
    """``(index, code, short reason)`` per write error, safe to log: never the document (``op``)."""
    summary = []
    for err in (bwe.details or {}).get("writeErrors", ()):
        code = int(err.get("code", 0))
        summary.append((int(err.get("index", -1)), code, short_reason(err)))
    return summary


def short_reason(err: Mapping[str, Any]) -> str:
    """A reason built from codes and field names only (``errmsg`` can quote document values)."""
    code = err.get("code")
    name = err.get("codeName") or CODE_NAMES.get(code if isinstance(code, int) else -1)
    reason = str(name) if name else f"write error {code}"
    pattern = err.get("keyPattern")
    if isinstance(pattern, Mapping):
        reason += " on " + "+".join(str(k) for k in pattern)
    return reason


def duplicate_on_id(err: Mapping[str, Any]) -> bool | None:
    """Whether an 11000 write error is on ``_id``; None if the server does not say (keyPattern)."""
    pattern = err.get("keyPattern")
    if isinstance(pattern, Mapping):
        return list(pattern) == ["_id"]
    return None


def make_client(mongo: MongoSettings) -> pymongo.MongoClient[Document]:
    """A client for ``mongo``; the URI is revealed here and nowhere else."""
    return pymongo.MongoClient(
        mongo.uri.reveal(),
        appname="ingestd",
        tz_aware=True,
        serverSelectionTimeoutMS=mongo.server_selection_timeout_ms,
        timeoutMS=mongo.timeout_ms,
        w=mongo.write_concern.w,
        journal=mongo.write_concern.j,
    )


def open_collection(mongo: MongoSettings) -> Collection[Document]:
    """The tweets collection on a new client, owned by the caller (``.database.client.close()``)."""
    return make_client(mongo)[mongo.database][mongo.collection]


# Indexes behind the analysts' usual questions: by time, by user, by matched term, by hashtag,
# by language, by place. 2dsphere last: a server without geo indexes must not block the others.
INDEXES = (
    IndexModel([("created_at", pymongo.ASCENDING)]),
    IndexModel([("user.id", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("_ingest.matched.track", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("entities.hashtags.text", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("_ingest.hashtags", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("_ingest.matched.locations", pymongo.ASCENDING),
                ("created_at", pymongo.ASCENDING)]),
    IndexModel([("lang", pymongo.ASCENDING)]),
    IndexModel([("coordinates", pymongo.GEOSPHERE)]),
)


def ensure_indexes(collection: Collection[Document]) -> list[tuple[str, ErrorClass]]:
    """Create the analysts' indexes one by one; failures are logged and returned, never raised."""
    failures: list[tuple[str, ErrorClass]] = []
    for model in INDEXES:
        name = str(model.document["name"])
        try:
            collection.create_indexes([model])
        except PyMongoError as exc:
            cls = classify_error(exc)
            log.error("index_create_failed", index=name, error=type(exc).__name__,
                      code=getattr(exc, "code", None), error_class=cls.value)
            failures.append((name, cls))
    return failures
