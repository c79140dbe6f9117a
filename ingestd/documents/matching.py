"""Predicate matching for v1.1 ``statuses/filter`` (docs/protocol.md §1.3–§1.5).

Shared by the simulator (which delivers only what matches) and the store worker (which records
``_ingest.matched``). It runs once per tweet at stream rate, so a ``Matcher`` precompiles its
predicates into dict/set lookups. Track phrases are matched by ``match_track.TrackMatcher`` (the
token model it implements is ``match_tokens``); follow and locations are here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ingestd.documents.match_track import TrackMatcher

Box = tuple[float, float, float, float]


@dataclass(slots=True)
class Matched:
    """Which predicates a tweet matched: phrases as configured, user ids, box indexes."""

    track: list[str] = field(default_factory=list)
    follow: list[int] = field(default_factory=list)
    locations: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.track or self.follow or self.locations)


class MatchLists(NamedTuple):
    """``Matched``'s lists as a tuple (``Matcher.match_lists``)."""

    track: list[str]
    follow: list[int]
    locations: list[int]


_new_tuple = tuple.__new__


class Matcher:
    """Precompiled track/follow/locations predicates; ``match()`` is safe on any dict."""

    def __init__(
        self,
        track: Sequence[str] = (),
        follow: Sequence[int] = (),
        locations: Sequence[Box] = (),
    ) -> None:
        self.track = list(track)
        self.follow = list(follow)
        self.locations = [_box(i, box) for i, box in enumerate(locations)]
        self._track = TrackMatcher(self.track) if self.track else None
        self._follow_order = {uid: i for i, uid in reversed(list(enumerate(self.follow)))}

    def retire(self) -> None:
        """Its generation is superseded: its caches shrink (``TrackMatcher.retire``)."""
        if self._track is not None:
            self._track.retire()

    def match(self, tweet: dict[str, Any]) -> Matched:
        """Return the predicates ``tweet`` matches (empty ``Matched`` for junk input)."""
        if not isinstance(tweet, dict):
            return Matched()
        return Matched(*self.match_lists(tweet))

    def match_lists(self, tweet: dict[str, Any]) -> MatchLists:
        """``match`` of a dict, as the encoder takes it: a tuple, built in C (``Matched``'s
        dataclass ``__init__`` is a Python frame per tweet)."""
        track = self._track
        phrases = track.match(tweet) if track is not None else []
        follow = self._match_follow(tweet) if self._follow_order else []
        locations: list[int] = []
        if (self.locations and not isinstance(tweet.get("retweeted_status"), dict)
                and (tweet.get("coordinates") is not None or tweet.get("place") is not None)):
            locations = self._match_locations(tweet)  # neither: no call (most tweets)
        return _new_tuple(MatchLists, (phrases, follow, locations))

    def _match_follow(self, tweet: dict[str, Any]) -> list[int]:
        """Followed users whose followers get this tweet: its author, the retweeted author, the
        replied-to user (also a manual reply: the text starts with the @mention)."""
        order = self._follow_order
        ids: list[int] = []
        user = tweet.get("user")
        uid = user.get("id") if type(user) is dict else None
        if type(uid) is int and uid in order:
            ids.append(uid)
        original = tweet.get("retweeted_status")
        if type(original) is dict:
            user = original.get("user")
            uid = user.get("id") if type(user) is dict else None
            if type(uid) is int and uid in order:
                ids.append(uid)
        uid = tweet.get("in_reply_to_user_id")
        if type(uid) is int and uid in order:
            ids.append(uid)
        entities = tweet.get("entities")
        mentions = entities.get("user_mentions") if type(entities) is dict else None
        if type(mentions) is list and mentions and type(first := mentions[0]) is dict:
            uid = first.get("id")
            if type(uid) is int and uid in order:
                indices = first.get("indices")
                if type(indices) is list and indices[:1] == [0]:
                    ids.append(uid)
        if len(ids) < 2:
            return ids
        return sorted(set(ids), key=order.__getitem__)

    def _match_locations(self, tweet: dict[str, Any]) -> list[int]:
        coordinates = tweet.get("coordinates")
        point = None if coordinates is None else _point(coordinates)
        if point is not None:
            lon, lat = point
            return [
                i
                for i, (w, s, e, n) in enumerate(self.locations)
                if w <= lon <= e and s <= lat <= n
            ]
        place = tweet.get("place")
        bbox = None if place is None else _place_bbox(place)
        if bbox is None:
            return []
        pw, ps, pe, pn = bbox
        return [
            i
            for i, (w, s, e, n) in enumerate(self.locations)
            if pw <= e and w <= pe and ps <= n and s <= pn
        ]


def retire_superseded(matchers: Mapping[int, Matcher]) -> None:
    """Retire every matcher but the highest generation's, the one new tweets are received under:
    the others match only a backlog (or a replay), which may refill their small caches."""
    if matchers:
        newest = max(matchers)
        for generation, matcher in matchers.items():
            if generation != newest:
                matcher.retire()


def _box(index: int, box: Sequence[float]) -> Box:
    if len(box) != 4:
        raise ValueError(f"locations[{index}]: expected 4 numbers, got {len(box)}")
    west, south, east, north = (float(v) for v in box)
    return west, south, east, north


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _point(coordinates: object) -> tuple[float, float] | None:
    if not isinstance(coordinates, dict):
        return None
    pair = coordinates.get("coordinates")
    if not isinstance(pair, list) or len(pair) != 2:
        return None
    lon, lat = _number(pair[0]), _number(pair[1])
    if lon is None or lat is None:
        return None
    return lon, lat


def _place_bbox(place: object) -> Box | None:
    if not isinstance(place, dict):
        return None
    bbox = place.get("bounding_box")
    if not isinstance(bbox, dict):
        return None
    rings = bbox.get("coordinates")
    if not isinstance(rings, list) or not rings or not isinstance(rings[0], list):
        return None
    # min/max as the pairs come: no list of points per tweet (a place on ~1 tweet in 4)
    west = south = east = north = 0.0
    seen = False
    for item in rings[0]:
        pair = _as_pair(item)
        if pair is None:
            continue
        lon, lat = pair
        if not seen:
            west = east = lon
            south = north = lat
            seen = True
            continue
        if lon < west:
            west = lon
        elif lon > east:
            east = lon
        if lat < south:
            south = lat
        elif lat > north:
            north = lat
    return (west, south, east, north) if seen else None


def _as_pair(item: object) -> tuple[float, float] | None:
    if isinstance(item, list) and len(item) == 2:
        lon, lat = item
        # JSON numbers are exactly float or int; anything else takes _number's checks
        lon = float(lon) if type(lon) is float or type(lon) is int else _number(lon)
        lat = float(lat) if type(lat) is float or type(lat) is int else _number(lat)
        if lon is not None and lat is not None:
            return lon, lat
    return None
