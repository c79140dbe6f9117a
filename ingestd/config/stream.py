"""Builder of the `stream` section: the endpoint, the v1.1 predicates and the reconnect back-off.

Limits are the endpoint's (docs/protocol.md §1.2); v2's rules and fields are in stream_v2.py.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from ingestd.config.loader import MISSING, Context
from ingestd.config.schema import BackoffSettings, Box, StreamSettings
from ingestd.config.section import INT_MAX, Section
from ingestd.config.stream_v2 import v2_stream
from ingestd.config.values import (
    is_int,
    is_loopback,
    is_number,
    kind,
    number_text,
    plain_number,
    quoted,
)

MAX_TRACK, MAX_TRACK_BYTES, MAX_FOLLOW, MAX_BOXES = 400, 60, 5000, 25
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*$")
# v2 sends a keep-alive at least every 20 s: three periods (docs/protocol.md §7.4).
V2_READ_TIMEOUT = 60.0


def build_stream(sec: Section) -> StreamSettings:
    """The `stream` section (read with schema StreamSettings)."""
    api = sec.text("api", choices=("v1.1", "v2"))
    track_items, follow_items = sec.items("track"), sec.items("follow")
    box_items = sec.items("locations")
    if api == "v2":
        if track_items or follow_items or box_items:
            sec.error("api", "v2 does not take track/follow/locations (v1.1 keys): with them api "
                             "must be one of v1.1; for v2 list stream.rules instead")
        for key in [k for k in ("language", "filter_level", "delimited") if sec.is_set(k)]:
            sec.error(key, "is a v1.1 parameter; v2 has no equivalent (use rule operators)")
    elif not (track_items or follow_items or box_items):
        sec.ctx.error(sec.path, "no predicate: set at least one of track, follow or locations")
    return StreamSettings(
        api=api,
        url=_url(sec),
        track=_track(sec, track_items),
        follow=_follow(sec, follow_items),
        locations=_locations(sec, box_items),
        language=_language(sec),
        filter_level=sec.optional_text("filter_level", choices=("none", "low", "medium")),
        delimited=sec.boolean("delimited"),
        gzip=sec.boolean("gzip"),
        read_timeout=sec.number("read_timeout", gt=0,
                                default=V2_READ_TIMEOUT if api == "v2" else MISSING),
        connect_timeout=sec.number("connect_timeout", gt=0),
        ca_file=_ca_file(sec),
        # A message must fit in one BSON document (16 MiB) to be storable at all.
        max_message_bytes=sec.integer("max_message_bytes", lo=1024, hi=16 << 20),
        backoff=_backoff(sec.section("backoff", BackoffSettings)),
        **v2_stream(sec, api),
    )


def _url(sec: Section) -> str:
    """The endpoint's URL. Errors never quote it: a URL may carry a password."""
    url = sec.text("url", required=True)
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket; the reason quotes nothing
        sec.error("url", f"is not a URL: {exc}")
        return url
    if not parts.hostname:
        sec.error("url", "has no host")
    elif parts.username is not None or parts.password is not None:
        sec.error("url", "must not hold a user name or password (the credentials go in auth)")
    elif not _port_ok(parts):
        sec.error("url", "has an invalid port (1 to 65535)")
    elif parts.scheme == "http" and not is_loopback(parts.hostname):
        sec.error("url", "http:// is allowed only for a loopback host; use https://")
    elif parts.scheme not in ("https", "http"):
        sec.error("url", f"scheme must be https, got {parts.scheme or 'none'!r}")
    return url


def _port_ok(parts: SplitResult) -> bool:
    try:
        return parts.port != 0  # None: the scheme's default
    except ValueError:  # not a number, or out of range
        return False


def _check_count(sec: Section, name: str, items: list[tuple[str, object]], limit: int,
                 noun: str) -> None:
    # The endpoint answers 413 to more (docs/protocol.md §1.2): refused here, not retried there.
    if len(items) > limit:
        sec.error(name, f"has {len(items)} {noun}; the endpoint accepts at most {limit} per "
                        f"connection: split them across instances, each with its own account "
                        f"(README: Outgrowing one machine)")


def _track(sec: Section, items: list[tuple[str, object]]) -> tuple[str, ...]:
    _check_count(sec, "track", items, MAX_TRACK, "phrases")
    phrases = []
    for path, item in items:
        if not isinstance(item, str):
            sec.ctx.error(path, f"must be a string, got {kind(item)}")
            continue
        size = len(item.strip().encode("utf-8"))
        if not 1 <= size <= MAX_TRACK_BYTES:
            sec.ctx.error(path, f"phrase is {size} UTF-8 bytes; must be 1 to {MAX_TRACK_BYTES}")
        elif "," in item:
            sec.ctx.error(path, "contains ',' which separates phrases on the wire: use two items")
        else:
            phrases.append(item.strip())
    return tuple(phrases)


