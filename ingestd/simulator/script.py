"""Fault scripts: per-connection step lists applied to accepted connections 1, 2, 3… in order.

A script is a JSON/YAML list of step lists (or ``{"connections": [...]}``). Entry *k* applies to
the *k*-th request that passed authentication and parameter checks; later connections, and a
connection whose steps are used up, stream normally. Every step is validated at load time so a
typo fails with the file, connection, step and field named, not mid-test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BAD_LINE_KINDS = ("truncated_json", "invalid_utf8", "json_array", "oversize", "non_object",
                  "deep_nesting", "nested_500", "date_out_of_range", "v2_date_out_of_range",
                  "v2_rules_not_a_list", "far_timestamp", "withheld_nested", "notice_nested",
                  "slow_word")
CONTROL_TYPES = ("delete", "scrub_geo", "limit", "status_withheld", "user_withheld", "warning")


class ScriptError(ValueError):
    """An invalid script; the message names where (file, connection, step) and what."""


@dataclass(frozen=True, slots=True)
class Step:
    """One validated step: ``kind`` is the step's key, ``value`` its checked argument."""

    kind: str
    value: Any
    extra: dict[str, Any] = field(default_factory=dict)


def run_steps(steps: Sequence[Step], take: Callable[[Step], str | None]) -> str | None:
    """Take a connection's script steps up to ``then`` (v1.1 and v2 sessions alike): the reason
    the first step that ends the connection gave, or None when the steps ran out."""
    for step in steps:
        if step.kind == "then":
            break
        reason = take(step)
        if reason is not None:
            return reason
    return None


def _positive_number(where: str, value: object, *, integer: bool = False) -> float:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise ScriptError(f"{where}: expected {kind}, got {value!r}")
    return value


def _step_status(where: str, step: dict[str, Any]) -> Step:
    status = step["status"]
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ScriptError(f"{where}.status: expected an HTTP status code, got {status!r}")
    body = step.get("body", "")
    headers = step.get("headers", {})
    if not isinstance(body, str):
        raise ScriptError(f"{where}.body: expected a string, got {type(body).__name__}")
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int) for k, v in headers.items()
    ):
        raise ScriptError(f"{where}.headers: expected a mapping of names to strings")
    extra = {"body": body, "headers": {k: str(v) for k, v in headers.items()}}
    return Step("status", status, extra)


def _step_trickle(where: str, value: object) -> Step:
    if not isinstance(value, dict) or set(value) - {"bytes", "interval", "count"}:
        raise ScriptError(f"{where}.trickle: expected {{bytes, interval, count}}, got {value!r}")
    size = _positive_number(f"{where}.trickle.bytes", value.get("bytes", 1), integer=True)
    if size < 1:
        raise ScriptError(f"{where}.trickle.bytes: must be at least 1")
    return Step(
        "trickle",
        {
            "bytes": int(size),
            "interval": _positive_number(f"{where}.trickle.interval", value.get("interval", 0.1)),
            "count": int(
                _positive_number(f"{where}.trickle.count", value.get("count", 1), integer=True)
            ),
        },
    )


def _step_corrupt_gzip(where: str, value: object) -> Step:
    """``corrupt_gzip: {tweets: N, partial: true}``: the bad bytes in the write of N tweets (and of
    half of one more), so that a client reads them together; ``true`` sends them alone."""
    if not isinstance(value, dict) or set(value) - {"tweets", "partial"}:
        raise ScriptError(f"{where}.corrupt_gzip: expected true or {{tweets, partial}}, "
                          f"got {value!r}")
    tweets = int(_positive_number(f"{where}.corrupt_gzip.tweets", value.get("tweets", 0),
                                  integer=True))
    partial = value.get("partial", False)
    if not isinstance(partial, bool):
        raise ScriptError(f"{where}.corrupt_gzip.partial: expected true or false, got {partial!r}")
    return Step("corrupt_gzip", True, {"tweets": tweets, "partial": partial})


