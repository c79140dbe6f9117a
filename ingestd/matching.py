"""Predicate matching for v1.1 ``statuses/filter`` (protocol.md §1.3–§1.5).

Shared by the simulator (which delivers only what matches) and the store worker (which records
``_ingest.matched``). It runs once per tweet at stream rate, so a ``Matcher`` precompiles its
predicates into dict/set lookups and each tweet is tokenised exactly once.

Model (a design choice where the docs are silent, see protocol.md §1.3):

* tweet tokens live in one set: plain words (edge punctuation stripped, lower case), ``#tag`` and
  ``@name`` for hashtags and mentions (from entities and from the text), canonical URLs (scheme and
  leading ``www.`` removed) plus the dot-separated parts of their host;
* a term without punctuation matches a word, a hashtag or a mention; a term with punctuation matches
  only a word or a URL; ``#word`` / ``@word`` terms match only that hashtag / mention;
* a native retweet is matched on its original; a quote on its own content and the quoted tweet's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Box = tuple[float, float, float, float]

# Cheap C-level strip for the common punctuation; the regex below handles the rest.
_EDGE_PUNCT = "!\"$%&'()*+,-./:;<=>?[\\]^`{|}~“”‘’«»…¡¿、。，！？：；（）「」『』【】・"
_EDGE_RE = re.compile(r"^\W+|\W+$")
_TAG_RE = re.compile(r"[#@](\w+)")
_WORD_RE = re.compile(r"\w+")
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*://")
_HOST_RE = re.compile(r"([\w-]+(?:\.[\w-]+)+)(?:[/?#:]|$)")
_MAX_NESTING = 3  # retweet of a quote of a quote is as deep as real payloads go


@dataclass(slots=True)
class Matched:
    """Which predicates a tweet matched: phrases as configured, user ids, box indexes."""

    track: list[str] = field(default_factory=list)
    follow: list[int] = field(default_factory=list)
    locations: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.track or self.follow or self.locations)


def _term_keys(term: str) -> tuple[str, ...]:
    """Token-set keys under which a (lower-case) track term is found."""
    if _WORD_RE.fullmatch(term):
        return (term, "#" + term, "@" + term)
    # "#tag"/"@name" find exactly that hashtag/mention; any other punctuated term can only equal
    # a word or URL token, because hashtag and mention tokens never hold punctuation.
    return (term,)


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
        self._compile_track()
        self._follow_order = {uid: i for i, uid in reversed(list(enumerate(self.follow)))}

    def _compile_track(self) -> None:
        # key -> term ids; first term id -> phrases that start with it (each phrase checked once)
        terms: dict[str, int] = {}
        self._phrase_terms: list[frozenset[int]] = []
        for i, phrase in enumerate(self.track):
            words = phrase.lower().split()
            if not words:
                raise ValueError(f"track[{i}]: empty phrase {phrase!r}")
            self._phrase_terms.append(frozenset(terms.setdefault(w, len(terms)) for w in words))
        self._keys: dict[str, list[int]] = {}
        for term, tid in terms.items():
            for key in _term_keys(term):
                self._keys.setdefault(key, []).append(tid)
        self._by_first: dict[int, list[int]] = {}
        for pid, tids in enumerate(self._phrase_terms):
            self._by_first.setdefault(min(tids), []).append(pid)

    def match(self, tweet: dict[str, Any]) -> Matched:
        """Return the predicates ``tweet`` matches (empty ``Matched`` for junk input)."""
        result = Matched()
        if not isinstance(tweet, dict):
            return result
        if self._keys:
            result.track = self._match_track(tweet)
        if self._follow_order:
            result.follow = self._match_follow(tweet)
        if self.locations and not isinstance(tweet.get("retweeted_status"), dict):
            result.locations = self._match_locations(tweet)
        return result

    def _match_track(self, tweet: dict[str, Any]) -> list[str]:
        keys = self._keys
        present: set[int] = set()
        for token in tweet_tokens(tweet):
            tids = keys.get(token)
            if tids:
                present.update(tids)
        if not present:
            return []
        hits: list[int] = []
        for tid in present:
            for pid in self._by_first.get(tid, ()):
                if self._phrase_terms[pid] <= present:
                    hits.append(pid)
        return [self.track[pid] for pid in sorted(hits)]

    def _match_follow(self, tweet: dict[str, Any]) -> list[int]:
        order = self._follow_order
        ids = {uid for uid in _follow_candidates(tweet) if uid in order}
        return sorted(ids, key=order.__getitem__)

    def _match_locations(self, tweet: dict[str, Any]) -> list[int]:
        point = _point(tweet.get("coordinates"))
        if point is not None:
            lon, lat = point
            return [
                i
                for i, (w, s, e, n) in enumerate(self.locations)
                if w <= lon <= e and s <= lat <= n
            ]
        bbox = _place_bbox(tweet.get("place"))
        if bbox is None:
            return []
        pw, ps, pe, pn = bbox
        return [
            i
            for i, (w, s, e, n) in enumerate(self.locations)
            if pw <= e and w <= pe and ps <= n and s <= pn
        ]


def _box(index: int, box: Sequence[float]) -> Box:
    if len(box) != 4:
        raise ValueError(f"locations[{index}]: expected 4 numbers, got {len(box)}")
    west, south, east, north = (float(v) for v in box)
    return west, south, east, north


# --- tokenising ---------------------------------------------------------------------------


def tweet_tokens(tweet: dict[str, Any], depth: int = 0) -> set[str]:
    """All match tokens of a tweet (see module docstring), retweet/quote content included."""
    original = tweet.get("retweeted_status")
    if type(original) is dict and depth < _MAX_NESTING:
        return tweet_tokens(original, depth + 1)
    tokens: set[str] = set()
    text = tweet.get("text")
    entities = tweet.get("entities")
    extended = tweet.get("extended_tweet")
    if type(extended) is dict and type(extended.get("full_text")) is str:
        # The wrapper's entities describe the cut text (plus a twitter.com/i/web link that
        # would match "twitter"), so use the full text's entities instead.
        text, entities = extended["full_text"], extended.get("entities")
    if type(text) is str:
        _add_text(tokens, text)
    if type(entities) is dict:
        _add_entities(tokens, entities)
    media = tweet.get("extended_entities")
    if type(media) is dict:
        _add_entities(tokens, media)
    quoted = tweet.get("quoted_status")
    if type(quoted) is dict and depth < _MAX_NESTING:
        tokens |= tweet_tokens(quoted, depth + 1)
    return tokens


def _add_text(tokens: set[str], text: str) -> None:
    for raw in set(text.lower().split()):
        if raw.isalnum():
            tokens.add(raw)
            continue
        lead = raw.lstrip(_EDGE_PUNCT)
        if lead[:1] in ("#", "@"):
            tag = _TAG_RE.match(lead)
            if tag:
                tokens.add(lead[0] + tag.group(1))
            continue
        word = raw.strip(_EDGE_PUNCT)
        if word and not (word[0].isalnum() and word[-1].isalnum()):
            word = _EDGE_RE.sub("", word)
        if "." in word or "://" in word:
            tokens.update(_url_tokens(word, True))
        elif word:
            tokens.add(word)


def _add_entities(tokens: set[str], entities: dict[str, Any]) -> None:
    hashtags = entities.get("hashtags")
    if type(hashtags) is list:
        for tag in hashtags:
            text = tag.get("text") if type(tag) is dict else None
            if type(text) is str and text:
                tokens.add("#" + text.lower())
    mentions = entities.get("user_mentions")
    if type(mentions) is list:
        for mention in mentions:
            name = mention.get("screen_name") if type(mention) is dict else None
            if type(name) is str and name:
                tokens.add("@" + name.lower())
    for key in ("urls", "media"):
        urls = entities.get(key)
        if type(urls) is not list:
            continue
        for url in urls:
            if type(url) is not dict:
                continue
            for value in (url.get("expanded_url"), url.get("display_url")):
                if type(value) is str and value:
                    tokens.update(_url_tokens(value.lower(), False))


@functools.lru_cache(maxsize=8192)
def _url_tokens(url: str, from_text: bool) -> tuple[str, ...]:
    """A URL-ish token's canonical form (no scheme, no leading www.) and its host parts."""
    canon = _SCHEME_RE.sub("", url)
    if canon.startswith("www."):
        canon = canon[4:]
    host = _HOST_RE.match(canon)
    if host is None:
        return (canon,)
    if from_text and host.group(1) == "t.co":
        return ()  # wrapped links in text; their expansion is matched through the entities
    return (canon, *(part for part in host.group(1).split(".") if part))


