"""Realistic v1.1 tweets and control messages (docs/protocol.md §3, §6).

``TweetGenerator`` builds tweets aimed at one connection's predicates (a track phrase's terms, a
followed author, a point in a box) plus noise; the caller delivers only what ``Matcher`` accepts.
Each generated tweet becomes a ``Template``: its JSON encoded once with sentinel id/time fields, so
sending it again under a fresh snowflake id is a few byte joins (the ``--rate 0`` pool).
"""

from __future__ import annotations

import operator
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ingestd.simulator.params import FILTER_LEVELS, StreamParams

TWITTER_EPOCH_MS = 1288834974657
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Sentinels: same width as the real values so templates need no re-encoding.
_ID_SENTINEL = 1111111111111111111
_MS_SENTINEL = "2222222222222"
_DATE_SENTINEL = "Xxx Xxx 00 00:00:00 +0000 0000"
_SLOT_RE = re.compile(rb"(1111111111111111111|2222222222222|Xxx Xxx 00 00:00:00 \+0000 0000)")
_SLOT_KIND = {b"1111111111111111111": 0, b"2222222222222": 1, _DATE_SENTINEL.encode(): 2}

_WORDS_TEXT = (
    "the a of to and in is it you that was for on are with as be at have this from or one had by "
    "but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its "
    "now find long down day did get come made may part stream data coffee music game news city "
    "rain sunny weekend launch release update bug fix python rust mongo café naïve touché "
    "façade jalapeño über smörgåsbord crème brûlée 東京 ラーメン 今日は 天気 北京 서울 "
    "😀 🎉 🔥 ❤️ 👍 🚀 ✨ 🙏 …"
)
WORDS = tuple(_WORDS_TEXT.split())
LANGS = ("en", "en", "en", "es", "fr", "de", "ja", "pt", "und")
COUNTRIES = ("DE", "AR", "FR", "IN", "TR", "RU", "BR", "GB")
DISCONNECT_REASONS = {
    1: "Shutdown",
    2: "Duplicate stream",
    3: "Control request",
    4: "Stall",
    5: "Normal",
    6: "Token revoked",
    7: "Admin logout: another connection with the same credentials was opened",
    8: "Reserved",
    9: "Max message limit",
    10: "Stream exception",
    11: "Broker stall",
    12: "Shed load",
}
FALLING_BEHIND = (
    "Your connection is falling behind and messages are being queued for delivery to you. "
    "Your queue is now over {pct}% full. You will be disconnected when the queue is full."
)
_SOURCES = (
    '<a href="http://twitter.com/download/iphone" rel="nofollow">Twitter for iPhone</a>',
    '<a href="http://twitter.com/download/android" rel="nofollow">Twitter for Android</a>',
    '<a href="https://mobile.twitter.com" rel="nofollow">Twitter Web App</a>',
)
_URL_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class Snowflake:
    """Unique tweet ids ``(ms - epoch) << 22 | seq`` from the wall clock (thread-safe).

    Ids never go backwards: if the clock does or 4096 ids were taken in one millisecond, the
    millisecond is borrowed from the future.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms = 0
        self._seq = 0

    def next(self) -> int:
        now = time.time_ns() // 1_000_000
        with self._lock:
            if now > self._ms:
                self._ms, self._seq = now, 0
            else:
                self._seq += 1
                if self._seq > 0xFFF:
                    self._ms, self._seq = self._ms + 1, 0
            return ((self._ms - TWITTER_EPOCH_MS) << 22) | self._seq


def id_ms(tweet_id: int) -> int:
    """The creation time (epoch ms) encoded in a snowflake id."""
    return (tweet_id >> 22) + TWITTER_EPOCH_MS


def created_at(ms: int) -> str:
    """Twitter's ``created_at`` format, independent of the process locale."""
    t = time.gmtime(ms // 1000)
    return (
        f"{_DAYS[t.tm_wday]} {_MONTHS[t.tm_mon - 1]} {t.tm_mday:02d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000 {t.tm_year}"
    )


@dataclass(slots=True)
class Template:
    """A tweet encoded once; ``render`` fills in id, ``timestamp_ms`` and ``created_at``.

    The JSON becomes a ``bytes`` %-format with one ``%b`` per sentinel, so a render is one C-level
    formatting call (this is the ``--rate 0`` hot path).
    """

    fmt: bytes
    pick: Callable[[tuple[bytes, bytes, bytes]], tuple[bytes, ...]]
    user_id: int

    @classmethod
    def from_tweet(cls, tweet: dict[str, Any]) -> Template:
        pieces = _SLOT_RE.split(orjson.dumps(tweet))
        kinds = [_SLOT_KIND[p] for p in pieces[1::2]]
        fmt = b"%b".join(p.replace(b"%", b"%%") for p in pieces[::2])
        if len(kinds) < 2:  # itemgetter returns a bare item, not a tuple, for one index
            raise ValueError("a template needs at least its id and created_at slots")
        return cls(fmt, operator.itemgetter(*kinds), tweet["user"]["id"])

    def render(self, tweet_id: int) -> bytes:
        ms = (tweet_id >> 22) + TWITTER_EPOCH_MS
        values = (b"%d" % tweet_id, b"%d" % ms, _created_at_bytes(ms // 1000))
        return self.fmt % self.pick(values)


_date_cache: dict[int, bytes] = {}


def _created_at_bytes(second: int) -> bytes:
    cached = _date_cache.get(second)
    if cached is None:
        if len(_date_cache) > 64:
            _date_cache.clear()
        cached = _date_cache[second] = created_at(second * 1000).encode()
    return cached


class _Text:
    """Builds tweet text and its entities with code-point indices as pieces are appended."""

    def __init__(self) -> None:
        self.text = ""
        self.entities: dict[str, list[dict[str, Any]]] = {
            "hashtags": [],
            "urls": [],
            "user_mentions": [],
            "symbols": [],
        }

    def _span(self, piece: str) -> list[int]:
        if self.text:
            self.text += " "
        start = len(self.text)
        self.text += piece
        return [start, len(self.text)]

    def word(self, word: str) -> None:
        self._span(word)

    def hashtag(self, tag: str) -> None:
        self.entities["hashtags"].append({"text": tag, "indices": self._span("#" + tag)})

    def mention(self, user: dict[str, Any]) -> None:
        span = self._span("@" + user["screen_name"])
        mention = {k: user[k] for k in ("screen_name", "name", "id", "id_str")}
        self.entities["user_mentions"].append({**mention, "indices": span})

    def url(self, expanded: str, display: str, tco: str) -> None:
        entity = {"url": tco, "expanded_url": expanded, "display_url": display}
        self.entities["urls"].append({**entity, "indices": self._span(tco)})


class TweetGenerator:
    """Tweets for one connection: ``matching()`` aims at a predicate, ``noise()`` at none."""

    def __init__(self, params: StreamParams, rng: random.Random, ids: Snowflake) -> None:
        self.params = params
        self.rng = rng
        self.ids = ids
        self.users = [self._user(rng.randrange(10**6, 10**12)) for _ in range(50)]
        self.followed = [self._user(uid) for uid in params.follow[:200]]
        kinds = [("track", params.track), ("follow", params.follow), ("geo", params.locations)]
        self._kinds = [name for name, values in kinds if values]

    # --- public -------------------------------------------------------------------------

    def matching(self) -> dict[str, Any]:
        """A tweet built to match one of the connection's predicates (chosen at random)."""
        kind = self.rng.choice(self._kinds)
        if kind == "track":
            return self._track_tweet()
        if kind == "follow":
            return self._follow_tweet()
        return self._geo_tweet()

    def noise(self) -> dict[str, Any]:
        """A random tweet not aimed at any predicate (the caller filters it)."""
        tweet = self._tweet(self.rng.choice(self.users), self._words())
        return self._maybe_wrap(tweet)

    # --- building blocks ----------------------------------------------------------------

    def _user(self, uid: int) -> dict[str, Any]:
        rng = self.rng
        name = "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(4))
        born = TWITTER_EPOCH_MS + rng.randrange(0, 10**12)
        return {
            "id": uid,
            "id_str": str(uid),
            "name": name.title() + rng.choice(["", " ✨", " Müller", " 田中"]),
            "screen_name": f"{name}{rng.randrange(100)}",
            "location": rng.choice([None, "Berlin", "東京", "São Paulo"]),
            "url": None,
            "description": " ".join(rng.choice(WORDS) for _ in range(6)),
            "protected": False,
            "verified": rng.random() < 0.05,
            "followers_count": rng.randrange(-1, 100000),
            "friends_count": rng.randrange(0, 5000),
            "listed_count": rng.randrange(0, 100),
            "favourites_count": rng.randrange(0, 10000),
            "statuses_count": rng.randrange(1, 50000),
            "created_at": created_at(born),
            "geo_enabled": rng.random() < 0.3,
            "lang": None,
            "profile_image_url_https": f"https://pbs.twimg.com/profile_images/{uid}/a_normal.jpg",
            "default_profile": True,
        }

    def _words(self, text: _Text | None = None, count: int | None = None) -> _Text:
        text = text or _Text()
        rng = self.rng
        for _ in range(count if count is not None else rng.randrange(3, 30)):
            roll = rng.random()
            if roll < 0.05:
                text.hashtag(rng.choice(WORDS[:60]) + rng.choice(["", "2024", "Fans"]))
            elif roll < 0.09:
                text.mention(rng.choice(self.users))
            elif roll < 0.11:
                path = "".join(rng.choices(_URL_CHARS, k=8))
                host = rng.choice(["example.org", "www.example.net", "blog.example.io"])
                text.url(f"https://{host}/{path}", f"{host.removeprefix('www.')}/{path}", _tco(rng))
            else:
                text.word(rng.choice(WORDS) + rng.choice(["", "", "", ",", ".", "!", "?"]))
        return text

    def _tweet(self, user: dict[str, Any], body: _Text) -> dict[str, Any]:
        """A complete status with sentinel id/time fields (``Template.render`` fills them)."""
        rng = self.rng
        tid, ms, when = _ID_SENTINEL, _MS_SENTINEL, _DATE_SENTINEL
        level = max(self.params.filter_level, rng.choice(FILTER_LEVELS), key=FILTER_LEVELS.index)
        langs = sorted(self.params.language) or LANGS
        tweet: dict[str, Any] = {
            "created_at": when,
            "id": tid,
            "id_str": str(tid),
            "text": body.text,
            "source": rng.choice(_SOURCES),
            "truncated": False,
            "in_reply_to_status_id": None,
            "in_reply_to_status_id_str": None,
            "in_reply_to_user_id": None,
            "in_reply_to_user_id_str": None,
            "in_reply_to_screen_name": None,
            "user": user,
            "geo": None,
            "coordinates": None,
            "place": None,
            "contributors": None,
            "is_quote_status": False,
            "quote_count": 0,
            "reply_count": 0,
            "retweet_count": 0,
            "favorite_count": 0,
            "entities": body.entities,
            "favorited": False,
            "retweeted": False,
            "filter_level": level,
            "lang": rng.choice(langs),
            "timestamp_ms": ms,
        }
        if len(body.text) > 140:
            _truncate(tweet, body, rng)
        return tweet

    def _maybe_wrap(self, tweet: dict[str, Any]) -> dict[str, Any]:
        """Sometimes turn a tweet into a reply, a retweet of it, or a quote of it."""
        roll = self.rng.random()
        if roll < 0.15:
            return self._retweet(self.rng.choice(self.users), self._as_nested(tweet))
        if roll < 0.25:
            return self._quote(self._as_nested(tweet))
        if roll < 0.35:
            self._reply_to(tweet, self.rng.choice(self.users))
        return tweet

    def _as_nested(self, tweet: dict[str, Any]) -> dict[str, Any]:
        tid = self.ids.next() - (self.rng.randrange(1, 86_400_000) << 22)
        nested = {**tweet, "id": tid, "id_str": str(tid), "created_at": created_at(id_ms(tid))}
        nested.pop("timestamp_ms", None)
        urls = nested.get("entities", {}).get("urls", [])
        for url in urls:  # the i/web link of a truncated original points at its own id
            url["expanded_url"] = url["expanded_url"].replace(str(_ID_SENTINEL), str(tid))
        return nested

    def _retweet(self, retweeter: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
        author = original["user"]
        body = _Text()
        body.word("RT")
        body.mention(author)
        body.text += ":"
        full = original.get("extended_tweet", {}).get("full_text", original["text"])
        prefix = len(body.text) + 1
        body.text = (body.text + " " + full)[:140]
        # As the endpoint does: the retweet's entities are the original's that its (cut) text
        # still shows, moved past "RT @name: " (an analyst's hashtag count reads them).
        shown = original.get("extended_tweet", {}).get("entities") or original["entities"]
        for kind, found in body.entities.items():
            found.extend({**e, "indices": [prefix + e["indices"][0], prefix + e["indices"][1]]}
                         for e in shown.get(kind, []) if prefix + e["indices"][1] <= len(body.text))
        wrapper = self._tweet(retweeter, body)
        wrapper["retweeted_status"] = original
        wrapper["filter_level"] = original["filter_level"]
        wrapper["lang"] = original["lang"]
        return wrapper

    def _quote(self, quoted: dict[str, Any]) -> dict[str, Any]:
        tweet = self._tweet(self.rng.choice(self.users), self._words(count=5))
        link = f"https://twitter.com/{quoted['user']['screen_name']}/status/{quoted['id']}"
        tweet.update(
            is_quote_status=True,
            quoted_status_id=quoted["id"],
            quoted_status_id_str=quoted["id_str"],
            quoted_status=quoted,
            quoted_status_permalink={"url": _tco(self.rng), "expanded": link, "display": link[8:]},
        )
        return tweet

    def _reply_to(self, tweet: dict[str, Any], user: dict[str, Any]) -> None:
        parent = self.ids.next() - (self.rng.randrange(1, 3_600_000) << 22)
        tweet.update(
            in_reply_to_status_id=parent,
            in_reply_to_status_id_str=str(parent),
            in_reply_to_user_id=user["id"],
            in_reply_to_user_id_str=user["id_str"],
            in_reply_to_screen_name=user["screen_name"],
        )

    # --- aimed tweets -------------------------------------------------------------------

    def _track_tweet(self) -> dict[str, Any]:
        rng = self.rng
        terms = rng.choice(self.params.track).split()
        rng.shuffle(terms)
        body = self._words(count=rng.randrange(0, 6))
        for term in terms:
            self._embed_term(body, term)
            self._words(body, rng.randrange(0, 4))
        tweet = self._tweet(rng.choice(self.users), body)
        return self._maybe_wrap(tweet)

    def _embed_term(self, body: _Text, term: str) -> None:
        rng = self.rng
        bare = term[1:]
        if term[0] == "#" and bare.replace("_", "a").isalnum():
            body.hashtag(bare)
        elif term[0] == "@" and bare.replace("_", "a").isalnum():
            body.mention({**rng.choice(self.users), "screen_name": bare})
        elif "." in term.strip(".") or "/" in term:
            host = term.removeprefix("https://").removeprefix("http://")
            body.url(f"https://{host}", host, _tco(rng))
        else:
            cased = "".join(c.upper() if rng.random() < 0.3 else c for c in term)
            if term.isalnum() and rng.random() < 0.15:
                body.hashtag(cased)
            else:
                body.word(cased + rng.choice(["", "", ",", "!", "."]))

    def _follow_tweet(self) -> dict[str, Any]:
        rng = self.rng
        followed = rng.choice(self.followed)
        roll = rng.random()
        if roll < 0.2:  # a retweet of the followed user's tweet
            original = self._as_nested(self._tweet(followed, self._words()))
            return self._retweet(rng.choice(self.users), original)
        if roll < 0.35:  # a reply to the followed user
            tweet = self._tweet(rng.choice(self.users), self._words())
            self._reply_to(tweet, followed)
            return tweet
        if roll < 0.45:  # a retweet BY the followed user
            original = self._as_nested(self._tweet(rng.choice(self.users), self._words()))
            return self._retweet(followed, original)
        return self._tweet(followed, self._words())

    def _geo_tweet(self) -> dict[str, Any]:
        rng = self.rng
        west, south, east, north = rng.choice(self.params.locations)
        lon, lat = rng.uniform(west, east), rng.uniform(south, north)
        tweet = self._tweet(rng.choice(self.users), self._words())
        if rng.random() < 0.6:
            tweet["coordinates"] = {"type": "Point", "coordinates": [lon, lat]}
            tweet["geo"] = {"type": "Point", "coordinates": [lat, lon]}
        tweet["place"] = _place(rng, lon, lat)
        return tweet


def _tco(rng: random.Random) -> str:
    return "https://t.co/" + "".join(rng.choices(_URL_CHARS, k=10))


def _truncate(tweet: dict[str, Any], body: _Text, rng: random.Random) -> None:
    """Compatibility-mode truncation (§6): cut text, i/web link at [116,139], extended_tweet."""
    full, entities = body.text, body.entities
    tco = _tco(rng)
    kept = {key: [e for e in items if e["indices"][1] <= 114] for key, items in entities.items()}
    kept["urls"].append(
        {
            "url": tco,
            "expanded_url": f"https://twitter.com/i/web/status/{tweet['id']}",
            "display_url": "twitter.com/i/web/status/1…",
            "indices": [116, 139],
        }
    )
    tweet.update(
        text=full[:114] + "… " + tco,
        truncated=True,
        entities=kept,
        display_text_range=[0, 115],
        extended_tweet={
            "full_text": full,
            "display_text_range": [0, len(full)],
            "entities": entities,
        },
    )


def _place(rng: random.Random, lon: float, lat: float) -> dict[str, Any]:
    """A city-sized place around a point (its box is what ``locations`` tests when no point)."""
    half = rng.uniform(0.01, 0.05)
    w, e = max(lon - half, -180.0), min(lon + half, 180.0)
    s, n = max(lat - half, -90.0), min(lat + half, 90.0)
    pid = "".join(rng.choices("0123456789abcdef", k=16))
    return {
        "id": pid,
        "url": f"https://api.twitter.com/1.1/geo/id/{pid}.json",
        "place_type": "city",
        "name": "Simville",
        "full_name": "Simville, SV",
        "country_code": "SV",
        "country": "Simland",
        "bounding_box": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n]]]},
        "attributes": {},
    }


