"""The store worker's counters and histograms, as published in ``run/store.json``.

Every record read from the spool ends in exactly one bucket, so the counters reconcile::

    records_read == stored + duplicates + Σ deadlettered + Σ control + Σ skipped + pending

``replayed`` counts the records an earlier daemon run received (they were in the spool when this
run started) that this run read or found lost to damage: the stream worker's ``received`` never
counted them. ``spool_missing_records`` counts the records found lost to damage (record numbers
skipped), whoever received them; neither is part of the identity above.

The supervisor's collector (``ingestd.control.collector``) reads these keys: renaming one is a
change of the metrics.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ingestd.sink.batch import ENTRY_RECV_NS, Entry
from ingestd.sink.histogram import (
    BATCH_SIZE_BUCKETS,
    INSERT_SECONDS_BUCKETS,
    LATENCY_SECONDS_BUCKETS,
    Histogram,
)


def bump(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


@dataclass(slots=True)
class StoreCounters:
    """Plain totals, written by the store worker's parts on its thread."""

    records_read: int = 0
    # read or lost (spool_missing_records) of the records an earlier daemon run received
    replayed: int = 0
    spool_missing_records: int = 0  # records lost to spool damage: numbers the reader skipped
    read_seq: int = 0  # seq of the last spool record read (exact in-flight for metrics)
    stored: int = 0
    duplicates: int = 0
    deadlettered: dict[str, int] = field(default_factory=dict)
    control: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    deletes_applied: int = 0
    deleted_documents: int = 0
    control_rejected: int = 0
    disconnects: dict[str, int] = field(default_factory=dict)
    last_warning: dict[str, Any] | None = None
    batches: int = 0
    insert_seconds_total: float = 0.0
    retries: int = 0
    slow_writes: int = 0  # MongoDB operations that took mongo.slow_write_seconds or longer
    index_failures: int = 0
    # Indexes of the target that could not be made, by name: why (``mongo.error_name``; a
    # missing createIndex privilege is named). Emptied as they are made (a transient failure is
    # tried again after the next batch, a refusal at the next target or start).
    indexes_missing: dict[str, str] = field(default_factory=dict)
    match_errors: int = 0
    # messages parsed only once their lone surrogate escapes became U+FFFD (documents.surrogates)
    repaired: int = 0
    # Tweets matched by the newest generation's filters because their own generation's were not
    # found, by reason (``spool.generations.Unresolved``).
    matched_fallback: dict[str, int] = field(default_factory=dict)
    encoder_restarts: int = 0
    offloaded: int = 0  # records encoded by the encoder child
    state: str = "starting"
    last_error: str = ""
    # When (wall clock) last_error happened: a past error must not read as a present one.
    last_error_at: float | None = None
    last_batch_size: int = 0

    def as_dict(self, **live: Any) -> dict[str, Any]:
        """The ``run/store.json`` counters: these fields (dicts copied) plus ``live`` values that
        other parts own (pending, limit_missed, the dead-letter store's drops)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("deadlettered", "control", "skipped", "disconnects", "matched_fallback",
                     "indexes_missing"):
            out[name] = dict(out[name])
        out["insert_seconds_total"] = out["insert_seconds"] = round(self.insert_seconds_total, 6)
        out.update(live)
        return out


# The counters of the reconciliation's identity (``control.tally``): what ``Settled`` tracks.
SETTLED_KEYS = ("records_read", "replayed", "spool_missing_records", "stored", "duplicates",
                "deadlettered", "control", "skipped")
Counts = dict[str, int | dict[str, int]]


def settled_counts(totals: StoreCounters) -> Counts:
    """The ``SETTLED_KEYS`` of ``totals`` (dicts copied)."""
    return {key: (dict(value) if isinstance(value := getattr(totals, key), dict) else value)
            for key in SETTLED_KEYS}


def minus(a: Counts, b: Counts) -> Counts:
    """``a - b``, key by key and label by label (labels that come to 0 are left out)."""
    out: Counts = {}
    for key, value in a.items():
        other = b.get(key, 0)
        if isinstance(value, dict):
            labels = other if isinstance(other, dict) else {}
            diff = {k: value.get(k, 0) - labels.get(k, 0) for k in value.keys() | labels.keys()}
            out[key] = {k: n for k, n in diff.items() if n}
        else:
            out[key] = value - (other if isinstance(other, int) else 0)
    return out


class Settled:
    """The counts of the records up to the last ack (``seq``): the part of the counters that a
    successor, resuming at that checkpoint, will not count again.

    The counters also count records taken but not acked yet: those of the open batch and of
    the batch in flight. Records are counted as they are taken, in spool order (``StoreWorker``
    counts a record only once it is in the open batch, and a loss only once a later record is),
    and a batch's own outcomes (tombstoned tweets at its flush; stored, duplicates and dead
    letters at its finish) come between its flush and its ack. So at a flight's finish the open
    batch's part is the counters less the settled counts and the flight's part (taken at its
    flush), and after the ack the settled counts are the counters less that part. Three
    snapshots of eight counters per batch, none per record.
    """

    def __init__(self, totals: StoreCounters, seq: int) -> None:
        self._totals = totals
        self.seq = seq
        self.counts = settled_counts(totals)
        self._flight: Counts = {}  # the flight's part: counted, not acked

    def flushed(self) -> None:
        """The open batch became the flight (after its tombstoned tweets were counted)."""
        self._flight = minus(settled_counts(self._totals), self.counts)

    def finishing(self) -> Counts:
        """Before the flight's outcomes are counted: the open batch's part."""
        return minus(minus(settled_counts(self._totals), self.counts), self._flight)

    def finished(self, open_part: Counts, acked: int | None) -> None:
        """The flight's outcomes are counted and its last record, ``acked``, is about to be
        acked (None: a flight of no record, nothing acked; its part is the open batch's)."""
        if acked is not None:
            self.counts = minus(settled_counts(self._totals), open_part)
            self.seq = acked
        self._flight = {}


@dataclass(slots=True)
class StoreHistograms:
    """Batch size, insert time and each tweet's time from the wire to MongoDB's ack."""

    batch: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    insert: Histogram = field(default_factory=lambda: Histogram(INSERT_SECONDS_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_SECONDS_BUCKETS))

    def observe_batch(self, elapsed: float, entries: list[Entry]) -> None:
        self.batch.observe(len(entries))
        self.insert.observe(elapsed)
        now_ns = time.time_ns()
        # The reader stamps a network read's messages alike: a batch has few distinct times.
        for recv_ns, count in Counter(map(ENTRY_RECV_NS, entries)).items():
            self.latency.observe((now_ns - recv_ns) / 1e9, count)

    def as_dict(self) -> dict[str, Any]:
        """For run/store.json "hist" (see metrics.HISTOGRAMS)."""
        return {"batch_size": self.batch.as_dict(),
                "insert_seconds": self.insert.as_dict(),
                "store_latency_seconds": self.latency.as_dict()}
