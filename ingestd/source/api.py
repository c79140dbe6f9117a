"""What differs between the v1.1 and the X API v2 stream, behind one interface.

The reader asks ``api_for(stream)`` and never tests ``stream.api`` itself. v1.1 is ``POST
statuses/filter`` signed with OAuth 1.0a, framed by lines or by lengths (``delimited``), and a
replacement connection may open before the old one closes. v2 is ``GET`` with a bearer token,
always ``\\r\\n``-framed, and allows one connection per app (a second one gets 429).
"""

from __future__ import annotations

import time
from typing import Protocol

import pycurl

from ingestd.config.schema import AuthSettings, StreamSettings
from ingestd.source import v2_request
from ingestd.source.framing import LengthFramer, LineFramer
from ingestd.source.headers import USER_AGENT
from ingestd.source.oauth import diagnose_401, encode_form, sign_request
from ingestd.source.request import post_params


class StreamApi(Protocol):
    make_before_break: bool  # may a reload open the new connection before closing the old?

    def request(self, curl: pycurl.Curl, stream: StreamSettings, auth: AuthSettings) -> None:
        """Set the URL, method, body and request headers on ``curl``."""

    def framer(self, stream: StreamSettings) -> LineFramer | LengthFramer:
        """A fresh framer for one connection's body."""

    def explain_401(self, headers: dict[str, str]) -> str:
        """What an HTTP 401 means, for the log and the status line."""


class V1Api:
    """v1.1 `POST statuses/filter`."""

    make_before_break = True

    def request(self, curl: pycurl.Curl, stream: StreamSettings, auth: AuthSettings) -> None:
        body = encode_form(post_params(stream))
        headers = sign_request(stream.url, body, auth)  # signed again on every connection
        headers["User-Agent"] = USER_AGENT
        if stream.gzip:
            # both names: the endpoint may compress only then (docs/protocol.md §2.3); the body is
            # inflated by source.inflate, not libcurl
            headers["Accept-Encoding"] = "deflate, gzip"
        curl.setopt(pycurl.URL, stream.url)
        curl.setopt(pycurl.POSTFIELDS, body)
        curl.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()])

    def framer(self, stream: StreamSettings) -> LineFramer | LengthFramer:
        if stream.delimited:
            return LengthFramer(stream.max_message_bytes)
        return LineFramer(stream.max_message_bytes)

    def explain_401(self, headers: dict[str, str]) -> str:
        return diagnose_401(headers.get("date"), time.time())


class V2Api:
    """X API v2 `GET /2/tweets/search/stream`."""

    make_before_break = False  # v2 rules changes never reconnect; only fields/url changes do

    def request(self, curl: pycurl.Curl, stream: StreamSettings, auth: AuthSettings) -> None:
        url, header_lines = v2_request.stream_request(stream, auth)
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.HTTPGET, 1)
        if stream.gzip:
            header_lines = [*header_lines, "Accept-Encoding: deflate, gzip"]  # see V1Api
        curl.setopt(pycurl.HTTPHEADER, header_lines)

    def framer(self, stream: StreamSettings) -> LineFramer | LengthFramer:
        return LineFramer(stream.max_message_bytes)  # settings refuse `delimited` for v2

    def explain_401(self, headers: dict[str, str]) -> str:
        return v2_request.DIAGNOSE_401


APIS: dict[str, StreamApi] = {"v1.1": V1Api(), "v2": V2Api()}


def api_for(stream: StreamSettings) -> StreamApi:
    """The API ``stream.api`` names (settings allow only the keys of ``APIS``)."""
    return APIS[stream.api]
