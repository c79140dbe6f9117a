"""Track phrases of v1.1 ``statuses/filter``, matched at stream rate (docs/protocol.md §1.3).

``TrackMatcher`` gets the answer of the token model (``match_tokens.tweet_tokens``) without building
a tweet's token set: every token is a substring of the (lower-cased) whitespace word it comes from,
and each \\w run of a token is a maximal \\w run of that word (edge punctuation, the ``#``/``@``,
URL schemes and host dots are all non-word characters). So a word can only produce a configured
key if it contains one of the key's runs; only those few words are tokenised (with the very same
per-word rules, ``word_tokens``), and entity values are looked up directly. The needles are found
by one Aho-Corasick pass (pyahocorasick) over the lower-cased text, for any number of phrases, and
an occurrence counts only as a maximal \\w run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ahocorasick

from ingestd.documents.match_tokens import (
    MAX_NESTING,
    WORD_RE,
    term_keys,
    url_tokens,
    word_tokens,
    words_containing,
)

_CACHE_SIZE = 8192  # entity URL values / text words remembered per matcher (cleared when full)
# The same for a matcher whose generation has been superseded (``retire``): only a backlog still
# reads its records. Full caches take up to ~4.5 MB per matcher and the store worker keeps 17; a
# retired one's hold the hot entries (the 558 real sample tweets need ~600 with bench/run.py's
# filters), while most URLs and words in a stream are seen once and never hit.
RETIRED_CACHE_SIZE = 1024


class TrackMatcher:
    """Precompiled track phrases: the configured ones a tweet matches, in configured order."""

    def __init__(self, phrases: Sequence[str]) -> None:
        self.phrases = list(phrases)
        self._compile_phrases()
        self._compile_needles()
        self._url_hits: dict[str, tuple[str, ...]] = {}  # entity URL value -> keys it yields
        self._word_hits: dict[str, tuple[str, ...]] = {}  # text word (with a needle) -> keys
        self.cache_size = _CACHE_SIZE  # entries of each cache before it is cleared

    def retire(self) -> None:
        """Its generation is superseded: empty the caches, and keep them small from now on."""
        if self.cache_size != RETIRED_CACHE_SIZE:
            self.cache_size = RETIRED_CACHE_SIZE
            self._url_hits.clear()
            self._word_hits.clear()

    def _compile_phrases(self) -> None:
        # key -> term ids; first term id -> phrases that start with it (each phrase checked once)
        terms: dict[str, int] = {}
        self._phrase_terms: list[frozenset[int]] = []
        for i, phrase in enumerate(self.phrases):
            words = phrase.lower().split()
            if not words:
                raise ValueError(f"track[{i}]: empty phrase {phrase!r}")
            self._phrase_terms.append(frozenset(terms.setdefault(w, len(terms)) for w in words))
        self._keys: dict[str, list[int]] = {}
        for term, tid in terms.items():
            for key in term_keys(term):
                self._keys.setdefault(key, []).append(tid)
        # "#tag" / "@name" keys by bare name: entity values are checked without building keys
        self._tag_names = frozenset(k[1:] for k in self._keys if k[:1] == "#")
        self._mention_names = frozenset(k[1:] for k in self._keys if k[:1] == "@")
        self._by_first: dict[int, list[int]] = {}
        for pid, tids in enumerate(self._phrase_terms):
            self._by_first.setdefault(min(tids), []).append(pid)
        self._key_set = frozenset(self._keys)
        self._single = {key: self._phrases_of({key}) for key in self._keys}

    def _compile_needles(self) -> None:
        # One needle per key: its longest \\w run (a maximal run of any word that yields the key),
        # or, for a key without word characters, the key itself (any occurrence counts).
        runs: set[str] = set()
        bare: list[str] = []
        for key in self._keys:
            found = WORD_RE.findall(key)
            if found:
                runs.add(max(found, key=len))
            else:
                bare.append(key)
        self._bare = frozenset(bare)
        self._automaton = ahocorasick.Automaton()  # needle -> itself
        for needle in (*runs, *bare):
            self._automaton.add_word(needle, needle)
        self._automaton.make_automaton()
        self._scan = self._automaton.iter  # (end index, needle) of every occurrence

    def match(self, tweet: dict[str, Any]) -> list[str]:
        """The phrases ``tweet`` matches (all the terms of each, anywhere in it)."""
        found: set[str] = set()
        self._part_hits(found, tweet, 0)
        if not found:
            return []
        if len(found) == 1:  # the usual hit: one key, its phrases precomputed
            return self._single[next(iter(found))][:]  # a copy: callers own their list
        return self._phrases_of(found)

    def _phrases_of(self, found: set[str]) -> list[str]:
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
        return [self.phrases[pid] for pid in hits]

    def _part_hits(self, found: set[str], tweet: dict[str, Any], depth: int) -> None:
        """``match_tokens.tweet_parts`` walked in place: no list of parts per tweet. The text's
        scan is inline here (no call per part: this runs for every tweet)."""
        original = tweet.get("retweeted_status")
        while type(original) is dict and depth < MAX_NESTING:
            tweet, depth = original, depth + 1
            original = tweet.get("retweeted_status")
        text = tweet.get("text")
        entities = tweet.get("entities")
        extended = tweet.get("extended_tweet")
        if type(extended) is dict and type(full := extended.get("full_text")) is str:
            text, entities = full, extended.get("entities")
        if type(text) is str:
            low = text.lower()
            needles: set[str] | None = None
            bare = self._bare
            for end, needle in self._scan(low):
                # a run needle counts only as a maximal \w run (as every token's runs are)
                before = end - len(needle)
                if needle not in bare and (
                    (before >= 0 and ((c := low[before]).isalnum() or c == "_"))
                    or (end + 1 < len(low) and ((c := low[end + 1]).isalnum() or c == "_"))
                ):
                    continue
                if needles is None:
                    needles = {needle}
                else:
                    needles.add(needle)
            if needles is not None:
                self._text_word_hits(found, low, needles)
        if type(entities) is dict:
            self._entity_hits(found, entities)
        entities = tweet.get("extended_entities")
        if type(entities) is dict:
            self._entity_hits(found, entities)
        quoted = tweet.get("quoted_status")
        if type(quoted) is dict and depth < MAX_NESTING:
            self._part_hits(found, quoted, depth + 1)

    def _entity_hits(self, found: set[str], entities: dict[str, Any]) -> None:
        """``entity_tags`` looked up without building its list, and ``entity_urls`` walked in a
        plain loop (a generator per tweet cost ~0.3 µs), each URL value's hits cached: a hashtag
        or mention is checked by name against the names of the ``#``/``@`` keys. Empty lists
        (most tweets) cost one truth test each."""
        if (items := entities.get("hashtags")) and self._tag_names:
            _name_hits(found, items, "text", self._tag_names, "#")
        if (items := entities.get("user_mentions")) and self._mention_names:
            _name_hits(found, items, "screen_name", self._mention_names, "@")
        urls, media = entities.get("urls"), entities.get("media")
        if not urls and not media:
            return
        cache = self._url_hits
        for group in (urls, media):
            if type(group) is not list:
                continue
            for url in group:
                if type(url) is not dict:
                    continue
                for value in (url.get("expanded_url"), url.get("display_url")):
                    if type(value) is str and value:
                        hits = cache.get(value)
                        if hits is None:
                            hits = self._cache_url_hits(value)
                        if hits:
                            found.update(hits)

    def _text_word_hits(self, found: set[str], low: str, needles: set[str]) -> None:
        """The keys of the text's words that hold one of ``needles`` (each word's cached)."""
        # words_containing splits at " " only: a printable text has no other whitespace (every
        # other one is a control or a separator character), so most texts need no copy made
        # with their whitespace runs collapsed (~1 µs for a tweet's text)
        spaced = low if low.isprintable() else " ".join(low.split())
        cache = self._word_hits
        for raw in words_containing(spaced, needles):
            hits = cache.get(raw)
            if hits is None:
                hits = self._cache_word_hits(raw)
            if hits:
                found.update(hits)

    def _cache_word_hits(self, raw: str) -> tuple[str, ...]:
        if len(self._word_hits) >= self.cache_size:
            self._word_hits.clear()
        key_set = self._key_set
        hits = tuple(token for token in word_tokens(raw) if token in key_set)
        self._word_hits[raw] = hits
        return hits

    def _cache_url_hits(self, value: str) -> tuple[str, ...]:
        if len(self._url_hits) >= self.cache_size:
            self._url_hits.clear()
        key_set = self._key_set
        hits = tuple(t for t in url_tokens(value.lower(), False) if t in key_set)
        self._url_hits[value] = hits
        return hits


def _name_hits(found: set[str], items: object, field: str, names: frozenset[str],
               prefix: str) -> None:
    """Add ``prefix + name`` for each entity in ``items`` whose (lower-cased) name is wanted."""
    if type(items) is not list:
        return
    for item in items:
        value = item.get(field) if type(item) is dict else None
        if type(value) is str and value:
            low = value.lower()
            if low in names:
                found.add(prefix + low)
