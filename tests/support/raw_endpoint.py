"""A raw-socket HTTP endpoint for faults the simulator cannot produce: each accepted connection
is handed to the next script function (the last one repeats), which writes whatever bytes it
likes. The request (head and body, as sent) has been read before the function runs."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Sequence

Answer = Callable[[socket.socket, bytes, threading.Event], None]  # (client, request, stop)

JSON_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def tweet(tweet_id: int) -> bytes:
    """A minimal v1.1 tweet line (with its ``\\r\\n``)."""
    return (b'{"id":%d,"id_str":"%d","text":"iphone %d","created_at":'
            b'"Mon Jan 01 00:00:00 +0000 2024","user":{"id":1,"id_str":"1"}}\r\n'
            % (tweet_id, tweet_id, tweet_id))


class RawEndpoint:
    """Serves ``script`` (one answer per accepted connection, the last one repeated)."""

    def __init__(self, script: Sequence[Answer]) -> None:
        self.script = list(script)
        self.stop = threading.Event()
        self.requests: list[bytes] = []  # each connection's request, in order
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/1.1/statuses/filter.json"

    def __enter__(self) -> RawEndpoint:
        self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            answer = self.script[min(len(self.requests), len(self.script) - 1)]
            self.requests.append(b"")
            thread = threading.Thread(target=self._serve, args=(client, answer,
                                                                len(self.requests) - 1),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, answer: Answer, index: int) -> None:
        with client:
            try:
                self.requests[index] = request = _read_request(client)
                answer(client, request, self.stop)
            except OSError:
                pass  # the client went away: its business


def _read_request(client: socket.socket) -> bytes:
    """The request: its head, then its body (Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = client.recv(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        more = client.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body
