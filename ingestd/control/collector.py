"""The ``ingestd_*`` metric families, built at scrape time from ``<state_dir>/run/*.json``.

The workers share no memory with the supervisor, so nothing here keeps counters of its own: on each
scrape ``RunStateCollector`` reads the run-state files (rewritten by every worker each second) and
builds the metric families from them. A restarted worker starts its own counters from zero again;
the supervisor carries the counts of the workers it reaped (``tally``), so the counters here never
fall while the supervisor runs (a new daemon run is a new process: an ordinary counter reset).

The counters reconcile (``ingestd_messages_in_flight`` is the difference still on its way)::

    received + replayed = stored + duplicate + deadlettered + control + skipped + dropped
                          + in_flight
                          (+ spool_missing: records lost to damage of the spool files, if any;
                           those an earlier run received are counted in replayed too)

Registered by the supervisor's HTTP listener (``metrics``); loaded by the supervisor only, on the
first scrape. prometheus_client is imported where the families are built, like the listener.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingestd.config.schema import SpoolSettings
from ingestd.control import runstate, status, tally
from ingestd.control.tally import in_flight, received_total

if TYPE_CHECKING:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )

# run/store.json "hist" key (see ``metrics.Histogram``) → (metric name, help). Units are in the
# names, as Prometheus wants.
HISTOGRAMS = {
    "batch_size": ("ingestd_insert_batch_size", "Tweets per insert_many batch."),
    "insert_seconds": ("ingestd_insert_duration_seconds",
                       "Time to get one batch acknowledged by MongoDB, retries included."),
    "store_latency_seconds": ("ingestd_receive_to_store_seconds",
                              "Time from a tweet's arrival off the wire to MongoDB's ack."),
}


# Run-file counter key → (metric name, help), for the counters published as they are.
STREAM_COUNTERS = {
    "attempts": ("ingestd_stream_connection_attempts_total", "Connection attempts."),
    "bytes": ("ingestd_stream_bytes_total", "Body bytes read (after decompression)."),
    "keepalives": ("ingestd_stream_keepalives_total", "Keep-alive blank lines."),
    "limit_missed": ("ingestd_limit_missed_total",
                     "Tweets the endpoint reported as not delivered (limit notices)."),
    "warnings": ("ingestd_stream_warnings_total", "Stall warnings from the endpoint."),
}
STORE_COUNTERS = {
    "records_read": ("ingestd_records_read_total", "Spool records read by the store worker."),
    "replayed": ("ingestd_spool_replayed_total", "Spool records an earlier daemon run received, "
                 "read by this one or found lost to damage (received + replayed reconcile with "
                 "the outcomes and the spool's missing records)."),
    "batches": ("ingestd_insert_batches_total", "insert_many batches written."),
    "retries": ("ingestd_insert_retries_total", "MongoDB operations retried."),
    "deletes_applied": ("ingestd_deletes_applied_total", "Delete notices applied."),
    "control_rejected": ("ingestd_control_rejected_total",
                         "Control messages whose effect MongoDB refused (a delete, scrub_geo or "
                         "withheld update); each is in the dead-letter files as "
                         "control_rejected."),
    "repaired": ("ingestd_messages_repaired_total",
                 "Messages parsed only after each lone UTF-16 surrogate escape in their JSON (half "
                 "an emoji, which JSON parsers and BSON refuse) was replaced by U+FFFD."),
    "offloaded": ("ingestd_encoder_offloaded_total",
                  "Tweets parsed and encoded by the store worker's encoder child."),
    "encoder_restarts": ("ingestd_encoder_restarts_total",
                         "Times the encoder child was lost (its tweets were encoded in-process)."),
    "slow_writes": ("ingestd_mongo_slow_writes_total", "MongoDB operations acknowledged (or "
                    "failed) only after mongo.slow_write_seconds."),
    "spool_corrupt_records": ("ingestd_spool_corrupt_records_total",
                              "Damaged regions of the spool skipped (a run of bad bytes each)."),
    "spool_missing_records": ("ingestd_spool_missing_records_total",
                              "Spool record numbers skipped: records lost to damage, never "
                              "stored."),
    "coverage_gaps": ("ingestd_coverage_gaps_total",
                      "Gaps opened in the coverage ledger (the stream stopped delivering)."),
}


# -- reading run files -----------------------------------------------------------------------------


_num, _counts, _section = tally.num, tally.counts, tally.section


def _dir_bytes(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


class _LastMessage:
    """Wall-clock time of the last message, from the run file or, if it lacks the field, from
    watching ``received`` change between scrapes (then accurate to the scrape interval)."""

    def __init__(self) -> None:
        self._seen: tuple[object, float] | None = None
        self._changed_at = time.time()

    def time(self, stream: Mapping[str, Any], now: float) -> float:
        published = stream.get("last_message_time")
        if isinstance(published, int | float):
            return float(published)
        key = (stream.get("pid"), _num(_section(stream, "counters").get("received")))
        if self._seen is None or self._seen[0] != key:
            self._seen, self._changed_at = (key, now), now
        return self._changed_at


# -- label values known in advance -----------------------------------------------------------------


@functools.cache
def known_labels() -> dict[str, tuple[str, ...]]:
    """Labelled counter → the label values it has a series for from the start (at 0).

    Taken from the code that produces the values, so a new reason needs no edit here. Imported
    on first scrape: they pull in modules of every stage.
    """
    from ingestd.control.pool import ROLES
    from ingestd.documents.labels import CONTROL_TYPES, MESSAGE_REASONS, SKIP_REASONS
    from ingestd.source.backoff import Ending
    from ingestd.spool.generations import UNRESOLVED_REASONS
    from ingestd.spool.writer import DROP_REASONS

    return {
        "ingestd_worker_restarts_total": ROLES,
        "ingestd_stream_reconnects_total": tuple(ending.value for ending in Ending),
        "ingestd_messages_deadlettered_total": MESSAGE_REASONS,
        "ingestd_messages_dropped_total": DROP_REASONS,
        "ingestd_control_messages_total": CONTROL_TYPES,
        "ingestd_tweets_skipped_total": SKIP_REASONS,
        "ingestd_tweets_matched_fallback_total": UNRESOLVED_REASONS,
    }


def known_counter(name: str, doc: str, label: str,
                  values: Mapping[str, float]) -> CounterMetricFamily:
    """``labelled_counter`` with the known values of ``name`` (``known_labels``) at 0."""
    return labelled_counter(name, doc, label, values, known_labels()[name])


# -- the collector ---------------------------------------------------------------------------------


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, value=value)


def labelled_counter(name: str, doc: str, label: str, values: Mapping[str, float],
                     known: Iterable[str] = ()) -> CounterMetricFamily:
    """One series per label value; every ``known`` value has one from the start, at 0, so that
    ``rate()``/``increase()`` see the first event (a series born at 1 shows no increase)."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted({**dict.fromkeys(known, 0.0), **values}.items()):
        family.add_metric([key], value)
    return family


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


