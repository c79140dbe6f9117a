"""A fault-injecting MongoDB wire proxy for tests: what a replica set does to its clients.

It listens on a free loopback port in front of a MongoDB server (the nx-27017 stand-in, or a real
one), forwards every message unchanged, and on request misbehaves the way a replica set does during
an election or an overload::

    with MongoProxy(("127.0.0.1", standin.port)) as proxy:
        daemon uses proxy.uri
        proxy.fail_writes(1, code=10107)        # next write answered NotWritablePrimary
        proxy.write_concern_error(1, code=64)   # next write applied, reply gets a writeConcernError
        proxy.reset_mid_reply(1)                # next write applied, half its reply, then RST
        proxy.delay_writes(2.0, count=1)        # next write's reply held for 2 s
        proxy.failover(5.0)                     # RST every connection, refuse new ones for 5 s
        proxy.failover_at_next_insert(5.0)      # the same, when the next insert arrives
        proxy.fail_writes(1, commands=INSERTS)  # a fault for the next insert only
        proxy.rewrite_hello(MONGOS_HELLO)       # every hello reply now says "mongos"
        proxy.answer("connectionStatus", {...}) # a command answered by the proxy, not the server
        proxy.wait_applied("command_error", 1)  # until the fault has been used

Faults apply to write commands only (``insert``, ``delete``, ``update``; ``failover_at_next_insert``
waits for an ``insert``, and ``commands=INSERTS`` makes a fault do so: the coverage ledger's
writes are ``update``s), in the order they were asked for; ``hello``/``isMaster`` and every
read pass through untouched unless a fault says so (``failover`` resets everything;
``rewrite_hello`` changes what ``hello`` says the server is: a replica-set member or a mongos,
for code that looks at the deployment type; the driver's first handshake on a connection, a
legacy OP_QUERY, is rewritten too).
Replies are built as the server builds them: the error codes carry their ``codeName``, and
``RetryableWriteError`` is labelled only on a retryable write (one that carries a
``txnNumber``), as servers from 4.4 do.

Every method is thread-safe. Each client connection is one thread that owns both of its sockets
(select loop), so a reset is always done by the thread that reads them: a connection is reset with
``SO_LINGER 0`` (a TCP RST, what a crashed or stepped-down primary's clients see).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import bson

from tests.support.wait import wait_until

OP_MSG = 2013
OP_QUERY, OP_REPLY = 2004, 1
OP_REPLY_PREFIX = struct.Struct("<iqii")  # responseFlags, cursorID, startingFrom, numberReturned
HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
CHECKSUM_PRESENT = 1
WRITE_COMMANDS = frozenset({"insert", "delete", "update"})
INSERTS = frozenset({"insert"})  # the tweets' writes (the coverage ledger's are updates)
# Commands a fault may also name (``commands=``; lowercase, as matched): the indexes' creation,
# the standby lease's compare-and-set.
CREATE_INDEXES, FIND_AND_MODIFY = frozenset({"createindexes"}), frozenset({"findandmodify"})
FAULTABLE = WRITE_COMMANDS | CREATE_INDEXES | FIND_AND_MODIFY

# code → (codeName, errmsg, retryable write error): as a mongod answers during an election.
COMMAND_ERRORS: dict[int, tuple[str, str, bool]] = {
    10107: ("NotWritablePrimary", "not primary", True),
    189: ("PrimarySteppedDown", "Primary stepped down while waiting for replication", True),
    11602: ("InterruptedDueToReplStateChange", "operation was interrupted", True),
    91: ("ShutdownInProgress", "The server is in quiesce mode and will shut down", True),
    # A user whose roles lack the command's privilege: mongod quotes the command's head.
    13: ("Unauthorized", 'not authorized on {db} to execute command {{ {command}: "{coll}", '
         '$db: "{db}" }}', False),
}
WRITE_CONCERN_ERRORS: dict[int, tuple[str, str]] = {
    64: ("WriteConcernFailed", "waiting for replication timed out"),
    100: ("UnsatisfiableWriteConcern", "Not enough data-bearing nodes"),
}
HELLO_COMMANDS = frozenset({"hello", "ismaster"})
MONGOS_HELLO: dict[str, Any] = {"msg": "isdbgrid"}


def replica_set_hello(set_name: str = "rs0", hosts: tuple[str, ...] = (
        "db1.example:27017", "db2.example:27017", "db3.example:27017")) -> dict[str, Any]:
    """The fields a replica set's primary adds to its ``hello`` reply."""
    return {"setName": set_name, "setVersion": 1, "hosts": list(hosts), "primary": hosts[0],
            "me": hosts[0], "isWritablePrimary": True, "secondary": False}


_request_ids = itertools.count(1 << 30)  # our own replies' ids, far from the driver's


