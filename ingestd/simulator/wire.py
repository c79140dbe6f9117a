"""The response body on the socket: message framing, gzip and HTTP/1.1 chunked encoding.

``frame`` adds ``\\r\\n`` (or the ``delimited=length`` prefix, which counts that ``\\r\\n``),
``encode`` runs one gzip stream per response with a sync flush per message so clients can decode
incrementally, and ``send`` writes HTTP chunks (``split`` re-cuts them into K-byte chunks so
message and chunk boundaries disagree, as the real stream's do).
"""

from __future__ import annotations

import array
import bisect
import fcntl
import itertools
import os
import select
import socket
import struct
import termios
import zlib
from collections.abc import Callable, Sequence

KEEPALIVE = b"\r\n"
_END = b"0\r\n\r\n"
# After a sync flush, what ``corrupt`` sends: a block header of the reserved type 11.
BAD_BYTES = b"\xff" * 16
BLOCKED_LOOK = 0.05  # s between looks at the session (and for a close) while the client reads none
# Deflate refers back at most this far: the dictionary a piece of the stream is decoded against.
WINDOW = 32 * 1024
GZIP_HEADER = 10  # zlib's gzip header (no name, no extra field): before the first deflate byte


class GivenUp(Exception):
    """A write that waits for a client that reads nothing is given up: the stream ends at once."""


class Stopping(GivenUp):
    """The simulator stops."""


class ClientClosed(GivenUp, ConnectionResetError):
    """The client closed its end, or half-closed it (a stopping ingestd reads on until we close):
    nothing more is written, and a write in progress is given up and recorded as far as it went.
    An ``OSError`` too, as the client going away always was."""


def completed(ends: Sequence[int], taken: int) -> tuple[int, bool]:
    """A write of messages ending at ``ends`` (``encode_batch``) given up after ``taken`` of its
    body bytes: how many messages went whole, and whether some bytes of the next one went."""
    done = bisect.bisect_right(ends, taken)
    return done, done < len(ends) and taken > (ends[done - 1] if done else 0)