def _follow(sec: Section, items: list[tuple[str, object]]) -> tuple[int, ...]:
    _check_count(sec, "follow", items, MAX_FOLLOW, "ids")
    ids = []
    for path, item in items:
        value = item if is_number(item) else _digits(item)
        if not isinstance(value, int) or not 0 < value <= INT_MAX:
            got = number_text(item) if isinstance(item, int) and is_int(item) else \
                quoted(item) if isinstance(item, str) else kind(item)
            sec.ctx.error(path, f"user id must be a positive 64-bit integer, got {got}")
        else:
            ids.append(value)
    return tuple(ids)


def _digits(item: object) -> int | None:
    """An id written as a string of digits; None if it is not one, or is longer than any
    64-bit integer (``int()`` refuses strings past 4300 digits)."""
    if not (isinstance(item, str) and item.isascii() and item.isdigit()):
        return None
    digits = item.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(INT_MAX)) else None


def _locations(sec: Section, items: list[tuple[str, object]]) -> tuple[Box, ...]:
    _check_count(sec, "locations", items, MAX_BOXES, "boxes")
    boxes = []
    for path, item in items:
        box = _box(sec.ctx, path, item)
        if box is not None:
            boxes.append(box)
    return tuple(boxes)


def _box(ctx: Context, path: str, item: object) -> Box | None:
    shape = "a box is [west, south, east, north] in degrees (4 numbers)"
    if not isinstance(item, list) or len(item) != 4 or not all(is_number(n) for n in item):
        got = f"{len(item)} items" if isinstance(item, list) and len(item) != 4 else kind(item)
        ctx.error(path, f"{shape}, got {got}")
        return None
    west, south, east, north = (_degrees(n) for n in item)
    problems = []
    if not (-180 <= west <= 180 and -180 <= east <= 180):
        problems.append("longitudes must be within -180..180")
    if not (-90 <= south <= 90 and -90 <= north <= 90):
        problems.append("latitudes must be within -90..90")
    if west >= east or south >= north:
        problems.append("west must be < east and south < north (south-west corner first)")
    # Each side 0.1..360 degrees (docs/protocol.md §1.2); tolerance absorbs float noise.
    elif east - west < 0.1 - 1e-9 or north - south < 0.1 - 1e-9:
        problems.append("each side must span at least 0.1 degrees")
    for problem in problems:
        ctx.error(path, problem)
    return None if problems else (west, south, east, north)


def _degrees(value: float) -> float:
    """A coordinate as a float; one far past any degree (float() of a 400-digit integer
    overflows) as an infinity, which the range checks refuse."""
    if abs(value) > 1000:
        return math.inf if value > 0 else -math.inf
    return float(value)


def _language(sec: Section) -> tuple[str, ...]:
    codes = []
    for path, item in sec.items("language"):
        if not isinstance(item, str) or not _LANGUAGE.match(item):
            got = repr(item) if isinstance(item, str) else kind(item)
            sec.ctx.error(path, f"must be a BCP 47 language code like 'en' or 'pt-BR', got {got}")
        else:
            codes.append(item)
    return tuple(codes)


def ca_bundle(stream: StreamSettings) -> str:
    """The CA bundle a TLS connection verifies against: ``stream.ca_file``, else certifi's."""
    if stream.ca_file:
        return stream.ca_file
    import certifi  # here: it loads importlib.resources, and only the stream worker connects

    return certifi.where()


def _ca_file(sec: Section) -> str:
    configured = sec.optional_text("ca_file", default=None)  # None: not a path to check
    if configured is None:
        return str(sec.default("ca_file"))
    path = Path(os.path.abspath(sec.ctx.path)).parent / Path(configured).expanduser()
    if not sec.ctx.check_files:
        return str(path)
    if not path.is_file():
        sec.error("ca_file", f"{str(path)!r} is not an existing file")
    elif not os.access(path, os.R_OK):
        sec.error("ca_file", f"{str(path)!r} is not readable")
    return str(path)


def _backoff(sec: Section) -> BackoffSettings:
    values = {name: sec.number(name, lo=0) for name in (
        "network_start", "network_step", "network_cap", "http_start", "http_cap",
        "rate_limit_start", "rate_limit_cap", "reconnect_delay")}
    for start, cap in (("network_start", "network_cap"), ("http_start", "http_cap"),
                       ("rate_limit_start", "rate_limit_cap")):
        if values[cap] < values[start]:
            sec.error(cap, f"must be >= {start} ({plain_number(values[start])}), "
                           f"got {plain_number(values[cap])}")
    return BackoffSettings(
        **values,
        max_attempts_per_minute=sec.integer("max_attempts_per_minute", lo=1, hi=600),
        jitter=sec.number("jitter", lo=0, hi=1),
    )