# --- control messages (§3) ------------------------------------------------------------------


def delete_msg(tweet_id: int, user_id: int, now_ms: int) -> dict[str, Any]:
    status = {
        "id": tweet_id,
        "id_str": str(tweet_id),
        "user_id": user_id,
        "user_id_str": str(user_id),
    }
    return {"delete": {"status": status, "timestamp_ms": str(now_ms)}}


def scrub_geo_msg(user_id: int, up_to: int) -> dict[str, Any]:
    return {
        "scrub_geo": {
            "user_id": user_id,
            "user_id_str": str(user_id),
            "up_to_status_id": up_to,
            "up_to_status_id_str": str(up_to),
        }
    }


def limit_msg(track: int, now_ms: int) -> dict[str, Any]:
    return {"limit": {"track": track, "timestamp_ms": str(now_ms)}}


def status_withheld_msg(tweet_id: int, user_id: int, countries: list[str]) -> dict[str, Any]:
    return {
        "status_withheld": {"id": tweet_id, "user_id": user_id, "withheld_in_countries": countries}
    }


def user_withheld_msg(user_id: int, countries: list[str]) -> dict[str, Any]:
    return {"user_withheld": {"id": user_id, "withheld_in_countries": countries}}


def warning_msg(percent_full: int) -> dict[str, Any]:
    return {
        "warning": {
            "code": "FALLING_BEHIND",
            "message": FALLING_BEHIND.format(pct=percent_full),
            "percent_full": percent_full,
        }
    }


def disconnect_msg(code: int, stream_name: str) -> dict[str, Any]:
    reason = DISCONNECT_REASONS.get(code, "Unknown reason")
    return {"disconnect": {"code": code, "stream_name": stream_name, "reason": reason}}
