"""MongoDB client construction, the analysts' indexes, and how pymongo errors are classified.

The classification follows docs/reliability.md §3.4. It is the one place that decides whether a
failed write is retried (nothing is lost: ``_id`` is the tweet id, so a retry can only produce
duplicates), counted as already stored, dead-lettered per document, or reported as a configuration
problem.
Nothing here ever formats a failed document: pymongo puts the whole document in
``BulkWriteError.details["writeErrors"][i]["op"]``.
"""

from __future__ import annotations

import collections
import enum
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pymongo
import structlog
from bson.errors import InvalidDocument
from pymongo import IndexModel, monitoring
from pymongo.collection import Collection
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
    WriteError,
)

from ingestd.config.schema import MongoSettings
from ingestd.config.tls import HOST_MONGO, TRUST_MONGO, certificate_problem
from ingestd.documents.messages import EMBEDDED_PATHS

log = structlog.get_logger("ingestd.sink.mongo")

Document = dict[str, Any]

DUPLICATE_KEY = 11000
UNAUTHORIZED, ATLAS_ERROR = 13, 8000
ATLAS_BAD_AUTH = "bad auth"  # 8000's message for a wrong user name or password
FATAL_CODES = frozenset({18, UNAUTHORIZED})  # AuthenticationFailed, Unauthorized
# Not-primary/recovering/interrupted/timeout codes (pymongo's _RETRYABLE_ERROR_CODES, plus 50
# MaxTimeMSExpired): the server did not judge the document, so retrying is right.
TRANSIENT_CODES = frozenset(
    {6, 7, 50, 89, 91, 134, 189, 262, 9001, 10058, 10107, 11600, 11602, 13435, 13436}
)
# Write concerns the deployment can never satisfy (w greater than its data-bearing members, an
# unknown tag set): the writes were applied on the primary, but no retry will confirm them. Only
# the operator can fix it (settings or the replica set): degraded, retried at the cap, not
# dead-lettered (the documents are fine).
UNSATISFIABLE_WRITE_CONCERN_CODES = frozenset({100, 79})  # UnsatisfiableWriteConcern,
#                                                            UnknownReplWriteConcern
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
    """What to do about a failed MongoDB operation (docs/reliability.md §3.4)."""

    TRANSIENT = "transient"  # keep the batch, retry the same documents with back-off
    DUPLICATES_ONLY = "duplicates_only"  # every failure is a duplicate _id: already stored
    PER_DOCUMENT = "per_document"  # only some documents are bad: dead-letter those, ack the rest
    FATAL_CONFIG = "fatal_config"  # auth/config: retrying fast cannot help; degrade, retry slowly


def classify_error(exc: BaseException) -> ErrorClass:
    """Map an exception raised by a write to what the writer should do about it."""
    if isinstance(exc, BulkWriteError):
        return _classify_bulk(exc)
    if isinstance(exc, ConfigurationError) or missing_privilege(exc):  # includes InvalidURI
        return ErrorClass.FATAL_CONFIG
    if isinstance(exc, OperationFailure) and exc.code == ATLAS_ERROR \
            and ATLAS_BAD_AUTH in str((exc.details or {}).get("errmsg", "")):
        return ErrorClass.FATAL_CONFIG  # Atlas's AuthenticationFailed
    if isinstance(exc, (InvalidDocument, OverflowError)):
        # Raised by the BSON encoder (DocumentTooLarge is an InvalidDocument; an integer beyond
        # int64 is an OverflowError) before anything is sent: a property of one document.
        return ErrorClass.PER_DOCUMENT
    if isinstance(exc, WriteConcernError) and exc.code in UNSATISFIABLE_WRITE_CONCERN_CODES:
        return ErrorClass.FATAL_CONFIG
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
    wce_codes = {err.get("code") for err in details.get("writeConcernErrors", ())}
    if wce_codes & UNSATISFIABLE_WRITE_CONCERN_CODES:
        return ErrorClass.FATAL_CONFIG
    if wce_codes or exc.has_error_label("RetryableWriteError"):
        return ErrorClass.TRANSIENT
    codes = {err.get("code") for err in details.get("writeErrors", ())}
    if not codes or codes & TRANSIENT_CODES:
        return ErrorClass.TRANSIENT
    if codes & FATAL_CODES:
        return ErrorClass.FATAL_CONFIG
    if codes == {DUPLICATE_KEY}:
        return ErrorClass.DUPLICATES_ONLY
    return ErrorClass.PER_DOCUMENT


