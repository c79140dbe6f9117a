"""Track/follow/locations rules of docs/protocol.md §1.3–§1.5, with every documented example."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.documents.match_tokens import term_keys, tweet_tokens, word_tokens
from ingestd.documents.matching import Matched, Matcher

DATA = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"


def tweet(text: str = "", **fields: Any) -> dict[str, Any]:
    entities = {
        "hashtags": fields.pop("hashtags", []),
        "user_mentions": fields.pop("mentions", []),
        "urls": fields.pop("urls", []),
        "symbols": [],
    }
    base: dict[str, Any] = {
        "id": 1,
        "text": text,
        "user": {"id": fields.pop("author", 99), "screen_name": "someone"},
        "entities": entities,
    }
    base.update(fields)
    return base


def url(expanded: str, display: str | None = None) -> dict[str, Any]:
    return {
        "url": "https://t.co/abc",
        "expanded_url": expanded,
        "display_url": display or expanded.split("://", 1)[-1],
    }


def tracks(phrases: str, t: dict[str, Any]) -> list[str]:
    return Matcher(phrases.split(","), [], []).match(t).track


# --- §1.3 documented examples ----------------------------------------------------------------

TWITTER_MATCHES = [
    tweet("TWITTER"),
    tweet("twitter"),
    tweet('"Twitter"'),
    tweet("twitter."),
    tweet("#twitter", hashtags=[{"text": "twitter", "indices": [0, 8]}]),
    tweet("#twitter"),  # hashtag only in the text, no entity
    tweet("@twitter", mentions=[{"screen_name": "twitter", "id": 783214, "indices": [0, 8]}]),
    tweet("see https://t.co/abc", urls=[url("http://twitter.com")]),
    tweet("http://twitter.com"),
]


@pytest.mark.parametrize("t", TWITTER_MATCHES, ids=[t["text"] for t in TWITTER_MATCHES])
def test_twitter_will_match(t: dict[str, Any]) -> None:
    assert tracks("Twitter", t) == ["Twitter"]


@pytest.mark.parametrize(
    "t",
    [
        tweet("TwitterTracker"),
        tweet("#newtwitter", hashtags=[{"text": "newtwitter", "indices": [0, 11]}]),
    ],
)
def test_twitter_will_not_match(t: dict[str, Any]) -> None:
    assert tracks("Twitter", t) == []


def test_term_with_punctuation_matches_words_but_never_mentions() -> None:
    assert tracks("Twitter’s", tweet("I like Twitter’s new design")) == ["Twitter’s"]
    mention = {"screen_name": "Twitter", "id": 783214, "indices": [6, 14]}
    assert tracks("Twitter’s", tweet("…visit @Twitter’s office", mentions=[mention])) == []


def test_comma_is_or_space_is_and() -> None:
    phrases = "twitter api,twitter streaming"
    assert tracks(phrases, tweet("The Twitter API is awesome")) == ["twitter api"]
    assert tracks(phrases, tweet("The twitter streaming service is fast")) == ["twitter streaming"]
    assert tracks(phrases, tweet("I’m new to Twitter")) == []


def test_domain_term_matches_only_the_whole_url() -> None:
    assert tracks("example.com", tweet("…visit example.com")) == ["example.com"]
    assert tracks("example.com", tweet("example.com/foobarbaz")) == []
    assert tracks("example.com", tweet("x", urls=[url("https://example.com/foobarbaz")])) == []


@pytest.mark.parametrize(
    "t",
    [
        tweet("example.com/foobarbaz"),
        tweet("www.example.com/foobarbaz"),
        tweet("see https://t.co/abc", urls=[url("https://www.example.com/foobarbaz")]),
    ],
)
def test_url_term_matches_with_www_canonicalised(t: dict[str, Any]) -> None:
    assert tracks("example.com/foobarbaz", t) == ["example.com/foobarbaz"]
    assert tracks("www.example.com/foobarbaz", t) == []


@pytest.mark.parametrize(
    "t",
    [
        tweet("x", urls=[url("http://example.com")]),
        tweet("x", urls=[url("https://www.example.com")]),
        tweet("x", urls=[url("https://foo.example.com")]),
        tweet("x", urls=[url("https://foo.example.com/bar")]),
        tweet("foo.example.com/bar"),
        tweet("another example of a dot com boom"),
    ],
)
def test_two_terms_match_any_subdomain_or_path(t: dict[str, Any]) -> None:
    assert tracks("example com", t) == ["example com"]


def test_unicode_matches_exactly() -> None:
    assert tracks("touché", tweet("Touché!")) == ["touché"]
    assert tracks("touche", tweet("Touché!")) == []


def test_hashtag_term_matches_only_that_hashtag() -> None:
    tagged = tweet("love #python", hashtags=[{"text": "Python", "indices": [5, 12]}])
    assert tracks("#python", tagged) == ["#python"]
    assert tracks("#python", tweet("love python")) == []


def test_full_text_of_a_truncated_tweet_is_used() -> None:
    t = tweet("short cut… https://t.co/x", extended_tweet={"full_text": "short cut and the ending"})
    assert tracks("ending", t) == ["ending"]
    # the wrapper's i/web link must not make every truncated tweet match "twitter"
    t["entities"]["urls"] = [url("https://twitter.com/i/web/status/1")]
    assert tracks("twitter", t) == []


def test_retweet_matches_on_its_original_and_quote_on_either() -> None:
    original = tweet("hello streaming world", id=5)
    assert tracks("streaming", tweet("RT @x: hello…", retweeted_status=original)) == ["streaming"]
    quote = tweet("my comment", quoted_status=original)
    assert tracks("streaming", quote) == ["streaming"]
    assert tracks("comment", quote) == ["comment"]
    assert tracks("nothing", quote) == []


def test_phrases_are_reported_as_configured_in_order() -> None:
    m = Matcher(["Zeta", "alpha beta", "GAMMA"], [], [])
    result = m.match(tweet("gamma, beta and ALPHA and zeta"))
    assert result.track == ["Zeta", "alpha beta", "GAMMA"]
    assert bool(result)
    assert not m.match(tweet("alpha only"))


# --- §1.4 follow ------------------------------------------------------------------------------


def follows(t: dict[str, Any], ids: tuple[int, ...] = (42,)) -> list[int]:
    return Matcher([], list(ids), []).match(t).follow


def test_follow_author_and_retweets_by_the_user() -> None:
    assert follows(tweet("hi", author=42)) == [42]
    assert follows(tweet("RT", author=42, retweeted_status=tweet("orig", author=7))) == [42]


def test_follow_retweets_of_and_replies_to_the_user() -> None:
    assert follows(tweet("RT", author=7, retweeted_status=tweet("orig", author=42))) == [42]
    assert follows(tweet("@bob yes", author=7, in_reply_to_user_id=42)) == [42]


def test_follow_manual_reply_but_not_a_mere_mention() -> None:
    mention = {"screen_name": "bob", "id": 42}
    manual = tweet("@bob agreed", author=7, mentions=[{**mention, "indices": [0, 4]}])
    assert follows(manual) == [42]
    assert follows(tweet("Hello @bob!", author=7, mentions=[{**mention, "indices": [6, 10]}])) == []


def test_follow_reports_ids_in_configured_order() -> None:
    t = tweet("RT", author=42, retweeted_status=tweet("orig", author=7))
    assert follows(t, (7, 42)) == [7, 42]


# --- §1.5 locations ---------------------------------------------------------------------------

SF = (-122.75, 36.8, -121.75, 37.8)
NY = (-74.0, 40.0, -73.0, 41.0)


def point(lon: float, lat: float) -> dict[str, Any]:
    return {"type": "Point", "coordinates": [lon, lat]}


def place(w: float, s: float, e: float, n: float) -> dict[str, Any]:
    ring = [[w, s], [e, s], [e, n], [w, n]]
    return {"full_name": "X", "bounding_box": {"type": "Polygon", "coordinates": [ring]}}


def boxes(t: dict[str, Any]) -> list[int]:
    return Matcher([], [], [SF, NY]).match(t).locations


def test_locations_point_in_box() -> None:
    assert boxes(tweet(coordinates=point(-122.4, 37.7))) == [0]
    assert boxes(tweet(coordinates=point(-73.5, 40.5))) == [1]
    assert boxes(tweet(coordinates=point(0.0, 0.0))) == []


def test_locations_point_wins_over_place() -> None:
    t = tweet(coordinates=point(0.0, 0.0), place=place(-123, 37, -122, 38))
    assert boxes(t) == []


def test_locations_place_box_intersects() -> None:
    assert boxes(tweet(place=place(-123.0, 37.5, -122.5, 38.5))) == [0]  # overlaps SF's corner
    assert boxes(tweet(place=place(10.0, 10.0, 11.0, 11.0))) == []


def test_locations_place_box_is_the_extent_of_its_valid_points() -> None:
    """The box spans every valid pair in any order; malformed pairs are skipped."""
    def ring_place(ring: list[Any]) -> dict[str, Any]:
        return {"bounding_box": {"type": "Polygon", "coordinates": [ring]}}

    # only the extent of all four points reaches SF (west -123..-121.9, south 36..37.0)
    corners = [[-121.9, 37.0], [-123.0, 36.0], [-124.0, 35.0], [-122.5, 36.5]]
    assert boxes(tweet(place=ring_place(corners))) == [0]
    assert boxes(tweet(place=ring_place(corners[1:3]))) == []  # the west-south part alone
    east_last = [[-130.0, 36.0], [-125.0, 36.5], [-121.0, 37.0]]  # east and north rise last
    assert boxes(tweet(place=ring_place(east_last))) == [0]
    junk = [[True, 1.0], ["-122", "37"], [1.0], None, [-122.5, 37.5]]
    assert boxes(tweet(place=ring_place(junk))) == [0]
    assert boxes(tweet(place=ring_place([[True, 1.0], [None, 2.0]]))) == []


def test_locations_ignore_geo_and_native_retweets() -> None:
    assert boxes(tweet(geo={"type": "Point", "coordinates": [37.7, -122.4]})) == []
    original = tweet("o", coordinates=point(-122.4, 37.7))
    assert boxes(original) == [0]
    assert boxes(tweet("RT", coordinates=point(-122.4, 37.7), retweeted_status=original)) == []


def test_predicates_combine_by_or() -> None:
    m = Matcher(["python"], [42], [SF])
    t = tweet("python rocks", author=42, coordinates=point(-122.4, 37.7))
    assert m.match(t) == Matched(track=["python"], follow=[42], locations=[0])
    assert bool(m.match(tweet("", author=42)))


# --- robustness and properties ---------------------------------------------------------------


def test_bad_configuration_is_refused_with_the_index() -> None:
    with pytest.raises(ValueError, match=r"track\[1\]"):
        Matcher(["ok", "  "], [], [])
    with pytest.raises(ValueError, match=r"locations\[0\]"):
        Matcher([], [], [(1.0, 2.0, 3.0)])  # type: ignore[list-item]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            ["text", "entities", "hashtags", "urls", "user", "id", "coordinates", "place",
             "bounding_box", "retweeted_status", "quoted_status", "extended_tweet", "full_text",
             "user_mentions", "expanded_url", "screen_name", "in_reply_to_user_id", "indices"]
        ),
        children,
        max_size=5,
    ),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_never_crashes(value: Any) -> None:
    m = Matcher(["a b", "#x", "example.com"], [1, 2], [(-10.0, -10.0, 10.0, 10.0)])
    result = m.match(value if isinstance(value, dict) else {"text": value, "entities": value})
    assert isinstance(result, Matched)


word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzéü0123456789", min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    terms=st.lists(word, min_size=1, max_size=4, unique=True),
    filler=st.lists(word, max_size=6),
    data=st.data(),
)
def test_text_with_all_terms_in_any_order_and_case_matches(
    terms: list[str], filler: list[str], data: st.DataObject
) -> None:
    phrase = " ".join(terms)
    pieces = [
        data.draw(st.sampled_from(["", "(", '"']))
        + term
        + data.draw(st.sampled_from(["", ",", "!"]))
        for term in data.draw(st.permutations(terms))
    ]
    pieces = [p.upper() if data.draw(st.booleans()) else p for p in pieces]
    text = " ".join(data.draw(st.permutations(pieces + filler)))
    assert Matcher([phrase], [], []).match(tweet(text)).track == [phrase]
    missing = terms[0] + "zz"
    assert Matcher([f"{phrase} {missing}"], [], []).match(tweet(text)).track == [] or (
        missing in [f.lower() for f in filler]
    )


def test_real_tweets_match_their_own_words() -> None:
    """On real payloads: a tweet's author always matches follow, and a hashtag it carries."""
    for line in DATA.read_text(encoding="utf-8").splitlines()[:200]:
        t = json.loads(line)
        if "retweeted_status" in t:
            continue
        assert Matcher([], [t["user"]["id"]], []).match(t).follow == [t["user"]["id"]]
        tags = (t.get("extended_tweet") or t)["entities"]["hashtags"]
        if tags:
            assert Matcher([tags[0]["text"]], [], []).match(t)


