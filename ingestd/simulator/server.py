"""The simulator's HTTP front: request checks in the real endpoint's order, then a ``Session``.

Order for ``/1.1/statuses/filter.json``: rate limit (420), OAuth (401), parameters (406/413/416),
scripted status, then a ``200`` chunked stream. ``GET /_sim/state`` returns counters as JSON.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from ingestd.simulator.auth import AuthError
from ingestd.simulator.params import ParamError, StreamParams, parse_params
from ingestd.simulator.session import Session
from ingestd.simulator.state import SimState
from ingestd.simulator.v2 import PREFIX as V2_PREFIX
from ingestd.simulator.v2 import V2App, V2Options
from ingestd.simulator.v2 import handle as handle_v2
from ingestd.simulator.wire import Wire

STREAM_PATH = "/1.1/statuses/filter.json"
STATE_PATH = "/_sim/state"
MAX_BODY = 1 << 20
CALM = "Easy there, Turbo. Too many requests recently. Enhance your calm."
_REASONS = {420: "Enhance Your Calm", 413: "Too Long", 416: "Range Unacceptable"}


class SimServer(ThreadingHTTPServer):
    """A threading HTTP server carrying the shared ``SimState``."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], state: SimState,
                 v2: V2Options | None = None) -> None:
        self.state = state
        self.v2 = V2App(state, v2 or V2Options())  # X API v2 routes (simulator/v2.py)
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    """One request; for a stream it blocks in ``Session.run`` until the stream ends."""

    protocol_version = "HTTP/1.1"
    server_version = "ingestd-sim/1"
    timeout = 15  # only while reading the request; cleared before streaming
    server: SimServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the ground-truth file is the simulator's record."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        if path == STATE_PATH and self.command == "GET":
            self._reply(200, orjson.dumps(self.server.state.snapshot()), "application/json")
        elif path == STREAM_PATH and "v1.1" in self.server.state.config.apis:
            self._stream_request()
        elif path.startswith(V2_PREFIX) and "v2" in self.server.state.config.apis:
            handle_v2(self.server.v2, self)
        else:
            served = " or ".join({"v1.1": STREAM_PATH, "v2": "/2/tweets/search/stream"}[api]
                                 for api in self.server.state.config.apis)
            self._reply(404, f"Unknown URL. Try {served}\n".encode())

    # --- responses ----------------------------------------------------------------------

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status, _REASONS.get(status))  # adds Date and Server
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _refuse(self, conn: int, status: int, body: str, params: dict[str, Any]) -> None:
        # Logged before the reply: a client that reconnects at once must not overtake it.
        self._log_connect(conn, status, params, reason=body)
        self.server.state.ground_truth.event("close", conn, reason=f"status {status}")
        self._reply(status, (body + "\n").encode())

    def _log_connect(self, conn: int, status: int, params: dict[str, Any], **extra: Any) -> None:
        self.server.state.ground_truth.event(
            "connect",
            conn,
            method=self.command,
            params=params,
            status=status,
            accept_encoding=self.headers.get("Accept-Encoding"),
            **extra,
        )

    # --- the stream route ---------------------------------------------------------------

    def _read_body(self) -> str:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY:
            raise ParamError(413, f"Request body of {length} bytes is too large")
        return self.rfile.read(length).decode("utf-8", "replace") if length else ""

    def _raw_params(self, body: str) -> dict[str, str]:
        """Query plus form-body parameters, without the ``oauth_*`` ones (never logged)."""
        pairs = parse_qsl(urlsplit(self.path).query, keep_blank_values=True)
        if "application/x-www-form-urlencoded" in self.headers.get("Content-Type", ""):
            pairs += parse_qsl(body, keep_blank_values=True)
        return {k: v for k, v in pairs if not k.startswith("oauth_")}

    def _stream_request(self) -> None:
        state = self.server.state
        conn = state.next_attempt()
        try:
            body = self._read_body()
        except (ParamError, ValueError) as exc:
            status = exc.status if isinstance(exc, ParamError) else 400
            self._refuse(conn, status, str(exc), {})
            return
        raw = self._raw_params(body)
        if not state.rate_limiter.allow():
            self._refuse(conn, 420, CALM, raw)
            return
        try:
            identity = state.verifier.check(
                self._signed_url(), self.command, body, dict(self.headers)
            )
        except AuthError as exc:
            self._refuse(conn, 401, f"Unauthorized: {exc}", raw)
            return
        try:
            params = parse_params(raw)
        except ParamError as exc:
            self._refuse(conn, exc.status, exc.body, raw)
            return
        self._open_stream(conn, identity, params)

    def _signed_url(self) -> str:
        """The URL the client signed, rebuilt from the Host header (§5.2 "Wrong base URL")."""
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_port}"
        return f"{self.server.state.config.signed_scheme}://{host}{self.path}"

    def _open_stream(self, conn: int, identity: str, params: StreamParams) -> None:
        state = self.server.state
        steps = state.config.script.take() if state.config.script else []
        if steps and steps[0].kind == "status":
            first = steps[0]
            self._log_connect(conn, first.value, params.summary(), scripted=True)
            state.ground_truth.event("close", conn, reason=f"status {first.value}")
            self._reply(first.value, first.extra["body"].encode(), headers=first.extra["headers"])
            return
        use_gzip = "gzip" in self.headers.get("Accept-Encoding", "").lower()
        sock: socket.socket = self.connection
        sock.settimeout(None)  # the headers: a slow reader blocks us, as TCP back-pressure should
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire = Wire(sock, gzip=use_gzip, delimited=params.delimited)
        session = Session(state, conn, identity, params, wire, steps)
        self._log_connect(conn, 200, params.summary())  # before the client can see the 200
        self._send_stream_headers(use_gzip)
        sock.setblocking(False)  # the body's writes wait in Wire, which watches the queue meanwhile
        state.register(session)
        try:
            reason = session.run()
            # Before unregistering: ``stop`` closes the ground truth once no session is open, and
            # a close written after that was lost (seen under load: a test found no close).
            state.ground_truth.event("close", conn, reason=reason, tweets=session.tweets_sent)
        finally:
            state.unregister(session)
            self.close_connection = True

    def _send_stream_headers(self, use_gzip: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        if use_gzip:
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Vary", "Accept-Encoding")
        self.end_headers()


class Simulator:
    """Start/stop wrapper: ``start()`` binds and serves in a thread; ``stop()`` ends it all."""

    def __init__(self, state: SimState, host: str = "127.0.0.1", port: int = 0,
                 v2: V2Options | None = None) -> None:
        self.state = state
        self.server = SimServer((host, port), state, v2)
        self._thread = threading.Thread(target=self.server.serve_forever, name="sim-http")

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.server.server_address[0])
        return f"http://{host}:{self.port}{STREAM_PATH}"

    def start(self) -> None:
        self._thread.start()

    def _wait_sessions(self, timeout: float) -> None:
        """Until every stream's handler has ended (and written its close), or ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.state.snapshot()["open_connections"] and time.monotonic() < deadline:
            time.sleep(0.02)  # handler threads finish their own sockets; poll until they do

    def stop(self, grace: float = 3.0) -> None:
        """Close every stream cleanly (or hard after ``grace`` s), then the listener and log."""
        self.state.stop()
        self._wait_sessions(grace)
        with self.state.lock:
            stuck = list(self.state.sessions.values())
        for session in stuck:  # blocked in sendall on a client that stopped reading
            with contextlib.suppress(OSError):
                session.wire.sock.shutdown(socket.SHUT_RDWR)
        if stuck:  # their threads still write their close to the ground truth
            self._wait_sessions(grace)
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=grace)
        self.state.ground_truth.close()
