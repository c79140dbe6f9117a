"""What a parsed stream message is, and the MongoDB document a tweet becomes.

This is the store worker's per-tweet hot path: one dict lookup chain to classify, the tweet dict is
reused as the document (mutated in place, never copied) and ``created_at`` comes from integers
(``timestamp_ms`` or the snowflake id) rather than a string parse whenever possible, as a
``bson.DatetimeMS`` (the BSON date's own integer: no calendar arithmetic to build it or to encode
it, ~0.5 µs per date less than a ``datetime``; stored and read back as the same BSON date).
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from bson.datetime_ms import DatetimeMS

from ingestd.documents.labels import CONTROL_TYPES

INT64_MAX = 2**63 - 1
TWITTER_EPOCH_MS = 1288834974657
# Ids below this may predate snowflake (Nov 2010): their high bits are not a timestamp.
SNOWFLAKE_MIN_ID = 1 << 40
# The milliseconds a ``datetime`` can hold: a BSON date outside them would not decode for an
# analyst's default pymongo client, so such a time falls back to the string.
MIN_DATE_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_DATE_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
BsonDate = datetime | DatetimeMS
"""A document's date: ``DatetimeMS`` on the hot path, ``datetime`` where a string was parsed."""
# Where a v1.1 tweet carries a copy of another tweet, whole with its geo fields: a retweet's
# original, a quote's quoted tweet, and a retweeted quote's quoted tweet (which the retweet also
# carries as its own quoted_status). Twitter nests no deeper.
EMBEDDED_PATHS = ("retweeted_status", "quoted_status", "retweeted_status.quoted_status")
# Top-level keys already known to be storable (no "$", ".", NUL): a set lookup per key instead of a
# scan of every key's characters. Grows with what the stream sends, up to a bound.
_STORABLE_KEYS: set[str] = set()
_STORABLE_KEYS_MAX = 4096


class InvalidTweet(ValueError):
    """A tweet-shaped message that must not be stored as is (dead-lettered with ``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MatchedLike(Protocol):
    """What ``ingestd.documents.matching.Matched`` provides."""

    @property
    def track(self) -> Sequence[str]: ...
    @property
    def follow(self) -> Sequence[int]: ...
    @property
    def locations(self) -> Sequence[int]: ...


def classify(obj: object) -> str:
    """The kind of a parsed message: ``tweet``, a control type, ``unknown`` or ``invalid``."""
    if not isinstance(obj, dict):
        return "invalid"
    if ("id" in obj or "id_str" in obj) and (
        "text" in obj or ("created_at" in obj and "user" in obj)
    ):
        return "tweet"
    for key in CONTROL_TYPES:
        if key in obj:
            return key
    # A tweet without an id: a tweet all the same, dead-lettered (``invalid_tweet``, no usable
    # id) with its payload, not counted away as an unknown control message.
    return "tweet" if "user" in obj and ("text" in obj or "full_text" in obj) else "unknown"


def tweet_document(
    obj: dict[str, Any],
    *,
    received_at: BsonDate,
    conn_id: int,
    generation: int,
    seq: int,
    matched: MatchedLike,
) -> dict[str, Any]:
    """Turn a parsed tweet into its document, in place; raises ``InvalidTweet``.

    ``obj`` must be owned by the caller (freshly parsed): it is returned mutated, not copied.
    So must ``matched``: its lists become the document's.
    """
    # The usual tweet's steps inline (a call each cost ~0.15 µs per tweet); the functions
    # handle the rest, and every error.
    if not _STORABLE_KEYS.issuperset(obj):
        check_top_level_keys(obj)
    tweet_id = obj.get("id")
    if type(tweet_id) is not int or not 0 < tweet_id <= INT64_MAX:
        tweet_id = parse_id(obj.get("id", obj.get("id_str")))
    created_str = obj.get("created_at")
    obj["_id"] = tweet_id
    stamp = obj.get("timestamp_ms")  # the stream's digit string: created_at's first choice
    if (type(stamp) is str and len(stamp) <= 15 and stamp.isascii() and stamp.isdigit()
            and MIN_DATE_MS <= (millis := int(stamp)) <= MAX_DATE_MS):
        obj["created_at"] = DatetimeMS(millis)
    elif stamp is None and tweet_id >= SNOWFLAKE_MIN_ID:  # its time: always a datetime's
        obj["created_at"] = DatetimeMS((tweet_id >> 22) + TWITTER_EPOCH_MS)
    else:
        obj["created_at"] = created_at(obj, tweet_id, created_str)
    obj["created_at_str"] = created_str
    obj["_ingest"] = {
        "received_at": received_at,
        "conn": conn_id,
        "generation": generation,
        "seq": seq,
        "matched": {
            "track": matched.track,
            "follow": matched.follow,
            "locations": matched.locations,
        },
        # ingest_hashtags' usual answer inline: no retweet, no hashtags, no extended form
        "hashtags": [] if ("retweeted_status" not in obj and "extended_tweet" not in obj
                           and type(entities := obj.get("entities")) is dict
                           and not entities.get("hashtags")) else ingest_hashtags(obj),
    }
    return obj


def ingest_hashtags(obj: dict[str, Any]) -> list[str]:
    """Lower-cased, de-duplicated hashtags of the tweet (entities and extended_tweet.entities);
    a retweet's are its original's.

    A flat list of strings is what analysts count and index by; the nested entity objects are
    case-sensitive and repeat across ``entities`` and ``extended_tweet.entities``. A retweet's
    own entities are those of its "RT @name: …" text, cut at 140 characters: a subset of the
    original's, so the original (``retweeted_status``) is read instead, as track matching does.
    A quoted tweet's hashtags are not this tweet's: ``quoted_status`` is never read.
    """
    original = obj.get("retweeted_status")
    if type(original) is dict:
        obj = original
    ents = obj.get("entities")
    tags = ents.get("hashtags") if isinstance(ents, dict) else None
    extended = obj.get("extended_tweet")
    if not tags and not isinstance(extended, dict):
        return []  # most tweets: no hashtags, no extended form
    found: set[str] = set()
    _add_hashtags(found, tags)
    if isinstance(extended, dict):
        ents = extended.get("entities")
        _add_hashtags(found, ents.get("hashtags") if isinstance(ents, dict) else None)
    return sorted(found)


def embedded_authors(doc: dict[str, Any]) -> tuple[int, ...]:
    """The ``user.id`` of each tweet ``doc`` carries a copy of (``EMBEDDED_PATHS``); () for most
    tweets, at two lookups (this is on the per-tweet path, for scrub_geo rules)."""
    original, quoted = doc.get("retweeted_status"), doc.get("quoted_status")
    if original is None and quoted is None:
        return ()
    nested = original.get("quoted_status") if type(original) is dict else None
    users = []
    for copy in (original, quoted, nested):  # a plain loop: a generator cost ~0.2 µs more
        user = copy.get("user") if type(copy) is dict else None
        uid = user.get("id") if type(user) is dict else None
        if type(uid) is int:
            users.append(uid)
    return tuple(users)


def embedded_copies(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each copy of another tweet in ``doc`` (at ``EMBEDDED_PATHS``)."""
    for path in EMBEDDED_PATHS:
        copy: object = doc
        for key in path.split("."):
            copy = copy.get(key) if isinstance(copy, dict) else None
        if isinstance(copy, dict):
            yield copy


