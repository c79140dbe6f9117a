"""A minimal MongoDB wire-protocol server that acknowledges everything and stores nothing.

The throughput figures of ``bench/run.py`` must measure ingestd and pymongo, not a database: this
server answers the handshake (``hello``/``isMaster``/``ismaster``, over OP_MSG or the legacy
OP_QUERY), ``ping``, ``buildInfo``, ``insert`` (``n`` = the number of documents, read from the body
section or from the ``documents`` sequence section, kind 1), ``endSessions``, ``createIndexes``,
``find`` (an empty cursor: the store worker's tombstone load), ``delete``/``update`` (acknowledged,
nothing matched) and anything else with ``ok: 1``. One thread per connection, blocking sockets.

Bench-only commands (the orchestrator sends them with pymongo's ``db.command``):

* ``benchReset`` ``{target: N, track: bool}``: zero the counters; note when ``N`` documents have
  been acknowledged in total; with ``track``, remember each document's ``_id`` and ack time.
* ``benchStats``: ``{inserted, batches, bytes, first_ns, last_ns, reached_ns}`` (monotonic ns).
* ``benchDump`` ``{path}``: write the tracked ``(_id, ack_ns)`` pairs as little-endian int64 pairs.

    .venv/bin/python bench/blackhole.py --port 0 --port-file /tmp/bh.port [--ack-delay 0.2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from array import array
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bson
from bson.int64 import Int64

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
_HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
CHECKSUM_PRESENT = 1
MORE_TO_COME = 2
MAX_MESSAGE = 48_000_000
_ID_KEY = b"\x12_id\x00"  # int64 "_id": pymongo always encodes _id first
HELLO_NAMES = frozenset({"hello", "ismaster", "isMaster"})


class Stats:
    """Counters shared by all connections (one lock; an insert takes it once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset(0, False)

    def reset(self, target: int, track: bool) -> None:
        self.inserted = self.batches = self.bytes = 0
        self.first_ns = self.last_ns = self.reached_ns = 0
        self.target = target
        self.track = track
        self.ids = array("q")
        self.acks = array("q")

    def record(self, n: int, nbytes: int, ids: list[int] | None) -> None:
        now = time.monotonic_ns()
        with self.lock:
            self.inserted += n
            self.batches += 1
            self.bytes += nbytes
            self.first_ns = self.first_ns or now
            self.last_ns = now
            if self.target and not self.reached_ns and self.inserted >= self.target:
                self.reached_ns = now
            if ids is not None and self.track:
                self.ids.extend(ids)
                self.acks.extend([now] * len(ids))

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"inserted": self.inserted, "batches": self.batches, "bytes": self.bytes,
                    "first_ns": Int64(self.first_ns), "last_ns": Int64(self.last_ns),
                    "reached_ns": Int64(self.reached_ns), "tracked": len(self.ids)}

    def dump(self, path: str) -> int:
        with self.lock:
            pairs = array("q")
            for tweet_id, ack in zip(self.ids, self.acks, strict=True):
                pairs.append(tweet_id)
                pairs.append(ack)
        Path(path).write_bytes(pairs.tobytes())
        return len(pairs) // 2


def count_sequence(data: memoryview, ids: list[int] | None) -> int:
    """Documents in a kind-1 section payload; their int64 ``_id`` values appended to ``ids``."""
    pos, end, n = 0, len(data), 0
    while pos + 4 <= end:
        size = _INT32.unpack_from(data, pos)[0]
        if size < 5:
            break
        if ids is not None and data[pos + 4 : pos + 9] == _ID_KEY:
            ids.append(_INT64.unpack_from(data, pos + 9)[0])
        pos += size
        n += 1
    return n


def _cstring_end(data: memoryview, pos: int) -> int:
    end = pos
    while data[end] != 0:
        end += 1
    return end