@dataclass
class _Fault:
    kind: str  # command_error | write_concern_error | reset_mid_reply | delay | failover
    remaining: int
    commands: frozenset[str] = WRITE_COMMANDS  # the write commands it waits for
    code: int = 0
    seconds: float = 0.0
    err_info: dict[str, Any] = field(default_factory=dict)


def op_msg_body(message: bytes) -> dict[str, Any] | None:
    """The body (section kind 0) of an OP_MSG, or None for any other op code."""
    _, _, _, op_code = HEADER.unpack_from(message)
    if op_code != OP_MSG:
        return None
    pos, end = HEADER.size + 4, len(message)
    if struct.unpack_from("<I", message, HEADER.size)[0] & CHECKSUM_PRESENT:
        end -= 4
    while pos < end:
        kind = message[pos]
        size = struct.unpack_from("<i", message, pos + 1)[0]
        if kind == 0:
            doc: dict[str, Any] = bson.decode(message[pos + 1:pos + 1 + size])
            return doc
        pos += 1 + size
    return None


def op_query_command(message: bytes) -> dict[str, Any] | None:
    """The command document of a legacy OP_QUERY (the driver's handshake), else None."""
    _, _, _, op_code = HEADER.unpack_from(message)
    if op_code != OP_QUERY:
        return None
    name_end = message.index(b"\x00", HEADER.size + 4)
    pos = name_end + 1 + 8  # numberToSkip, numberToReturn
    size = struct.unpack_from("<i", message, pos)[0]
    doc: dict[str, Any] = bson.decode(message[pos:pos + size])
    return doc


def command_body(message: bytes) -> dict[str, Any] | None:
    """The command of an OP_MSG or OP_QUERY message, else None."""
    return op_msg_body(message) or op_query_command(message)


def op_msg(body: dict[str, Any], response_to: int, request_id: int | None = None) -> bytes:
    """An OP_MSG with one body section (no checksum)."""
    payload = struct.pack("<I", 0) + b"\x00" + bson.encode(body)
    rid = next(_request_ids) if request_id is None else request_id
    return HEADER.pack(HEADER.size + len(payload), rid, response_to, OP_MSG) + payload


def command_name(body: dict[str, Any]) -> str:
    return next(iter(body), "")


