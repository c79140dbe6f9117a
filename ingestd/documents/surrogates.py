"""Parse a message whose JSON text carries half of a UTF-16 surrogate pair.

JSON writes a character outside the BMP (most emoji) as two escapes, ``\\ud83d\\ude00``. A text cut
between the two (a truncated retweet, a clipped profile field) keeps one half alone: JSON's grammar
admits it, RFC 8259 §8.2 leaves what a parser makes of it open, orjson refuses the whole message and
BSON could not hold the half anyway (its strings are UTF-8). Dead-lettering a real tweet for half an
emoji would lose it from the collection, so each lone half becomes ``\\ufffd``, the replacement
character, and the text is parsed again (docs/protocol.md §6, "Lone surrogates").

This runs only after orjson has refused a text: the hot path never pays for it.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# One escape at a time, left to right, so an escaped backslash (``\\\\``) is consumed whole and the
# ``u`` after it is never read as an escape: a valid pair (kept), a lone half (group 1, replaced),
# or any other escape (kept).
_ESCAPE = re.compile(
    rb"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|u([dD][89a-fA-F][0-9a-fA-F]{2})|.)",
    re.DOTALL,
)
REPLACEMENT = b"\\ufffd"


def without_lone_surrogates(text: bytes) -> bytes | None:
    """``text`` with each lone surrogate escape replaced by ``\\ufffd``; None if it has none."""
    if b"\\u" not in text:
        return None
    replaced = 0

    def replace(match: re.Match[bytes]) -> bytes:
        nonlocal replaced
        if match.group(1) is None:
            return match.group(0)
        replaced += 1
        return REPLACEMENT

    fixed = _ESCAPE.sub(replace, text)
    return fixed if replaced else None


def loads(payload: bytes | memoryview) -> tuple[Any, bool]:
    """``(parsed, repaired)``: ``orjson.loads``, retried once without lone surrogates. Raises the
    first ``orjson.JSONDecodeError`` if the text is not JSON either way."""
    try:
        return orjson.loads(payload), False
    except orjson.JSONDecodeError as first:
        return loads_repaired(payload, first), True


def loads_repaired(payload: bytes | memoryview, refused: orjson.JSONDecodeError) -> Any:
    """``payload``, which orjson ``refused``, parsed again without lone surrogates; raises
    ``refused`` if it has none or is still not JSON (callers parse with orjson first, so the hot
    path pays nothing here)."""
    fixed = without_lone_surrogates(bytes(payload))
    if fixed is None:
        raise refused
    try:
        return orjson.loads(fixed)
    except orjson.JSONDecodeError:
        raise refused from None
