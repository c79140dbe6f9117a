"""messages.classify and tweet_document on real v1.1 payloads and hostile variants."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import bson
import orjson
import pytest
from bson.codec_options import CodecOptions
from hypothesis import given
from hypothesis import strategies as st

from ingestd.documents.matching import Matched
from ingestd.documents.messages import (
    MAX_DATE_MS,
    MIN_DATE_MS,
    SNOWFLAKE_MIN_ID,
    InvalidTweet,
    classify,
    embedded_authors,
    embedded_copies,
    parse_twitter_time,
    tweet_document,
)

RECEIVED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
STORED = CodecOptions(tz_aware=True)  # how a document reads back: dates as aware datetimes


def load(name: str) -> list[Any]:
    data = resources.files("ingestd").joinpath("data", name).read_bytes()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


REAL_TWEETS = load("real_tweets.jsonl")
CONTROL = load("real_stream_control_messages.jsonl")


def document(obj: dict[str, Any], matched: Matched | None = None) -> dict[str, Any]:
    return tweet_document(obj, received_at=RECEIVED, conn_id=3, generation=2, seq=41,
                          matched=matched or Matched())


def build(obj: dict[str, Any], matched: Matched | None = None) -> dict[str, Any]:
    """The document as MongoDB stores it (its dates are built as BSON dates, not datetimes)."""
    return bson.decode(bson.encode(document(obj, matched)), codec_options=STORED)


def plain_tweets() -> list[dict[str, Any]]:
    """Real tweets as the stream sends them (the file also holds a few Mongo exports)."""
    return [t for t in REAL_TWEETS if type(t["id"]) is int]


def fresh_tweets() -> list[dict[str, Any]]:
    """``plain_tweets`` read anew: a document is built by changing the tweet it is given."""
    return [t for t in load("real_tweets.jsonl") if type(t["id"]) is int]


def test_real_tweets_classify_as_tweets() -> None:
    assert {classify(t) for t in REAL_TWEETS} == {"tweet"}


def test_real_control_messages_classify_by_top_level_key() -> None:
    kinds = [classify(m) for m in CONTROL]
    expected = [next(iter(m)) if next(iter(m)) in {
        "delete", "scrub_geo", "limit", "status_withheld", "user_withheld", "disconnect",
        "warning"} else "unknown" for m in CONTROL]
    assert kinds == expected
    assert "unknown" in kinds  # the `friends` preamble of user streams


@pytest.mark.parametrize("obj,kind", [
    ([1, 2], "invalid"),
    ("text", "invalid"),
    (None, "invalid"),
    ({}, "unknown"),
    ({"id": 1}, "unknown"),
    ({"id_str": "5", "text": "hi"}, "tweet"),
    ({"id": 5, "created_at": "x", "user": {}}, "tweet"),
    ({"event": "user_update", "created_at": "x", "source": {}}, "unknown"),
    ({"status_withheld": {"id": 1}}, "status_withheld"),
    ({"user_withheld": {"id": 1}}, "user_withheld"),
    # the input audit: a tweet without id was counted as an unknown control message, its
    # payload gone; a tweet, it is dead-lettered (invalid_tweet, no usable id)
    ({"text": "hi", "created_at": "x", "user": {"id": 1}}, "tweet"),
    ({"full_text": "hi", "user": {"id": 1}}, "tweet"),
    ({"text": "hi"}, "unknown"),
])
def test_classify_shapes(obj: object, kind: str) -> None:
    assert classify(obj) == kind


def test_document_of_real_tweet_keeps_fields_and_derives_created_at() -> None:
    for raw in plain_tweets():
        original = dict(raw)
        doc = build(raw, Matched(track=["beatles"], follow=[7], locations=[0]))
        assert doc["_id"] == original["id"]
        assert doc["created_at_str"] == original["created_at"]
        parsed = email.utils.parsedate_to_datetime(original["created_at"])
        # timestamp_ms/snowflake carry milliseconds; the string only whole seconds
        assert abs((doc["created_at"] - parsed).total_seconds()) < 1
        assert doc["created_at"].tzinfo is not None
        tags = full_hashtags(original.get("retweeted_status") or original)
        assert doc["_ingest"] == {
            "received_at": RECEIVED, "conn": 3, "generation": 2, "seq": 41,
            "matched": {"track": ["beatles"], "follow": [7], "locations": [0]},
            "hashtags": sorted(tags)}
        for key, value in original.items():
            if key != "created_at":
                assert doc[key] == value


def full_hashtags(tweet: dict[str, Any]) -> set[str]:
    """A tweet's own hashtags, lower-cased: its entities' and its full text's."""
    return {t["text"].lower() for holder in (tweet, tweet.get("extended_tweet") or {})
            for t in holder.get("entities", {}).get("hashtags", [])}


