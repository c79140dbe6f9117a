"""X API v2 rules: the simulator's rule language, and ingestd's rules sync against the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd.config.errors import Secret
from ingestd.config.schema import AuthSettings, Rule, StreamSettings
from ingestd.simulator.v2_rules import RuleSyntaxError, TweetView, matches, parse_rule
from ingestd.source.v2_rules import diff_rules, sync_rules
from ingestd.source.v2_rules_client import RulesClient, RulesError, ServerRule
from tests.support.simulator import SimProcess

TOKEN = "AAAAAAAAAAAAAAAAAAAAAtest-bearer-token-for-ingestd"


# ---------------------------------------------------------------- the rule language (simulator)


def view(text: str, **fields: object) -> TweetView:
    data = {"id": "1", "text": text, "author_id": "42", "lang": "en", **fields}
    return TweetView.of(data, {"42": "Alice"})


@pytest.mark.parametrize(("rule", "text", "expected"), [
    ("cat", "My CAT sleeps", True),
    ("cat", "concatenate", False),
    ("coca-cola", "coca cola please", True),  # keywords are tokenised on punctuation
    ('"happy cat"', "a happy cat", True),
    ('"happy cat"', "a cat happy", False),
    ("cat OR dog", "dogs and a dog", True),
    ("apple OR iphone ipad", "apple pie", True),  # AND binds tighter than OR
    ("apple OR iphone ipad", "iphone only", False),
    ("cat -dog", "cat and dog", False),
    ("cat -dog", "cat alone", True),
    ("(cat OR dog) lang:en", "a cat", True),
    ("café", "cafe", False),  # accents are strict
    ("from:alice cat", "cat", True),
    ("from:bob cat", "cat", False),
])
def test_rule_matching(rule: str, text: str, expected: bool) -> None:
    assert matches(parse_rule(rule), view(text)) is expected


def test_operators_on_entities_and_fields() -> None:
    tweet = view("#Python and @bob", entities={"hashtags": [{"tag": "Python"}],
                                                 "mentions": [{"username": "bob"}]},
                 geo={"place_id": "x"}, referenced_tweets=[{"type": "retweeted", "id": "2"}])
    for rule in ("#python", "@bob", "#python has:geo", "@bob is:retweet", "#python lang:en"):
        assert matches(parse_rule(rule), tweet), rule
    assert not matches(parse_rule("#python lang:fr"), tweet)
    assert not matches(parse_rule("#python -is:retweet"), tweet)


@pytest.mark.parametrize(("rule", "reason"), [
    ("frm:bob", "invalid operator 'frm'"),
    ("lang:en", "at least one positive term"),
    ("-cat", "at least one positive term"),
    ("cat OR", "dangling OR"),
    ("(cat dog", "missing ')'"),
    ("cat)", "unexpected ')'"),
    ("-(cat dog)", "Negating a group"),
    ('"open phrase', "Unbalanced quotes"),
    ("has:everything cat", "invalid field"),
    ("x" * 513, "maximum is 512"),
])
def test_invalid_rules_are_refused_with_a_reason(rule: str, reason: str) -> None:
    with pytest.raises(RuleSyntaxError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_rule(rule)


# ---------------------------------------------------------------- the diff (client)


def test_diff_adds_deletes_and_keeps_by_value_and_tag() -> None:
    current = [ServerRule("1", "cat", "pets"), ServerRule("2", "dog", None),
               ServerRule("3", "rain", "weather")]
    desired = [Rule("cat", "pets"), Rule("dog", "animals"), Rule("snow", None)]
    diff = diff_rules(current, desired)
    assert diff.keep == (current[0],)
    assert diff.delete == (current[1], current[2])  # a new tag is delete + add
    assert diff.add == (Rule("dog", "animals"), Rule("snow", None))
    assert not diff_rules(current[:1], [Rule("cat", "pets")])


# ---------------------------------------------------------------- sync against the simulator


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimProcess]:
    proc = SimProcess(tmp_path / "sim", "--rate", "20", "--keepalive", "1", "--max-rules", "4",
                      env={"TWITTER_BEARER_TOKEN": TOKEN}).start()
    try:
        yield proc
    finally:
        proc.stop()


def client(sim: SimProcess, token: str = TOKEN) -> RulesClient:
    stream = StreamSettings(url=f"http://127.0.0.1:{sim.port}/2/tweets/search/stream", api="v2")
    blank = Secret("")
    return RulesClient(stream, AuthSettings(blank, blank, blank, blank, Secret(token)))


def server_rules(sim: SimProcess) -> set[tuple[str, str | None]]:
    return {r.key() for r in client(sim).current()}


def rule_events(sim: SimProcess) -> list[tuple[str, list[str]]]:
    return [(e["op"], sorted(r["value"] for r in e["rules"]))
            for e in sim.ground_truth().of("rules")]


def test_sync_adds_then_changes_nothing_when_unchanged(sim: SimProcess) -> None:
    desired = [Rule("coffee OR music", "drinks"), Rule("#python", "py")]
    first = sync_rules(client(sim), desired)
    assert [r.value for r in first.diff.add] == ["coffee OR music", "#python"]
    assert server_rules(sim) == {("coffee OR music", "drinks"), ("#python", "py")}
    again = sync_rules(client(sim), desired)
    assert not again.diff and len(again.in_force) == 2
    assert rule_events(sim) == [("add", ["#python", "coffee OR music"])]  # one change only


def test_sync_deletes_and_retags_only_what_changed(sim: SimProcess) -> None:
    sync_rules(client(sim), [Rule("coffee", "a"), Rule("rain", "b"), Rule("music", "c")])
    kept_id = {r.value: r.id for r in client(sim).current()}["coffee"]
    result = sync_rules(client(sim), [Rule("coffee", "a"), Rule("music", "renamed")])
    assert server_rules(sim) == {("coffee", "a"), ("music", "renamed")}
    assert {r.value: r.id for r in client(sim).current()}["coffee"] == kept_id  # untouched
    assert sorted(r.value for r in result.diff.delete) == ["music", "rain"]
    assert rule_events(sim)[1:] == [("delete", ["music", "rain"]), ("add", ["music"])]


@pytest.mark.parametrize(("bad", "message"), [
    (Rule("frm:bob coffee"), "UnprocessableEntity 'frm:bob coffee': Reference to invalid operator"),
    (Rule("lang:en"), "at least one positive term"),
])
def test_an_invalid_rule_leaves_the_previous_rules_in_force(
    sim: SimProcess, bad: Rule, message: str
) -> None:
    sync_rules(client(sim), [Rule("coffee", "a"), Rule("rain", "b")])
    before = server_rules(sim)
    with pytest.raises(RulesError) as info:
        sync_rules(client(sim), [Rule("coffee", "a"), Rule("snow", "c"), bad])
    assert any(message in m for m in info.value.messages), info.value.messages
    assert not info.value.transient
    assert server_rules(sim) == before
    assert [op for op, _ in rule_events(sim)] == ["add"]  # the dry run changed nothing


def test_too_many_rules_is_refused_and_nothing_changes(sim: SimProcess) -> None:
    sync_rules(client(sim), [Rule("coffee"), Rule("rain")])
    with pytest.raises(RulesError) as info:
        sync_rules(client(sim), [Rule(w) for w in ("coffee", "rain", "snow", "sun", "wind")])
    assert any("RulesCapExceeded" in m and "cap of 4" in m for m in info.value.messages)
    assert server_rules(sim) == {("coffee", None), ("rain", None)}


def test_swapping_rules_at_the_cap_works(sim: SimProcess) -> None:
    """The dry run counts rules about to be deleted; the sync deletes first, then adds."""
    full = [Rule(w) for w in ("coffee", "rain", "snow", "sun")]
    sync_rules(client(sim), full)
    sync_rules(client(sim), [*full[:3], Rule("wind")])
    assert server_rules(sim) == {("coffee", None), ("rain", None), ("snow", None), ("wind", None)}


def test_duplicate_rule_reported_by_the_server(sim: SimProcess) -> None:
    sync_rules(client(sim), [Rule("coffee", "a")])
    with pytest.raises(RulesError) as info:
        client(sim).add([Rule("coffee", "b")])
    assert info.value.messages == ["DuplicateRule 'coffee'"]


def test_a_bad_token_is_a_401_with_the_problem_text(sim: SimProcess) -> None:
    with pytest.raises(RulesError) as info:
        client(sim, token="wrong").current()
    assert info.value.messages == ["HTTP 401: Unauthorized"]  # title and detail alike: said once
    assert "wrong" not in str(info.value)
