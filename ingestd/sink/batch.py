"""What the store worker holds between two flushes: one batch of tweets and control effects."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from bson.raw_bson import RawBSONDocument
from pymongo.collection import Collection

from ingestd.sink.attempt import Started
from ingestd.sink.mongo import Document
from ingestd.spool.format import Record, RecordRef


class Entry(RawBSONDocument):
    """A tweet in a batch: its BSON (what ``insert_many`` sends as is), its id and its record's
    reference (not its payload: a batch would hold each tweet twice; a dead letter re-reads it).

    The document itself carries the id and the reference (set right after it is made), so holding
    a tweet costs no object beyond its document: this is the per-tweet path.
    """

    __slots__ = ("record", "tweet_id")
    tweet_id: int  # the _id, without decoding the BSON
    record: RecordRef  # for dead letters (``SpoolReader.reread``) and provenance


# An entry's receive time, without a Python frame (a batch's entries are counted at once).
ENTRY_RECV_NS = operator.attrgetter("record.recv_ns")


@dataclass(slots=True)
class Op:
    """A control message's effect on MongoDB, applied after the batch it arrived in."""

    kind: str
    record: Record
    apply: Callable[[Collection[Document]], object]


@dataclass(slots=True)
class Batch:
    # Tweets are held encoded: the parsed dict dies at once, so the cyclic GC never walks a batch
    # of ~200k live objects and the batch weighs its BSON size (~4 MB), not several times that.
    entries: list[Entry] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)
    tombstones: list[Document] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    last: Record | None = None  # newest record taken: acked when the batch is flushed
    started: float | None = None
    closed: bool = False  # holds an effect that must not reach later tweets: flush now
    nbytes: int = 0  # payload bytes of the records whose effect is held here

    def has_writes(self) -> bool:
        return bool(self.entries or self.deletes or self.ops)

    def size(self) -> int:
        """Writes held: tweets plus control effects (a run of deletes must not grow unbounded)."""
        return len(self.entries) + len(self.deletes) + len(self.ops)


@dataclass(slots=True)
class InFlight:
    """A batch's tweets and their first ``insert_many``, running on the helper thread;
    ``tried``: the ids a failed attempt may have written (``Inserter._attempt``)."""

    entries: list[Entry]
    tried: set[int]
    attempt: Started[object]


@dataclass(slots=True)
class Flight:
    """A flushed batch not yet finished: its insert (None: no tweets to insert) runs on the helper
    thread while the next batch is taken; ``ledger_mark`` ends its coverage records."""

    batch: Batch
    insert: InFlight | None
    ledger_mark: int
