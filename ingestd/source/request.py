"""What the stream settings mean on the wire: request parameters, and when a change needs a new
connection.

Pure functions of `StreamSettings`, light enough for the supervisor (it compares filters on
reload) as well as the stream worker and `ingestd check`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from ingestd.config.schema import StreamSettings
from ingestd.config.values import plain_number


def post_params(stream: StreamSettings) -> list[tuple[str, str]]:
    """v1.1 form parameters in protocol order; empty ones omitted, stall warnings always on."""
    params = [
        ("track", ",".join(stream.track)),
        ("follow", ",".join(str(i) for i in stream.follow)),
        ("locations", ",".join(plain_number(n) for box in stream.locations for n in box)),
        ("language", ",".join(stream.language)),
        ("filter_level", stream.filter_level or ""),
        ("delimited", "length" if stream.delimited else ""),
        ("stall_warnings", "true"),
    ]
    return [(name, value) for name, value in params if value]


def v2_query_params(stream: StreamSettings, *, backfill: bool = False) -> list[tuple[str, str]]:
    """Query parameters of ``GET /2/tweets/search/stream``; lists comma-joined, no spaces."""
    params = [
        ("tweet.fields", ",".join(stream.tweet_fields)),
        ("expansions", ",".join(stream.expansions)),
        ("user.fields", ",".join(stream.user_fields)),
        ("place.fields", ",".join(stream.place_fields)),
        ("backfill_minutes", str(stream.backfill_minutes) if backfill else ""),
    ]
    return [(name, value) for name, value in params if value and value != "0"]


# Every stream key whose change needs a new connection. v2 rules are not in here: they change on
# the live connection (rules endpoint), and ``backfill_minutes`` only matters on the next
# reconnect. The reader (whether to reconnect) and ``ingestd reload`` (what it reports) both read
# this one list, so they cannot disagree.
CONNECTION_KEYS = ("url", "track", "follow", "locations", "language", "filter_level", "delimited",
                   "gzip", "api", "tweet_fields", "expansions", "user_fields", "place_fields")


def filter_key(stream: StreamSettings) -> tuple[Hashable, ...]:
    """Everything that needs a new connection when it changes (``CONNECTION_KEYS``)."""
    return tuple(getattr(stream, key) for key in CONNECTION_KEYS)


def reconnect_keys(old: StreamSettings, new: StreamSettings) -> list[str]:
    """The ``stream.*`` keys whose change needs a new connection (empty: none changed)."""
    return [f"stream.{key}" for key in CONNECTION_KEYS if getattr(old, key) != getattr(new, key)]


def filter_diff(old: StreamSettings, new: StreamSettings) -> dict[str, dict[str, list[Any]]]:
    """Added/removed track phrases, follow ids and boxes (compared as sets), sorted."""
    pairs: dict[str, tuple[Sequence[Any], Sequence[Any]]] = {
        "track": (old.track, new.track),
        "follow": (old.follow, new.follow),
        "locations": (old.locations, new.locations),
    }
    return {
        name: {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b))}
        for name, (a, b) in pairs.items()
    }
