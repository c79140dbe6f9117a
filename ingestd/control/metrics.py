"""The supervisor's HTTP listener: ``/metrics`` (families from ``collector.RunStateCollector`` and
``procstats.ProcessCollector``) and ``/healthz`` (``status.collect``), on a daemon thread.

The store worker publishes bucket counts (``ingestd.sink.histogram``) in ``run/store.json`` under
``"hist"``; the collector turns those into histogram families.

    server = start_metrics_server(settings)   # None when metrics.listen is null
    ...
    server.close()

Only the supervisor imports this module; prometheus_client and http.server are still imported
where the families and the listener are built, so importing it stays cheap.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from ingestd.config.schema import Settings
from ingestd.control import runstate, status

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

log = structlog.get_logger("ingestd.control.metrics")

HTTP_TIMEOUT = 10.0  # seconds a scraper may take to send its request: no thread is held forever
# Requests served at once (a thread each); a connection past them is closed at once. Unbounded,
# idle connections (a port scanner, a stuck client) each held a thread for HTTP_TIMEOUT: 150 of
# them take the service past systemd's TasksMax=128, shared with the workers' threads and forks.
MAX_REQUESTS = 8



# -- the HTTP listener -----------------------------------------------------------------------------


ServerClass = Callable[[tuple[str, int], Settings], "ThreadingHTTPServer"]


@functools.cache
def _server_classes() -> tuple[ServerClass, ServerClass]:
    """The listener's (IPv4, IPv6) server classes, defined on first use (see the module doc)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # the listen backlog (socketserver's default is 5): a burst of connections waits in the
        # kernel for the accept loop, which closes those past MAX_REQUESTS at once, rather than
        # having its SYNs dropped and retried seconds later
        request_queue_size = 64

        def __init__(self, address: tuple[str, int], settings: Settings) -> None:
            from ingestd.control.collector import RunStateCollector
            from ingestd.control.procstats import ProcessCollector

            self.state_dir = state_dir = settings.state_dir
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(RunStateCollector(state_dir, settings.spool))
            self.registry.register(ProcessCollector(state_dir))
            self.slots = threading.BoundedSemaphore(MAX_REQUESTS)
            super().__init__(address, Handler)

        def process_request(self, request: Any, client_address: Any) -> None:
            """A thread for the request if fewer than ``MAX_REQUESTS`` are being served, else
            the connection closed (a scraper tries again at its next interval)."""
            if not self.slots.acquire(blocking=False):
                log.warning("metrics_connection_refused", busy=MAX_REQUESTS,
                            rate_key="metrics_connection_refused")
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread started: it will not give the slot back
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            """An exception out of a request (the scraper hung up before its request was read):
            one log line, where socketserver would print a traceback outside the JSON log."""
            exc = sys.exc_info()[1]
            client_gone = isinstance(exc, ConnectionError | TimeoutError)
            (log.info if client_gone else log.warning)(
                "metrics_request_failed", error=type(exc).__name__)

    class Server6(Server):
        address_family = socket.AF_INET6

    class Handler(BaseHTTPRequestHandler):
        server: Server
        timeout = HTTP_TIMEOUT

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                code, content_type, body = self._response(path)
            except Exception as exc:  # a scrape must never take the supervisor down
                log.error("metrics_scrape_failed", path=path, error=type(exc).__name__)
                code, content_type, body = 500, "text/plain; charset=utf-8", b"internal error\n"
            try:
                self._send(code, content_type, body)
            except OSError as exc:  # the scraper hung up (its own timeout): not our failure
                log.info("metrics_client_gone", path=path, error=type(exc).__name__)

        def _response(self, path: str) -> tuple[int, str, bytes]:
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry)
            if path == "/healthz":
                code, body = healthz(self.server.state_dir)
                return code, "application/json", body
            return 404, "text/plain; charset=utf-8", b"try /metrics or /healthz\n"

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

    def publish(self) -> bool:
        """Write ``run/metrics.addr`` again if it is gone or names another listener (``run/``
        removed by hand); True if it did (``OSError`` if it cannot)."""
        if status.metrics_address(self.state_dir) == self.address:
            return False
        write_addr(self.state_dir, self.address)
        return True

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
        hint = {"hint": f"another process (another ingestd instance?) holds the port: give "
                        f"each instance its own metrics.listen in {settings.path}"
                } if exc.errno == errno.EADDRINUSE else {}
        log.error("metrics_listen_failed", listen=settings.metrics.listen,
                  error=os.strerror(exc.errno) if exc.errno else type(exc).__name__, **hint)
        return None
    log.info("metrics_listening", address=server.address)
    return server
