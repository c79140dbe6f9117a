"""X API v2 filtered stream: the request the reader sends (docs/protocol.md §7.1-7.2).

v2 differs from v1.1 on the wire only in how the connection is asked for: ``GET`` with the fields
and expansions as query parameters, and an OAuth 2.0 app-only bearer token instead of an OAuth 1.0a
signature. The body is the same kind of ``\\r\\n``-separated JSON with ``\\r\\n`` keep-alives, so
framing, spooling and the connection loop are shared with v1.1.

    url, headers = stream_request(settings.stream, settings.auth)
"""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit, urlunsplit

from ingestd.config.schema import AuthSettings, StreamSettings
from ingestd.source.headers import USER_AGENT
from ingestd.source.request import v2_query_params

RULES_SUFFIX = "/rules"
# Said after an HTTP 401 on v2: there is no signature or clock involved, only the token.
# (Worded without "bearer <word>": the log redactor masks whatever follows that, as a header.)
DIAGNOSE_401 = ("token rejected: check auth.bearer_token (an app-only OAuth 2.0 token from the "
                "developer portal)")


def bearer_headers(auth: AuthSettings) -> list[str]:
    """Header lines for a v2 request (the token is masked in logs by the redactor)."""
    return [f"Authorization: Bearer {auth.bearer_token.reveal()}", f"User-Agent: {USER_AGENT}"]


def stream_url(stream: StreamSettings) -> str:
    """The stream URL with ``tweet.fields``/``expansions``/... and ``backfill_minutes``.

    ``backfill_minutes`` is sent on every connection when configured: after a restart or a
    reconnect alike the endpoint resends what it may have sent while we were away, and ``_id``
    absorbs the duplicates (docs/protocol.md §7.2).
    """
    params = v2_query_params(stream, backfill=stream.backfill_minutes > 0)
    parts = urlsplit(stream.url)
    # safe="," keeps the lists readable; the endpoint wants them comma-joined without spaces.
    query = "&".join(p for p in (parts.query, urlencode(params, safe=",")) if p)
    return urlunsplit(parts._replace(query=query))


def stream_request(stream: StreamSettings, auth: AuthSettings) -> tuple[str, list[str]]:
    """(URL, header lines) for ``GET /2/tweets/search/stream``."""
    return stream_url(stream), bearer_headers(auth)


def rules_url(stream: StreamSettings) -> str:
    """``…/2/tweets/search/stream/rules``: the stream URL's path plus ``/rules``, no query."""
    parts = urlsplit(stream.url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + RULES_SUFFIX, query=""))