# How a server names the privilege a user lacks. mongod (13 Unauthorized) names the database and
# quotes the command's head, ``{ insert: "tweets", ordered: false, … }`` (the documents travel
# apart from it, never in the message); Atlas's front end answers 8000 AtlasError with the action
# and the namespace. Only these names are taken from the message.
_MONGOD_DENIAL = re.compile(r"not authorized on (?P<db>[^ ]+) to execute command "
                            r'\{ ?(?P<command>\w+): ?(?:"(?P<coll>[^"]*)")?')
_ATLAS_DENIAL = re.compile(r"not allowed to do action \[(?P<action>\w+)\] on \[(?P<ns>[^\]]*)\]")
# The privilege action (as a role grants it) each command ingestd runs needs.
_ACTIONS = {"insert": "insert", "update": "update", "delete": "remove", "find": "find",
            "findandmodify": "update", "createindexes": "createIndex",
            "listindexes": "listIndexes", "collmod": "collMod", "dropindexes": "dropIndex"}


def missing_privilege(exc: BaseException) -> str | None:
    """A refusal for want of a privilege, in the operator's words (``the user lacks the insert
    privilege on db.tweets``): the fix is a role for the user, not a wait. None otherwise."""
    if not isinstance(exc, OperationFailure) or exc.code not in (UNAUTHORIZED, ATLAS_ERROR):
        return None
    errmsg = str((exc.details or {}).get("errmsg", ""))
    if atlas := _ATLAS_DENIAL.search(errmsg):
        return f"the user lacks the {atlas['action']} privilege on {atlas['ns']}"
    if exc.code != UNAUTHORIZED:  # another AtlasError: not a refusal this knows
        return None
    mongod = _MONGOD_DENIAL.search(errmsg)
    if mongod is None:
        return "the user lacks a privilege this operation needs"
    action = _ACTIONS.get(mongod["command"].lower(), mongod["command"])
    ns = f"{mongod['db']}.{mongod['coll']}" if mongod["coll"] else mongod["db"]
    return f"the user lacks the {action} privilege on {ns}"


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
    """A client for ``mongo``; the URI is revealed here and nowhere else.

    ``timeoutMS`` bounds a whole operation: server selection, pymongo's own retries and the
    round trips (with it set, pymongo ignores ``serverSelectionTimeoutMS`` for operations).
    ``connect=False``: nothing happens until the first operation, so a ``mongodb+srv`` name
    that does not resolve (DNS not up yet at boot) fails that operation, which is retried,
    instead of the constructor, which would crash the worker.
    """
    return pymongo.MongoClient(
        mongo.uri.reveal(),
        connect=False,
        appname="ingestd",
        tz_aware=True,
        timeoutMS=mongo.timeout_ms,
        w=mongo.write_concern.w,
        journal=mongo.write_concern.j,
        event_listeners=[DRIVER_EVENTS],
    )


def open_collection(mongo: MongoSettings) -> Collection[Document]:
    """The tweets collection on a new client, owned by the caller (``.database.client.close()``).

    Logs the write concern the client will use (one line per client: at start, and after a
    reload that opens a new one), so the durability in force is on record.
    """
    collection = make_client(mongo)[mongo.database][mongo.collection]
    log_write_concern(collection, mongo)
    return collection


def log_write_concern(collection: Collection[Document], mongo: MongoSettings) -> None:
    """``mongo_write_concern w=… j=… wtimeout=… timeout_ms=…`` as the driver will send it."""
    wc = collection.write_concern.document  # the settings merged with any URI options
    log.info("mongo_write_concern", w=wc.get("w", "server default"),
             j=bool(wc.get("j", False)), wtimeout=wc.get("wtimeout", "none"),
             timeout_ms=mongo.timeout_ms, database=mongo.database, collection=mongo.collection)



# ---------------------------------------------------------------- what the server said

ERRMSG_CAP = 300  # a server message is for the operator; a long one is cut, not dropped


