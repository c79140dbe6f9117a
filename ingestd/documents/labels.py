"""The names messages are counted and dead-lettered by (one list each, read by the store worker
and by the supervisor's metrics, which start a series at 0 for every name), and the bound on a
limit notice's count. A module of its own, without bson: the supervisor reads it at its first
scrape and the stream worker for that bound, and neither loads pymongo's packages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

# Why a tweet is not stored on purpose: its delete notice arrived before it was written.
SkipReason = Literal["deleted"]
SKIP_REASONS: tuple[SkipReason, ...] = get_args(SkipReason)
# Why a message is dead-lettered: the one list of reasons (the store worker's calls are checked
# against it by mypy; the metrics start a series at 0 for each).
MessageReason = Literal["invalid_json", "invalid_utf8", "not_an_object", "invalid_control",
                        "invalid_tweet", "unencodable", "mongo_rejected", "oversize",
                        "bad_frame", "partial_message"]
MESSAGE_REASONS: tuple[MessageReason, ...] = get_args(MessageReason)

CONTROL_TYPES = (
    "delete",
    "scrub_geo",
    "limit",
    "status_withheld",
    "user_withheld",
    "disconnect",
    "warning",
)

# The largest count a ``limit`` notice may carry: far beyond any real one (the endpoint counts
# tweets it could not deliver), and small enough that the sums over connections, the ledger's
# documents and the status files stay within 64-bit integers; a larger one is dead-lettered.
LIMIT_TRACK_MAX = (1 << 53) - 1

# Distinct disconnect codes counted by name in the status files; any further ones as "other". The
# endpoint's codes are 1–12 (docs/protocol.md §3.1): a server sending ever new ones must not grow
# the workers' counters and status files without bound.
CODES_MAX = 32
OTHER_CODE = "other"


def code_key(counts: Mapping[str, int], code: str) -> str:
    """``code`` as a key of ``counts``: itself while fewer than ``CODES_MAX`` codes are counted."""
    return code if code in counts or len(counts) < CODES_MAX else OTHER_CODE
