"""The benchmark payload, and a tiny chunked HTTP server that streams it over loopback.

Payload: ``N`` tweets made from the packaged real sample (``ingestd/data/real_tweets.jsonl``, 558
tweets of 3.7 KB on average, retweets/quotes/extended tweets included), each re-issued under a fresh
snowflake id with a matching ``timestamp_ms``/``created_at``, so every tweet is a distinct
document. Written once per (N, version) to a cache folder as

* ``plain.body``: the decoded stream body, ``\\r\\n`` after every message;
* ``gzip.body``: the same body as one gzip stream with a sync flush per message (as the endpoint
  and ``ingestd simulate`` do), so any prefix of whole messages is decodable;
* ``plain.idx`` / ``gzip.idx``: int64 end offsets of message i in each body (N + 1 values);
* ``ids.bin``: int64 tweet id of message i.

Server: answers every request to any path with a 200 chunked stream. The body of an *armed*
connection is the first ``tweets`` messages, sent only after ``go()`` (so start-up costs of the
contender are outside the measured window): at full speed with ``sendfile`` (the server costs next
to no CPU) or paced at ``rate`` tweets/s. Afterwards the connection stays open, silent, until the
client leaves; a connection that is not armed (a reconnect) gets no messages, so the delivered
count is exactly ``tweets``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ingestd.simulator.generator import created_at

DATA = Path(__file__).resolve().parents[1] / "ingestd" / "data" / "real_tweets.jsonl"
VERSION = 1
TWITTER_EPOCH_MS = 1288834974657
BASE_MS = 1_700_000_000_000
SEND_BLOCK = 1 << 20  # bytes per chunk at full speed
# The longest sleep of a paced send loop: a send goes out as soon as a tweet is due, so at 5k/s
# about one tweet per send (the endpoint sends a chunk per message; bench/LOG.md, 2026-12-05 21:00)
PACE_TICK = 0.01


@dataclass(frozen=True)
class Payload:
    """The files of one generated payload (see the module docstring)."""

    directory: Path
    tweets: int

    def body(self, gzip: bool) -> Path:
        return self.directory / ("gzip.body" if gzip else "plain.body")

    def offsets(self, gzip: bool) -> array[int]:
        out = array("q")
        out.frombytes((self.directory / ("gzip.idx" if gzip else "plain.idx")).read_bytes())
        return out

    def ids(self) -> array[int]:
        out = array("q")
        out.frombytes((self.directory / "ids.bin").read_bytes())
        return out

    def decoded_bytes(self, tweets: int | None = None) -> int:
        """Bytes of the decoded body of the first ``tweets`` messages (what a client frames)."""
        return self.offsets(False)[self.tweets if tweets is None else tweets]

    def messages(self, limit: int) -> Iterator[bytes]:
        """The first ``limit`` messages (without ``\\r\\n``), read back from the plain body."""
        with self.body(False).open("rb") as f:
            for i, line in enumerate(f):
                if i >= limit:
                    return
                yield line.rstrip(b"\r\n")


def _templates() -> list[dict[str, object]]:
    lines = [line for line in DATA.read_bytes().splitlines() if line.strip()]
    return [orjson.loads(line) for line in lines]


def build(cache: Path, tweets: int, progress: bool = True) -> Payload:
    """Generate (or reuse) the payload of ``tweets`` messages under ``cache``."""
    directory = cache / f"payload-v{VERSION}-{tweets}"
    manifest = directory / "manifest.json"
    if manifest.exists():
        return Payload(directory, tweets)
    directory.mkdir(parents=True, exist_ok=True)
    templates = _templates()
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    plain_idx, gzip_idx, ids = array("q", [0]), array("q"), array("q")
    started = time.monotonic()
    with (directory / "plain.body").open("wb") as plain, (directory / "gzip.body").open(
        "wb"
    ) as gz:
        gz_size = 0
        for i in range(tweets):
            ms = BASE_MS + i // 40  # 40 tweets per millisecond of creation time
            tweet_id = ((ms - TWITTER_EPOCH_MS) << 22) | (i % 40)
            tweet = dict(templates[i % len(templates)])
            tweet.update(id=tweet_id, id_str=str(tweet_id), timestamp_ms=str(ms),
                         created_at=created_at(ms))
            message = orjson.dumps(tweet) + b"\r\n"
            plain.write(message)
            plain_idx.append(plain_idx[-1] + len(message))
            piece = compressor.compress(message) + compressor.flush(zlib.Z_SYNC_FLUSH)
            if i == 0:
                gzip_idx.append(0)  # the gzip header comes with the first piece
            gz.write(piece)
            gz_size += len(piece)
            gzip_idx.append(gz_size)
            ids.append(tweet_id)
            if progress and (i + 1) % 50_000 == 0:
                print(f"  payload: {i + 1:,}/{tweets:,} tweets "
                      f"({time.monotonic() - started:.0f} s)", flush=True)
    (directory / "plain.idx").write_bytes(plain_idx.tobytes())
    (directory / "gzip.idx").write_bytes(gzip_idx.tobytes())
    (directory / "ids.bin").write_bytes(ids.tobytes())
    manifest.write_text(json.dumps({
        "version": VERSION, "tweets": tweets, "plain_bytes": plain_idx[-1],
        "gzip_bytes": gzip_idx[-1], "source": str(DATA.name),
    }))
    return Payload(directory, tweets)


@dataclass
class Delivery:
    """What the server sent on one connection (monotonic ns)."""

    gzip: bool
    tweets: int
    accepted_ns: int
    first_byte_ns: int = 0
    done_ns: int = 0
    body_bytes: int = 0
    # paced sends: (first message index, send time) per slice
    slices: list[tuple[int, int]] = field(default_factory=list)


class PayloadServer:
    """Serves the payload on 127.0.0.1 (threads; ``sendfile`` at full speed)."""

    def __init__(self, payload: Payload) -> None:
        self.payload = payload
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._offsets = {False: payload.offsets(False), True: payload.offsets(True)}
        self._lock = threading.Lock()
        self._armed: tuple[int, float] | None = None
        self._go = threading.Event()
        self.deliveries: list[Delivery] = []
        self._accepted = threading.Condition(self._lock)
        self._closing = False
        self._socks: list[socket.socket] = []
        self.keepalive = 0.0  # seconds between keep-alives once the payload is sent; 0 = none
        threading.Thread(target=self._accept_loop, name="payload-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/1.1/statuses/filter.json"

    def arm(self, tweets: int, rate: float = 0.0) -> None:
        """The next connection gets the first ``tweets`` messages (at ``rate``/s; 0 = max)."""
        with self._lock:
            self._armed = (min(tweets, self.payload.tweets), rate)
            self._go.clear()
            self.deliveries = []

    def go(self) -> None:
        self._go.set()

    def wait_delivery(self, timeout: float) -> Delivery:
        """The armed connection, once a client made it."""
        deadline = time.monotonic() + timeout
        with self._accepted:
            while not self.deliveries:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no client connected to the payload server")
                self._accepted.wait(left)
            return self.deliveries[0]

    def close(self) -> None:
        self._closing = True
        self._go.set()
        self.listener.close()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            gzip = self._read_request(sock)
            if gzip is None:
                return
            headers = [b"HTTP/1.1 200 OK", b"Content-Type: application/json",
                       b"Transfer-Encoding: chunked", b"Connection: close"]
            if gzip:
                headers.append(b"Content-Encoding: gzip")
            sock.sendall(b"\r\n".join(headers) + b"\r\n\r\n")
            with self._lock:
                armed, self._armed = self._armed, None
                delivery = Delivery(gzip, armed[0] if armed else 0, time.monotonic_ns())
                if armed is not None:
                    self.deliveries.append(delivery)
                    self._accepted.notify_all()
            if armed is not None:
                self._go.wait()
                if not self._closing:
                    self._send(sock, delivery, armed[1])
            self._hold(sock)
        except OSError:
            pass
        finally:
            with self._lock:
                if sock in self._socks:
                    self._socks.remove(sock)
            sock.close()

    def _hold(self, sock: socket.socket) -> None:
        """Hold the stream open until the client leaves: silent, or a keep-alive (an empty
        line, as the endpoint sends) every ``keepalive`` seconds if set."""
        sock.settimeout(self.keepalive or None)
        while True:
            try:
                if not sock.recv(65536):
                    return
            except TimeoutError:
                sock.sendall(b"2\r\n\r\n\r\n")

    @staticmethod
    def _read_request(sock: socket.socket) -> bool | None:
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                return None
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        gzip = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip() or 0)
            elif name == b"accept-encoding":
                gzip = b"gzip" in value.lower()
        while len(rest) < length:
            more = sock.recv(65536)
            if not more:
                return None
            rest += more
        return gzip

    def _send(self, sock: socket.socket, delivery: Delivery, rate: float) -> None:
        offsets = self._offsets[delivery.gzip]
        end = offsets[delivery.tweets]
        with self.payload.body(delivery.gzip).open("rb") as f:
            fd = f.fileno()
            delivery.first_byte_ns = time.monotonic_ns()
            if rate <= 0:
                pos = 0
                while pos < end:
                    size = min(SEND_BLOCK, end - pos)
                    sock.sendall(b"%x\r\n" % size)
                    sent = 0
                    while sent < size:
                        sent += os.sendfile(sock.fileno(), fd, pos + sent, size - sent)
                    sock.sendall(b"\r\n")
                    pos += size
            else:
                self._paced(sock, fd, delivery, offsets, rate)
            delivery.done_ns = time.monotonic_ns()
            delivery.body_bytes = end

    @staticmethod
    def _paced(sock: socket.socket, fd: int, delivery: Delivery, offsets: array[int],
               rate: float) -> None:
        start = time.monotonic()
        sent = 0
        while sent < delivery.tweets:
            due = min(delivery.tweets, int((time.monotonic() - start) * rate) + 1)
            if due > sent:
                lo, hi = offsets[sent], offsets[due]
                data = os.pread(fd, hi - lo, lo)
                delivery.slices.append((sent, time.monotonic_ns()))
                sock.sendall(b"%x\r\n%b\r\n" % (len(data), data))
                sent = due
            time.sleep(max(0.0, min(PACE_TICK, start + sent / rate - time.monotonic())))
