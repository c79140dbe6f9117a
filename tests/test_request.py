"""ingestd/source/request.py: request parameters and the reload filter comparison."""

from __future__ import annotations

from ingestd.config.schema import BackoffSettings, StreamSettings
from ingestd.source.request import filter_diff, filter_key, post_params, v2_query_params

URL = "https://stream.twitter.com/1.1/statuses/filter.json"
SF = (-122.75, 36.8, -121.75, 37.8)


def test_post_params_order_and_formatting() -> None:
    stream = StreamSettings(
        url=URL, track=("twitter api", "#python"), follow=(12, 13),
        locations=(SF, (-74.0, 40.0, -73.0, 41.0), (1e-05, 0.0, 1.0, 1.0)),
        language=("en", "fr"), filter_level="low", delimited=True,
    )
    assert post_params(stream) == [
        ("track", "twitter api,#python"),
        ("follow", "12,13"),
        ("locations", "-122.75,36.8,-121.75,37.8,-74,40,-73,41,0.00001,0,1,1"),
        ("language", "en,fr"),
        ("filter_level", "low"),
        ("delimited", "length"),
        ("stall_warnings", "true"),
    ]


def test_post_params_omit_empty_ones() -> None:
    assert post_params(StreamSettings(url=URL, follow=(7,))) == [
        ("follow", "7"), ("stall_warnings", "true")]


def test_v2_query_params_send_backfill_only_when_asked_and_set() -> None:
    stream = StreamSettings(url=URL, api="v2", tweet_fields=("author_id", "lang"),
                            expansions=("author_id",), backfill_minutes=3)
    assert v2_query_params(stream) == [("tweet.fields", "author_id,lang"),
                                       ("expansions", "author_id")]
    assert v2_query_params(stream, backfill=True)[-1] == ("backfill_minutes", "3")
    no_backfill = StreamSettings(url=URL, api="v2", tweet_fields=("lang",))
    assert v2_query_params(no_backfill, backfill=True) == [("tweet.fields", "lang")]


def test_filter_key_changes_only_for_connection_relevant_keys() -> None:
    a = StreamSettings(url=URL, track=("iphone", "ipad"))
    b = StreamSettings(url=URL, track=("iphone", "ipad"), read_timeout=30,
                       backoff=BackoffSettings(jitter=0.5), backfill_minutes=2)
    c = StreamSettings(url=URL, track=("iphone", "ipad", "ipod"))
    d = StreamSettings(url=URL, track=("iphone", "ipad"), gzip=False)
    assert filter_key(a) == filter_key(b)
    assert len({filter_key(a), filter_key(c), filter_key(d)}) == 3


def test_filter_diff_compares_as_sets() -> None:
    old = StreamSettings(url="https://h/x", track=("a", "b"), follow=(1, 2),
                         locations=((0.0, 0.0, 1.0, 1.0),))
    new = StreamSettings(url="https://h/x", track=("b", "c", "a"), follow=(2,),
                         locations=((0.0, 0.0, 1.0, 1.0), (2.0, 2.0, 3.0, 3.0)))
    assert filter_diff(old, new) == {
        "track": {"added": ["c"], "removed": []},
        "follow": {"added": [], "removed": [1]},
        "locations": {"added": [(2.0, 2.0, 3.0, 3.0)], "removed": []},
    }
    assert filter_diff(new, new) == {k: {"added": [], "removed": []}
                                     for k in ("track", "follow", "locations")}