# Real retweets of long tweets: their own entities (those of the cut "RT @x: …" text) hold none of
# the original's hashtags, which are in retweeted_status.extended_tweet.entities.
CUT_RETWEETS = {
    932386200773677056: ["aliceinwonderland", "downtherabbithole", "followthewhiterabbit",
                         "qanon"],
    932386714047229952: ["sound_tripper", "山下智久"],
    932386637018947584: ["narou"],
}


def test_a_retweets_hashtags_are_its_originals_full_list() -> None:
    # The analyst audit: these were stored with _ingest.hashtags [] (the top-level entities only).
    found = {t["id"]: t for t in fresh_tweets() if t["id"] in CUT_RETWEETS}
    assert set(found) == set(CUT_RETWEETS)
    for tweet_id, tags in CUT_RETWEETS.items():
        assert found[tweet_id]["entities"]["hashtags"] == []
        assert build(found[tweet_id])["_ingest"]["hashtags"] == tags


def test_every_real_retweets_own_hashtags_are_among_its_originals() -> None:
    retweets = [t for t in fresh_tweets() if "retweeted_status" in t]
    assert len(retweets) > 100
    for raw in retweets:
        own = full_hashtags(raw)
        assert own <= set(build(raw)["_ingest"]["hashtags"]), raw["id"]


def test_quoted_hashtags_are_the_quoted_tweets_not_this_ones() -> None:
    quoted = {"id": 4, "text": "#Quoted", "entities": {"hashtags": [{"text": "Quoted"}]}}
    quote = {"id": 5, "text": "x #Mine", "timestamp_ms": "1576724693818",
             "entities": {"hashtags": [{"text": "Mine"}]}, "quoted_status": quoted}
    assert build(quote)["_ingest"]["hashtags"] == ["mine"]
    # a retweet of that quote: the quote's hashtags, still not the quoted tweet's
    retweet = {"id": 6, "text": "RT @q: x #Mine", "timestamp_ms": "1576724693818",
               "entities": {"hashtags": [{"text": "Mine"}]}, "quoted_status": quoted,
               "retweeted_status": {**quote, "extended_tweet": {"full_text": "x #Mine #More",
                   "entities": {"hashtags": [{"text": "Mine"}, {"text": "More"}]}}}}
    assert build(retweet)["_ingest"]["hashtags"] == ["mine", "more"]


def test_embedded_authors_are_the_users_of_the_copies_a_tweet_carries() -> None:
    # What scrub_geo rules are checked against on the per-tweet path (its fast form).
    kinds = set()
    for t in fresh_tweets():
        authors = embedded_authors(t)
        assert authors == tuple(c["user"]["id"] for c in embedded_copies(t)), t["id"]
        kinds.add(len(authors))
    assert kinds == {0, 1, 3}  # plain; a retweet or a quote; a retweet of a quote
    odd = {"id": 1, "retweeted_status": {"user": {"id": "5"}}, "quoted_status": [1]}
    assert embedded_authors(odd) == () and list(embedded_copies(odd)) == [
        {"user": {"id": "5"}}]


def test_hashtags_are_lower_cased_deduplicated_and_include_extended_entities() -> None:
    doc = build({"id": 5, "text": "x", "timestamp_ms": "1576724693818",
                 "entities": {"hashtags": [{"text": "Python"}]},
                 "extended_tweet": {"full_text": "x", "entities": {
                     "hashtags": [{"text": "PYTHON"}, {"text": "MongoDB"}]}}})
    assert doc["_ingest"]["hashtags"] == ["mongodb", "python"]
    assert build({"id": 6, "text": "x", "timestamp_ms": "1576724693818",
                  "entities": {"hashtags": "junk"}})[
        "_ingest"]["hashtags"] == []


def test_timestamp_ms_wins_and_is_exact() -> None:
    doc = build({"id": 1207497000637231109, "text": "x", "timestamp_ms": "1576724693818",
                 "created_at": "Thu Dec 19 03:04:53 +0000 2019"})
    assert doc["created_at"] == datetime(2019, 12, 19, 3, 4, 53, 818000, tzinfo=UTC)


