"""How a connection ended, from its status line, headers and body: the ``Ending`` that picks the
back-off schedule, the reason logged and shown in the status, and any wait the server asked for.
"""

from __future__ import annotations

import email.utils

from ingestd.source.backoff import Ending
from ingestd.source.connection import Connection

CONFIG_STATUSES = frozenset({403, 404, 406, 413, 416})
RATE_LIMIT_STATUSES = frozenset({420, 429})


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
    if conn.disconnect is not None:
        return Ending.DISCONNECT
    if errno is None:
        return Ending.CLOSED if conn.status == 200 else Ending.NETWORK
    return Ending.NETWORK


def describe(conn: Connection, ending: Ending, errmsg: str) -> str:
    """One line saying why the connection ended (``errmsg``: libcurl's, if any)."""
    if conn.status and conn.status != 200:
        body = bytes(conn.error_body).decode("utf-8", "replace").strip()[:300]
        text = f"HTTP {conn.status}: {body}" if body else f"HTTP {conn.status}"
        if conn.status == 401:
            text += "; " + conn.api.explain_401(conn.headers)
        return text
    if conn.disconnect is not None:
        return f"disconnect code {conn.disconnect.get('code')}: {conn.disconnect.get('reason')}"
    if conn.failure:
        return conn.failure
    if ending is Ending.STALL:
        return f"no data for {conn.stream.read_timeout:g}s"
    return errmsg or ending.value


def disconnect_code(conn: Connection) -> int | None:
    """The numeric code of a v1.1 disconnect message (v2's are names: None)."""
    code = conn.disconnect.get("code") if conn.disconnect else None
    return code if isinstance(code, int) else None


def retry_after(headers: dict[str, str], now: float) -> float | None:
    """Seconds the server asked us to wait (Retry-After, or x-rate-limit-reset epoch)."""
    value = headers.get("retry-after")
    if value:
        if value.isdigit():
            return float(value)
        try:
            return max(email.utils.parsedate_to_datetime(value).timestamp() - now, 0.0)
        except (TypeError, ValueError):
            pass
    reset = headers.get("x-rate-limit-reset")
    # The reset time matters only once the allowance is spent: v2 sends these headers on every
    # answer, including a 429 TooManyConnections that has requests left (docs/protocol.md §7.1).
    if headers.get("x-rate-limit-remaining", "0") != "0":
        return None
    if reset and reset.isdigit():
        return max(float(reset) - now, 0.0)
    return None
