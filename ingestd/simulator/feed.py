"""Where a connection's tweets come from: the packaged real tweets and the generator.

Every tweet goes through the connection's ``Matcher`` (plus ``language``/``filter_level``) before it
is offered, so the simulator delivers exactly what the real endpoint's rules would.
Real tweets are delivered at most once per simulator run, to the first connection they match.
"""

from __future__ import annotations

import importlib.resources
import random
import threading
from typing import Any, NamedTuple

import orjson

from ingestd.simulator.generator import Snowflake, Template, TweetGenerator
from ingestd.simulator.params import FILTER_LEVELS, StreamParams

SOURCES = ("real", "generated", "mixed")
_MAX_FAILED_TRIES = 200  # consecutive non-matching candidates before a predicate set is "dry"


class Outgoing(NamedTuple):
    """One tweet ready for the wire (JSON without the trailing ``\\r\\n``)."""

    id: int
    user_id: int
    payload: bytes


class RealTweets:
    """The packaged real tweets, each delivered at most once per simulator run (thread-safe).

    Every connection scans the list from the start with its own position and claims a tweet
    when it matches there, so a tweet skipped by one connection's predicates stays available to
    another's, and none is ever delivered twice.
    """

    def __init__(self, lines: list[bytes] | None = None) -> None:
        self._lines = lines if lines is not None else _packaged_lines()
        self._claimed: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lines)

    def get(self, index: int) -> tuple[dict[str, Any], bytes] | None:
        """The tweet at ``index`` (parsed and raw) unless claimed already or not a tweet."""
        if index in self._claimed:
            return None
        raw = self._lines[index]
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("id"), int):
            return obj, raw
        return None

    def claim(self, index: int) -> bool:
        """Take the tweet for delivery; ``False`` if another connection got there first."""
        with self._lock:
            if index in self._claimed:
                return False
            self._claimed.add(index)
            return True

    @property
    def remaining(self) -> int:
        return len(self._lines) - len(self._claimed)


def _packaged_lines() -> list[bytes]:
    data = importlib.resources.files("ingestd") / "data" / "real_tweets.jsonl"
    return [line.rstrip(b"\r\n") for line in data.read_bytes().splitlines() if line.strip()]


class Feed:
    """A connection's tweet supply. ``pool_size > 0`` reuses pre-encoded templates (fast path)."""

    def __init__(
        self,
        params: StreamParams,
        source: str,
        rng: random.Random,
        ids: Snowflake,
        real: RealTweets,
        pool_size: int = 0,
    ) -> None:
        self.params = params
        self.source = source
        self.rng = rng
        self.ids = ids
        self.real = real
        self.matcher = params.matcher()
        self.generator = TweetGenerator(params, rng, ids)
        self.pool_size = pool_size
        self._pool: list[Template] = []
        self._pool_next = 0
        self._real_pos = 0
        self._dry = False  # no generated candidate matches (e.g. track=hello. matches nothing)
        self.filtered_out = 0

    def accepts(self, tweet: dict[str, Any]) -> bool:
        """The endpoint's delivery rule: a predicate matches, and language/filter_level allow."""
        params = self.params
        if params.language and tweet.get("lang") not in params.language:
            return False
        level = tweet.get("filter_level", "none")
        level_rank = FILTER_LEVELS.index(level) if level in FILTER_LEVELS else 0
        if level_rank < FILTER_LEVELS.index(params.filter_level):
            return False
        return bool(self.matcher.match(tweet))

    def next(self) -> Outgoing | None:
        """The next tweet to deliver, or ``None`` when the source has nothing for us now."""
        if self.source != "generated" and (self.source == "real" or self.rng.random() < 0.5):
            found = self._next_real()
            if found is not None or self.source == "real":
                return found
        template = self._next_template()
        if template is None:
            return None
        tweet_id = self.ids.next()
        return Outgoing(tweet_id, template.user_id, template.render(tweet_id))

    def _next_real(self) -> Outgoing | None:
        # Bounded scan per call, so narrow predicates never stall the write loop for long.
        for _ in range(64):
            index = self._real_pos
            if index >= len(self.real):
                return None
            self._real_pos += 1
            found = self.real.get(index)
            if found is None:
                continue
            tweet, raw = found
            if not self.accepts(tweet):
                self.filtered_out += 1
            elif self.real.claim(index):
                user = tweet.get("user")
                uid = user.get("id") if isinstance(user, dict) else None
                return Outgoing(tweet["id"], uid if isinstance(uid, int) else 0, raw)
        return None

    def _next_template(self) -> Template | None:
        if self.pool_size and len(self._pool) >= self.pool_size:
            self._pool_next = (self._pool_next + 1) % len(self._pool)
            return self._pool[self._pool_next]
        template = self._generate()
        if template is None and self._pool:
            self.pool_size = len(self._pool)  # stop trying; cycle what we have
            return self._next_template()
        if template is not None and self.pool_size:
            self._pool.append(template)
        return template

    def _generate(self) -> Template | None:
        """A generated tweet the connection accepts; non-matching noise is filtered out."""
        if self._dry:
            return None
        for _ in range(_MAX_FAILED_TRIES):
            gen = self.generator
            tweet = gen.matching() if self.rng.random() < 0.85 else gen.noise()
            # Match on the rendered form, exactly as a client would parse it.
            template = Template.from_tweet(tweet)
            probe = orjson.loads(template.render(self.ids.next()))
            if self.accepts(probe):
                return template
            self.filtered_out += 1
        self._dry = True
        return None