def error_fields(exc: BaseException) -> dict[str, Any]:
    """Log fields that let an operator look up what MongoDB said; never a document's content.

    Server errors give ``code``, ``codeName``, ``errmsg``, ``errorLabels`` and ``errInfo``; a bulk
    result gives its ``writeConcernErrors`` whole and its ``writeErrors`` summarised by code
    (their messages can quote document values, so only codes, names and counts).
    """
    fields: dict[str, Any] = {"error": type(exc).__name__}
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        fields["writeErrors"] = write_errors_by_code(details.get("writeErrors", ()))
        wces = details.get("writeConcernErrors", ())
        fields["writeConcernErrors"] = [server_error(e) for e in wces if isinstance(e, Mapping)]
        fields["nInserted"] = details.get("nInserted", 0)
    elif isinstance(exc, WriteError):  # one document's error: its message can quote values
        fields.update(code=exc.code, codeName=(exc.details or {}).get("codeName", ""))
    elif isinstance(exc, OperationFailure):
        fields.update(server_error(exc.details or {"code": exc.code, "errmsg": str(exc)}))
    elif isinstance(reply := getattr(exc, "details", None), Mapping) and "code" in reply:
        fields.update(server_error(reply))  # NotPrimaryError: a server reply, not a socket error
    elif isinstance(exc, PyMongoError):
        fields["errmsg"] = str(exc)[:ERRMSG_CAP]  # driver errors: host, port, socket error
    if isinstance(exc, PyMongoError):
        labels = [label for label in ("RetryableWriteError", "TransientTransactionError",
                                      "NoWritesPerformed") if exc.has_error_label(label)]
        if labels:
            fields["errorLabels"] = labels
    if privilege := missing_privilege(exc):
        fields["missing_privilege"] = privilege
    return fields


def error_key(exc: BaseException) -> str:
    """What the error is, for folding repeats of it (``logs.RateLimiter``'s ``rate_key``): its
    type, code(s), codeName(s) and labels; never its message, whose timings and topology
    change at every attempt."""
    fields = error_fields(exc)
    wces = [*fields.get("writeConcernErrors", ()), fields.get("writeConcernError") or {}]
    parts = [fields["error"], str(fields.get("code", "")), fields.get("codeName", ""),
             *(f"wce {e.get('code')} {e.get('codeName', '')}" for e in wces if e),
             *(f"we {e['code']}" for e in fields.get("writeErrors", ())),  # not their counts
             *fields.get("errorLabels", ())]
    return " ".join(p for p in parts if p)


def tls_cause(exc: BaseException) -> str | None:
    """A failed TLS certificate check behind a connection error, said as its cause and the option
    to change (``config.tls``): pymongo's name for it (ServerSelectionTimeoutError) says neither.
    None for any other error."""
    if not isinstance(exc, ConnectionFailure):
        return None
    return certificate_problem(str(exc), TRUST_MONGO, HOST_MONGO, verify_failed=False)


def error_name(exc: BaseException) -> str:
    """One-line name for status text: type, then the server's code(s) and codeName(s)."""
    fields = error_fields(exc)
    parts = [fields["error"]]
    for wce in fields.get("writeConcernErrors", ()):
        parts.append(f"writeConcernError {wce.get('code')} {wce.get('codeName', '')}".rstrip())
    for err in fields.get("writeErrors", ()):
        parts.append(f"writeErrors {err['code']} {err['codeName']} x{err['count']}")
    if "code" in fields:
        parts.append(f"{fields['code']} {fields.get('codeName', '')}".rstrip())
    if privilege := fields.get("missing_privilege"):  # what to fix first, then the server's code
        return f"{privilege}: {' '.join(parts)}"
    if len(parts) == 1 and isinstance(exc, ConnectionFailure) and (cause := driver_cause(exc)):
        parts.append(cause)  # no server reply: what the driver met (refused, no primary, DNS…)
    return parts[0] if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


DRIVER_CAUSE_CAP = 160
# What pymongo appends to the cause of a failed selection or connection: its timeouts and the
# whole topology, too long for a status line (the error line keeps them, in ``errmsg``).
_DRIVER_NOISE = re.compile(r" \(configured timeouts:[^)]*\)|, Timeout: .*$", re.S)


def driver_cause(exc: ConnectionFailure) -> str:
    """The driver's own cause of a connection failure, short: ``db1:27017: [Errno 111]
    Connection refused``, ``No primary available for writes``, a DNS failure."""
    text = _DRIVER_NOISE.sub("", str(exc)).strip()
    return text if len(text) <= DRIVER_CAUSE_CAP else text[:DRIVER_CAUSE_CAP - 1] + "…"


def server_error(doc: Mapping[str, Any]) -> dict[str, Any]:
    """code, codeName, errmsg, errInfo (and writeConcernError) of one server error document."""
    out: dict[str, Any] = {}
    code = doc.get("code")
    if isinstance(code, int):
        out["code"] = code
        out["codeName"] = doc.get("codeName") or CODE_NAMES.get(code, "")
    if doc.get("errmsg"):
        out["errmsg"] = str(doc["errmsg"])[:ERRMSG_CAP]
    if isinstance(doc.get("errInfo"), Mapping):
        out["errInfo"] = _plain(doc["errInfo"])
    wce = doc.get("writeConcernError")
    if isinstance(wce, Mapping):
        out["writeConcernError"] = server_error(wce)
    return out


