"""Lone UTF-16 surrogate escapes become U+FFFD, so the message parses (documents/surrogates)."""

from __future__ import annotations

import json
import random

import orjson
import pytest

from ingestd.documents.surrogates import loads, without_lone_surrogates
from ingestd.simulator.session import with_lone_surrogate

PAIR = "\\ud83d\\ude00"  # 😀 as JSON writes it


@pytest.mark.parametrize(("escaped", "expected"), [
    ("a\\ud83d b", "a\ufffd b"),  # high half alone
    ("a\\ude00 b", "a\ufffd b"),  # low half alone
    (f"x{PAIR}y", "x\U0001f600y"),  # a pair is kept
    (f"\\ud83d{PAIR}", "\ufffd\U0001f600"),  # a high half, then a whole pair
    (f"{PAIR}\\ude00", "\U0001f600\ufffd"),  # a whole pair, then a low half
    ("\\uD83D\\uDE00 \\uDBFF", "\U0001f600 \ufffd"),  # upper-case hex
    ("end\\ud83d", "end\ufffd"),  # at the end of the string
    ("\\\\ud83d", "\\ud83d"),  # an escaped backslash and the text ud83d: no escape at all
    ("\\\\\\ud83d", "\\\ufffd"),  # an escaped backslash, then a real lone escape
    ("\\u00e9\\n\\\"", 'é\n"'),  # other escapes untouched
])
def test_each_lone_half_becomes_the_replacement_character(escaped: str, expected: str) -> None:
    payload = b'{"text":"' + escaped.encode() + b'"}'
    obj, repaired = loads(payload)
    assert obj == {"text": expected}
    assert repaired is ("\ufffd" in expected)


def test_valid_json_is_parsed_by_orjson_alone() -> None:
    assert without_lone_surrogates(b'{"a":"\\u00e9"}') is None
    assert loads(memoryview(b'{"a":"\\u00e9"}')) == ({"a": "é"}, False)


def test_text_that_is_not_json_either_way_raises_orjsons_first_complaint() -> None:
    bad = b'{"text":"\\ud83d", "cut'
    with pytest.raises(orjson.JSONDecodeError) as caught:
        loads(bad)
    assert "surrogate" in str(caught.value)  # the first error, not the retry's
    with pytest.raises(orjson.JSONDecodeError):
        loads(b'{"text": "no escapes", "cut')


def test_agrees_with_the_standard_library_on_random_escapes() -> None:
    """``json`` keeps lone halves as str code points; replacing those with U+FFFD must give what
    the repaired text parses to."""
    rng = random.Random(15)
    pieces = ["a", "é", "\\\\", "\\\\u", "\\n", "\\u0041", "\\ud83d", "\\ude00", PAIR, "\\uDBFF",
              "\\\\ud83d", "\\\\\\ude00", " "]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
        payload = b'{"k":"' + text.encode() + b'"}'
        expected = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c
                           for c in json.loads(payload)["k"])
        assert loads(payload)[0] == {"k": expected}, text


def test_the_simulators_step_puts_a_lone_half_first_in_the_text() -> None:
    tweet = orjson.dumps({"id": 1, "text": "hello", "user": {"name": "x"}})
    payload = with_lone_surrogate(tweet)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(payload)
    assert json.loads(payload)["text"] == "\ud83dhello"
    assert loads(payload)[0]["text"] == "\ufffdhello"