class Handler:
    """Serves one client connection until it closes."""

    def __init__(self, sock: socket.socket, server: Blackhole, conn_id: int) -> None:
        self.sock, self.server, self.conn_id = sock, server, conn_id
        self.buf = bytearray(1 << 20)

    def serve(self) -> None:
        try:
            while True:
                msg = self._read_message()
                if msg is None:
                    return
                request_id, op_code, body = msg
                if op_code == OP_MSG:
                    self._on_msg(request_id, body)
                elif op_code == OP_QUERY:
                    self._on_query(request_id, body)
                # anything else (OP_COMPRESSED is never negotiated): ignore
        except (ConnectionError, OSError):
            return
        finally:
            self.sock.close()

    def _recv_exact(self, view: memoryview) -> bool:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                return False
            got += n
        return True

    def _read_message(self) -> tuple[int, int, memoryview] | None:
        head = bytearray(16)
        if not self._recv_exact(memoryview(head)):
            return None
        length, request_id, _, op_code = _HEADER.unpack(head)
        if not 16 <= length <= MAX_MESSAGE:
            raise ConnectionError("bad message length")
        if length - 16 > len(self.buf):
            self.buf = bytearray(length - 16)
        body = memoryview(self.buf)[: length - 16]
        if not self._recv_exact(body):
            return None
        return request_id, op_code, body

    def _on_msg(self, request_id: int, body: memoryview) -> None:
        flags = _INT32.unpack_from(body, 0)[0]
        end = len(body) - (4 if flags & CHECKSUM_PRESENT else 0)
        pos = 4
        command: dict[str, Any] = {}
        docs = 0
        track = self.server.stats.track
        ids: list[int] | None = [] if track else None
        while pos < end:
            kind = body[pos]
            pos += 1
            size = _INT32.unpack_from(body, pos)[0]
            if kind == 0:
                command = bson.decode(body[pos : pos + size])
            elif kind == 1:
                name_end = _cstring_end(body, pos + 4)
                docs += count_sequence(body[name_end + 1 : pos + size], ids)
            pos += size
        reply = self.server.answer(command, docs, len(body), ids, self.conn_id)
        if not flags & MORE_TO_COME:
            self._send_msg(request_id, reply)

    def _on_query(self, request_id: int, body: memoryview) -> None:
        name_end = _cstring_end(body, 4)
        pos = name_end + 1 + 8  # numberToSkip, numberToReturn
        size = _INT32.unpack_from(body, pos)[0]
        query = bson.decode(body[pos : pos + size])
        if "$query" in query and isinstance(query["$query"], dict):
            query = query["$query"]
        reply = bson.encode(self.server.answer(query, 0, 0, None, self.conn_id))
        prefix = struct.pack("<iqii", 0, 0, 0, 1)
        self.sock.sendall(_HEADER.pack(16 + len(prefix) + len(reply), 0, request_id, OP_REPLY)
                          + prefix + reply)

    def _send_msg(self, request_id: int, reply: dict[str, Any]) -> None:
        doc = bson.encode(reply)
        payload = b"\x00\x00\x00\x00\x00" + doc  # flagBits 0, section kind 0
        self.sock.sendall(_HEADER.pack(16 + len(payload), 0, request_id, OP_MSG) + payload)


class Blackhole:
    """The listening socket and the command answers."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ack_delay: float = 0.0) -> None:
        self.listener = socket.create_server((host, port))
        self.port = self.listener.getsockname()[1]
        self.ack_delay = ack_delay
        self.stats = Stats()
        self._next_conn = 1

    def serve_forever(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler = Handler(sock, self, self._next_conn)
            self._next_conn += 1
            threading.Thread(target=handler.serve, daemon=True).start()

    def answer(self, command: dict[str, Any], seq_docs: int, nbytes: int,
               ids: list[int] | None, conn_id: int) -> dict[str, Any]:
        name = next(iter(command), "")
        if name in HELLO_NAMES:
            return self._hello(conn_id)
        if name == "insert":
            docs = command.get("documents")
            n = seq_docs + (len(docs) if isinstance(docs, list) else 0)
            if ids is not None and isinstance(docs, list):
                ids.extend(d["_id"] for d in docs if isinstance(d, dict)
                           and isinstance(d.get("_id"), int))
            if self.ack_delay:
                time.sleep(self.ack_delay)
            self.stats.record(n, nbytes, ids)
            return {"n": n, "ok": 1.0}
        if name == "find":
            ns = f"{command.get('$db', 'test')}.{command.get('find')}"
            return {"cursor": {"id": Int64(0), "ns": ns, "firstBatch": []}, "ok": 1.0}
        if name == "listIndexes":
            ns = f"{command.get('$db', 'test')}.{command.get('listIndexes')}"
            return {"cursor": {"id": Int64(0), "ns": ns, "firstBatch": []}, "ok": 1.0}
        if name == "delete":
            return {"n": 0, "ok": 1.0}
        if name == "update":
            return {"n": 0, "nModified": 0, "ok": 1.0}
        if name == "buildInfo" or name == "buildinfo":
            return {"version": "7.0.0", "versionArray": [7, 0, 0, 0], "maxBsonObjectSize":
                    16 * 1024 * 1024, "ok": 1.0}
        if name == "createIndexes":
            return {"numIndexesBefore": 1, "numIndexesAfter": 1,
                    "createdCollectionAutomatically": False, "ok": 1.0}
        if name == "benchReset":
            self.stats.reset(int(command.get("target", 0)), bool(command.get("track", False)))
            return {"ok": 1.0}
        if name == "benchStats":
            return {**self.stats.snapshot(), "ok": 1.0}
        if name == "benchDump":
            return {"pairs": self.stats.dump(str(command["path"])), "ok": 1.0}
        return {"ok": 1.0}  # ping, endSessions, and anything else

    def _hello(self, conn_id: int) -> dict[str, Any]:
        return {
            "helloOk": True, "ismaster": True, "isWritablePrimary": True,
            "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": MAX_MESSAGE,
            "maxWriteBatchSize": 100_000, "localTime": datetime.now(UTC),
            "logicalSessionTimeoutMinutes": 30, "connectionId": conn_id,
            "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False, "ok": 1.0,
        }

    def close(self) -> None:
        self.listener.close()


def _write_port_file(path: Path, port: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{port}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--ack-delay", type=float, default=0.0,
                        help="seconds to wait before acknowledging each insert (overload runs)")
    args = parser.parse_args(argv)
    server = Blackhole(args.host, args.port, args.ack_delay)
    signal.signal(signal.SIGTERM, lambda *_: server.close())
    if args.port_file:
        _write_port_file(args.port_file, server.port)
    print(f"blackhole listening on mongodb://127.0.0.1:{server.port}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
