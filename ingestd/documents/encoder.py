"""A v1.1 tweet's spool payload → its BSON document (pure: run by the store worker and by its
encoder child, ``ingestd.sink.encoder_pool``).

Only v1.1 tweets are encoded here. Anything else (control messages, v2, invalid JSON) comes back
as ``PUNT`` and takes the store worker's usual path, so every dead-letter reason and counter has one
source.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Protocol

import bson
import orjson
from bson.datetime_ms import DatetimeMS
from bson.errors import InvalidDocument

from ingestd.documents.labels import MessageReason
from ingestd.documents.matching import Box, Matched, Matcher, MatchLists
from ingestd.documents.messages import InvalidTweet, classify, embedded_authors, tweet_document

MAX_BSON_SIZE = 16 * 1024 * 1024
PIPE_BYTES = 1 << 20
OK, DEAD, PUNT = 0, 1, 2


class JobLike(Protocol):
    """A ``Job`` or a ``spool.Record`` (the store worker encodes records directly)."""

    @property
    def payload(self) -> bytes | memoryview: ...
    @property
    def recv_ns(self) -> int: ...
    @property
    def conn_id(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def seq(self) -> int: ...


class Encoded(NamedTuple):
    """``OK``: ``raw`` is the document; ``DEAD``: dead-letter with ``reason``/``detail``;
    ``PUNT``: not a v1.1 tweet, the store worker handles the record itself."""

    status: int
    raw: bytes = b""
    tweet_id: int = 0
    user_id: int | None = None  # for scrub_geo rules applied after encoding
    reason: MessageReason | Literal[""] = ""
    detail: str = ""
    match_error: bool = False
    embedded_users: tuple[int, ...] = ()  # authors of the tweets it carries copies of: likewise


_PUNTED = Encoded(PUNT)
_new_encoded = tuple.__new__


@functools.lru_cache(maxsize=4)  # the reader appends each network read with one recv_ns
def received_at(recv_ns: int) -> DatetimeMS:
    """The BSON date of a receive time (a BSON date holds milliseconds: the rest is dropped, as
    encoding a ``datetime`` would)."""
    return DatetimeMS(recv_ns // 1_000_000)


def encode(job: JobLike, matcher: Matcher) -> Encoded:
    """Parse, match and encode one record's payload (pure: no state but the matcher's caches)."""
    try:
        obj = orjson.loads(job.payload)
    except orjson.JSONDecodeError:
        return _PUNTED
    # classify's usual answer inline: an object with an id and a text is a tweet
    if not (type(obj) is dict and ("id" in obj or "id_str" in obj) and "text" in obj) and (
            classify(obj) != "tweet"):
        return _PUNTED
    return encode_tweet(obj, job, matcher)


def encode_tweet(obj: dict[str, Any], job: JobLike, matcher: Matcher) -> Encoded:
    """Match and encode a parsed v1.1 tweet (``obj`` is consumed: it becomes the document)."""
    match_error = False
    try:
        matched: Matched | MatchLists = matcher.match_lists(obj)
    except Exception:  # matching only annotates: a matcher bug must never lose a tweet
        matched, match_error = Matched(), True
    try:
        doc = tweet_document(obj, received_at=received_at(job.recv_ns), conn_id=job.conn_id,
                             generation=job.generation, seq=job.seq, matched=matched)
    except InvalidTweet as exc:
        return Encoded(DEAD, reason="invalid_tweet", detail=exc.reason, match_error=match_error)
    return encode_document(doc, match_error)


def encode_document(doc: dict[str, Any], match_error: bool = False) -> Encoded:
    """The BSON of a built document, or the dead letter it becomes."""
    try:
        raw = bson.encode(doc)
    except (InvalidDocument, OverflowError) as exc:  # e.g. a NUL in a nested key, a huge int
        return Encoded(DEAD, reason="unencodable", detail=type(exc).__name__,
                       match_error=match_error)
    except RecursionError:  # nested near 1000 deep (orjson takes 1024): one message, not a crash
        return Encoded(DEAD, reason="unencodable", detail="RecursionError: nested too deeply",
                       match_error=match_error)
    if len(raw) > MAX_BSON_SIZE:
        return Encoded(DEAD, reason="unencodable", detail="DocumentTooLarge",
                       match_error=match_error)
    user = doc.get("user")
    user_id = user.get("id") if isinstance(user, dict) else None
    # embedded_authors' usual answer inline: no copy of another tweet, no call
    authors = () if doc.get("retweeted_status") is None and doc.get("quoted_status") is None else (
        embedded_authors(doc))
    # tuple.__new__: the NamedTuple's generated __new__ is a Python frame per tweet
    return _new_encoded(Encoded, (OK, raw, doc["_id"], user_id if type(user_id) is int else None,
                                  "", "", match_error, authors))


MatcherSpec = tuple[Sequence[str], Sequence[int], Sequence[Box]]
