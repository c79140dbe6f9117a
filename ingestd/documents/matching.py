"""Predicate matching for v1.1 ``statuses/filter`` (docs/protocol.md §1.3–§1.5).

Shared by the simulator (which delivers only what matches) and the store worker (which records
``_ingest.matched``). It runs once per tweet at stream rate, so a ``Matcher`` precompiles its
predicates into dict/set lookups and a tweet's text is scanned once per needle (see below).

Model (a design choice where the docs are silent, see docs/protocol.md §1.3):

* tweet tokens live in one set: plain words (edge punctuation stripped, lower case), ``#tag`` and
  ``@name`` for hashtags and mentions (from entities and from the text), canonical URLs (scheme and
  leading ``www.`` removed) plus the dot-separated parts of their host;
* a term without punctuation matches a word, a hashtag or a mention; a term with punctuation matches
  only a word or a URL; ``#word`` / ``@word`` terms match only that hashtag / mention;
* a native retweet is matched on its original; a quote on its own content and the quoted tweet's.

``tweet_tokens`` spells the model out (the whole token set of a tweet). ``Matcher`` gets the same
answer without building that set: every token is a substring of the (lower-cased) whitespace word
it comes from, and each \\w run of a token is a maximal \\w run of that word (edge punctuation, the
``#``/``@``, URL schemes and host dots are all non-word characters). So a word can only produce a
configured key if it contains one of the key's runs; only those few words are tokenised (with the
very same per-word rules, ``_word_tokens``), and entity values are looked up directly.
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
# Up to this many needles, ``needle in text`` per needle beats one ``\\w+`` scan of the text.
_SUBSTRING_SCAN_MAX = 24
_URL_CACHE_SIZE = 8192  # entity URL values remembered per Matcher (cleared when full)


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
        self._key_set = frozenset(self._keys)
        # One needle per key: its longest \\w run (a maximal run of any word that yields the key),
        # or, for a key without word characters, the key itself (found by substring search).
        runs: set[str] = set()
        bare: list[str] = []
        for key in self._keys:
            found = _WORD_RE.findall(key)
            if found:
                runs.add(max(found, key=len))
            else:
                bare.append(key)
        self._runs = frozenset(runs)
        self._run_list = tuple(sorted(runs, key=len, reverse=True))
        self._bare = tuple(bare)
        self._url_hits: dict[str, tuple[str, ...]] = {}  # entity URL value -> keys it yields

    def match(self, tweet: dict[str, Any]) -> Matched:
        """Return the predicates ``tweet`` matches (empty ``Matched`` for junk input)."""
        if not isinstance(tweet, dict):
            return Matched()
        return Matched(
            self._match_track(tweet) if self._keys else [],
            self._match_follow(tweet) if self._follow_order else [],
            self._match_locations(tweet)
            if self.locations and not isinstance(tweet.get("retweeted_status"), dict)
            else [],
        )

    def _match_track(self, tweet: dict[str, Any]) -> list[str]:
        found = self._hits(tweet, 0)
        if not found:
            return []
        keys = self._keys
        present: set[int] = set()
        for key in found:
            present.update(keys[key])
        by_first, phrase_terms = self._by_first, self._phrase_terms
        hits: list[int] = []
        for tid in present:
            for pid in by_first.get(tid, ()):
                if phrase_terms[pid] <= present:
                    hits.append(pid)
        if len(hits) > 1:
            hits.sort()
        return [self.track[pid] for pid in hits]

    def _hits(self, tweet: dict[str, Any], depth: int) -> set[str]:
        """The configured keys among ``tweet_tokens(tweet)`` (same traversal, same rules)."""
        original = tweet.get("retweeted_status")
        if type(original) is dict and depth < _MAX_NESTING:
            return self._hits(original, depth + 1)
        found: set[str] = set()
        text = tweet.get("text")
        entities = tweet.get("entities")
        extended = tweet.get("extended_tweet")
        if type(extended) is dict and type(extended.get("full_text")) is str:
            text, entities = extended["full_text"], extended.get("entities")
        if type(text) is str:
            self._text_hits(found, text)
        if type(entities) is dict:
            self._entity_hits(found, entities)
        media = tweet.get("extended_entities")
        if type(media) is dict:
            self._entity_hits(found, media)
        quoted = tweet.get("quoted_status")
        if type(quoted) is dict and depth < _MAX_NESTING:
            found |= self._hits(quoted, depth + 1)
        return found

    def _text_hits(self, found: set[str], text: str) -> None:
        low = text.lower()
        if len(self._run_list) <= _SUBSTRING_SCAN_MAX:
            needles = [run for run in self._run_list if run in low]
        else:
            needles = list(self._runs.intersection(_WORD_RE.findall(low)))
        needles += [key for key in self._bare if key in low]
        if not needles:
            return
        spaced = " ".join(low.split())
        key_set = self._key_set
        for raw in _words_containing(spaced, needles):
            for token in _word_tokens(raw):
                if token in key_set:
                    found.add(token)

    def _entity_hits(self, found: set[str], entities: dict[str, Any]) -> None:
        key_set = self._key_set
        hashtags = entities.get("hashtags")
        if type(hashtags) is list:
            for tag in hashtags:
                text = tag.get("text") if type(tag) is dict else None
                if type(text) is str and text and (key := "#" + text.lower()) in key_set:
                    found.add(key)
        mentions = entities.get("user_mentions")
        if type(mentions) is list:
            for mention in mentions:
                name = mention.get("screen_name") if type(mention) is dict else None
                if type(name) is str and name and (key := "@" + name.lower()) in key_set:
                    found.add(key)
        for kind in ("urls", "media"):
            urls = entities.get(kind)
            if type(urls) is not list:
                continue
            for url in urls:
                if type(url) is not dict:
                    continue
                for value in (url.get("expanded_url"), url.get("display_url")):
                    if type(value) is str and value:
                        hits = self._url_hits.get(value)
                        if hits is None:
                            hits = self._cache_url_hits(value)
                        if hits:
                            found.update(hits)

    def _cache_url_hits(self, value: str) -> tuple[str, ...]:
        if len(self._url_hits) >= _URL_CACHE_SIZE:
            self._url_hits.clear()
        key_set = self._key_set
        hits = tuple(t for t in _url_tokens(value.lower(), False) if t in key_set)
        self._url_hits[value] = hits
        return hits

    def _match_follow(self, tweet: dict[str, Any]) -> list[int]:
        """``_follow_candidates`` that are followed, inlined: it runs for every tweet."""
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
        tokens.update(_word_tokens(raw))


def _word_tokens(raw: str) -> tuple[str, ...]:
    """The tokens of one lower-cased whitespace-delimited word of the text."""
    if raw.isalnum():
        return (raw,)
    lead = raw.lstrip(_EDGE_PUNCT)
    if lead[:1] in ("#", "@"):
        tag = _TAG_RE.match(lead)
        return (lead[0] + tag.group(1),) if tag else ()
    word = raw.strip(_EDGE_PUNCT)
    if word and not (word[0].isalnum() and word[-1].isalnum()):
        word = _EDGE_RE.sub("", word)
    if "." in word or "://" in word:
        return _url_tokens(word, True)
    return (word,) if word else ()


def _words_containing(spaced: str, needles: Sequence[str]) -> set[str]:
    """The words of ``spaced`` (words joined by single spaces) that contain one of ``needles``."""
    words: set[str] = set()
    for needle in needles:
        at = spaced.find(needle)
        while at >= 0:
            start = spaced.rfind(" ", 0, at) + 1
            end = spaced.find(" ", at + len(needle))
            if end < 0:
                end = len(spaced)
            words.add(spaced[start:end])
            at = spaced.find(needle, end)
    return words


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
