"""`Section`: typed, error-collecting access to one mapping of settings.yaml.

A getter that meets a bad value records "<key.path>: <reason>" and carries on with the default,
so one load reports every problem. The default of a key is read from the section's schema
dataclass (ingestd/config/schema.py), where it is written once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from ingestd.config.loader import MISSING, Context, join
from ingestd.config.values import (
    SIZE_MAX,
    is_int,
    is_number,
    kind,
    number_text,
    parse_size,
    quoted,
    range_problem,
)


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)  # math.isnan(10**400) overflows


@functools.cache
def _schema_fields(schema: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(schema)}


# Integers are written to BSON and to the status files as 64-bit signed integers.
INT_MAX = (1 << 63) - 1
# Every ``number`` setting is a duration in seconds: a week is far beyond any sensible one, and
# keeps each within what timers and libcurl's millisecond options take (1e30 overflowed them).
SECONDS_MAX = 7 * 86400.0


class Section:
    """One YAML mapping at key path `path`, read by the builder of `schema`; unknown keys are
    reported by finish().

    Each getter's ``default`` (used when the key is absent or invalid) is the schema field's
    default unless given: pass one only where it is not a field default (a placeholder, or a
    default that depends on another key).
    """

    def __init__(self, ctx: Context, path: str, raw: object, schema: type | None = None) -> None:
        self.ctx = ctx
        self.path = path
        self.schema = schema
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            ctx.error(path, f"must be a mapping, got {kind(raw)}")
            raw = {}
        self._raw: dict[object, object] = raw
        self._known: list[str] = []
        self._children: list[Section] = []

    def key(self, name: str) -> str:
        return join(self.path, name)

    def error(self, name: str, reason: str) -> None:
        self.ctx.error(self.key(name), reason)

    def default(self, name: str) -> Any:
        """The schema's default for `name` (a builder asking for one that has none is a bug)."""
        found = _schema_fields(self.schema).get(name) if self.schema else None
        if found is not None and found.default is not dataclasses.MISSING:
            return found.default
        if found is not None and found.default_factory is not dataclasses.MISSING:
            return found.default_factory()
        raise LookupError(f"no schema default for {self.key(name)}")

    def get(self, name: str) -> object:
        self._known.append(name)
        return self._raw.get(name, MISSING)

    def is_set(self, name: str) -> bool:
        """Whether the key holds something other than absent/null/empty/false/'none'."""
        value = self._raw.get(name)
        return value not in (None, False, "none") and value != []

    def section(self, name: str, schema: type | None = None) -> Section:
        raw = self.get(name)
        child = Section(self.ctx, self.key(name), None if raw is MISSING else raw, schema)
        self._children.append(child)
        return child

    def finish(self) -> None:
        for key in self._raw:
            if key not in self._known:
                self.ctx.error(self.key(str(key)), self._unknown_reason(key))
        for child in self._children:
            child.finish()

    def _unknown_reason(self, key: object) -> str:
        import difflib  # error path only: the daemons do not carry it

        close = difflib.get_close_matches(str(key), self._known, n=1, cutoff=0.6)
        if close:
            return f"unknown key; did you mean {close[0]!r}?"
        return f"unknown key (known keys: {', '.join(sorted(set(self._known)))})"

    # -- typed getters: on error they record it and return the default

    def _fallback(self, name: str, default: Any) -> Any:
        return self.default(name) if default is MISSING else default

    def _typed(self, name: str, default: Any, ok: Callable[[object], bool], what: str,
               *, nullable: bool = False, required: bool = False) -> Any:
        value = self.get(name)
        if value is MISSING:
            if required:
                self.error(name, "required key is missing")
            return default
        if value is None and nullable:
            return None
        if not ok(value):
            self.error(name, f"must be {what}, got {kind(value)}")
            return default
        return value

    def boolean(self, name: str, *, default: Any = MISSING) -> bool:
        default = self._fallback(name, default)
        return bool(self._typed(name, default, lambda v: isinstance(v, bool), "true or false"))

    def boolean_or(self, name: str, word: Literal["auto"], *, default: Any = MISSING
                   ) -> bool | Literal["auto"]:
        """true, false, or ``word`` (a third mode)."""
        default = self._fallback(name, default)
        value = self._typed(name, default, lambda v: isinstance(v, bool) or v == word,
                            f'true, false or "{word}"')
        return bool(value) if isinstance(value, bool) else word

    def integer(self, name: str, lo: int | None = None, hi: int | None = None, *,
                default: Any = MISSING) -> int:
        fallback: int = self._fallback(name, default)
        value: int = self._typed(name, fallback, is_int, "an integer")
        if hi is None and abs(value) > INT_MAX:
            self.error(name, f"must be a 64-bit integer (<= {INT_MAX}), "
                             f"got {number_text(value)}")
            return fallback
        return value if self._in_range(name, value, lo=lo, hi=hi) else fallback

    def number(self, name: str, *, gt: float | None = None, lo: float | None = None,
               hi: float | None = None, default: Any = MISSING) -> float:
        fallback = float(self._fallback(name, default))
        # Checked as written (an int of any size): float() of a 400-digit integer overflows.
        value: float = self._typed(name, fallback, is_number, "a number")
        if hi is None and not _nan(value) and abs(value) > SECONDS_MAX:
            self.error(name, f"must be at most {number_text(SECONDS_MAX)} seconds (a week), "
                             f"got {number_text(value)}")
            return fallback
        return float(value) if self._in_range(name, value, gt=gt, lo=lo, hi=hi) else fallback

    def _in_range(self, name: str, value: float, **bounds: float | None) -> bool:
        problem = range_problem(value, **bounds)
        if problem is not None:
            self.error(name, problem)
        return problem is None

    def text(self, name: str, *, choices: Sequence[str] = (), required: bool = False,
             default: Any = MISSING) -> str:
        # A required key has no default: "" stands in while its error is reported.
        default = "" if required else self._fallback(name, default)
        value = self._typed(name, default, lambda v: isinstance(v, str), "a string",
                            required=required)
        if required and self._raw.get(name) == "":
            self.error(name, "must not be empty")
        return str(value) if self._choice_ok(name, value, choices) else str(default)

    def optional_text(self, name: str, *, choices: Sequence[str] = (),
                      default: Any = MISSING) -> str | None:
        default = self._fallback(name, default)
        value = self._typed(name, default, lambda v: isinstance(v, str), "a string or null",
                            nullable=True)
        if value is None:
            return None
        return str(value) if self._choice_ok(name, value, choices) else default

    def _choice_ok(self, name: str, value: object, choices: Sequence[str]) -> bool:
        if choices and value not in choices:
            self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
            return False
        return True

    def items(self, name: str) -> list[tuple[str, object]]:
        """(key path, value) of each list item; absent or null means an empty list."""
        value = self.get(name)
        if value is MISSING or value is None:
            return []
        if not isinstance(value, list):
            self.error(name, f"must be a list, got {kind(value)}")
            return []
        return [(f"{self.key(name)}[{i}]", item) for i, item in enumerate(value)]

    def size(self, name: str) -> int:
        value = self.get(name)
        if value is MISSING:
            return int(self.default(name))
        parsed = parse_size(value)
        if parsed is None:
            self.error(name, f"must be a positive size in bytes or a string like '64MiB' "
                             f"(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
                             f"got {_quoted(value)}")
            return int(self.default(name))
        if parsed > SIZE_MAX:
            self.error(name, f"must be at most 1024TiB ({SIZE_MAX} bytes), got {_quoted(value)}")
            return int(self.default(name))
        return parsed


def _quoted(value: object) -> str:
    """What a size error says it got: a string or a number as written (shortened), else its
    kind."""
    if isinstance(value, str):
        return f"{kind(value)} {quoted(value)}"
    if isinstance(value, int | float) and is_number(value):
        return number_text(value)
    return kind(value)
