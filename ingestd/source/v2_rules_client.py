"""The HTTP client of the X API v2 rules endpoint (docs/protocol.md §7.3).

``GET``/``POST …/2/tweets/search/stream/rules`` with the bearer token, over pycurl easy handles like
the stream: one HTTP stack, the same CA bundle (``stream.ca_file``) and the same transport policy
(``source.transport``: TLS always verified; plain http only for loopback, which settings enforce on
``stream.url``, the base of the rules URL, and never through a proxy). Refusals come back as
``RulesError`` in the server's own words.

The server's list is paginated (``max_results``, ``meta.next_token`` → ``pagination_token``):
``current`` reads every page, so an app with more than one page of rules (Enterprise) is diffed
against all of them, not the first thousand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from urllib.parse import quote

import orjson
import pycurl

from ingestd.config.schema import AuthSettings, Rule, StreamSettings
from ingestd.config.stream import ca_bundle
from ingestd.source.curl_errors import curl_error_text, tls_hint
from ingestd.source.headers import ResponseHead
from ingestd.source.transport import configure_transport
from ingestd.source.v2_request import bearer_headers, rules_url

REQUEST_TIMEOUT = 30  # seconds for one rules call
# A full page: 1,000 rules of 2,048 characters, ~2.3 MB in ASCII but up to ~6.2 MB in CJK
# (3 bytes a character in UTF-8) and ~12.3 MB if the server \u-escapes them.
MAX_BODY = 16 << 20
PAGE_SIZE = 1000  # max_results: the endpoint's most (and its default)
# Pages read before giving up: 100,000 rules, 40 times the Enterprise 2,500. A server whose
# next_token never ends (or a proxy replaying one page) must not keep the sync thread forever.
MAX_PAGES = 100
MAX_TOKEN = 2048  # characters: real tokens are a few dozen; this keeps the URL an ordinary one


@dataclass(frozen=True, slots=True)
class ServerRule:
    """A rule as the server holds it."""

    id: str
    value: str
    tag: str | None = None

    def key(self) -> tuple[str, str | None]:
        return self.value, self.tag


class RulesError(Exception):
    """The server refused a rules call; ``messages`` are its own words, one per problem."""

    def __init__(self, messages: Sequence[str], *, transient: bool = False,
                 status: int = 0) -> None:
        super().__init__("; ".join(messages))
        self.messages = list(messages)
        self.transient = transient
        self.status = status  # the HTTP status (0: none)

    @property
    def credentials(self) -> bool:
        """401/403: the token was refused, whatever the rules say."""
        return self.status in (401, 403)


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


class RulesClient:
    """``GET``/``POST /2/tweets/search/stream/rules`` with the bearer token."""

    def __init__(self, stream: StreamSettings, auth: AuthSettings) -> None:
        self.url = rules_url(stream)
        self.ca_file = ca_bundle(stream)
        self.connect_timeout = max(1, round(stream.connect_timeout))
        self._headers = bearer_headers(auth)
        self.last_rate_limit: dict[str, str] = {}

    def current(self) -> list[ServerRule]:
        """Every rule the server holds: each page of ``GET …/rules`` until no ``next_token``."""
        rules: dict[str, ServerRule] = {}  # by id: a rule added while paging may show twice
        tokens: set[str] = set()
        token: str | None = None
        for _ in range(MAX_PAGES):
            reply = self._call("GET", self._page_url(token), None)
            self._raise_errors(reply)
            for rule in (_server_rule(r) for r in _list(reply.body.get("data"))):
                rules.setdefault(rule.id, rule)
            token = _next_token(reply.body)
            if token is None:
                return list(rules.values())
            if token in tokens:  # the same page again: following it would never end
                raise RulesError([f"rules list: the server sent next_token {token!r} twice "
                                  f"(after {len(rules):,} rules); the list cannot be read"])
            tokens.add(token)
        raise RulesError([f"rules list: still a next_token after {MAX_PAGES} pages "
                          f"({len(rules):,} rules); the list cannot be read"])

    def _page_url(self, token: str | None) -> str:
        query = f"max_results={PAGE_SIZE}"
        if token is not None:
            query += f"&pagination_token={quote(token, safe='')}"  # opaque: sent as received
        return f"{self.url}?{query}"

    def add(self, rules: Sequence[Rule], *, dry_run: bool = False,
            ignore: Callable[[dict[str, Any]], bool] = lambda _e: False) -> list[ServerRule]:
        body = {"add": [{"value": r.value, **({"tag": r.tag} if r.tag else {})} for r in rules]}
        url = self.url + ("?dry_run=true" if dry_run else "")
        reply = self._call("POST", url, body)
        self._raise_errors(reply, ignore)
        return [_server_rule(r) for r in _list(reply.body.get("data"))]

    def delete(self, ids: Sequence[str]) -> int:
        reply = self._call("POST", self.url, {"delete": {"ids": list(ids)}})
        self._raise_errors(reply)
        meta = reply.body.get("meta")
        summary = meta.get("summary") if isinstance(meta, dict) else None
        deleted = summary.get("deleted") if isinstance(summary, dict) else None
        return deleted if type(deleted) is int else 0  # the server's JSON: any shape

    def _call(self, method: str, url: str, payload: dict[str, Any] | None) -> _Response:
        buf, over = BytesIO(), [False]
        head = ResponseHead()  # its take skips junk lines: no traceback from the callback

        def on_data(data: bytes) -> int | None:
            if buf.tell() + len(data) > MAX_BODY:
                over[0] = True
                return 0  # abort: no rules reply is this large (curl reports error 23)
            buf.write(data)
            return None

        curl = pycurl.Curl()
        try:
            self._configure(curl, method, url, payload, head.take, on_data)
            curl.perform()
        except pycurl.error as exc:
            if over[0]:  # the endpoint answered: too much to be a rules answer
                raise RulesError([f"rules answer larger than {MAX_BODY >> 20} MiB (HTTP "
                                  f"{head.status}): not read"], status=head.status) from None
            if malformed := head.refused_by_curl(exc.args[0], exc.args[1]):
                raise RulesError([f"rules endpoint's answer unreadable: {malformed}"],
                                 transient=True) from None
            raise RulesError([_unreachable(exc.args[0], exc.args[1])], transient=True) from None
        finally:
            curl.close()
        self.last_rate_limit = {k: v for k, v in head.headers.items()
                                if k.startswith("x-rate-limit")}
        return _Response(head.status, head.headers, _json_object(buf.getvalue()))

    def _configure(self, curl: pycurl.Curl, method: str, url: str,
                   payload: dict[str, Any] | None, on_header: Callable[[bytes], None],
                   on_data: Callable[[bytes], int | None]) -> None:
        lines = list(self._headers)
        curl.setopt(pycurl.URL, url)
        if method == "POST":
            lines.append("Content-Type: application/json")
            curl.setopt(pycurl.POSTFIELDS, orjson.dumps(payload).decode())
        curl.setopt(pycurl.HTTPHEADER, lines)
        curl.setopt(pycurl.HEADERFUNCTION, on_header)
        curl.setopt(pycurl.WRITEFUNCTION, on_data)
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.TIMEOUT, REQUEST_TIMEOUT)
        curl.setopt(pycurl.CONNECTTIMEOUT, self.connect_timeout)
        configure_transport(curl, url, self.ca_file)  # TLS verified; proxy policy

    @staticmethod
    def _raise_errors(reply: _Response,
                      ignore: Callable[[dict[str, Any]], bool] | None = None) -> None:
        reported = [e for e in _list(reply.body.get("errors")) if isinstance(e, dict)]
        errors = [e for e in reported if ignore is None or not ignore(e)]
        # A dry run refused only for reasons the delete step resolves counts as accepted.
        if not errors and (200 <= reply.status < 300 or reported):
            return
        messages = [_describe_error(e) for e in errors] or [_describe_problem(reply)]
        transient = reply.status == 429 or reply.status >= 500 or reply.status == 0
        raise RulesError(messages, transient=transient, status=reply.status)


def _unreachable(errno: int, errmsg: str) -> str:
    """A failed call's reason. A failed certificate check says its cause (expired, another host's,
    self-signed…) and the setting to change, as the stream's reason does (``tls_hint``), not
    OpenSSL's bare words."""
    if tls_hint(errno, errmsg):
        return f"rules endpoint unreachable: {curl_error_text(errno, errmsg)}"
    return f"rules endpoint unreachable: {errmsg} (curl error {errno})"


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _next_token(body: dict[str, Any]) -> str | None:
    """``meta.next_token``: None when absent or empty (the last page); any other shape, or a
    token no server would send, is a RulesError (reading on, or stopping, would be a guess)."""
    meta = body.get("meta")
    token = meta.get("next_token") if isinstance(meta, dict) else None
    if token is None or token == "":
        return None
    if not isinstance(token, str):
        raise RulesError([f"rules list: meta.next_token is not text but {_text(token)[:40]}"])
    if len(token) > MAX_TOKEN:
        raise RulesError([f"rules list: meta.next_token of {len(token):,} characters "
                          f"(more than {MAX_TOKEN})"])
    return token


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        return {"detail": raw[:300].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {}


def _server_rule(raw: object) -> ServerRule:
    if not isinstance(raw, dict):
        return ServerRule("", "")
    tag = raw.get("tag")
    return ServerRule(_text(raw.get("id", "")), _text(raw.get("value", "")),
                      tag if isinstance(tag, str) and tag else None)


def _text(value: object) -> str:
    """A field of the server's JSON as text: a scalar as sent, anything else by its type only
    (``str()`` of a list nested ~1000 deep, which orjson reads, raises RecursionError)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    return f"<{type(value).__name__}>"


def _describe_error(err: dict[str, Any]) -> str:
    """``Title: 'rule value': detail`` in the server's own words."""
    title = _text(err.get("title") or err.get("type") or "error")
    details = err.get("details")
    detail = "; ".join(_text(d) for d in details) if isinstance(details, list) else ""
    detail = detail or _text(err.get("detail") or err.get("message") or "")
    value = err.get("value")
    where = f" {value!r}" if isinstance(value, str) else ""
    return f"{title}{where}: {detail}" if detail else f"{title}{where}"


def _describe_problem(reply: _Response) -> str:
    body = reply.body
    title = _text(body.get("title") or "")
    detail = _text(body.get("detail") or "")
    text = ": ".join(dict.fromkeys(p for p in (title, detail) if p)) or "no details"  # once
    return f"HTTP {reply.status}: {text}"
