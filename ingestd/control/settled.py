"""A store worker's counts at the spool checkpoint on disk, for when it dies between reports.

A killed store worker's successor reads again from the checkpoint on disk, which may be behind
the worker's last report (acks are written at most once per interval) or ahead of it (written
after the report). Carrying the last report would count the records in between twice, or not at
all. So before each checkpoint write the store worker writes, to ``spool/store.settled.json``, its
counts of the records up to that checkpoint (``sink.counters.Settled``) and up to the one on disk
before it::

    {"pid": P, "proc": T, "at": [[seq_on_disk, counts], [seq_being_written, counts]]}

(``proc``: ``runstate.process_token``, which tells apart two workers on the same pid.)

Whichever of the two the checkpoint file names once the worker is dead (the write may or may not
have happened) gives exactly what it counted of the records its successor will not read again;
the supervisor carries those counts (``tally.Carried``). Beside the checkpoint, in the same
folder: a read-only folder stops both, and on a full disk both are overwritten in place (this
file is padded, like the status files). No fsync: the file serves within one daemon run, across a
worker's death, never across a power loss. A failed write (logged once) leaves the pair before,
which names no later checkpoint: the supervisor then falls back to the last report.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import orjson
import structlog

from ingestd.control.runstate import DISK_FULL, PAD, overwrite_in_place, process_token

log = structlog.get_logger("ingestd.control.settled")

# Loaded by the supervisor too, which never loads the sink (pymongo): the same shape as
# ``sink.counters.Counts``, checked by value when read.
Counts = dict[str, int | dict[str, int]]
SETTLED_FILE = "store.settled.json"


def settled_path(state_dir: Path) -> Path:
    return state_dir / "spool" / SETTLED_FILE


class SettledRecord:
    """Writes ``spool/store.settled.json`` for the store worker (``StoreWorker.on_checkpoint``)."""

    def __init__(self, state_dir: Path, on_disk: int, counts: Counts) -> None:
        self._path = settled_path(state_dir)
        self._pid, self._proc = os.getpid(), process_token()
        self._known: dict[int, Counts] = {}  # counts at each checkpoint seq
        self._failing = False  # the last write failed (logged once, until one works)
        self.before_checkpoint(on_disk, on_disk, counts)  # killed before its first checkpoint

    def before_checkpoint(self, on_disk: int, seq: int, counts: Counts) -> None:
        """Checkpoint ``seq`` is about to replace ``on_disk``; ``counts`` are those at ``seq``."""
        known = {on_disk: self._known[on_disk]} if on_disk in self._known else {}
        known[seq] = counts
        self._known = known
        data = orjson.dumps({"pid": self._pid, "proc": self._proc,
                             "at": [[s, c] for s, c in known.items()]})
        try:
            self._write(data + b" " * (-len(data) % PAD))  # JSON allows trailing white space
        except OSError as exc:
            if not self._failing:
                log.warning("settled_write_failed", path=str(self._path), error=str(exc),
                            effect="should this store worker be killed, its last report is "
                                   "carried instead of its counts at the checkpoint")
            self._failing = True
        else:
            self._failing = False

    def _write(self, data: bytes) -> None:
        tmp = self._path.with_name(f".{SETTLED_FILE}.{self._pid}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno not in DISK_FULL:
                raise
            if not overwrite_in_place(self._path, data):
                raise


def read_settled(state_dir: Path, pid: int, seq: int, proc: object = None) -> Counts | None:
    """Worker ``pid``'s counts at checkpoint ``seq``, if its file has them (else None); with
    ``proc`` (its status file's), only if that process wrote the file (a pid comes back)."""
    try:
        doc = orjson.loads(settled_path(state_dir).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("pid") != pid or not isinstance(doc.get("at"), list):
        return None
    if proc is not None and doc.get("proc", proc) != proc:
        return None
    for entry in doc["at"]:
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == seq:
            return _valid(entry[1])
    return None


def _valid(counts: Any) -> Counts | None:
    """``counts`` if each of its counters is a number or a {label: number} (else None)."""
    if not isinstance(counts, dict) or not counts:
        return None
    out: Counts = {}
    for key, value in counts.items():
        if _count(value):
            out[str(key)] = value
        elif isinstance(value, dict) and all(_count(n) for n in value.values()):
            out[str(key)] = {str(k): n for k, n in value.items()}
        else:
            return None
    return out


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