# --- the fast track matcher against its token model (one automaton pass over the text) -------


def model_tracks(phrases: list[str], t: dict[str, Any]) -> list[str]:
    """The phrases the token model (match_tokens.tweet_tokens, the spec) says ``t`` matches."""
    tokens = tweet_tokens(t)
    return [p for p in phrases
            if all(any(k in tokens for k in term_keys(term)) for term in p.lower().split())]


def test_needles_that_overlap_or_prefix_each_other() -> None:
    phrases = ["api", "apis", "pi", "rapid api", "twit", "twitter"]
    cases = {
        "apis": ["apis"],
        "rapid api": ["api", "rapid api"],
        "capital rapids": [],  # needles inside longer words never count
        "api_x pi_": [],  # "_" is a word character
        "x:api,pi!": [],  # one word "x:api,pi", not the terms
        "#apis @PI": ["apis", "pi"],
        "twitter twit": ["twit", "twitter"],
        "api": ["api"],  # needle is the whole text: both ends at the text's edges
        "pi api": ["api", "pi"],
    }
    for text, want in cases.items():
        got = Matcher(phrases, [], []).match(tweet(text)).track
        assert got == want == model_tracks(phrases, tweet(text)), text


def test_lower_case_that_changes_length_keeps_positions() -> None:
    # "İ".lower() is two characters (i + combining dot): positions are in the lower-cased text
    assert tracks("api", tweet("İİ api")) == ["api"]
    assert tracks("api", tweet("İİİ rapid")) == []
    assert tracks("İstanbul", tweet("İSTANBUL!")) == ["İstanbul"]
    assert tracks("istanbul", tweet("İstanbul")) == []  # the dot stays: "i̇stanbul"
    assert tracks("東京", tweet("今日は東京で")) == []  # one word, not the term
    assert tracks("東京", tweet("今日は #東京 で")) == ["東京"]