def _step_simple(where: str, kind: str, value: object) -> Step:
    """Steps whose single value is a number, a flag, a name or a list of names."""
    if kind in ("deliver", "split", "disconnect", "lone_surrogates"):
        number = int(_positive_number(f"{where}.{kind}", value, integer=True))
        if kind == "split" and number < 1:
            raise ScriptError(f"{where}.split: must be at least 1 byte")
        return Step(kind, number)
    if kind in ("keepalive_only", "stall"):
        return Step(kind, _positive_number(f"{where}.{kind}", value))
    if kind in ("close_mid_message", "reset", "close", "corrupt_gzip"):
        if value is not True:
            raise ScriptError(f"{where}.{kind}: expected true, got {value!r}")
        return Step(kind, True)
    if kind == "bad_lines":
        if not isinstance(value, list) or not all(v in BAD_LINE_KINDS for v in value):
            raise ScriptError(f"{where}.bad_lines: expected a list of {', '.join(BAD_LINE_KINDS)}")
        return Step(kind, tuple(value))
    if kind == "control":
        if value not in CONTROL_TYPES:
            raise ScriptError(f"{where}.control: expected one of {', '.join(CONTROL_TYPES)}")
        return Step(kind, value)
    if kind == "then":
        if value != "normal":
            raise ScriptError(f"{where}.then: only 'normal' is supported, got {value!r}")
        return Step(kind, value)
    known = ("deliver, keepalive_only, stall, close_mid_message, corrupt_gzip, reset, close, "
             "status, disconnect, bad_lines, lone_surrogates, trickle, split, control, then")
    raise ScriptError(f"{where}: unknown step {kind!r} (known: {known})")


def parse_step(where: str, raw: object, first: bool) -> Step:
    if not isinstance(raw, dict) or not raw:
        raise ScriptError(f"{where}: expected a mapping like {{deliver: 10}}, got {raw!r}")
    if "status" in raw:
        if not first:
            raise ScriptError(f"{where}: a status step must be a connection's first step")
        unknown = set(raw) - {"status", "body", "headers"}
        if unknown:
            raise ScriptError(f"{where}: unexpected keys with status: {sorted(unknown)}")
        return _step_status(where, raw)
    if "reset" in raw and set(raw) <= {"reset", "mid_message"}:
        _step_simple(where, "reset", raw["reset"])
        return Step("reset", True, {"mid_message": raw.get("mid_message") is True})
    if len(raw) != 1:
        raise ScriptError(f"{where}: one key per step, got {sorted(raw)}")
    ((kind, value),) = raw.items()
    if kind == "trickle":
        return _step_trickle(where, value)
    if kind == "corrupt_gzip" and value is not True:
        return _step_corrupt_gzip(where, value)
    return _step_simple(where, str(kind), value)


class FaultScript:
    """Validated step lists, handed out one per accepted connection (thread-safe)."""

    def __init__(self, connections: Sequence[Sequence[object]], source: str = "<script>") -> None:
        if isinstance(connections, str | bytes) or not isinstance(connections, Sequence):
            raise ScriptError(f"{source}: expected a list of per-connection step lists")
        self.connections: list[list[Step]] = []
        for c, steps in enumerate(connections, start=1):
            if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
                raise ScriptError(f"{source}: connection {c}: expected a list of steps")
            self.connections.append(
                [
                    parse_step(f"{source}: connection {c} step {i + 1}", s, i == 0)
                    for i, s in enumerate(steps)
                ]
            )
        self._next = 0
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> FaultScript:
        try:
            text = path.read_text(encoding="utf-8")
            data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            raise ScriptError(f"{path}: cannot read script: {exc}") from None
        if isinstance(data, dict):
            data = data.get("connections")
        return cls(data, str(path))

    def take(self) -> list[Step]:
        """The next connection's steps (empty once the script has run out)."""
        with self._lock:
            index, self._next = self._next, self._next + 1
        return list(self.connections[index]) if index < len(self.connections) else []