class Wire:
    """Writes one streaming response body to ``sock``; all writes happen on one thread."""

    def __init__(self, sock: socket.socket, *, gzip: bool, delimited: bool) -> None:
        self.sock = sock
        self.delimited = delimited
        self.split = 0
        self._gzip = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
        self._window = b""  # gzip: the last WINDOW body bytes compressed so far
        self._header = GZIP_HEADER  # gzip: header bytes the next compressed piece starts with
        # gzip: the last encode_batch's ends, bytes, framed messages, window and header before it
        self._batch: tuple[list[int], bytes, list[bytes], bytes, int] | None = None
        self.bytes_sent = 0  # body bytes (before chunking) handed to the socket, to the byte
        self.socket_bytes = 0  # every byte of the body handed to the socket, chunking included
        # Called every BLOCKED_LOOK while the socket takes nothing; it must not write. It raises
        # GivenUp to abandon the write (the simulator stopping, a newer connection).
        self.on_blocked: Callable[[], None] = _nothing

    def frame(self, message: bytes) -> bytes:
        """A message as it appears in the decoded body."""
        if self.delimited:
            return b"%d\r\n%b\r\n" % (len(message) + 2, message)
        return message + b"\r\n"

    def encode(self, body: bytes) -> bytes:
        """Body bytes as sent: gzip-compressed and sync-flushed when gzip is on."""
        if self._gzip is None:
            return body
        out = self._gzip.compress(body) + self._gzip.flush(zlib.Z_SYNC_FLUSH)
        self._window = (self._window + body)[-WINDOW:]
        if out:
            self._header = 0
        return out

    def encode_batch(self, messages: Sequence[bytes]) -> tuple[bytes, list[int]]:
        """Several messages framed and encoded (with gzip each gets its own sync flush), and where
        each one's bytes end: a write given up part-way delivered the messages whose end went out,
        and with gzip perhaps the next one too (``Wire.completed``)."""
        if self._gzip is None and not self.delimited:  # one join: the --rate 0 hot path
            data = b"\r\n".join(messages) + b"\r\n"
            return data, list(itertools.accumulate(len(m) + 2 for m in messages))
        if self._gzip is None:
            pieces = [self.frame(m) for m in messages]
            return b"".join(pieces), list(itertools.accumulate(map(len, pieces)))
        window, header = self._window, self._header
        frames = [self.frame(m) for m in messages]
        pieces = [self.encode(f) for f in frames]
        data, ends = b"".join(pieces), list(itertools.accumulate(map(len, pieces)))
        self._batch = (ends, data, frames, window, header)
        return data, ends

    def completed(self, ends: list[int], taken: int) -> tuple[int, bool]:
        """``completed`` for a write of ``ends`` given up after ``taken`` body bytes. A gzip'd
        message needs less than all of its bytes: the last 5–6 of its sync flush (an empty stored
        block) carry none of its data, so the message the write cut is decoded here from what
        went out, as the client would (the last ``encode_batch``'s; ``ends`` is its list)."""
        done, cut = completed(ends, taken)
        batch = self._batch
        if not cut or batch is None or batch[0] is not ends or done >= len(batch[2]):
            return done, cut
        _, data, frames, window, header = batch
        start = ends[done - 1] if done else header
        window = (window + b"".join(frames[:done]))[-WINDOW:]
        inflater = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
        try:
            whole = inflater.decompress(data[start:taken]) == frames[done]
        except zlib.error:
            whole = False
        return (done + 1, False) if whole else (done, cut)

    def send(self, data: bytes) -> None:
        """Write already-encoded bytes as one chunk, or as ``split``-byte chunks."""
        if not data:
            return
        step = self.split or len(data)
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            head = b"%x\r\n" % len(piece)
            before = self.socket_bytes
            try:
                self._sendall(head + piece + b"\r\n")
            finally:  # a write given up part-way (the session's on_blocked) counts what went
                self.bytes_sent += min(max(self.socket_bytes - before - len(head), 0), len(piece))

    def _sendall(self, data: bytes) -> None:
        """Write all of ``data``; while the client reads nothing, look at the session (its queue
        keeps filling) and whether the client closed, instead of blocking in ``sendall``."""
        sock, view = self.sock, memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                sent = 0
            self.socket_bytes += sent
            view = view[sent:]
            if view:
                self._wait_writable()

    def _wait_writable(self) -> None:
        sock = self.sock
        readable, writable, _ = select.select([sock], [sock], [], BLOCKED_LOOK)
        if writable:
            return
        if readable:
            if self.client_gone():
                raise ClientClosed("the client closed its end")
            select.select([], [sock], [], BLOCKED_LOOK)  # bytes from the client, not a close
        self.on_blocked()

    def client_gone(self) -> bool:
        """Whether the client sent its FIN (closed, or half-closed while it reads on) or reset:
        it sends nothing after its request, so a readable socket with nothing to peek is one."""
        sock = self.sock
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and not sock.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def unacked_bytes(self) -> int | None:
        """Bytes handed to the socket that the client's kernel has not acknowledged yet (Linux's
        SIOCOUTQ: the last ones written), which a reset discards; None where it cannot be read."""
        count = array.array("i", [0])
        try:
            fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, count)
        except OSError:
            return None
        return count[0]

    def keepalive(self) -> None:
        self.send(self.encode(KEEPALIVE))

    def end(self) -> None:
        """Finish the body cleanly (the gzip trailer, then the zero-length chunk)."""
        if self._gzip is not None:
            self.send(self._gzip.flush(zlib.Z_FINISH))
        self._sendall(_END)

    def corrupt(self, before: bytes = b"") -> None:
        """Bytes no deflate stream can go on with (block type 11 is reserved), then a hang-up: a
        gzip client must end the connection; on a plain body they are a line the close cuts.
        ``before`` (encoded body bytes) goes in the same write: one chunk, unless ``split``."""
        self.send(before + BAD_BYTES)
        self.hang_up()

    def hang_up(self) -> None:
        """Send FIN now, with no zero-length chunk: the body ends early."""
        self.sock.shutdown(socket.SHUT_RDWR)

    def reset(self) -> None:
        """Abort with a TCP RST: linger 0 makes closing the descriptor discard and reset.

        The fd is detached and closed directly because the handler's ``rfile`` still holds a
        reference that would otherwise postpone the real close.
        """
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(self.sock.detach())


def _nothing() -> None:
    return None