def write_errors_by_code(errors: object) -> list[dict[str, Any]]:
    """``[{"code", "codeName", "count"}]`` for a bulk result's writeErrors."""
    counts: collections.Counter[tuple[int, str]] = collections.Counter()
    for err in errors if isinstance(errors, list | tuple) else ():
        if isinstance(err, Mapping):
            code = int(err.get("code", 0))
            counts[(code, str(err.get("codeName") or CODE_NAMES.get(code, "")))] += 1
    return [{"code": c, "codeName": n, "count": k} for (c, n), k in sorted(counts.items())]


def _plain(value: Any) -> Any:
    """BSON values as JSON-friendly ones (errInfo holds e.g. ``wtimeout``, ``writeConcern``)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if isinstance(value, int | float | str | bool | None) else str(value)


# ---------------------------------------------------------------- what pymongo saw meanwhile

DRIVER_EVENTS_KEPT = 64


class DriverEvents(monitoring.CommandListener, monitoring.ConnectionPoolListener,
                   monitoring.ServerListener):
    """The last few things pymongo noticed (failed commands, pool clears, server state changes).

    pymongo retries inside ``timeoutMS`` without telling its caller; these events are what a
    slow write's warning reports as its cause. Listeners run on pymongo's threads: a lock guards
    the bounded buffer, and each hook only appends a short text.
    """

    def __init__(self) -> None:
        self._events: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=DRIVER_EVENTS_KEPT)
        self._lock = threading.Lock()

    def since(self, started: float) -> list[str]:
        """Distinct events since ``started`` (monotonic), oldest first, repeats counted."""
        with self._lock:
            texts = [text for t, text in self._events if t >= started]
        counts = collections.Counter(texts)
        return [text if counts[text] == 1 else f"{text} (x{counts[text]})"
                for text in dict.fromkeys(texts)]

    def _add(self, text: str) -> None:
        with self._lock:
            self._events.append((time.monotonic(), text))

    # CommandListener
    def started(self, event: Any) -> None:
        pass

    def succeeded(self, event: Any) -> None:
        pass

    def failed(self, event: Any) -> None:
        failure = event.failure if isinstance(event.failure, Mapping) else {}
        what = server_error(failure) if "code" in failure else {
            "error": failure.get("errtype", ""), "errmsg": str(failure.get("errmsg", ""))[:200]}
        parts = " ".join(f"{k}={v}" for k, v in what.items() if k != "errInfo")
        self._add(f"{event.command_name} failed on {_address(event.connection_id)}: {parts}")

    # ConnectionPoolListener: only what ends connections or refuses them matters here
    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None:
        self._add(f"connection pool cleared for {_address(event.address)}")

    def connection_check_out_failed(self, event: monitoring.ConnectionCheckOutFailedEvent
                                    ) -> None:
        self._add(f"connection check-out failed for {_address(event.address)}: {event.reason}")

    def pool_created(self, event: Any) -> None:
        pass

    def pool_ready(self, event: Any) -> None:
        pass

    def pool_closed(self, event: Any) -> None:
        pass

    def connection_created(self, event: Any) -> None:
        pass

    def connection_ready(self, event: Any) -> None:
        pass

    def connection_closed(self, event: Any) -> None:
        pass

    def connection_check_out_started(self, event: Any) -> None:
        pass

    def connection_checked_out(self, event: Any) -> None:
        pass

    def connection_checked_in(self, event: Any) -> None:
        pass

    # ServerListener
    def opened(self, event: Any) -> None:
        pass

    def closed(self, event: Any) -> None:
        pass

    def description_changed(self, event: monitoring.ServerDescriptionChangedEvent) -> None:
        old, new = event.previous_description, event.new_description
        if old.server_type == new.server_type:
            return
        text = f"server {_address(event.server_address)}: {old.server_type_name} -> " \
               f"{new.server_type_name}"
        if new.error is not None:
            text += f" ({type(new.error).__name__}: {str(new.error)[:200]})"
        self._add(text)


# One per process (every client reports here): the store worker has one client at a time.
DRIVER_EVENTS = DriverEvents()


def _address(address: object) -> str:
    if isinstance(address, tuple) and len(address) == 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


# Indexes behind the analysts' usual questions: by time, by user, by matched term, by hashtag,
# by language, by place; then those a scrub_geo notice needs to find the copies of a user's
# tweets that retweets and quotes carry without a collection scan (sparse: they hold only the
# documents that have such a copy). 2dsphere last: a server without geo indexes must not block
# the others.
INDEXES = (
    IndexModel([("created_at", pymongo.ASCENDING)]),
    IndexModel([("user.id", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("_ingest.matched.track", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("entities.hashtags.text", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("_ingest.hashtags", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("_ingest.matched.locations", pymongo.ASCENDING),
                ("created_at", pymongo.ASCENDING)]),
    IndexModel([("lang", pymongo.ASCENDING)]),
    *(IndexModel([(f"{path}.user.id", pymongo.ASCENDING), (f"{path}.id", pymongo.ASCENDING)],
                 sparse=True) for path in EMBEDDED_PATHS),
    IndexModel([("coordinates", pymongo.GEOSPHERE)]),
)
# With ``stream.api: v2`` the same questions ask other fields: the author is ``author_id`` (a
# string, as delivered) and what matched is ``_ingest.matched.rules``/``tags``; without these,
# "tweets by one author" or "by rule" over the whole archive scanned the collection. Not made
# for a v1.1 collection, whose documents have none of these fields.
V2_INDEXES = (
    IndexModel([("author_id", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("_ingest.matched.rules", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
    IndexModel([("_ingest.matched.tags", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)]),
)


def indexes_for(api: str) -> tuple[IndexModel, ...]:
    """The analysts' indexes of a collection the ``api`` stream fills."""
    return (*INDEXES, *(V2_INDEXES if api == "v2" else ()))


