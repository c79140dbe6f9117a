"""Small value checks and formatting shared by the settings loader and section builders."""

from __future__ import annotations

import ipaddress
import re


def kind(value: object) -> str:
    """What a YAML value is, for "must be X, got Y" messages (never the value: it may be secret)."""
    if isinstance(value, bool):
        return "a boolean (quote it: YAML reads yes/no/on/off/true/false as booleans)"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def plain_number(value: float) -> str:
    """Shortest exact decimal text, never scientific notation: -122.75, 37.8, 100."""
    from decimal import Decimal  # not at module level: the supervisor rarely formats numbers

    text = format(Decimal(repr(float(value))).normalize(), "f")
    return "0" if text == "-0" else text


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: object) -> int | None:
    """Bytes from an int or a string like '64MiB', '1.5 GB'; None if invalid or not > 0."""
    if is_int(value):
        assert isinstance(value, int)
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        return None
    from decimal import Decimal

    size = int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])
    return size if size > 0 else None