def test_snowflake_used_without_timestamp_ms() -> None:
    doc = build({"id": 1207497000637231109, "text": "x", "created_at": "garbage"})
    assert doc["created_at"] == datetime(2019, 12, 19, 3, 4, 53, 818000, tzinfo=UTC)


@pytest.mark.parametrize("millis", [MAX_DATE_MS + 1, MIN_DATE_MS - 1, str(MAX_DATE_MS + 1),
                                    "9" * 15])
def test_a_timestamp_no_datetime_can_hold_falls_back_to_the_string(millis: int | str) -> None:
    # an analyst's default client could not read such a date back
    doc = build({"id": 145344012, "text": "x", "timestamp_ms": millis,
                 "created_at": "Wed Oct 10 20:19:24 +0000 2007"})
    assert doc["created_at"] == datetime(2007, 10, 10, 20, 19, 24, tzinfo=UTC)


def test_the_date_bounds_are_the_first_and_last_millisecond_a_datetime_holds() -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert epoch + timedelta(milliseconds=MIN_DATE_MS) == datetime.min.replace(tzinfo=UTC)
    last = datetime.max.replace(microsecond=999000, tzinfo=UTC)
    assert epoch + timedelta(milliseconds=MAX_DATE_MS) == last
    doc = build({"id": 145344012, "text": "x", "timestamp_ms": str(MAX_DATE_MS)})
    assert doc["created_at"] == last
    doc = build({"id": 145344012, "text": "x", "timestamp_ms": MIN_DATE_MS})
    assert doc["created_at"] == datetime.min.replace(tzinfo=UTC)


def test_pre_snowflake_id_parses_the_string() -> None:
    doc = build({"id": 145344012, "text": "x", "created_at": "Wed Oct 10 20:19:24 +0000 2007"})
    assert doc["created_at"] == datetime(2007, 10, 10, 20, 19, 24, tzinfo=UTC)
    assert SNOWFLAKE_MIN_ID > 145344012


def test_time_parse_ignores_locale_and_converts_offsets() -> None:
    assert parse_twitter_time("Wed Oct 10 20:19:24 -0200 2018") == datetime(
        2018, 10, 10, 22, 19, 24, tzinfo=UTC)


@pytest.mark.parametrize("value", [None, 5, "yesterday", "Wed Oct 10 20:19:24 2018"])
def test_unparseable_created_at_without_other_source_is_invalid(value: object) -> None:
    with pytest.raises(InvalidTweet):
        build({"id": 145344012, "text": "x", "created_at": value})


@pytest.mark.parametrize("tweet_id", [
    {"$numberLong": "661275583813431296"}, -1, 0, 2**63, "12a", "", 1.5e18, True, "٣",
])
def test_bad_ids_are_invalid(tweet_id: object) -> None:
    with pytest.raises(InvalidTweet) as err:
        build({"id": tweet_id, "text": "x", "timestamp_ms": "1576724693818"})
    assert "id" in err.value.reason


def test_digit_string_id_and_id_str_fallback() -> None:
    assert build({"id": "1207497000637231109", "text": "x"})["_id"] == 1207497000637231109
    assert build({"id_str": "1207497000637231109", "text": "x"})["_id"] == 1207497000637231109


def test_mongo_export_rows_in_the_real_file_are_invalid() -> None:
    exported = [t for t in REAL_TWEETS if type(t["id"]) is not int]
    assert exported
    for raw in exported:
        with pytest.raises(InvalidTweet):
            build(raw)


@pytest.mark.parametrize("key", ["$where", "a.b", "nul\x00", "$"])
def test_unstorable_top_level_keys_are_invalid(key: str) -> None:
    with pytest.raises(InvalidTweet) as err:
        build({"id": 1207497000637231109, "text": "x", key: 1})
    assert "key" in err.value.reason


def test_dollar_or_dot_inside_a_key_is_fine() -> None:
    doc = build({"id": 1207497000637231109, "text": "x", "price$": 1, "nested": {"a.b": 1}})
    assert doc["price$"] == 1


# "id" is left out: an extra "id" of 0 replaces the tweet's id and is refused as an id, not a key
@given(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "id"), st.integers(), max_size=6))
def test_key_check_agrees_with_a_plain_scan(extra: dict[str, int]) -> None:
    tweet: dict[str, Any] = {"id": 1207497000637231109, "text": "x", **extra}
    bad = any(k.startswith("$") or "." in k or "\x00" in k for k in tweet)
    try:
        document(tweet)  # the key check alone: an int beyond int64 is the encoder's to refuse
    except InvalidTweet:
        assert bad
    else:
        assert not bad