def _add_hashtags(found: set[str], tags: object) -> None:
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, dict) and isinstance(text := tag.get("text"), str):
                found.add(text.lower())


def check_top_level_keys(obj: dict[str, Any]) -> None:
    """Reject ``$``-prefixed, dotted or NUL-bearing top-level keys (one scan in the usual case).

    MongoDB refuses ``$`` at the top level, BSON cannot hold NUL in a key, and a dotted name cannot
    be addressed in a query. Nested keys are left to the encoder (rare, handled per document).
    """
    if _STORABLE_KEYS.issuperset(obj):
        return  # the usual keys (orjson hands out the same key objects: hashes are cached)
    joined = "".join(obj)
    if "$" not in joined and "." not in joined and "\x00" not in joined:
        if len(_STORABLE_KEYS) < _STORABLE_KEYS_MAX:
            _STORABLE_KEYS.update(obj)
        return
    for key in obj:
        if key.startswith("$") or "." in key or "\x00" in key:
            raise InvalidTweet(f"top-level key not storable: {_describe_key(key)}")


def _describe_key(key: str) -> str:
    # Key names are structure, not content, but cap them: the payload is attacker-controlled.
    return repr(key[:40])


def parse_id(value: object) -> int:
    """A tweet id as an int64 (an int, or a decimal digit string, as the stream sends)."""
    if type(value) is int:
        tweet_id = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        tweet_id = int(value)
    else:
        raise InvalidTweet(f"id is not an integer ({type(value).__name__})")
    if not 0 < tweet_id <= INT64_MAX:
        raise InvalidTweet("id out of int64 range")
    return tweet_id


def created_at(obj: dict[str, Any], tweet_id: int, created_str: object) -> BsonDate:
    """UTC creation time: ``timestamp_ms``, else the snowflake id, else the string."""
    millis = timestamp_ms(obj.get("timestamp_ms"))
    if millis is None and tweet_id >= SNOWFLAKE_MIN_ID:
        millis = (tweet_id >> 22) + TWITTER_EPOCH_MS
    if millis is not None and MIN_DATE_MS <= millis <= MAX_DATE_MS:
        return DatetimeMS(millis)
    return parse_twitter_time(created_str)


def timestamp_ms(value: object) -> int | None:
    """A ``timestamp_ms`` as an int (the stream sends a digit string), else None; not checked
    against any range."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 15:
        return int(value)
    return None


def parse_twitter_time(value: object) -> datetime:
    """Parse ``Wed Oct 10 20:19:24 +0000 2018`` without depending on the locale."""
    if not isinstance(value, str):
        raise InvalidTweet("created_at missing and not derivable from the id")
    try:
        # email.utils reads English day/month names whatever the locale (docs/protocol.md §6).
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise InvalidTweet("created_at not in Twitter format") from exc
    if parsed.tzinfo is None:
        raise InvalidTweet("created_at has no time zone")
    return in_utc(parsed)


def in_utc(parsed: datetime) -> datetime:
    """``parsed`` in UTC; raises ``InvalidTweet`` when its offset moves it out of years 1–9999
    (``Fri Dec 31 23:59:59 -2359 9999``: OverflowError, uncaught it crash-looped the worker)."""
    try:
        return parsed.astimezone(UTC)
    except OverflowError as exc:
        raise InvalidTweet("created_at out of range in UTC") from exc

