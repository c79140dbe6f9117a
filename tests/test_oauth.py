"""oauth.py: Twitter's documented vector, and verification by oauthlib's server endpoint."""

from __future__ import annotations

import email.utils
import string
import urllib.parse
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oauthlib.oauth1 import RequestValidator, SignatureOnlyEndpoint  # type: ignore[import-untyped]
from oauthlib.oauth1.rfc5849.utils import parse_authorization_header  # type: ignore[import-untyped]

from ingestd.config.errors import Secret
from ingestd.config.schema import AuthSettings
from ingestd.source.oauth import FORM_CONTENT_TYPE, diagnose_401, encode_form, sign_request

# docs/protocol.md §5.1: Twitter's "Creating a signature" example.
AUTH = AuthSettings(
    consumer_key=Secret("xvz1evFS4wEEPTGEFPHBog"),
    consumer_secret=Secret("kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw"),
    access_token=Secret("370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb"),
    access_token_secret=Secret("LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE"),
)
NONCE, TIMESTAMP = "kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg", "1318622958"
STATUS = [("status", "Hello Ladies + Gentlemen, a signed OAuth request!")]
URL = "http://127.0.0.1:8080/1.1/statuses/filter.json"


def oauth_params(headers: dict[str, str]) -> dict[str, str]:
    pairs = parse_authorization_header(headers["Authorization"])
    return {k: urllib.parse.unquote(v) for k, v in pairs}


@pytest.mark.parametrize(("url", "signature"), [
    ("https://api.twitter.com/1.1/statuses/update.json?include_entities=true",
     "hCtSmYh+iHYCEqBWrE7C7hYmtUk="),
    ("https://api.twitter.com/1/statuses/update.json?include_entities=true",
     "tnnArxj06cWHq44gCs1OSKk/jLY="),
])
def test_twitter_documented_vector(url: str, signature: str) -> None:
    headers = sign_request(url, encode_form(STATUS), AUTH, nonce=NONCE, timestamp=TIMESTAMP)
    params = oauth_params(headers)
    assert params["oauth_signature"] == signature
    assert params["oauth_consumer_key"] == AUTH.consumer_key.reveal()
    assert params["oauth_token"] == AUTH.access_token.reveal()
    assert (params["oauth_nonce"], params["oauth_timestamp"]) == (NONCE, TIMESTAMP)
    assert params["oauth_signature_method"] == "HMAC-SHA1"
    assert headers["Content-Type"] == FORM_CONTENT_TYPE
    assert set(headers) == {"Authorization", "Content-Type"}


def test_fresh_nonce_and_timestamp_per_call() -> None:
    body = encode_form([("track", "x")])
    first, second = (oauth_params(sign_request(URL, body, AUTH)) for _ in range(2))
    assert first["oauth_nonce"] != second["oauth_nonce"]
    assert first["oauth_timestamp"].isdigit() and len(first["oauth_timestamp"]) == 10


def test_secrets_are_not_in_the_headers() -> None:
    headers = sign_request(URL, encode_form([("track", "x")]), AUTH)
    text = repr(headers)
    assert AUTH.consumer_secret.reveal() not in text
    assert AUTH.access_token_secret.reveal() not in text


class _Validator(RequestValidator):  # type: ignore[misc]
    """docs/protocol.md §5.4, relaxed for Twitter-style keys (length, '-' in tokens)."""

    enforce_ssl = False
    safe_characters: ClassVar[set[str]] = set(string.ascii_letters + string.digits + "-_")
    client_key_length = (1, 100)
    access_token_length = (1, 100)
    nonce_length = (1, 100)
    dummy_client = "dummyclient"
    dummy_access_token = "dummytoken"

    def get_client_secret(self, client_key: str, request: Any) -> str:
        return AUTH.consumer_secret.reveal() if client_key == AUTH.consumer_key.reveal() else "x"

    def get_access_token_secret(self, client_key: str, token: str, request: Any) -> str:
        ok = token == AUTH.access_token.reveal()
        return AUTH.access_token_secret.reveal() if ok else "x"

    def validate_client_key(self, client_key: str, request: Any) -> bool:
        return bool(client_key == AUTH.consumer_key.reveal())

    def validate_timestamp_and_nonce(self, *args: Any, **kwargs: Any) -> bool:
        return True


def verify(url: str, body: str, headers: dict[str, str]) -> tuple[bool, Any]:
    ok, request = SignatureOnlyEndpoint(_Validator()).validate_request(url, "POST", body, headers)
    return bool(ok), request


def test_server_side_verification_accepts_ours_and_rejects_tampering() -> None:
    body = encode_form([("track", "twitter api,#python"), ("follow", "12,13"),
                        ("stall_warnings", "true")])
    headers = sign_request(URL, body, AUTH)
    assert verify(URL, body, headers)[0]
    tampered = body.replace("12%2C13", "12%2C14")
    assert tampered != body
    assert not verify(URL, tampered, headers)[0]
    assert not verify(URL.replace("8080", "8081"), body, headers)[0]


def test_unicode_and_commas_round_trip() -> None:
    params = [("track", "café naïve,東京 ラーメン,😀"), ("locations", "-122.75,36.8,-121.75,37.8")]
    body = encode_form(params)
    assert body.isascii() and " " not in body
    assert urllib.parse.parse_qsl(body) == params
    ok, request = verify(URL, body, sign_request(URL, body, AUTH))
    assert ok
    assert request.decoded_body == params


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["track", "follow", "language"]),
                          st.text(st.characters(exclude_categories=["Cs"]), min_size=1)),
                min_size=1, max_size=4))
def test_any_form_body_verifies(params: list[tuple[str, str]]) -> None:
    body = encode_form(params)
    assert verify(URL, body, sign_request(URL, body, AUTH))[0]


def test_a_401_is_diagnosed_by_the_server_s_date_and_only_then_clears_the_clock() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now - 3600, usegmt=True)
    assert diagnose_401(date, now).startswith("local clock is 3600s ahead of the server's")
    in_step = diagnose_401(email.utils.formatdate(now + 2, usegmt=True), now)
    assert in_step.endswith("(clock agrees with the server)")
    # no Date (or one that cannot be read): nothing was measured, so nothing is said to agree
    for missing in (None, "", "not a date", "Mon, 01 Jan 2024 00:00:00 +99999999999999",
                    "Mon, 99999999999999999999 Jan 2024 00:00:00 GMT"):  # OverflowError
        text = diagnose_401(missing, now)
        assert text.startswith("credentials rejected") and "agrees" not in text, text
        assert "no Date to compare the clock with" in text
