"""OAuth 1.0a request signing for `POST statuses/filter` (docs/protocol.md §5), and what a 401
means.

    body = encode_form(post_params(settings.stream))
    headers = sign_request(settings.stream.url, body, settings.auth)
    # send `body` verbatim (POSTFIELDS) with `headers`; sign again on every reconnect.
"""

from __future__ import annotations

import email.utils
import urllib.parse

from ingestd.config.schema import AuthSettings

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
SKEW_THRESHOLD = 60.0  # seconds of clock difference worth blaming for a 401


def encode_form(params: list[tuple[str, str]]) -> str:
    """Form-encode in order. oauthlib decodes this same string to build the signature."""
    return urllib.parse.urlencode(params)


def sign_request(
    url: str,
    body: str,
    auth: AuthSettings,
    *,
    nonce: str | None = None,
    timestamp: str | None = None,
) -> dict[str, str]:
    """Headers (Authorization, Content-Type) for POSTing the already-encoded `body` to `url`.

    `nonce`/`timestamp` are for tests; by default oauthlib makes fresh ones per call.
    """
    # Imported on first use: oauthlib (with urllib.request and http.client, ~0.7 MB of RSS in the
    # stream worker) is needed by neither an X API v2 stream (bearer token) nor the supervisor.
    from oauthlib.oauth1 import (  # type: ignore[import-untyped]
        SIGNATURE_HMAC_SHA1,
        SIGNATURE_TYPE_AUTH_HEADER,
        Client,
    )

    client = Client(
        auth.consumer_key.reveal(),
        client_secret=auth.consumer_secret.reveal(),
        resource_owner_key=auth.access_token.reveal(),
        resource_owner_secret=auth.access_token_secret.reveal(),
        signature_method=SIGNATURE_HMAC_SHA1,
        signature_type=SIGNATURE_TYPE_AUTH_HEADER,
        nonce=nonce,
        timestamp=timestamp,
    )
    # The Content-Type header makes oauthlib include the form parameters in the signature.
    _uri, headers, _body = client.sign(
        url, http_method="POST", body=body, headers={"Content-Type": FORM_CONTENT_TYPE})
    return {str(k): str(v) for k, v in headers.items()}


def diagnose_401(date_header: str | None, now: float) -> str:
    """Explain a 401: clock skew (with the measured offset) or the credentials themselves.
    Without a readable ``Date`` header the clock is not judged, and the text says so."""
    server = None
    if date_header:
        try:
            server = email.utils.parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, OverflowError):  # a field too large for a C int
            server = None
    if server is not None and abs(now - server) >= SKEW_THRESHOLD:
        direction = "ahead of" if now > server else "behind"
        return (f"local clock is {abs(now - server):.0f}s {direction} the server's: "
                "fix NTP (OAuth timestamps must be within a few minutes)")
    clock = ("clock agrees with the server" if server is not None else
             "the server sent no Date to compare the clock with: check NTP too")
    return f"credentials rejected: check consumer key/secret and access token/secret ({clock})"