def test_terms_without_word_characters_are_found_as_substrings() -> None:
    # a host part of "-" is a token of its own; "-.-" is one only as a canonical entity URL
    phrases = ["-", "-.-", "…"]
    for text in ["a.-.b", "see a.-.b-", "a-.-b", "… x", "http://-.-"]:
        got = Matcher(phrases, [], []).match(tweet(text)).track
        assert got == model_tracks(phrases, tweet(text)), text
    assert tracks("-", tweet("see a.-.b now")) == ["-"]
    assert tracks("-", tweet("a-.-b")) == []
    assert tracks("-.-", tweet("x", urls=[url("http://-.-")])) == ["-.-"]


track_words = st.sampled_from(
    ["api", "apis", "pi", "rapid", "twitter", "twit", "#api", "@pi", "example.com", "co",
     "İstanbul", "straße", "東京", "-.-", "a_b", "x"]
)
text_pieces = st.sampled_from(
    ["api", "APIs", "pi", "rapid", "Twitter", "twit", "#api", "@PI", "example.com",
     "http://www.example.com/x", "co.uk", "İSTANBUL", "STRASSE", "straße", "東京", "-.-",
     "a_b", "x", "_", "#", "@", ".", ",", "!", "'", "…", "İ", "é", " ", " ", "\u00a0", "\n"]
)


