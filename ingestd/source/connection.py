"""One connection to the streaming endpoint: its libcurl easy handle, its framer, its ids.

The handle is configured here for the API the settings name (``api_for``) and the transport
options every connection shares; the reader adds it to its ``CurlMulti`` loop and owns its life.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pycurl

from ingestd.config.schema import AuthSettings, StreamSettings
from ingestd.config.stream import ca_bundle
from ingestd.source.api import StreamApi, api_for
from ingestd.source.backoff import CONTESTED_DISCONNECT_CODES, Ending
from ingestd.source.framing import LengthFramer, LineFramer
from ingestd.source.headers import ResponseHead
from ingestd.source.inflate import BadEncoding, Inflater, body_decoder
from ingestd.source.stats import CUT_BY_DISCONNECT
from ingestd.source.transport import configure_transport

# libcurl's receive buffer (default 16 KiB): a body then reaches the write callback in larger
# slices, so fewer callbacks, framer calls and spool writes per tweet. Only what is already in the
# socket is handed over: no added latency. A compressed body is inflated by ``source.inflate``,
# 16 KiB of input (~150 KB of tweets) per step, not by libcurl, whose output comes 16 KiB at a time.
RECV_BUFFER = 256 * 1024

@dataclass
class Connection:
    """One HTTP request to the endpoint and what it has delivered so far."""

    conn_id: int
    generation: int
    stream: StreamSettings
    curl: pycurl.Curl
    framer: LineFramer | LengthFramer
    opened_at: float
    last_byte_at: float
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    error_body: bytearray = field(default_factory=bytearray)
    messages: int = 0
    body_bytes: int = 0
    disconnect: dict[str, Any] | None = None
    limit_track: int = 0
    paused: bool = False
    announced: bool = False  # "connected" logged once the first bytes of a 200 arrived
    marked: bool = False  # the coverage "connected" marker went before its first message
    retire_at: float = 0.0  # when a replaced connection is closed at the latest
    replaced: bool = False  # a connection with new filters was opened to replace this one
    abort: Ending | None = None  # set when we end it ourselves (stall, stop, reload)
    cut_bytes: int = 0  # bytes of the message this connection's end cut off (dropped)
    decoder: Inflater | None = None  # set from Content-Encoding at the first body bytes
    # The rest of a read's inflated pieces, left by a full spool (``body.BodyIntake._take``):
    # taken before the transfer resumes.
    held_pieces: Iterator[bytes] | None = None
    held_dropped: int = 0  # messages in held_pieces when it closed (counted dropped: spool_full)
    decoding_known: bool = False
    failure: str = ""  # why we ended it, where no status or libcurl error says (a bad body)
    malformed: str = ""  # libcurl refused a line of the response head: the reason saying so
    head: ResponseHead = field(init=False)  # reads header lines into status and headers

    def __post_init__(self) -> None:
        self.head = ResponseHead(self.headers)

    @property
    def healthy(self) -> bool:
        """A connection that delivered a message proved the credentials and filters work."""
        return self.status == 200 and self.messages > 0

    @property
    def switched_out(self) -> bool:
        """The endpoint logged this connection out for a newer one of the account (code 2 or
        7) after we opened its replacement: the planned end of a filter switch, not a fault."""
        code = self.disconnect.get("code") if self.disconnect else None
        return self.replaced and code in CONTESTED_DISCONNECT_CODES

    @property
    def api(self) -> StreamApi:
        return api_for(self.stream)

    def on_header(self, line: bytes) -> None:
        """libcurl's HEADERFUNCTION (must not raise); a junk line is skipped (``head.ignored``)."""
        self.head.take(line)
        self.status = self.head.status

    def decoded(self, data: bytes) -> Iterable[bytes]:
        """The body bytes ``data`` carries, inflated if the response is compressed; the iteration
        raises ``inflate.BadEncoding`` if they cannot be decoded."""
        if not self.decoding_known:
            self.decoding_known = True
            self.decoder = body_decoder(self.headers.get("content-encoding", ""))
        return (data,) if self.decoder is None else self.decoder.inflate(data)

    def close(self, ending: Ending) -> None:
        """Close the handle (already out of the multi loop); note a message its end cut."""
        self.abort = self.abort or ending
        self.held_dropped = self._drop_held()
        self.curl.close()
        if self.framer.pending_bytes and self.status == 200:
            self.cut_bytes = self.framer.pending_bytes

    def half_close(self) -> bool:
        """Send our FIN (shut down our sending side) and keep reading: an endpoint that closes when
        its client does (the simulator; most HTTP servers on reading EOF) ends the stream after a
        write we will still read, so a stop gets every byte it sent (docs/protocol.md §8). False
        when libcurl holds no socket for it (not connected, or already closed)."""
        fd = self.curl.getinfo(pycurl.ACTIVESOCKET)
        if fd < 0:
            return False
        sock = socket.socket(fileno=fd)  # a view of libcurl's socket: detached, never closed here
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        finally:
            sock.detach()
        return True

    def _drop_held(self) -> int:
        """The messages in what a full spool held back (``held_pieces``), framed only to be
        counted: closed with the connection they are dropped as ``spool_full``, not lost
        silently (a message they end inside is the cut one). At most one read's worth."""
        pieces, self.held_pieces = self.held_pieces, None
        count = 0
        with contextlib.suppress(BadEncoding):  # what came before the bad bytes is counted
            for piece in pieces or ():
                count += sum(1 for f in self.framer.feed(piece) if not isinstance(f, bytes) or f)
        return count

    def cut_fields(self) -> dict[str, Any]:
        """Log fields for a message cut by this connection's end, and for the messages a full
        spool held back (none if nothing was cut or held)."""
        held = {"held_dropped": self.held_dropped, "held_dropped_as": "spool_full"} \
            if self.held_dropped else {}
        if not self.cut_bytes:
            return held
        return {"partial_message_cut": True, "cut_bytes": self.cut_bytes,
                "dropped": CUT_BY_DISCONNECT, **held}


OnData = Callable[[Connection, bytes], int | None]  # libcurl's WRITEFUNCTION, per connection


def open_connection(conn_id: int, generation: int, stream: StreamSettings, auth: AuthSettings,
                    now: float, on_data: OnData) -> Connection:
    """A configured easy handle, not yet added to a multi loop."""
    api = api_for(stream)
    curl = pycurl.Curl()
    conn = Connection(conn_id, generation, stream, curl, api.framer(stream), now, now)
    api.request(curl, stream, auth)
    curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
    curl.setopt(pycurl.BUFFERSIZE, RECV_BUFFER)
    curl.setopt(pycurl.WRITEFUNCTION, functools.partial(on_data, conn))  # no Python frame
    curl.setopt(pycurl.HEADERFUNCTION, conn.on_header)
    curl.setopt(pycurl.NOSIGNAL, 1)
    curl.setopt(pycurl.CONNECTTIMEOUT, max(1, round(stream.connect_timeout)))
    curl.setopt(pycurl.TCP_KEEPALIVE, 1)
    curl.setopt(pycurl.TCP_KEEPIDLE, 30)
    curl.setopt(pycurl.TCP_KEEPINTVL, 15)
    configure_transport(curl, stream.url, ca_bundle(stream))  # TLS verified; proxy policy
    return conn
