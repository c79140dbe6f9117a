"""v2-shaped tweets for the simulator's filtered stream (docs/protocol.md §7.4).

``V2Tweets.aimed(terms)`` builds a full tweet (every field, ids as strings) containing what one
rule branch asks for; ``render`` cuts it down to what the connection requested with
``tweet.fields``/``expansions``/``user.fields``/``place.fields`` and adds ``includes`` and
``matching_rules``, as the endpoint does (only ``id``, ``text``, ``edit_history_tweet_ids`` by
default).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ingestd.simulator.generator import LANGS, WORDS, Snowflake, id_ms
from ingestd.simulator.v2_rules import Term

DEFAULT_TWEET_FIELDS = ("id", "text", "edit_history_tweet_ids")
DEFAULT_USER_FIELDS = ("id", "name", "username")
DEFAULT_PLACE_FIELDS = ("id", "full_name")
_PLACES = (
    {"id": "01a9a39529b27f36", "full_name": "Manhattan, NY", "country_code": "US",
     "place_type": "city", "geo": {"type": "Feature", "bbox": [-74.026675, 40.683935,
                                                                -73.910408, 40.877483]}},
    {"id": "0a5bb2bdc6a6b4b1", "full_name": "Paris, France", "country_code": "FR",
     "place_type": "city", "geo": {"type": "Feature", "bbox": [2.224199, 48.815573,
                                                                2.469921, 48.902145]}},
    {"id": "1ef1183ed7056dc1", "full_name": "Tokyo, Japan", "country_code": "JP",
     "place_type": "admin", "geo": {"type": "Feature", "bbox": [138.9431, 35.4978,
                                                                139.9192, 35.8984]}},
)


@dataclass(frozen=True, slots=True)
class Fields:
    """What one connection asked for (parsed query parameters)."""

    tweet: frozenset[str] = frozenset()
    expansions: frozenset[str] = frozenset()
    user: frozenset[str] = frozenset()
    place: frozenset[str] = frozenset()


def iso_time(ms: int) -> str:
    """``2022-09-14T19:00:55.000Z``."""
    t = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms % 1000:03d}Z"


class V2Tweets:
    """Authors, places and tweets; not thread-safe (the firehose thread owns it)."""

    def __init__(self, rng: random.Random, ids: Snowflake) -> None:
        self.rng, self.ids = rng, ids
        self.users: dict[str, dict[str, Any]] = {}
        self.by_name: dict[str, str] = {}
        for n in range(40):
            self.user_named(f"user{n}_{rng.randrange(10**4)}")

    def user_named(self, name: str) -> dict[str, Any]:
        """The user with that username (or numeric id), created on first use."""
        if name.isdigit():
            uid = name
            name = self.users[uid]["username"] if uid in self.users else f"u{name}"
        else:
            uid = self.by_name.get(name.lower()) or str(self.rng.randrange(10**6, 10**18))
        if uid not in self.users:
            self.users[uid] = {"id": uid, "username": name, "name": name.title(),
                               "created_at": iso_time(1_300_000_000_000 + int(uid) % 10**11)}
            self.by_name[name.lower()] = uid
        return self.users[uid]

    def usernames(self) -> dict[str, str]:
        return {uid: u["username"] for uid, u in self.users.items()}

    # -- building

    def aimed(self, terms: list[Term]) -> dict[str, Any]:
        """A tweet with what ``terms`` ask for, between random words."""
        rng = self.rng
        tweet_id = self.ids.next()
        author = rng.choice(list(self.users.values()))
        body = _Body(rng)
        body.words(rng.randrange(2, 6))
        tweet: dict[str, Any] = {"lang": rng.choice(LANGS)}
        for term in terms:
            author = self._apply(term, body, tweet, author)
            body.words(rng.randrange(0, 3))
        if rng.random() < 0.15 and "geo" not in tweet:
            tweet["geo"] = {"place_id": rng.choice(_PLACES)["id"]}
        ms = id_ms(tweet_id)
        tweet.update({
            "id": str(tweet_id), "edit_history_tweet_ids": [str(tweet_id)], "text": body.text,
            "author_id": author["id"], "created_at": iso_time(ms),
            "conversation_id": str(tweet_id), "entities": body.entities(),
            "public_metrics": {"retweet_count": 0, "reply_count": 0, "like_count": 0,
                               "quote_count": 0},
        })
        return {k: v for k, v in tweet.items() if v}  # v2 omits empty fields

    def noise(self) -> dict[str, Any]:
        return self.aimed([])

    def _apply(self, term: Term, body: _Body, tweet: dict[str, Any],
               author: dict[str, Any]) -> dict[str, Any]:
        kind, value = term.kind, term.value
        if kind in ("keyword", "phrase"):
            body.add(value)
        elif kind == "hashtag" or (kind == "has" and value == "hashtags"):
            body.hashtag(value if kind == "hashtag" else self.rng.choice(WORDS_ASCII))
        elif kind == "mention" or (kind == "has" and value == "mentions"):
            body.mention(self.user_named(value if kind == "mention" else "someone"))
        elif kind == "from":
            return self.user_named(value)
        elif kind == "to" or (kind == "is" and value == "reply"):
            user = self.user_named(value if kind == "to" else "someone")
            tweet["in_reply_to_user_id"] = user["id"]
            tweet["referenced_tweets"] = [{"type": "replied_to", "id": str(self.ids.next())}]
        elif kind == "lang":
            tweet["lang"] = value
        elif kind == "has" and value == "geo":
            tweet["geo"] = {"place_id": self.rng.choice(_PLACES)["id"]}
        elif kind == "has" and value == "links":
            body.url()
        elif kind == "is":
            kinds = {"retweet": "retweeted", "quote": "quoted"}
            tweet["referenced_tweets"] = [{"type": kinds[value], "id": str(self.ids.next())}]
        return author

    # -- what the connection sees

    def render(self, tweet: dict[str, Any], rules: list[dict[str, str]], fields: Fields) -> bytes:
        wanted = set(DEFAULT_TWEET_FIELDS) | fields.tweet
        data = {k: v for k, v in tweet.items() if k in wanted}
        includes = self._includes(tweet, fields)
        msg: dict[str, Any] = {"data": data}
        if includes:
            msg["includes"] = includes
        msg["matching_rules"] = rules
        return orjson.dumps(msg)

    def _includes(self, tweet: dict[str, Any], fields: Fields) -> dict[str, Any]:
        ex = fields.expansions
        user_ids: list[str] = []
        if "author_id" in ex:
            user_ids.append(tweet["author_id"])
        if "in_reply_to_user_id" in ex and "in_reply_to_user_id" in tweet:
            user_ids.append(tweet["in_reply_to_user_id"])
        if "entities.mentions.username" in ex:
            user_ids += [m["id"] for m in tweet.get("entities", {}).get("mentions", ())]
        out: dict[str, Any] = {}
        if user_ids:
            keep = set(DEFAULT_USER_FIELDS) | fields.user
            out["users"] = [{k: v for k, v in self.users[u].items() if k in keep}
                            for u in dict.fromkeys(user_ids)]
        place_id = tweet.get("geo", {}).get("place_id")
        if "geo.place_id" in ex and place_id:
            keep = set(DEFAULT_PLACE_FIELDS) | fields.place
            place = next(p for p in _PLACES if p["id"] == place_id)
            out["places"] = [{k: v for k, v in place.items() if k in keep}]
        return out


WORDS_ASCII = tuple(w for w in WORDS if w.isascii() and w.isalpha())


class _Body:
    """Tweet text with entity offsets (characters) as pieces are added."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.text = ""
        self.hashtags: list[dict[str, Any]] = []
        self.mentions: list[dict[str, Any]] = []
        self.urls: list[dict[str, Any]] = []

    def add(self, piece: str) -> tuple[int, int]:
        if self.text:
            self.text += " "
        start = len(self.text)
        self.text += piece
        return start, len(self.text)

    def words(self, n: int) -> None:
        for _ in range(n):
            self.add(self.rng.choice(WORDS))

    def hashtag(self, tag: str) -> None:
        start, end = self.add(f"#{tag}")
        self.hashtags.append({"start": start, "end": end, "tag": tag})

    def mention(self, user: dict[str, Any]) -> None:
        start, end = self.add(f"@{user['username']}")
        self.mentions.append({"start": start, "end": end, "username": user["username"],
                              "id": user["id"]})

    def url(self) -> None:
        short = f"https://t.co/{self.rng.randrange(16**10):010x}"
        start, end = self.add(short)
        self.urls.append({"start": start, "end": end, "url": short,
                          "expanded_url": "https://example.com/a", "display_url": "example.com/a"})

    def entities(self) -> dict[str, Any]:
        ents = {"hashtags": self.hashtags, "mentions": self.mentions, "urls": self.urls}
        return {k: v for k, v in ents.items() if v}