class MongoProxy:
    """A TCP proxy on 127.0.0.1:<free port> in front of ``upstream`` that injects faults."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._faults: collections.deque[_Fault] = collections.deque()
        self._down_until = 0.0
        self._hello_fields: dict[str, Any] | None = None
        self._answers: dict[str, dict[str, Any]] = {}  # command (lowercase) → canned reply
        self._pipes: set[_Pipe] = set()
        self.applied: collections.Counter[str] = collections.Counter()  # fault kind → times
        self.writes_seen = 0
        self.refused = 0  # connections reset on accept during a failover window
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="mongo-proxy",
                                        daemon=True)

    @property
    def uri(self) -> str:
        # directConnection: a client must not chase the server's own address past the proxy.
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> MongoProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.kill()
        for pipe in pipes:
            pipe.thread.join(5)

    def __enter__(self) -> MongoProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults (thread-safe)

    def pass_through(self) -> None:
        """Forget every pending fault and end any failover window."""
        with self._lock:
            self._faults.clear()
            self._down_until = 0.0

    def fail_writes(self, count: int, code: int = 10107,
                    commands: frozenset[str] = WRITE_COMMANDS) -> None:
        """Answer the next ``count`` writes (of ``commands``) with a command error (not forwarded
        to the server)."""
        if code not in COMMAND_ERRORS:
            raise ValueError(f"unknown command error {code}; known: {sorted(COMMAND_ERRORS)}")
        self._add(_Fault("command_error", count, code=code, commands=commands))

    def write_concern_error(self, count: int, code: int = 64,
                            err_info: dict[str, Any] | None = None,
                            commands: frozenset[str] = WRITE_COMMANDS) -> None:
        """Forward the next ``count`` writes (of ``commands``); add a ``writeConcernError`` to
        their replies."""
        if code not in WRITE_CONCERN_ERRORS:
            raise ValueError(f"unknown write concern error {code}")
        info = err_info if err_info is not None else {
            "wtimeout": True,
            "writeConcern": {"w": 2, "wtimeout": 100, "provenance": "clientSupplied"}}
        self._add(_Fault("write_concern_error", count, code=code, err_info=info,
                         commands=commands))

    def reset_mid_reply(self, count: int) -> None:
        """Forward the next ``count`` writes, send half of each reply, then reset the connection."""
        self._add(_Fault("reset_mid_reply", count))

    def delay_writes(self, seconds: float, count: int = 1,
                     commands: frozenset[str] = WRITE_COMMANDS) -> None:
        """Forward the next ``count`` writes (of ``commands``); hold each reply for ``seconds``."""
        self._add(_Fault("delay", count, seconds=seconds, commands=commands))

    def failover(self, seconds: float) -> None:
        """Reset every connection now and every new one for ``seconds``; then pass through."""
        self._go_down(seconds)
        self._count("failover")

    def failover_at_next_insert(self, seconds: float) -> None:
        """``failover(seconds)`` at the moment the next ``insert`` arrives (it is not forwarded):
        a failover that certainly catches a batch in flight, not whichever write was."""
        self._add(_Fault("failover", 1, seconds=seconds, commands=INSERTS))

    def rewrite_hello(self, fields: dict[str, Any] | None) -> None:
        """Merge ``fields`` into every ``hello``/``isMaster`` reply (OP_MSG or the legacy
        OP_QUERY handshake's OP_REPLY); None: answer as the server does again."""
        with self._lock:
            self._hello_fields = dict(fields) if fields is not None else None

    def answer(self, command: str, reply: dict[str, Any] | None) -> None:
        """Answer every ``command`` (any case) with ``reply`` instead of the server (None: forward
        it again): e.g. ``connectionStatus`` as a server with access control answers it."""
        with self._lock:
            if reply is None:
                self._answers.pop(command.lower(), None)
            else:
                self._answers[command.lower()] = dict(reply)

    def answer_for(self, command: str) -> dict[str, Any] | None:
        with self._lock:
            return self._answers.get(command)

    def hello_fields(self) -> dict[str, Any] | None:
        with self._lock:
            return self._hello_fields

    def in_failover(self) -> bool:
        with self._lock:
            return time.monotonic() < self._down_until

    def pending(self) -> int:
        """Fault uses still queued."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    def wait_applied(self, kind: str, times: int = 1, timeout: float = 30.0) -> None:
        """Until fault ``kind`` has been applied ``times`` times in all."""
        wait_until(lambda: self.count(kind) >= times, timeout, f"{kind} applied {times} times")

    def count(self, kind: str) -> int:
        with self._lock:
            return self.applied[kind]

    # ------------------------------------------------------------------ internals

    def _add(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.append(fault)

    def _go_down(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.kill()

    def _count(self, kind: str) -> None:
        with self._lock:
            self.applied[kind] += 1

    def take_fault(self, command: str) -> _Fault | None:
        """The fault for the write ``command`` being forwarded now (one use of the oldest queued
        one, if it waits for that command)."""
        with self._lock:
            self.writes_seen += 1
            if not self._faults or command not in self._faults[0].commands:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining == 0:
                self._faults.popleft()
            self.applied[fault.kind] += 1
            return fault

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.in_failover():
                with self._lock:
                    self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            pipe = _Pipe(self, client, upstream)
            with self._lock:
                self._pipes.add(pipe)
            pipe.thread.start()

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)


class _Pipe:
    """One client connection and its upstream connection, served by one thread."""

    def __init__(self, proxy: MongoProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client, self.upstream = client, upstream
        for sock in (client, upstream):
            sock.setblocking(True)
            sock.settimeout(None)
        self._killed = threading.Event()
        self._bufs = {client.fileno(): bytearray(), upstream.fileno(): bytearray()}
        self._faults: dict[int, _Fault] = {}  # request id → fault to apply to its reply
        self._hellos: dict[int, dict[str, Any]] = {}  # request id → fields to add to its reply
        self._outbox: list[tuple[float, bytes, bool]] = []  # (due, bytes, reset after) to client
        self.thread = threading.Thread(target=self._run, name="mongo-proxy-conn", daemon=True)

    def kill(self) -> None:
        """Ask the pipe's thread to reset both connections (it owns the sockets)."""
        self._killed.set()

    def _run(self) -> None:
        try:
            self._loop()
        except OSError:
            pass
        finally:
            self._close(reset=True)
            self.proxy._forget(self)

    def _loop(self) -> None:
        while not self._killed.is_set():
            if self._send_due():
                return  # a reset_mid_reply fault ended the connection
            ready, _, _ = select.select([self.client, self.upstream], [], [], self._wait())
            for sock in ready:
                data = sock.recv(1 << 16)
                if not data:
                    return
                buf = self._bufs[sock.fileno()]
                buf += data
                for message in _split(buf):
                    if sock is self.client:
                        self._from_client(message)
                    else:
                        self._from_server(message)

    def _wait(self) -> float:
        if not self._outbox:
            return 0.05
        return max(0.0, min(0.05, self._outbox[0][0] - time.monotonic()))

    def _from_client(self, message: bytes) -> None:
        command = command_body(message)
        if command is not None and command_name(command).lower() in HELLO_COMMANDS:
            self._note_hello(message)
        body = op_msg_body(message)
        if body is not None and (reply := self.proxy.answer_for(command_name(body).lower())):
            self._queue(0.0, op_msg(reply, HEADER.unpack_from(message)[1]), False)
            return
        if body is None or command_name(body).lower() not in FAULTABLE:
            self.upstream.sendall(message)
            return
        fault = self.proxy.take_fault(command_name(body).lower())
        request_id = HEADER.unpack_from(message)[1]
        if fault is not None and fault.kind == "command_error":
            self._queue(0.0, op_msg(_command_error(fault.code, body), request_id), False)
            return
        if fault is not None and fault.kind == "failover":
            self.proxy._go_down(fault.seconds)  # resets this pipe too (counted by take_fault)
            return
        if fault is not None:
            self._faults[request_id] = fault
        self.upstream.sendall(message)

    def _note_hello(self, message: bytes) -> None:
        fields = self.proxy.hello_fields()
        if fields is not None:
            self._hellos[HEADER.unpack_from(message)[1]] = fields

    def _from_server(self, message: bytes) -> None:
        response_to = HEADER.unpack_from(message)[2]
        if (hello := self._hellos.pop(response_to, None)) is not None:
            self.proxy._count("hello_rewrite")
            message = _with_fields(message, hello)
        fault = self._faults.pop(response_to, None)
        if fault is None:
            self._queue(0.0, message, False)
        elif fault.kind == "write_concern_error":
            self._queue(0.0, _with_write_concern_error(message, fault), False)
        elif fault.kind == "reset_mid_reply":
            self._queue(0.0, message[:len(message) // 2], True)
        else:  # delay
            self._queue(fault.seconds, message, False)

    def _queue(self, delay: float, data: bytes, reset_after: bool) -> None:
        self._outbox.append((time.monotonic() + delay, data, reset_after))
        self._outbox.sort(key=lambda item: item[0])

    def _send_due(self) -> bool:
        """Send the replies that are due; True if one of them ends the connection."""
        now = time.monotonic()
        while self._outbox and self._outbox[0][0] <= now:
            _, data, reset_after = self._outbox.pop(0)
            self.client.sendall(data)
            if reset_after:
                return True
        return False

    def _close(self, reset: bool) -> None:
        for sock in (self.client, self.upstream):
            if reset:
                _reset(sock)
            else:
                sock.close()


def _split(buf: bytearray) -> list[bytes]:
    """Remove and return the complete wire messages at the start of ``buf``."""
    out = []
    while len(buf) >= 4:
        size = struct.unpack_from("<i", buf)[0]
        if len(buf) < size:
            break
        out.append(bytes(buf[:size]))
        del buf[:size]
    return out


def _command_error(code: int, request: dict[str, Any]) -> dict[str, Any]:
    name, errmsg, retryable = COMMAND_ERRORS[code]
    command = command_name(request)
    errmsg = errmsg.format(db=request.get("$db", ""), command=command, coll=request[command])
    reply: dict[str, Any] = {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": name}
    if retryable and "txnNumber" in request:
        reply["errorLabels"] = ["RetryableWriteError"]
    return reply


def _with_write_concern_error(message: bytes, fault: _Fault) -> bytes:
    """The server's reply with a ``writeConcernError`` added (its writes stay applied)."""
    body = op_msg_body(message)
    if body is None:
        return message
    name, errmsg = WRITE_CONCERN_ERRORS[fault.code]
    body["writeConcernError"] = {"code": fault.code, "codeName": name, "errmsg": errmsg,
                                 "errInfo": fault.err_info}
    _, request_id, response_to, _ = HEADER.unpack_from(message)
    return op_msg(body, response_to, request_id)


def _with_fields(message: bytes, fields: dict[str, Any]) -> bytes:
    """The server's reply (OP_MSG or OP_REPLY) with ``fields`` set in its body (same ids)."""
    _, request_id, response_to, op_code = HEADER.unpack_from(message)
    if op_code == OP_REPLY:
        return _reply_with_fields(message, fields)
    body = op_msg_body(message)
    if body is None:
        return message
    body.update(fields)
    return op_msg(body, response_to, request_id)


def _reply_with_fields(message: bytes, fields: dict[str, Any]) -> bytes:
    """An OP_REPLY whose single document has ``fields`` set."""
    _, request_id, response_to, _ = HEADER.unpack_from(message)
    flags, cursor_id, starting_from, returned = OP_REPLY_PREFIX.unpack_from(message, HEADER.size)
    start = HEADER.size + OP_REPLY_PREFIX.size
    if returned != 1:
        return message
    doc = bson.decode(message[start:]) | fields
    payload = OP_REPLY_PREFIX.pack(flags, cursor_id, starting_from, 1) + bson.encode(doc)
    return HEADER.pack(HEADER.size + len(payload), request_id, response_to, OP_REPLY) + payload


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed server's peers see it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
