"""Differential check: ``Matcher.match`` against the token model it implements, on many inputs.

``ingestd.documents.match_tokens.tweet_tokens`` spells out the matching model (a tweet's token
set); ``Matcher`` finds the same hits without building that set (the fast path). This script
compares the two on the real sample, on the benchmark payload's shapes and on random text full of
edge cases (punctuation, ``#``/``@``, URLs, Unicode word characters and spaces, terms without any
word character), with track lists drawn from the tweets' own tokens so that hits are frequent.
``TrackMatcher`` walks a tweet's parts itself, so this also checks it against
``match_tokens.tweet_parts`` (which parts of a tweet count); ``--reference`` checks the parts too.

    .venv/bin/python bench/check_matching.py [--cases 20000] [--seed 7] [--reference FILE]

``--reference`` also compares with another, self-contained implementation of ``matching.py`` (e.g.
the single-file version before it was split: ``git show d0042b8:ingestd/documents/matching.py >
/tmp/m.py``), as the spec for ``track``, ``follow`` and ``locations``. Exit status 1 on any
difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from ingestd.documents.match_tokens import term_keys, tweet_tokens
from ingestd.documents.matching import Matched, Matcher

DATA = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"
ALPHABET = (
    "abcxyzABCXYZ0129_éüßİıǅ東京ラーメン한국"  # word characters, incl. case-folding oddities
    "#@.:/-?&=%'\"!,;()[]{}…“”‘’«»¡¿、。・~*+$^|\\<>`"  # edge and inner punctuation
    "  \t\n\u00a0\u2003\u3000"  # spaces str.split() knows
    "😀🎉\u200d\u0301"  # emoji, joiner, combining accent (not \\w)
)
WORDS = ["twitter", "example.com", "http://t.co/x", "https://www.example.com/a?b=c",
         "www.foo.co.uk/path", "#tag", "@name", "t.co", "foo-bar.com", "a.b", "...", "-", "…",
         "twitter’s", "_x_", "x_", "Touché", "ß", "İstanbul", "http://-.-.com", "x://y", "."]


def reference_track(matcher: Matcher, tweet: Any) -> list[str]:
    """The track phrases a tweet matches, straight from the token model."""
    tokens = tweet_tokens(tweet) if isinstance(tweet, dict) else set()
    return [phrase for phrase in matcher.track
            if all(any(key in tokens for key in term_keys(term))
                   for term in phrase.lower().split())]


def random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.4:
            word = rng.choice(WORDS)
            if rng.random() < 0.3:
                word = word.upper()
        else:
            word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 9)))
        pieces.append(word)
        pieces.append(rng.choice([" ", " ", "  ", "\n", "\u00a0", "", ",", "\u3000"]))
    return "".join(pieces)


def random_entities(rng: random.Random) -> dict[str, Any]:
    def url() -> dict[str, Any]:
        value = rng.choice([*WORDS[1:5], random_text(rng)])
        return {"expanded_url": value, "display_url": value.split("://", 1)[-1][:20]}

    return {
        "hashtags": [{"text": rng.choice(["Tag", "twitter", random_text(rng)[:8], ""])}
                     for _ in range(rng.randint(0, 2))],
        "user_mentions": [{"screen_name": rng.choice(["name", "Twitter", random_text(rng)[:6]]),
                           "id": rng.randint(1, 5), "indices": [rng.choice([0, 3]), 9]}
                          for _ in range(rng.randint(0, 2))],
        "urls": [url() for _ in range(rng.randint(0, 2))],
    }


def random_tweet(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    tweet: dict[str, Any] = {"id": rng.randint(1, 10**6), "text": random_text(rng),
                             "entities": random_entities(rng),
                             "user": {"id": rng.randint(1, 5)}}
    if rng.random() < 0.15:
        tweet["extended_tweet"] = {"full_text": random_text(rng),
                                   "entities": random_entities(rng)}
    if rng.random() < 0.1:
        tweet["extended_entities"] = {"media": [{"expanded_url": rng.choice(WORDS)}]}
    if depth < 4 and rng.random() < 0.15:
        tweet["retweeted_status"] = random_tweet(rng, depth + 1)
    if depth < 4 and rng.random() < 0.15:
        tweet["quoted_status"] = random_tweet(rng, depth + 1)
    if rng.random() < 0.2:
        tweet["in_reply_to_user_id"] = rng.randint(1, 5)
    if rng.random() < 0.2:
        tweet["coordinates"] = {"coordinates": [rng.uniform(-5, 5), rng.uniform(-5, 5)]}
    if rng.random() < 0.2:
        w, s = rng.uniform(-6, 4), rng.uniform(-6, 4)
        ring = [[w, s], [w + 1, s], [w + 1, s + 1], [w, s + 1]]
        tweet["place"] = {"bounding_box": {"coordinates": [ring]}}
    return tweet


def track_from(rng: random.Random, tweets: list[dict[str, Any]]) -> list[str]:
    """Track phrases mostly made of tokens the tweets really have (and some raw words)."""
    pool: list[str] = []
    for tweet in tweets:
        pool.extend(tweet_tokens(tweet))
        text = tweet.get("text")
        if isinstance(text, str):
            pool.extend(text.split()[:5])
    pool = [p for p in pool if p.strip()] or ["x"]
    phrases = []
    for _ in range(rng.randint(1, 30)):
        terms = [rng.choice(pool + WORDS) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        phrase = " ".join(t for t in terms if t.strip())
        if phrase.strip():
            phrases.append(phrase)
    return phrases or ["x"]


def load_reference(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("matching_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def as_tuple(m: Matched) -> tuple[list[str], list[int], list[int]]:
    return list(m.track), list(m.follow), list(m.locations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reference", type=Path, help="another matching.py to compare with")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    reference = load_reference(args.reference) if args.reference else None
    real = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    started = time.monotonic()
    failures = 0
    checked = 0
    for case in range(args.cases):
        tweets = [random_tweet(rng) for _ in range(3)] if case % 2 else rng.sample(real, 3)
        track = track_from(rng, tweets)
        follow = [rng.randint(1, 5)] if rng.random() < 0.5 else []
        boxes = [(-1.0, -1.0, 1.0, 1.0), (0.0, 0.0, 3.0, 3.0)] if rng.random() < 0.5 else []
        matcher = Matcher(track, follow, boxes)
        other = reference.Matcher(track, follow, boxes) if reference else None
        for tweet in tweets:
            got = matcher.match(tweet)
            want = reference_track(matcher, tweet)
            checked += 1
            if got.track != want or (other and as_tuple(other.match(tweet)) != as_tuple(got)):
                failures += 1
                if failures <= 5:
                    print(f"DIFFERENCE track={track!r}\n  tweet={json.dumps(tweet)[:400]}\n"
                          f"  fast={as_tuple(got)} model={want} "
                          f"reference={as_tuple(other.match(tweet)) if other else None}")
        if (case + 1) % 5000 == 0:
            print(f"  {case + 1:,}/{args.cases:,} cases ({checked:,} tweets checked), "
                  f"{failures} differences, {time.monotonic() - started:.0f} s", flush=True)
    print(f"{checked:,} tweets checked against the token model"
          + (f" and {args.reference}" if reference else "") + f": {failures} differences")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
