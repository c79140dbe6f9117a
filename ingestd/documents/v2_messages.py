"""X API v2 stream messages: what a line is, and the MongoDB document a v2 tweet becomes.

A v2 line is ``{"data": {tweet}, "includes": {...}, "matching_rules": [...]}`` (docs/protocol.md
§7.4), or ``{"errors": [...]}`` alone (e.g. ``operational-disconnect``). The document is the
tweet's own fields at the top level, as for v1.1, so ``created_at``, ``lang`` and ``_id`` queries
and indexes work on both; ``includes`` (users, places, ... expanded for this tweet) and
``matching_rules`` are kept beside them, and ``_ingest.matched`` lists the rule ids and tags.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ingestd.documents.messages import (
    BsonDate,
    InvalidTweet,
    check_top_level_keys,
    created_at,
    in_utc,
    parse_id,
)

V2_TWEET = "v2_tweet"
V2_ERROR = "v2_error"  # counted as a control message: nothing to store
# Keys the document adds beside the tweet's fields; a tweet field of that name would be lost.
_RESERVED = frozenset({"includes", "matching_rules", "errors", "created_at_str", "_ingest"})


def v2_kind(obj: object) -> str | None:
    """``v2_tweet``, ``v2_error``, or None when ``obj`` is not a v2 stream message."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("data"), dict):
        return V2_TWEET
    if isinstance(obj.get("errors"), list):
        return V2_ERROR
    return None


def v2_document(
    obj: dict[str, Any], *, received_at: BsonDate, conn_id: int, generation: int, seq: int
) -> dict[str, Any]:
    """The document for a v2 tweet message; raises ``InvalidTweet`` (dead-lettered)."""
    data: dict[str, Any] = obj["data"]
    if clash := sorted(_RESERVED & data.keys()):
        raise InvalidTweet(f"tweet field clashes with a document key: {clash[0][:40]!r}")
    check_top_level_keys(data)
    tweet_id = parse_id(data.get("id"))
    created_str = data.get("created_at")
    doc = data  # freshly parsed and owned by the caller: reused, not copied
    doc["_id"] = tweet_id
    doc["created_at"] = _created_at(created_str, tweet_id)
    doc["created_at_str"] = created_str
    rules = obj.get("matching_rules")
    # a list of rule objects with scalar ids and tags: anything else is left out (iterating a
    # number raised TypeError; str() of a list nested ~1000 deep, RecursionError)
    rules = [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []
    doc["matching_rules"] = rules
    if isinstance(includes := obj.get("includes"), dict):
        doc["includes"] = includes
    if isinstance(errors := obj.get("errors"), list):
        doc["errors"] = errors  # partial problems, e.g. an expanded object not found
    doc["_ingest"] = {
        "received_at": received_at,
        "conn": conn_id,
        "generation": generation,
        "seq": seq,
        "api": "v2",
        "matched": {"rules": [str(r["id"]) for r in rules if _is_label(r.get("id"))],
                    "tags": [str(r["tag"]) for r in rules if r.get("tag") and _is_label(r["tag"])]},
        "hashtags": _hashtags(data),
    }
    return doc


def _is_label(value: object) -> bool:
    return value is not None and not isinstance(value, dict | list)


def _created_at(value: object, tweet_id: int) -> BsonDate:
    """``2022-09-14T19:00:55.000Z`` as a UTC date; without it, the snowflake id's time."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidTweet("created_at not ISO 8601") from exc
        if parsed.tzinfo is None:
            raise InvalidTweet("created_at has no time zone")
        return in_utc(parsed)
    # created_at was not requested (tweet.fields): the id still carries the time.
    return created_at({}, tweet_id, None)


def _hashtags(data: dict[str, Any]) -> list[str]:
    """Lower-cased, de-duplicated ``entities.hashtags[].tag`` (v2 says ``tag``, v1.1 ``text``)."""
    ents = data.get("entities")
    tags = ents.get("hashtags") if isinstance(ents, dict) else None
    found = {t["tag"].lower() for t in tags if isinstance(t, dict) and isinstance(t.get("tag"), str)
             } if isinstance(tags, list) else set()
    return sorted(found)
