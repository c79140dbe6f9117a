"""Builder of the `mongo` section: the URI (checked by pymongo's parser), names, write concern."""

from __future__ import annotations

from urllib.parse import unquote

from ingestd.config.errors import Secret
from ingestd.config.loader import MISSING
from ingestd.config.mongo_uri import uri_problems
from ingestd.config.schema import MongoSettings, WriteConcernSettings
from ingestd.config.section import SECONDS_MAX, Section
from ingestd.config.values import digits_text, is_int, kind, number_text

# pymongo takes a timeoutMS under a billion; a week (the longest duration setting) is under it.
TIMEOUT_MS_MAX = int(SECONDS_MAX * 1000)
# w counts the data-bearing members that must acknowledge a write: it cannot exceed their number,
# and a replica set has at most 50 members. pymongo takes any integer, which once reached the
# store worker's log line (orjson: "Integer exceeds 64-bit range") and crash-looped it.
W_MAX = 50

# Keys that once existed and now do nothing → what to use instead.
_RETIRED_MONGO_KEYS = {
    "server_selection_timeout_ms": (
        "has no effect and is ignored: with timeout_ms set, pymongo bounds server selection by "
        "timeout_ms; remove it and use mongo.timeout_ms to bound a write attempt"),
}
_BAD_DB_CHARS = set('/\\. "$*<>:|?\x00')


def build_mongo(sec: Section) -> MongoSettings:
    """The `mongo` section (read with schema MongoSettings)."""
    uri = sec.text("uri", required=True)
    if uri and sec.key("uri") not in sec.ctx.unresolved:
        for problem in uri_problems(uri):
            sec.error("uri", problem)
        _uri_write_concern(sec, uri)
    database = sec.text("database")
    collection = sec.text("collection")
    _check_db_name(sec, database)
    _check_collection_name(sec, database, collection)
    coverage = sec.text("coverage_collection")
    _check_collection_name(sec, database, coverage, "coverage_collection")
    if coverage == collection:
        sec.error("coverage_collection", f"must differ from mongo.collection ({collection!r})")
    return MongoSettings(
        uri=Secret(uri),
        database=database,
        collection=collection,
        coverage_collection=coverage,
        write_concern=_write_concern(sec.section("write_concern", WriteConcernSettings)),
        timeout_ms=sec.integer("timeout_ms", lo=1, hi=TIMEOUT_MS_MAX),
        slow_write_seconds=sec.number("slow_write_seconds", gt=0),
        notices=_retired_mongo_keys(sec),
    )


def _retired_mongo_keys(sec: Section) -> tuple[str, ...]:
    """Notices (file, key, what to use instead) for retired keys present in ``sec``.

    A warning, not an error: a settings file that was valid yesterday must still start the
    daemon and reload into it; the key never changed what a write does.
    """
    notices = []
    for key, advice in _RETIRED_MONGO_KEYS.items():
        if sec.get(key) is not MISSING:
            notices.append(f"{sec.ctx.path}: {sec.key(key)} {advice}")
    return tuple(notices)


def _check_db_name(sec: Section, name: str) -> None:
    if not name:
        sec.error("database", "must not be empty")
    elif bad := sorted(set(name) & _BAD_DB_CHARS):
        sec.error("database", f"contains characters MongoDB forbids: {''.join(bad)!r}")
    elif len(name.encode()) >= 64:
        sec.error("database", "must be shorter than 64 bytes")


def _check_collection_name(sec: Section, database: str, name: str, key: str = "collection"
                           ) -> None:
    if not name:
        sec.error(key, "must not be empty")
    elif "$" in name or "\x00" in name:
        sec.error(key, "must not contain '$' or NUL")
    elif name.startswith("system."):
        sec.error(key, "must not start with 'system.' (reserved)")
    elif name.startswith(".") or name.endswith(".") or ".." in name:
        sec.error(key, "must not start or end with '.', nor contain '..'")
    elif len(f"{database}.{name}".encode()) > 255:
        sec.error(key, f"database.{key} must be at most 255 bytes")


def _write_concern(sec: Section) -> WriteConcernSettings:
    raw = sec.get("w")
    w: int | str = sec.default("w")
    if raw == "majority":
        w = raw
    elif raw == 0 and is_int(raw):
        # The spool is acknowledged only after MongoDB confirms a write; w=0 never confirms.
        sec.error("w", "0 (unacknowledged writes) is not allowed: tweets could be lost")
    elif isinstance(raw, int) and is_int(raw) and 1 <= raw <= W_MAX:
        w = raw
    elif isinstance(raw, int) and is_int(raw) and raw > W_MAX:
        sec.error("w", f"must be at most {W_MAX} (the members that acknowledge a write; a "
                       f"replica set has at most {W_MAX}), got {number_text(raw)}")
    elif raw is not MISSING:
        got = number_text(raw) if isinstance(raw, int) and is_int(raw) else kind(raw)
        sec.error("w", f"must be an integer >= 1 or 'majority', got {got}")
    return WriteConcernSettings(w=w, j=sec.boolean("j"))


def _uri_write_concern(sec: Section, uri: str) -> None:
    """``wtimeoutMS`` in the URI, which the settings do not override: pymongo takes any size,
    and the store worker logs it (``log_write_concern``) as JSON, where past 64 bits it crashed.
    Neither the option's name nor its value is secret."""
    query = uri.partition("?")[2].partition("#")[0]
    for part in query.replace(";", "&").split("&"):
        name, _, value = (unquote(p.strip()) for p in part.partition("="))
        if name.lower() != "wtimeoutms" or not (value.isascii() and value.isdigit()):
            continue  # pymongo itself refuses anything but a non-negative integer
        digits = value.lstrip("0") or "0"
        if len(digits) > len(str(TIMEOUT_MS_MAX)) or int(digits) > TIMEOUT_MS_MAX:
            sec.error("uri", f"URI option {name} must be at most {TIMEOUT_MS_MAX} (a week), "
                             f"got {digits_text(digits)}")