def index_names(api: str) -> tuple[str, ...]:
    return tuple(str(model.document["name"]) for model in indexes_for(api))


def missing_indexes(collection: Collection[Document], api: str = "v1.1") -> list[IndexModel]:
    """The analysts' indexes ``collection`` lacks, by key (one on the same key under another name
    is there): all of them for a collection that does not exist (dropped). Errors are raised."""
    have = {_key(index["key"]) for index in collection.list_indexes()}
    return [model for model in indexes_for(api) if _key(model.document["key"]) not in have]


def _key(key: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(dict(key).items())


def ensure_indexes(collection: Collection[Document], models: Sequence[IndexModel] = INDEXES
                   ) -> list[tuple[str, ErrorClass, str]]:
    """Create ``models`` (the analysts' indexes) one by one; failures are logged and returned as
    ``(name, class, why)`` (``why``: ``error_name``), never raised."""
    failures: list[tuple[str, ErrorClass, str]] = []
    for model in models:
        name = str(model.document["name"])
        try:
            collection.create_indexes([model])
        except PyMongoError as exc:
            failures.append((name, *index_failed(name, exc)))
    return failures


def index_failed(name: str, exc: PyMongoError) -> tuple[ErrorClass, str]:
    """Log an index that could not be made (what the server said: a missing privilege is named);
    its error class and ``error_name``."""
    cls = classify_error(exc)
    log.error("index_create_failed", index=name, error_class=cls.value, **error_fields(exc))
    return cls, error_name(exc)


# The tombstones' TTL index (``<collection>_deleted``): a tombstone is removed by the server once
# ``deleted_at`` is older than ``writer.tombstone_retention``. Found by its key, not its name.
TOMBSTONE_TTL_KEY = {"deleted_at": 1}
TOMBSTONE_TTL_NAME = "deleted_at_ttl"


def _ttl_index(collection: Collection[Document]) -> Mapping[str, Any] | None:
    for index in collection.list_indexes():
        if dict(index["key"]) == TOMBSTONE_TTL_KEY:
            return dict(index)
    return None


def ensure_tombstone_ttl(collection: Collection[Document], seconds: int) -> str:
    """Make the TTL index on ``deleted_at`` expire after ``seconds``: ``created``, ``updated``
    (``collMod``; a server that did not apply it, or an index on the key without a TTL, gets
    the index dropped and created again) or ``kept``. Errors are raised."""
    index = _ttl_index(collection)
    if index is None:
        collection.create_index(list(TOMBSTONE_TTL_KEY.items()), name=TOMBSTONE_TTL_NAME,
                                expireAfterSeconds=seconds)
        return "created"
    if index.get("expireAfterSeconds") == seconds:
        return "kept"
    try:
        collection.database.command("collMod", collection.name, index={
            "keyPattern": TOMBSTONE_TTL_KEY, "expireAfterSeconds": seconds})
    except OperationFailure as exc:
        log.info("tombstone_ttl_collmod_refused", code=exc.code, error=str(exc)[:200])
    index = _ttl_index(collection)
    if index is None or index.get("expireAfterSeconds") != seconds:
        if index is not None:
            collection.drop_index(str(index["name"]))
        collection.create_index(list(TOMBSTONE_TTL_KEY.items()), name=TOMBSTONE_TTL_NAME,
                                expireAfterSeconds=seconds)
    return "updated"
