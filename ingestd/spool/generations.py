"""The filters each settings generation was received under, kept in the state folder.

Every spool record carries the generation of the settings its connection was opened with; the
store worker computes ``_ingest.matched`` with that generation's filters. Process timing and
restarts must not change which filters those are, so the supervisor records each generation's
filter spec here (``<state_dir>/generations/<N>.json``, written once, atomically) **before** any
worker can write a record under it, and the store worker resolves a generation it does not know
yet from here (docs/design.md, "Generations").

Generation numbers are unique for the life of a state folder: a start takes the number after the
newest one recorded. ``first`` holds the first number recorded in this folder; a folder that
held a spool before generations were recorded (an older ingestd) starts at ``LEGACY_FIRST``, so
that the numbers of the records it may replay (each older run counted from 1) are never given
again. A record whose generation is below ``first`` is one of those: its filters were never
recorded. The newest ``KEEP`` generations are kept (a spool backlog across more reloads than that
falls back, counted as ``pruned``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from ingestd.spool.format import fsync_dir, write_atomically

DIRNAME = "generations"
FIRST_FILE = "first"
STOPPED_FILE = "stopped_at"  # the spool's last record when this version last stopped cleanly
SUPERSEDED = "superseded"  # generation files set aside (``supersede_if_appended``)
KEEP = 256  # generations kept: each file is written once, a few KB (at most ~100 KB)
LEGACY_FIRST = 65536  # first generation of a state folder whose spool predates this record
# A spool record's generation field is a uint32 (``format.BODY``): a number past it, from a file
# this version never wrote, is no generation of ours (numbering after it, every append failed).
MAX_GENERATION = 2**32 - 1

Box = tuple[float, float, float, float]
FilterSpec = tuple[list[str], list[int], list[Box]]
"""(track phrases, follow ids, location boxes): what ``documents.matching.Matcher`` is built of."""

Unresolved = Literal["before_record", "pruned", "missing", "unreadable"]
"""Why a generation's filters cannot be found: recorded before this folder kept generations (an
older ingestd's run), pruned (more than ``KEEP`` generations since), never recorded, or a file
that cannot be read."""
UNRESOLVED_REASONS: tuple[str, ...] = get_args(Unresolved)


def filter_spec(stream: object) -> FilterSpec:
    """The filters of ``stream`` (``config.schema.StreamSettings``; a stand-in without them has
    none)."""
    track: Sequence[str] = getattr(stream, "track", ())
    follow: Sequence[int] = getattr(stream, "follow", ())
    boxes: Sequence[Sequence[float]] = getattr(stream, "locations", ())
    return (list(track), list(follow), [_box(b) for b in boxes])


def _in_range(generation: int) -> bool:
    return 1 <= generation <= MAX_GENERATION


def _box(values: Sequence[Any]) -> Box:
    w, s, e, n = (float(v) for v in values)
    return (w, s, e, n)


class GenerationRecord:
    """``<state_dir>/generations/``: one file per generation, written by the supervisor, read by
    the store worker."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.directory = state_dir / DIRNAME

    def _numbers(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        numbers = (int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
        return sorted(n for n in numbers if _in_range(n))

    def first(self) -> int | None:
        """The first generation recorded in this folder; None before any was (or unreadable)."""
        try:
            first = int((self.directory / FIRST_FILE).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        return first if _in_range(first) else None

    def next_generation(self) -> int:
        """The number a start gives its first generation: after the newest recorded, else 1 on a
        new folder and ``LEGACY_FIRST`` on one whose spool an older ingestd wrote (its records
        may be replayed with numbers from 1 up). Creates the record's folder (``OSError``)."""
        numbers = self._numbers()
        first = self.first()
        if numbers:
            return numbers[-1] + 1
        if first is not None:
            return first  # recorded, then every file lost: start where the record started
        spool = self.state_dir / "spool"
        legacy = spool.is_dir() and any(spool.iterdir())
        first = LEGACY_FIRST if legacy else 1
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.directory, FIRST_FILE, b"%d\n" % first)
        return first

    def note_stop(self, last_seq: int) -> None:
        """At a stop, every worker gone: the spool's last record number. The next start compares
        the spool with it (``supersede_if_appended``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.directory, STOPPED_FILE, b"%d\n" % last_seq)

    def supersede_if_appended(self, last_seq: int) -> tuple[int, int] | None:
        """At a start, before numbering: the records appended since this version's last stop
        (``last_seq`` is now the spool's last), if any; their range, else None.

        Only another program appends to a stopped daemon's spool: an older ingestd (README,
        "Downgrade"), which numbers its generations from 1 again, so a record's number no longer
        says which of the filters recorded here it came under. The generations recorded so far
        are set aside (``superseded/``) and numbering goes on past them: those records, like
        every older one, are then matched by the newest filters and counted (``before_record``),
        never by another run's filters. The mark is removed at once, so a run that crashes
        leaves none to compare with (its own appends are not another program's).
        """
        try:
            stopped: int | None = int((self.directory / STOPPED_FILE).read_text("ascii"))
        except (OSError, ValueError):
            stopped = None
        with contextlib.suppress(FileNotFoundError):
            (self.directory / STOPPED_FILE).unlink()
            fsync_dir(self.directory)
        if stopped is None or last_seq <= stopped:
            return None
        numbers = self._numbers()
        if numbers:
            aside = self.directory / SUPERSEDED
            aside.mkdir(exist_ok=True)
            for number in numbers:
                os.replace(self.directory / f"{number}.json", aside / f"{number}.json")
            _write_atomically(self.directory, FIRST_FILE, b"%d\n" % (numbers[-1] + 1))
        return stopped + 1, last_seq

    def record(self, generation: int, spec: FilterSpec) -> None:
        """Keep ``generation``'s filters durably (fsynced), then forget all but the newest
        ``KEEP`` generations. ``OSError`` if it could not be written: nothing may run under
        ``generation`` then."""
        if not _in_range(generation):  # past 4294967295.json: a file put there by hand
            raise OSError(errno.ERANGE, f"generation {generation} is past the spool's "
                          f"{MAX_GENERATION}", str(self.directory / f"{generation}.json"))
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.first() is None:
            _write_atomically(self.directory, FIRST_FILE, b"%d\n" % generation)
        track, follow, boxes = spec
        doc = {"generation": generation, "track": track, "follow": follow,
               "locations": [list(b) for b in boxes]}
        _write_atomically(self.directory, f"{generation}.json", orjson.dumps(doc))
        for old in self._numbers()[:-KEEP]:
            with contextlib.suppress(OSError):
                (self.directory / f"{old}.json").unlink()

    def lookup(self, generation: int) -> FilterSpec | Unresolved:
        """``generation``'s filters, or why they cannot be found."""
        try:
            raw = (self.directory / f"{generation}.json").read_bytes()
        except FileNotFoundError:
            return self._why_missing(generation)
        except OSError:
            return "unreadable"
        try:
            return _spec(orjson.loads(raw))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return "unreadable"

    def _why_missing(self, generation: int) -> Unresolved:
        first = self.first()
        if first is None or generation < first:
            return "before_record"
        numbers = self._numbers()
        return "pruned" if numbers and generation < numbers[0] else "missing"


def _spec(doc: Any) -> FilterSpec:
    """The filters of a generation file, as ``record`` writes them; ``TypeError`` or
    ``ValueError`` for any other shape (a file edited or garbled by hand): a string's characters
    taken as phrases matched nothing, silently, and a blank phrase, which no settings validate,
    made ``documents.matching.Matcher`` raise in the store worker at every start."""
    track, follow, boxes = doc["track"], doc["follow"], doc["locations"]
    if not all(isinstance(v, list) for v in (track, follow, boxes, *boxes)):
        raise TypeError("filters are lists")
    if not all(isinstance(t, str) and t.split() for t in track):
        raise ValueError("a track phrase is text with a word")
    if not all(isinstance(f, int) and not isinstance(f, bool) for f in follow):
        raise TypeError("follow ids are integers")
    return (track, follow, [_box(b) for b in boxes])


def _write_atomically(directory: Path, name: str, data: bytes) -> None:
    write_atomically(directory / name, data)