@settings(max_examples=300, deadline=None)
@given(phrases=st.lists(st.lists(track_words, min_size=1, max_size=2).map(" ".join),
                        min_size=1, max_size=6),
       pieces=st.lists(text_pieces, max_size=14))
def test_text_matching_equals_the_token_model(phrases: list[str], pieces: list[str]) -> None:
    t = tweet("".join(pieces))
    assert Matcher(phrases, [], []).match(t).track == model_tracks(phrases, t)


def test_long_track_lists_equal_the_token_model_on_real_tweets() -> None:
    """400 phrases (the v1.1 limit) drawn from the sample's own tokens: many hits."""
    real = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:300]]
    pool = sorted({tok for t in real for tok in tweet_tokens(t)})
    phrases = [pool[(i * 7919) % len(pool)] for i in range(400)]
    m = Matcher(phrases, [], [])
    hits = 0
    for t in real:
        got = m.match(t).track
        assert got == model_tracks(phrases, t)
        hits += bool(got)
    assert hits > 100  # the comparison is not vacuous


def test_one_key_reports_every_phrase_it_completes_and_a_fresh_list() -> None:
    m = Matcher(["Api", "rapid api", "api", "x"], [], [])
    first = m.match(tweet("an API"))
    assert first.track == ["Api", "api"]
    first.track.append("changed by the caller")
    assert m.match(tweet("api!")).track == ["Api", "api"]
    assert m.match(tweet("#api")).track == ["Api", "api"]


# ---------------------------------------------------------------- caches across generations


