"""How a connection ended, from its status line, headers and body: the ``Ending`` that picks the
back-off schedule, the reason logged and shown in the status, and any wait the server asked for
(``server_hint``).
"""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Mapping
from dataclasses import dataclass

from ingestd.source.backoff import Ending, ServerWait
from ingestd.source.connection import Connection
from ingestd.source.curl_errors import TRUST_ERRORS

CONFIG_STATUSES = frozenset({403, 404, 406, 413, 416})
RATE_LIMIT_STATUSES = frozenset({420, 429})
# Retry-After is defined for 429 (RFC 6585) and 503 (RFC 9110): a wait the server knows it
# needs. 420 is v1.1's 429. Other statuses' Retry-After is not ours to guess at.
RETRY_AFTER_STATUSES = RATE_LIMIT_STATUSES | {503}
MAX_SHOWN = 40  # characters of a header's value logged: it is the server's text


@dataclass(frozen=True, slots=True)
class ServerHint:
    """A wait a refused connection's answer asked for."""

    header: str  # "retry-after" or "x-rate-limit-reset"
    value: str  # as sent (its first MAX_SHOWN characters)
    seconds: float | None  # from now; None: unusable, ``problem`` says why
    problem: str = ""


def classify(conn: Connection, errno: int | None) -> Ending:
    """The ending of a finished transfer (``errno``: libcurl's error, None if it completed)."""
    if conn.abort is not None:
        return conn.abort
    if conn.status and conn.status != 200:
        if conn.status in CONFIG_STATUSES:
            return Ending.CONFIG
        if conn.status in RATE_LIMIT_STATUSES:
            return Ending.RATE_LIMITED
        return Ending.HTTP
    if conn.malformed:  # a refused status's own ending (above) keeps its schedule
        return Ending.MALFORMED_HEADER
    if conn.disconnect is not None:
        return Ending.DISCONNECT
    if errno is None:
        return Ending.CLOSED if conn.status == 200 else Ending.NETWORK
    return Ending.TLS_CERTIFICATE if errno in TRUST_ERRORS else Ending.NETWORK


def describe(conn: Connection, ending: Ending, errmsg: str) -> str:
    """One line saying why the connection ended (``errmsg``: libcurl's, if any)."""
    if conn.status and conn.status != 200:
        body = bytes(conn.error_body).decode("utf-8", "replace").strip()[:300]
        text = f"HTTP {conn.status}: {body}" if body else f"HTTP {conn.status}"
        if conn.status == 401:
            text += "; " + conn.api.explain_401(conn.headers)
        return f"{text}; {conn.malformed}" if conn.malformed else text
    if conn.disconnect is not None:
        return f"disconnect code {conn.disconnect.get('code')}: {conn.disconnect.get('reason')}"
    if conn.malformed:
        return conn.malformed
    if conn.failure:
        return conn.failure
    if ending is Ending.STALL:
        return f"no data for {conn.stream.read_timeout:g}s"
    return errmsg or ending.value


def disconnect_code(conn: Connection) -> int | None:
    """The numeric code of a v1.1 disconnect message (v2's are names: None)."""
    code = conn.disconnect.get("code") if conn.disconnect else None
    return code if isinstance(code, int) else None


def server_hint(status: int, headers: Mapping[str, str], now: float) -> ServerHint | None:
    """The wait a refused connection's answer asks for (``now``: epoch seconds), or None.

    Retry-After counts on 420/429 and 503 only; x-rate-limit-reset on 420/429 only, and only
    once x-rate-limit-remaining says 0 (docs/protocol.md §4.2). When both say something usable
    the longer wins. A hint that cannot be used comes back with ``seconds`` None and why, for
    the log; ``Backoff.delay`` caps a usable one.
    """
    if status < 400:
        return None  # a stream's own 200 headers are no answer to a refused attempt
    hints: list[ServerHint] = []
    if value := headers.get("retry-after", ""):
        hints.append(_retry_after(status, value, now))
    # v2 sends these headers on every answer, a 429 TooManyConnections with requests left
    # included (docs/protocol.md §7.1): the reset time is a wait only once the allowance is spent.
    remaining = headers.get("x-rate-limit-remaining", "")
    spent = _is_seconds(remaining) and not remaining.strip("0")  # no int(): 4300 digits max
    if status in RATE_LIMIT_STATUSES and spent and (reset := headers.get("x-rate-limit-reset")):
        hints.append(_rate_limit_reset(reset, now))
    usable = [h for h in hints if h.seconds is not None]
    if usable:
        return max(usable, key=lambda h: h.seconds or 0.0)
    return hints[0] if hints else None


def describe_hint(hint: ServerHint, used: ServerWait | None) -> str:
    """What became of a server's wait, for ``stream_ended`` and the status: honoured, capped (with
    the setting that capped it) or ignored (with why)."""
    said = f"{hint.header}={hint.value}"
    if hint.seconds is None:
        return f"{said} ignored: {hint.problem}"
    if used is None or used.cap is None:
        return f"{said} ignored: this ending takes no server wait"
    if hint.header != "retry-after" or not _is_seconds(hint.value):  # a moment, not a delay
        said += f" (in {hint.seconds:.0f}s)"
    if used.capped:
        return f"{said} capped to {used.cap:g} (stream.backoff.{used.setting})"
    return f"{said} honoured"


def _retry_after(status: int, value: str, now: float) -> ServerHint:
    """Retry-After: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    shown = value[:MAX_SHOWN]
    if status not in RETRY_AFTER_STATUSES:
        return ServerHint("retry-after", shown, None, f"not honoured after HTTP {status} "
                          "(only after 420, 429 and 503)")
    if _is_seconds(value):
        return ServerHint("retry-after", shown, float(value))  # inf if absurdly long: capped
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000": an HTTP-date is always GMT
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):
        return ServerHint("retry-after", shown, None, "neither seconds nor an HTTP date")
    if seconds <= 0:
        return ServerHint("retry-after", shown, None, "in the past")
    return ServerHint("retry-after", shown, seconds)


def _rate_limit_reset(value: str, now: float) -> ServerHint:
    """x-rate-limit-reset: the epoch second the allowance comes back."""
    shown = value[:MAX_SHOWN]
    if not _is_seconds(value):
        return ServerHint("x-rate-limit-reset", shown, None, "not epoch seconds")
    seconds = float(value) - now
    if seconds <= 0:
        return ServerHint("x-rate-limit-reset", shown, None, "in the past")
    return ServerHint("x-rate-limit-reset", shown, seconds)


def _is_seconds(value: str) -> bool:
    return value.isascii() and value.isdigit()  # isdigit alone takes "²", which float refuses
