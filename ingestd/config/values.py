"""Small value checks and formatting shared by the settings loader and section builders."""

from __future__ import annotations

import ipaddress
import math
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


SHOWN_DIGITS = 20  # a longer number is quoted by its first digits and its length
_LOG10_2 = 0.30102999566398120


def number_text(value: float) -> str:
    """A number as a message quotes it: exact and never scientific up to ``SHOWN_DIGITS``
    digits, else ``12345678901234567890… (400 digits)``. Never raises: a 400-digit integer
    overflows ``float()``, and one past 4300 digits ``str()``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, -inf, nan
    if isinstance(value, float):
        text = plain_number(value)
    else:
        try:
            text = str(value)
        except ValueError:  # past sys.get_int_max_str_digits(): only its size can be said
            digits = round(abs(value).bit_length() * _LOG10_2)
            return f"{'a negative' if value < 0 else 'an'} integer of about {digits:,} digits"
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole = digits.partition(".")[0]
    return text if len(whole) <= SHOWN_DIGITS else sign + digits_text(whole)


def digits_text(digits: str) -> str:
    """A run of digits as a message quotes it: its first ``SHOWN_DIGITS`` and its length."""
    if len(digits) <= SHOWN_DIGITS:
        return digits
    return f"{digits[:SHOWN_DIGITS]}… ({len(digits)} digits)"


def quoted(text: str, limit: int = 40) -> str:
    """``repr(text)``, cut to its first ``limit`` characters when longer (a value in a message
    names the mistake; a megabyte of it would bury the message)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def range_problem(value: float, *, lo: float | None = None, hi: float | None = None,
                  gt: float | None = None) -> str | None:
    """Why ``value`` is outside ``lo <= value <= hi`` (and ``> gt``), or None: the one check of
    every numeric setting. Compares exactly, whatever the size of an integer (an int against a
    float never overflows), and quotes the value with ``number_text``."""
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got nan"
    if gt is not None and not value > gt:
        return f"must be > {number_text(gt)}, got {number_text(value)}"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"must be {_bounds(lo, hi)}, got {number_text(value)}"
    return None


def _bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {number_text(lo)} and {number_text(hi)}"
    return f">= {number_text(lo)}" if lo is not None else f"<= {number_text(hi or 0)}"


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
# The largest size setting: 1 PiB is far beyond any disk a spool or dead-letter folder sits on,
# and keeps every size (and sums of a few) within the 64-bit integers of the status files.
SIZE_MAX = 1 << 50


def parse_size(value: object) -> int | None:
    """Bytes from an int or a string like '64MiB', '1.5 GB'; None if invalid or not > 0.

    Not bounded here (``Section.size`` refuses what is past ``SIZE_MAX``): a string of more
    than 30 digits is not computed, only taken as ``SIZE_MAX + 1``."""
    if is_int(value):
        assert isinstance(value, int)
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        return None
    number, unit = match.group(1), _UNITS[match.group(2).lower()]
    if len(number.partition(".")[0].lstrip("0")) > 30:
        return SIZE_MAX + 1
    from decimal import Decimal, localcontext

    with localcontext() as exact:  # the default 28 digits would round a long fraction
        exact.prec = len(number) + 20
        size = int(Decimal(number) * unit)
    return size if size > 0 else None
