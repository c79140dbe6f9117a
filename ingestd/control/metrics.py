"""Prometheus metrics and ``/healthz``, served by the supervisor from the workers' run-state files.

The workers share no memory with the supervisor, so nothing here keeps counters of its own: on each
scrape ``RunStateCollector`` reads ``state/run/*.json`` (rewritten by every worker each second) and
builds the metric families from them. A restarted worker starts its counters from zero again, which
Prometheus' ``rate()``/``increase()`` treat as an ordinary counter reset.

The counters reconcile (``ingestd_messages_in_flight`` is the difference still on its way)::

    received = stored + duplicate + deadlettered + control + skipped + dropped + in_flight

``Histogram`` is the accumulator the store worker publishes bucket counts with (``as_dict()`` goes
into ``run/store.json`` under ``"hist"``); the collector turns those into histogram families.

    server = start_metrics_server(settings)   # None when metrics.listen is null
    ...
    server.close()

The store worker imports this module for ``Histogram`` only, so prometheus_client and http.server
(~2 MB of RSS) are imported where the families and the listener are built, not at module level.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from ingestd.config.settings import Settings, SpoolSettings
from ingestd.control import runstate, status

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )

log = structlog.get_logger("ingestd.control.metrics")

HTTP_TIMEOUT = 10.0  # seconds a scraper may take to send its request: no thread is held forever

BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
INSERT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0, 60.0)
LATENCY_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                           60.0, 300.0, 900.0, 3600.0)
# run/store.json "hist" key → (metric name, help). Units are in the names, as Prometheus wants.
HISTOGRAMS = {
    "batch_size": ("ingestd_insert_batch_size", "Tweets per insert_many batch."),
    "insert_seconds": ("ingestd_insert_duration_seconds",
                       "Time to get one batch acknowledged by MongoDB, retries included."),
    "store_latency_seconds": ("ingestd_receive_to_store_seconds",
                              "Time from a tweet's arrival off the wire to MongoDB's ack."),
}


class Histogram:
    """A Prometheus-style histogram accumulator that a worker can publish as plain JSON.

    ``counts[i]`` is the number of observations ``<= buckets[i]`` and ``> buckets[i-1]`` (not
    cumulative); the extra last count is for values above the largest bound (``+Inf``).
    """

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "<=").
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts),
                "sum": round(self.sum, 6), "count": self.count}


# -- reading run files -----------------------------------------------------------------------------


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _counts(value: object) -> dict[str, float]:
    """A ``{label: count}`` dict from a run file, ignoring anything malformed."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): _num(v) for k, v in value.items()}


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``doc[key]`` if it is a mapping, else an empty one (run files are read, never trusted)."""
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def _dir_bytes(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def received_total(stream_counters: Mapping[str, Any]) -> float:
    """Every message framed off the wire.

    The stream worker's ``received`` counts every record handed to the spool; messages not
    spooled (``spool_full``, ``disk_error``, and a message cut by a connection end,
    ``cut_by_disconnect``) are in ``dropped`` and added back here so the reconciliation holds.
    """
    dropped = _counts(stream_counters.get("dropped"))
    return _num(stream_counters.get("received")) + sum(dropped.values())


def in_flight(stream: Mapping[str, Any], store_counters: Mapping[str, Any]) -> float:
    """Messages received but not yet resolved into one of the outcome counters.

    Exact when the workers publish spool positions (stream ``spool.next_seq``, store
    ``read_seq``): records not yet read plus tweets read into a batch not yet inserted. Without
    them, the spool backlog (appended, not yet acknowledged) is used: exact whenever the store
    worker has acknowledged what it counted, at most one batch high while one is being written.
    """
    spool = _section(stream, "spool")
    next_seq, read_seq = spool.get("next_seq"), store_counters.get("read_seq")
    if isinstance(next_seq, int) and isinstance(read_seq, int):
        unread = max(next_seq - 1 - read_seq, 0)
        return unread + _num(store_counters.get("pending"))
    return _num(spool.get("records"))


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
    on first scrape: the store worker imports this module without them (see the module doc).
    """
    from ingestd.control.supervisor import Supervisor
    from ingestd.documents.messages import CONTROL_TYPES, SKIP_REASONS
    from ingestd.sink.deadletter import MESSAGE_REASONS
    from ingestd.source.backoff import Ending
    from ingestd.spool.writer import DROP_REASONS

    return {
        "ingestd_worker_restarts_total": Supervisor.ROLES,
        "ingestd_stream_reconnects_total": tuple(ending.value for ending in Ending),
        "ingestd_messages_deadlettered_total": MESSAGE_REASONS,
        "ingestd_messages_dropped_total": DROP_REASONS,
        "ingestd_control_messages_total": CONTROL_TYPES,
        "ingestd_tweets_skipped_total": SKIP_REASONS,
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
        yield from self._workers(docs, now)
        yield from self._stream(docs["stream"], now)
        yield from self._store(docs["store"])
        yield from self._flow(docs["stream"], docs["store"])
        yield from self._disk()

    def _workers(self, docs: Mapping[str, Mapping[str, Any]], now: float) -> Iterable[Metric]:
        sup = docs["supervisor"]
        yield labelled_gauge("ingestd_worker_up", "1 while the role's process heartbeats.", "role",
                             {role: 1.0 if status.alive(dict(docs[role]) or None, now) else 0.0
                              for role in ("supervisor", "stream", "store")})
        yield gauge("ingestd_config_generation", "Settings generation in force (1 at start, "
                    "+1 per successful reload).", _num(sup.get("generation")))
        yield counter("ingestd_config_reload_failures_total",
                      "Reloads refused because the new settings were invalid.",
                      _num(sup.get("reload_failures")))
        yield known_counter("ingestd_worker_restarts_total", "Worker processes restarted.",
                            "role", _counts(sup.get("restarts")))

    def _stream(self, stream: Mapping[str, Any], now: float) -> Iterable[Metric]:
        c = _section(stream, "counters")
        state = status.stream_state(str(stream.get("state", "")))
        yield labelled_gauge("ingestd_stream_state", "1 for the stream's current state.", "state",
                             {name: 1.0 if name == state else 0.0
                              for name in (*status.STREAM_STATES, "other")})
        yield gauge("ingestd_stream_connected", "1 while a connection is delivering.",
                    1.0 if state == "connected" else 0.0)
        yield gauge("ingestd_stream_backoff_seconds", "The reconnect delay last chosen.",
                    _num(stream.get("backoff")))
        yield known_counter("ingestd_stream_reconnects_total",
                            "Connections ended, by reason.", "reason", _counts(c.get("endings")))
        yield counter("ingestd_stream_connection_attempts_total", "Connection attempts.",
                      _num(c.get("attempts")))
        yield counter("ingestd_stream_bytes_total", "Body bytes read (after decompression).",
                      _num(c.get("bytes")))
        yield counter("ingestd_stream_keepalives_total", "Keep-alive blank lines.",
                      _num(c.get("keepalives")))
        yield counter("ingestd_limit_missed_total", "Tweets the endpoint reported as not "
                      "delivered (limit notices).", _num(c.get("limit_missed")))
        yield counter("ingestd_stream_warnings_total", "Stall warnings from the endpoint.",
                      _num(c.get("warnings")))
        if stream:
            with self._lock:
                last = self._last_message.time(stream, now)
            yield gauge("ingestd_last_message_age_seconds", "Seconds since the last message.",
                        max(now - last, 0.0))

    def _store(self, store: Mapping[str, Any]) -> Iterable[Metric]:
        c = _section(store, "counters")
        yield counter("ingestd_records_read_total", "Spool records read by the store worker.",
                      _num(c.get("records_read")))
        yield counter("ingestd_insert_batches_total", "insert_many batches written.",
                      _num(c.get("batches")))
        yield counter("ingestd_insert_retries_total", "MongoDB operations retried.",
                      _num(c.get("retries")))
        yield counter("ingestd_deletes_applied_total", "Delete notices applied.",
                      _num(c.get("deletes_applied")))
        yield counter("ingestd_encoder_offloaded_total",
                      "Tweets parsed and encoded by the store worker's encoder child.",
                      _num(c.get("offloaded")))
        yield counter("ingestd_encoder_restarts_total",
                      "Times the encoder child was lost (its tweets were encoded in-process).",
                      _num(c.get("encoder_restarts")))
        yield counter("ingestd_mongo_slow_writes_total", "MongoDB operations acknowledged (or "
                      "failed) only after mongo.slow_write_seconds.", _num(c.get("slow_writes")))
        yield counter("ingestd_spool_corrupt_records_total", "Spool records skipped as corrupt.",
                      _num(c.get("spool_corrupt_records")))
        yield gauge("ingestd_store_degraded", "1 while MongoDB writes are failing.",
                    1.0 if str(store.get("state", "")).startswith("degraded") else 0.0)
        hist = _section(store, "hist")
        for key, (name, doc) in HISTOGRAMS.items():
            family = histogram(name, doc, hist.get(key))
            if family is not None:
                yield family

    def _flow(self, stream: Mapping[str, Any], store: Mapping[str, Any]) -> Iterable[Metric]:
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
        yield gauge("ingestd_messages_in_flight", "Received, not yet stored or otherwise "
                    "resolved.", in_flight(stream, wc))
        yield gauge("ingestd_queue_records", "Spool backlog: records not yet acknowledged.",
                    _num(spool.get("records")))
        yield gauge("ingestd_queue_bytes", "Spool backlog in bytes.", _num(spool.get("bytes")))
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


# -- the HTTP listener -----------------------------------------------------------------------------


ServerClass = Callable[[tuple[str, int], Settings], "ThreadingHTTPServer"]


@functools.cache
def _server_classes() -> tuple[ServerClass, ServerClass]:
    """The listener's (IPv4, IPv6) server classes, defined on first use (see the module doc)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def __init__(self, address: tuple[str, int], settings: Settings) -> None:
            from ingestd.control.procstats import ProcessCollector

            self.state_dir = state_dir = settings.state_dir
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(RunStateCollector(state_dir, settings.spool))
            self.registry.register(ProcessCollector(state_dir))
            super().__init__(address, Handler)

    class Server6(Server):
        address_family = socket.AF_INET6

    class Handler(BaseHTTPRequestHandler):
        server: Server
        timeout = HTTP_TIMEOUT

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
                elif path == "/healthz":
                    code, body = healthz(self.server.state_dir)
                    self._send(code, "application/json", body)
                else:
                    self._send(404, "text/plain; charset=utf-8", b"try /metrics or /healthz\n")
            except Exception as exc:  # a scrape must never take the supervisor down
                log.error("metrics_scrape_failed", path=path, error=type(exc).__name__)
                self._send(500, "text/plain; charset=utf-8", b"internal error\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the per-request stderr line: scrapes every 15 s would flood the journal."""

    return Server, Server6


def healthz(state_dir: Path) -> tuple[int, bytes]:
    """(HTTP status, JSON body): 200 for ok/degraded, 503 for down."""
    view = status.collect(state_dir)
    code = 503 if view["health"] == "down" else 200
    return code, orjson.dumps({"status": view["health"], "reasons": view["reasons"]})


class MetricsServer:
    """The supervisor's one HTTP listener (``/metrics``, ``/healthz``) on a daemon thread."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        server4, server6 = _server_classes()
        cls = server6 if ":" in host else server4
        self._httpd: ThreadingHTTPServer = cls((host, port), settings)
        self.state_dir = settings.state_dir
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics",
                                        kwargs={"poll_interval": 0.5}, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        write_addr(self.state_dir, self.address)
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with contextlib.suppress(OSError):
            if status.metrics_address(self.state_dir) == self.address:
                (self.state_dir / runstate.RUN_DIR / status.METRICS_ADDR_FILE).unlink()


def write_addr(state_dir: Path, address: str) -> None:
    """``run/metrics.addr``: where the listener is (tests and ``ingestd status`` read it)."""
    path = runstate.run_dir(state_dir) / status.METRICS_ADDR_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, path)


def start_metrics_server(settings: Settings) -> MetricsServer | None:
    """Serve metrics on ``metrics.listen``; None if disabled or the address cannot be bound.

    A bind failure is logged, not fatal: losing the metrics must not stop the ingestion.
    """
    address = settings.metrics.address()
    if address is None:
        return None
    try:
        server = MetricsServer(settings, *address).start()
    except OSError as exc:
        log.error("metrics_listen_failed", listen=settings.metrics.listen,
                  error=os.strerror(exc.errno) if exc.errno else type(exc).__name__)
        return None
    log.info("metrics_listening", address=server.address)
    return server
