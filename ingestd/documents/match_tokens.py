"""The track model of v1.1 ``statuses/filter`` spelled out: a tweet's whole token set.

A design choice where the docs are silent (docs/protocol.md §1.3):

* tweet tokens live in one set: plain words (edge punctuation stripped, lower case), ``#tag`` and
  ``@name`` for hashtags and mentions (from entities and from the text), canonical URLs (scheme and
  leading ``www.`` removed) plus the dot-separated parts of their host;
* a term without punctuation matches a word, a hashtag or a mention; a term with punctuation matches
  only a word or a URL; ``#word`` / ``@word`` terms match only that hashtag / mention;
* a native retweet is matched on its original; a quote on its own content and the quoted tweet's.

``tweet_tokens`` builds the set (the specification, and bench/check_matching.py's oracle);
``match_track.TrackMatcher`` finds the same hits without it, with the per-word rules here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any

# Cheap C-level strip for the common punctuation; ``_strip_non_word`` handles the rest.
_EDGE_PUNCT = "!\"$%&'()*+,-./:;<=>?[\\]^`{|}~“”‘’«»…¡¿、。，！？：；（）「」『』【】・"
_WORD_CHAR_RE = re.compile(r"\w")
_TAG_RE = re.compile(r"[#@](\w+)")
WORD_RE = re.compile(r"\w+")
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*://")
_HOST_RE = re.compile(r"([\w-]+(?:\.[\w-]+)+)(?:[/?#:]|$)")
MAX_NESTING = 3  # retweet of a quote of a quote is as deep as real payloads go


def term_keys(term: str) -> tuple[str, ...]:
    """Token-set keys under which a (lower-case) track term is found."""
    if WORD_RE.fullmatch(term):
        return (term, "#" + term, "@" + term)
    # "#tag"/"@name" find exactly that hashtag/mention; any other punctuated term can only equal
    # a word or URL token, because hashtag and mention tokens never hold punctuation.
    return (term,)


Part = tuple[str | None, list[dict[str, Any]]]
"""What is matched of one tweet: its text (None if it has none) and its entity dicts."""


def tweet_tokens(tweet: dict[str, Any]) -> set[str]:
    """All match tokens of a tweet (see module docstring), retweet/quote content included."""
    tokens: set[str] = set()
    for text, groups in tweet_parts(tweet):
        if text is not None:
            _add_text(tokens, text)
        for entities in groups:
            tokens.update(entity_tags(entities))
            for value in entity_urls(entities):
                tokens.update(url_tokens(value.lower(), False))
    return tokens


def tweet_parts(tweet: dict[str, Any], depth: int = 0) -> list[Part]:
    """The parts matched: a native retweet's original instead of it, plus a quoted tweet's."""
    original = tweet.get("retweeted_status")
    if type(original) is dict and depth < MAX_NESTING:
        return tweet_parts(original, depth + 1)
    text = tweet.get("text")
    entities = tweet.get("entities")
    extended = tweet.get("extended_tweet")
    if type(extended) is dict and type(extended.get("full_text")) is str:
        # The wrapper's entities describe the cut text (plus a twitter.com/i/web link that
        # would match "twitter"), so use the full text's entities instead.
        text, entities = extended["full_text"], extended.get("entities")
    groups = [e for e in (entities, tweet.get("extended_entities")) if type(e) is dict]
    parts: list[Part] = [(text if type(text) is str else None, groups)]
    quoted = tweet.get("quoted_status")
    if type(quoted) is dict and depth < MAX_NESTING:
        parts += tweet_parts(quoted, depth + 1)
    return parts


def _add_text(tokens: set[str], text: str) -> None:
    for raw in set(text.lower().split()):
        tokens.update(word_tokens(raw))


def word_tokens(raw: str) -> tuple[str, ...]:
    """The tokens of one lower-cased whitespace-delimited word of the text."""
    if raw.isalnum():
        return (raw,)
    lead = raw.lstrip(_EDGE_PUNCT)
    if lead[:1] in ("#", "@"):
        tag = _TAG_RE.match(lead)
        return (lead[0] + tag.group(1),) if tag else ()
    word = raw.strip(_EDGE_PUNCT)
    if word and not (word[0].isalnum() and word[-1].isalnum()):
        word = _strip_non_word(word)
    if "." in word or "://" in word:
        return url_tokens(word, True)
    return (word,) if word else ()


def _strip_non_word(word: str) -> str:
    """``word`` without its leading and trailing ``\\W`` runs. Not ``re.sub(r"^\\W+|\\W+$")``:
    its search tries ``\\W+$`` from every position of a run, time quadratic in the run (a word
    with 60,000 symbols before a "_" took 20 s: the store worker was restarted as hung, again and
    again)."""
    first = _WORD_CHAR_RE.search(word)
    last = _WORD_CHAR_RE.search(word[::-1])
    if first is None or last is None:
        return ""
    return word[first.start():len(word) - last.start()]


def words_containing(spaced: str, needles: Iterable[str]) -> set[str]:
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


def entity_tags(entities: dict[str, Any]) -> list[str]:
    """``#tag`` and ``@name`` tokens (lower case) of the hashtags and mentions in ``entities``."""
    tags: list[str] = []
    for kind, prefix, field in (("hashtags", "#", "text"), ("user_mentions", "@", "screen_name")):
        items = entities.get(kind)
        if type(items) is not list:
            continue
        for item in items:
            value = item.get(field) if type(item) is dict else None
            if type(value) is str and value:
                tags.append(prefix + value.lower())
    return tags


def entity_urls(entities: dict[str, Any]) -> Iterator[str]:
    """The expanded and display URLs (as given) of the links and media in ``entities``."""
    for kind in ("urls", "media"):
        urls = entities.get(kind)
        if type(urls) is not list:
            continue
        for url in urls:
            if type(url) is not dict:
                continue
            for value in (url.get("expanded_url"), url.get("display_url")):
                if type(value) is str and value:
                    yield value


@functools.lru_cache(maxsize=8192)
def url_tokens(url: str, from_text: bool) -> tuple[str, ...]:
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