def distinct_tweets(count: int) -> list[dict[str, Any]]:
    """Real tweets, each given its own URL and its own word with a needle (as a stream's are),
    so that each one adds entries to a matcher's caches."""
    real = [t for t in map(json.loads, DATA.read_text().splitlines()) if type(t["id"]) is int]
    out = []
    for i in range(count):
        t = {k: v for k, v in real[i % len(real)].items()
             if k not in ("retweeted_status", "quoted_status", "extended_tweet")}
        out.append(dict(t, text=f"{t['text']} covid-{i}",
                        entities={"urls": [url(f"https://example.com/covid/{i}")]}))
    return out


def cache_entries(matcher: Matcher) -> int:
    track = matcher._track
    assert track is not None
    return len(track._url_hits) + len(track._word_hits)


def test_a_superseded_generations_caches_are_emptied_kept_small_and_it_matches_as_before(
        tmp_path: Path) -> None:
    """The store worker keeps 17 generations' matchers; their caches hold up to ~4.5 MB each. Only
    the newest one's may grow to full size: an older one, read only by a backlog, starts again
    empty and stays within RETIRED_CACHE_SIZE per cache, and matches exactly as before."""
    from ingestd.documents.match_track import RETIRED_CACHE_SIZE
    from ingestd.sink.encoder_split import Matchers
    from ingestd.spool.generations import GenerationRecord
    from tests.test_writer import make_settings

    tracks = {1: ("covid", "example", "beatles"), 2: ("example",), 3: ("nothing here",)}
    settings = {g: make_settings("mongodb://127.0.0.1:1", "db", track=track)
                for g, track in tracks.items()}
    record = GenerationRecord(tmp_path)
    record.record(1, (list(tracks[1]), [], []))
    matchers = Matchers(1, settings[1], record)
    tweets = distinct_tweets(3 * RETIRED_CACHE_SIZE)
    reference = Matcher(tracks[1])
    first = matchers.get(1)
    for t in tweets[:RETIRED_CACHE_SIZE]:
        first.match(t)
    assert cache_entries(first) > 2 * RETIRED_CACHE_SIZE * 0.9  # the newest's: full size
    matchers.add(2, settings[2])  # a reload: generation 1 is superseded
    assert matchers.get(1) is first and cache_entries(first) == 0
    backlog = tweets[RETIRED_CACHE_SIZE:]
    for t in backlog:  # its backlog, read after the reload
        assert first.match(t) == reference.match(t)
        assert cache_entries(first) <= 2 * RETIRED_CACHE_SIZE
    assert sum(bool(first.match(t).track) for t in backlog) == len(backlog)
    newest = matchers.get(2)
    for t in backlog:
        newest.match(t)
    assert cache_entries(newest) > 2 * RETIRED_CACHE_SIZE  # still full size
    matchers.add(3, settings[3])
    assert cache_entries(newest) == 0
    # An older generation resolved from the record (a backlog replayed after a restart) is small
    # from the start.
    record.record(2, (list(tracks[2]), [], []))
    record.record(3, (list(tracks[3]), [], []))
    replayed = Matchers(3, settings[3], record).get(1)
    for t in backlog:
        assert replayed.match(t) == reference.match(t)
    assert 0 < cache_entries(replayed) <= 2 * RETIRED_CACHE_SIZE


def test_a_long_run_of_symbols_in_a_word_is_tokenised_in_linear_time() -> None:
    # A regex's trailing \\W+$ took time quadratic in the run: 20 s for 60,000 symbols, and the
    # store worker was restarted as hung, again and again (simulator bad line "slow_word").
    word = "iphone" + "\u2603" * 30000 + "_"
    started = time.monotonic()
    assert word_tokens(word) == (word,)
    assert word_tokens("\u2603" * 30000 + "#x" + "\u2603" * 30000 + ".") == ("x",)
    assert time.monotonic() - started < 1.0


def test_only_the_space_is_printable_whitespace() -> None:
    """TrackMatcher looks for a printable text's words in the text as it is (``words_containing``
    splits at " " only), which holds while " " is the one printable whitespace character."""
    assert [c for c in map(chr, range(sys.maxunicode + 1))
            if c.isspace() and c.isprintable()] == [" "]


@pytest.mark.parametrize("text", ["a\u00a0twitter, b", "x\ntwitter\n", "tw\u3000twitter!",
                                  "  twitter  ", "twitter\u2028x", "no twitterx here"])
def test_words_found_whatever_the_whitespace(text: str) -> None:
    assert tracks("twitter", tweet(text)) == ([] if "twitterx" in text else ["twitter"])