# --- follow and locations -----------------------------------------------------------------


def _user_id(obj: object) -> int | None:
    uid = obj.get("id") if type(obj) is dict else None
    return uid if type(uid) is int else None


def _follow_candidates(tweet: dict[str, Any]) -> list[int]:
    """User ids whose followers get this tweet: author, retweeted author, replied-to user."""
    ids = [_user_id(tweet.get("user"))]
    original = tweet.get("retweeted_status")
    if type(original) is dict:
        ids.append(_user_id(original.get("user")))
    reply_to = tweet.get("in_reply_to_user_id")
    if type(reply_to) is int:
        ids.append(reply_to)
    entities = tweet.get("entities")
    mentions = entities.get("user_mentions") if type(entities) is dict else None
    if type(mentions) is list and mentions and type(mentions[0]) is dict:
        # a manual reply: the text starts with the @mention (not a mere mention)
        indices = mentions[0].get("indices")
        if type(indices) is list and indices[:1] == [0]:
            ids.append(_user_id(mentions[0]))
    return [uid for uid in ids if uid is not None]


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
    points = [p for p in (_as_pair(item) for item in rings[0]) if p is not None]
    if not points:
        return None
    lons = [p[0] for p in points]
    lats = [p[1] for p in points]
    return min(lons), min(lats), max(lons), max(lats)


def _as_pair(item: object) -> tuple[float, float] | None:
    if isinstance(item, list) and len(item) == 2:
        lon, lat = _number(item[0]), _number(item[1])
        if lon is not None and lat is not None:
            return lon, lat
    return None
