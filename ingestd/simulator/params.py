"""Parse and validate ``statuses/filter`` parameters the way the real endpoint did (§1.2, §4.1).

Errors carry the HTTP status and a plain-text body: 406 for a bad value or no predicate, 413 for too
many items, 416 for ``count`` (the simulator models default access, which may not backfill).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ingestd.documents.matching import Box, Matcher

MAX_PHRASES = 400
MAX_PHRASE_BYTES = 60
MAX_FOLLOW = 5000
MAX_BOXES = 25
FILTER_LEVELS = ("none", "low", "medium")


class ParamError(Exception):
    """A request the endpoint refuses: ``status`` and the text body to send."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


@dataclass(frozen=True, slots=True)
class StreamParams:
    """One connection's validated predicates and options."""

    track: tuple[str, ...] = ()
    follow: tuple[int, ...] = ()
    locations: tuple[Box, ...] = ()
    delimited: bool = False
    stall_warnings: bool = False
    language: frozenset[str] = frozenset()
    filter_level: str = "none"

    def matcher(self) -> Matcher:
        return Matcher(self.track, self.follow, self.locations)

    def summary(self) -> dict[str, object]:
        """The predicates for the ground-truth ``connect`` event (no secrets in here)."""
        return {
            "track": list(self.track),
            "follow": list(self.follow),
            "locations": [list(box) for box in self.locations],
            "delimited": "length" if self.delimited else None,
            "stall_warnings": self.stall_warnings,
            "language": sorted(self.language),
            "filter_level": self.filter_level,
        }


def parse_params(raw: Mapping[str, str]) -> StreamParams:
    """Validate decoded request parameters; raise ``ParamError`` like the real endpoint."""
    if "count" in raw:
        raise ParamError(416, "Parameter count is not allowed for this access level")
    if not any(key in raw for key in ("track", "follow", "locations")):
        raise ParamError(
            406, "No filter parameters found. Expect at least one parameter: follow track locations"
        )
    delimited = raw.get("delimited")
    if delimited not in (None, "length"):
        raise ParamError(406, f"Parameter delimited must be 'length', got {delimited!r}")
    level = raw.get("filter_level", "none")
    if level not in FILTER_LEVELS:
        raise ParamError(406, f"Parameter filter_level must be none, low or medium, got {level!r}")
    language = raw.get("language", "")
    return StreamParams(
        track=_track(raw["track"]) if "track" in raw else (),
        follow=_follow(raw["follow"]) if "follow" in raw else (),
        locations=_locations(raw["locations"]) if "locations" in raw else (),
        delimited=delimited == "length",
        stall_warnings=raw.get("stall_warnings", "").lower() == "true",
        language=frozenset(code.strip() for code in language.split(",") if code.strip()),
        filter_level=level,
    )


def _track(value: str) -> tuple[str, ...]:
    phrases = [item.strip() for item in value.split(",")]
    if len(phrases) > MAX_PHRASES:
        raise ParamError(413, f"Parameter track has {len(phrases)} items, maximum {MAX_PHRASES}")
    for index, phrase in enumerate(phrases):
        size = len(phrase.encode("utf-8"))
        if size == 0:
            raise ParamError(406, f"Parameter track item index {index} too short: {phrase}")
        if size > MAX_PHRASE_BYTES:
            raise ParamError(406, f"Parameter track item index {index} too long: {phrase}")
    return tuple(phrases)


def _follow(value: str) -> tuple[int, ...]:
    items = [item.strip() for item in value.split(",")]
    if len(items) > MAX_FOLLOW:
        raise ParamError(413, f"Parameter follow has {len(items)} items, maximum {MAX_FOLLOW}")
    ids: list[int] = []
    for index, item in enumerate(items):
        if not (item.isascii() and item.isdigit()) or not 0 < int(item) < 2**63:
            raise ParamError(406, f"Parameter follow item index {index} is not a user id: {item}")
        ids.append(int(item))
    return tuple(ids)


def _locations(value: str) -> tuple[Box, ...]:
    items = [item.strip() for item in value.split(",")]
    if len(items) % 4:
        raise ParamError(406, f"Parameter locations needs 4 numbers per box, got {len(items)}")
    if len(items) // 4 > MAX_BOXES:
        raise ParamError(413, f"Parameter locations has {len(items) // 4} boxes, max {MAX_BOXES}")
    numbers: list[float] = []
    for index, item in enumerate(items):
        try:
            number = float(item)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ParamError(406, f"Parameter locations item index {index} is not a number: {item}")
        numbers.append(number)
    boxes = [(w, s, e, n) for w, s, e, n in zip(*[iter(numbers)] * 4, strict=True)]
    for index, box in enumerate(boxes):
        _check_box(index, box)
    return tuple(boxes)


def _check_box(index: int, box: Box) -> None:
    west, south, east, north = box
    text = ",".join(f"{v:g}" for v in box)
    in_range = all(-180 <= lon <= 180 for lon in (west, east)) and all(
        -90 <= lat <= 90 for lat in (south, north)
    )
    if not in_range:
        raise ParamError(406, f"Parameter locations box {index} out of range: {text}")
    if not (west < east and south < north):
        raise ParamError(
            406, f"Parameter locations box {index} must be south-west then north-east: {text}"
        )
    # Each side spans 0.1 to 360 degrees (docs/protocol.md §1.2); the tolerance absorbs float
    # noise, as the daemon's settings check does.
    if east - west < 0.1 - 1e-9 or north - south < 0.1 - 1e-9:
        raise ParamError(
            406, f"Parameter locations box {index} must span at least 0.1 degrees: {text}"
        )