def labelled_gauge(name: str, doc: str, label: str,
                   values: Mapping[str, float]) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def histogram(name: str, doc: str, data: object) -> HistogramMetricFamily | None:
    """A histogram family from ``Histogram.as_dict()`` output; None if the shape is wrong."""
    from prometheus_client.core import HistogramMetricFamily

    if not isinstance(data, Mapping):
        return None
    bounds, counts = data.get("buckets"), data.get("counts")
    if (not isinstance(bounds, list) or not isinstance(counts, list)
            or len(counts) != len(bounds) + 1):
        return None
    cumulative, buckets = 0.0, []
    for bound, count in zip([*bounds, "+Inf"], counts, strict=True):
        cumulative += _num(count)
        le = bound if isinstance(bound, str) else repr(float(bound))
        buckets.append((le, cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=_num(data.get("sum")))


def plain_counters(table: Mapping[str, tuple[str, str]],
                   counters: Mapping[str, Any]) -> Iterator[CounterMetricFamily]:
    """One counter family per ``table`` entry, valued from the run file's ``counters``."""
    for key, (name, doc) in table.items():
        yield counter(name, doc, _num(counters.get(key)))


class RunStateCollector:
    """Builds every ``ingestd_*`` family from ``<state_dir>/run/*.json`` at scrape time.

    A prometheus_client ``Collector`` by duck typing (the registry only calls ``collect``):
    subclassing would import prometheus_client with this module.
    """

    def __init__(self, state_dir: Path, spool: SpoolSettings | None = None) -> None:
        self.state_dir = state_dir
        self.spool = spool  # the bounds the daemon started with (see ``_spool_bounds``)
        self._last_message = _LastMessage()
        self._lock = threading.Lock()  # scrapes may run concurrently (threaded server)

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        docs = {role: runstate.read_status(self.state_dir, role) or {}
                for role in ("supervisor", "stream", "store")}
        # the daemon run's counts: the running worker's plus its predecessors' (``tally``)
        for role in ("stream", "store"):
            docs[role] = tally.role_totals(docs[role], docs["supervisor"], role)
        yield from self._workers(docs, now)
        yield from self._stream(docs["stream"], now)
        yield from self._store(docs["store"])
        yield from self._flow(docs["stream"], docs["store"], now)
        yield from self._disk()

    def _workers(self, docs: Mapping[str, Mapping[str, Any]], now: float) -> Iterable[Metric]:
        sup = docs["supervisor"]
        timeout = status.timeout_in_force(sup)
        frozen = status.files_frozen(self.state_dir, sup.get("pid")) is not None
        yield labelled_gauge("ingestd_worker_up", "1 while the role's process heartbeats.", "role",
                             {role: 1.0 if status.alive(docs[role], now, timeout, frozen) else 0.0
                              for role in ("supervisor", "stream", "store")})
        yield gauge("ingestd_config_generation", "Settings generation in force (numbered on "
                    "from the state folder's last run, +1 per successful reload).",
                    _num(sup.get("generation")))
        yield counter("ingestd_config_reload_failures_total",
                      "Reloads refused because the new settings were invalid.",
                      _num(sup.get("reload_failures")))
        yield gauge("ingestd_config_reload_refused", "1 while the latest reload attempt was "
                    "refused (ingestd status: degraded, last reload refused); 0 once a later one "
                    "is applied.", 1.0 if sup.get("reload_refused") else 0.0)
        yield known_counter("ingestd_worker_restarts_total", "Worker processes restarted.",
                            "role", _counts(sup.get("restarts")))

    def _stream(self, stream: Mapping[str, Any], now: float) -> Iterable[Metric]:
        c = _section(stream, "counters")
        state = status.stream_state(str(stream.get("state", "")))
        yield labelled_gauge("ingestd_stream_state", "1 for the stream's current state.", "state",
                             {name: 1.0 if name == state else 0.0
                              for name in (*status.STREAM_STATES, "other")})
        yield gauge("ingestd_stream_connected", "1 while a connection is delivering.",
                    1.0 if stream.get("delivering") else 0.0)
        rules = _section(stream, "rules")
        yield gauge("ingestd_stream_rules_refused", "1 while the endpoint refuses stream.rules "
                    "(v2) and none of them are in force (refused since the run began): the "
                    "stream delivers nothing they match; coverage gap rules_refused.",
                    1.0 if rules.get("error") and rules.get("generation") is None else 0.0)
        yield gauge("ingestd_stream_backoff_seconds", "The reconnect delay last chosen.",
                    _num(stream.get("backoff")))
        yield known_counter("ingestd_stream_reconnects_total",
                            "Connections ended, by reason.", "reason", _counts(c.get("endings")))
        yield from plain_counters(STREAM_COUNTERS, c)
        yield from self._ha(stream, now)
        if stream:
            with self._lock:
                last = self._last_message.time(stream, now)
            yield gauge("ingestd_last_message_age_seconds", "Seconds since the last message.",
                        max(now - last, 0.0))

    def _ha(self, stream: Mapping[str, Any], now: float) -> Iterable[Metric]:
        """``ha.mode``: whether this instance streams (always, unless a standby without the
        lease), the takeovers it made and its failed lease operations. A standby pair's
        instances share ``lease`` (the lease key): summed by it, the pair's active count is one
        (deploy/prometheus/ingestd-alerts.yml, IngestdStandby*)."""
        from prometheus_client.core import GaugeMetricFamily

        ha = _section(stream, "ha")
        mode = str(ha.get("mode", ""))
        if mode == "standby":  # a dead stream worker's file still names the role it last had
            active = ha.get("role") == "active" and status.alive(stream, now)
        else:
            active = bool(ha)
        family = GaugeMetricFamily(
            "ingestd_ha_active", "1 while this instance may stream (ha.mode single or "
            "redundant, or the holder of the standby lease).", labels=["mode", "lease"])
        family.add_metric([mode, str(ha.get("lease", "")) if mode == "standby" else ""],
                          1.0 if active else 0.0)
        yield family
        yield counter("ingestd_ha_takeovers_total", "Times this instance took the standby lease "
                      "over from another holder (expired or released while it watched; a lease "
                      "found free at start is not counted).", _num(ha.get("takeovers")))
        yield counter("ingestd_ha_lease_failures_total", "Lease renewals or reads that failed "
                      "(MongoDB unreachable or too slow).", _num(ha.get("renew_failures")))

    def _store(self, store: Mapping[str, Any]) -> Iterable[Metric]:
        c = _section(store, "counters")
        yield from plain_counters(STORE_COUNTERS, c)
        yield gauge("ingestd_store_degraded", "1 while the store worker is degraded: MongoDB "
                    "writes failing, or the spool checkpoint cannot be written.",
                    1.0 if str(store.get("state", "")).startswith("degraded") else 0.0)
        yield gauge("ingestd_indexes_missing", "Indexes of the collection (and the tombstones' "
                    "TTL) the store worker could not create: a refusal (the user lacks "
                    "createIndex) or a failure tried again after the next batch.",
                    len(_section(c, "indexes_missing")))
        # Its own series: an unwritable checkpoint keeps stored segments on disk, a MongoDB
        # failure does not; the two need different hands (docs/reliability.md, #8b).
        yield counter("ingestd_spool_checkpoint_failures_total", "Spool checkpoint writes that "
                      "failed (the segments behind it are kept until one is written).",
                      _num(_section(store, "spool").get("checkpoint_failures")))
        hist = _section(store, "hist")
        for key, (name, doc) in HISTOGRAMS.items():
            family = histogram(name, doc, hist.get(key))
            if family is not None:
                yield family

    def _flow(self, stream: Mapping[str, Any], store: Mapping[str, Any],
              now: float) -> Iterable[Metric]:
        sc, wc, spool = _section(stream, "counters"), _section(store, "counters"), _section(
            stream, "spool")
        yield counter("ingestd_messages_received_total", "Messages framed off the wire (tweets "
                      "and control messages).", received_total(sc))
        yield counter("ingestd_tweets_stored_total", "Tweets MongoDB acknowledged.",
                      _num(wc.get("stored")))
        yield counter("ingestd_tweets_duplicate_total", "Tweets already stored (same id).",
                      _num(wc.get("duplicates")))
        yield known_counter("ingestd_messages_deadlettered_total", "Messages written to the "
                            "dead-letter store.", "reason", _counts(wc.get("deadlettered")))
        yield known_counter("ingestd_messages_dropped_total", "Messages dropped (counted, by "
                            "reason).", "reason", _counts(sc.get("dropped")))
        yield known_counter("ingestd_control_messages_total", "Control messages handled.",
                            "type", _counts(wc.get("control")))
        yield known_counter("ingestd_tweets_skipped_total", "Tweets not stored on purpose "
                            "(e.g. already deleted).", "reason", _counts(wc.get("skipped")))
        yield known_counter("ingestd_tweets_matched_fallback_total", "Tweets whose _ingest.matched "
                            "was computed with the newest filters because the filters of their "
                            "own generation were not found.", "reason",
                            _counts(wc.get("matched_fallback")))
        yield gauge("ingestd_messages_in_flight", "Received, not yet stored or otherwise "
                    "resolved.", in_flight(stream, wc))
        # as ``ingestd status`` shows it (a stopped stream worker's own figure is stale)
        records, nbytes = status.queue(stream, store, status.alive(stream, now))
        yield gauge("ingestd_queue_records", "Spool backlog: records not yet acknowledged.",
                    records)
        yield gauge("ingestd_queue_bytes", "Spool backlog in bytes.", nbytes)
        yield from self._spool_bounds(spool)

    def _spool_bounds(self, published: Mapping[str, Any]) -> Iterable[Metric]:
        """The bounds the queue gauges fill up to (``spool.max_bytes``, ``spool.max_records``).

        The stream worker's published figures if it publishes them, else the settings the
        daemon started with: a reload does not resize the running worker's spool.
        """
        for key, doc in (("max_bytes", "Spool bound in bytes (spool.max_bytes): the stream "
                          "stops reading or drops (spool.when_full) when ingestd_queue_bytes "
                          "reaches it."),
                         ("max_records", "Spool bound in records (spool.max_records), for "
                          "ingestd_queue_records.")):
            value = published.get(key, getattr(self.spool, key, None))
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield gauge(f"ingestd_spool_{key}", doc, value)

    def _disk(self) -> Iterable[Metric]:
        yield gauge("ingestd_spool_disk_bytes", "Bytes of spool files on disk.",
                    _dir_bytes(self.state_dir / "spool"))
        yield gauge("ingestd_deadletter_disk_bytes", "Bytes of dead-letter files on disk.",
                    _dir_bytes(self.state_dir / "deadletter"))
