"""The store worker's encoder child: the process, its wire and its pipes.

Parsing a tweet into Python objects and encoding it to BSON is most of the store worker's CPU
(``bench/RESULTS.md``), and one process can use only one core. So the store worker keeps one
*encoder process* (a child running ``ingestd.sink.encoder_pool.main``) and splits each read of
the spool between it and itself: the child encodes the first part while the store worker
encodes the rest, then the store worker applies all results in spool order. Ordering, batching,
control messages, MongoDB and the spool checkpoint stay in the store worker; the child is a pure
function of (payload, matcher) (``ingestd.documents.encoder``) and holds no state that matters,
so losing it loses nothing: its part is encoded again in-process and a new child is started.

Wire format between the two processes: ``multiprocessing.connection.Connection`` frames (a length
prefix, then a pickle or raw bytes) over the child's stdin/stdout pipes; see ``_pack_jobs``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from array import array
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Literal, NamedTuple, TypeAlias

from ingestd.documents.encoder import DEAD, PUNT, Encoded, JobLike, MatcherSpec, encode
from ingestd.documents.matching import Matcher
from ingestd.documents.messages import MessageReason

PIPE_BYTES = 1 << 20
_PUNTED = Encoded(PUNT)


class Job(NamedTuple):
    """What encoding one spool record needs (a ``spool.Record`` without its position)."""

    payload: bytes
    recv_ns: int
    conn_id: int
    generation: int
    seq: int


class EncoderProcess:
    """The store worker's handle on its encoder child: ``submit`` a chunk, later ``result``."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            # Not ``-m``: anything pickled must name this module, not ``__main__``.
            [sys.executable, "-c",
             "import sys, ingestd.sink.encoder_pool as e; sys.exit(e.main())"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        for pipe in (self._proc.stdin, self._proc.stdout):
            # A chunk is ~2–4 MB each way: a 1 MiB pipe cuts the context switches by 16.
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._send = Connection(os.dup(self._proc.stdin.fileno()), readable=False)
        self._recv = Connection(os.dup(self._proc.stdout.fileno()), writable=False)
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._matchers: set[int] = set()  # generations the child has a matcher for
        self.pending = 0  # chunks submitted and not yet collected

    def submit(self, jobs: Sequence[JobLike], matchers: dict[int, MatcherSpec]) -> None:
        """Send a chunk (and the matchers for generations the child has not seen yet).

        One chunk at a time: the child reads only between answers, so a second chunk sent before
        the first one's results are read could block both sides on full pipes.
        """
        if self.pending:
            raise RuntimeError("encoder: collect the previous chunk before sending another")
        new = {g: spec for g, spec in matchers.items() if g not in self._matchers}
        self._send.send((new, _pack_jobs(jobs)))
        self._send.send_bytes(b"".join([job.payload for job in jobs]))
        self._matchers.update(new)
        self.pending += 1

    def ready(self) -> bool:
        return self._recv.poll()

    def result(self) -> list[Encoded]:
        """The oldest chunk's results; raises ``EOFError``/``OSError`` if the child is gone."""
        header = self._recv.recv()
        blob = self._recv.recv_bytes()
        self.pending -= 1
        return _unpack_results(header, blob)

    def close(self, timeout: float = 2.0) -> None:
        for conn in (self._send, self._recv):
            conn.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    @property
    def pid(self) -> int:
        return self._proc.pid


# The wire. Pickling a list of tuples that hold 4 KB byte strings costs more than encoding them
# does; so each direction sends one pickled header of int arrays and one blob of concatenated
# payloads (or BSON documents), sliced back apart on the other side.
_JOB_FIELDS = 5  # payload length, recv_ns, conn_id, generation, seq
_MATCH_ERROR, _HAS_USER = 1, 2


def _pack_jobs(jobs: Sequence[JobLike]) -> bytes:
    meta = array("q")
    for job in jobs:
        meta.extend((len(job.payload), job.recv_ns, job.conn_id, job.generation, job.seq))
    return meta.tobytes()


def _unpack_jobs(header: bytes, blob: bytes) -> list[Job]:
    meta = array("q")
    meta.frombytes(header)
    jobs, pos = [], 0
    for i in range(0, len(meta), _JOB_FIELDS):
        size, recv_ns, conn_id, generation, seq = meta[i:i + _JOB_FIELDS]
        jobs.append(Job(blob[pos:pos + size], recv_ns, conn_id, generation, seq))
        pos += size
    return jobs


DeadReason: TypeAlias = MessageReason | Literal[""]
DeadEntry: TypeAlias = "tuple[int, DeadReason, str]"
ResultHeader: TypeAlias = "tuple[bytes, bytes, bytes, bytes, bytes, list[DeadEntry]]"


def _pack_results(results: Sequence[Encoded]) -> tuple[ResultHeader, bytes]:
    statuses, flags = bytearray(), bytearray()
    ids, users, sizes = array("q"), array("q"), array("q")
    dead: list[DeadEntry] = []
    for i, enc in enumerate(results):
        statuses.append(enc.status)
        flags.append((_MATCH_ERROR if enc.match_error else 0)
                     | (_HAS_USER if enc.user_id is not None else 0))
        ids.append(enc.tweet_id)
        users.append(enc.user_id or 0)
        sizes.append(len(enc.raw))
        if enc.status == DEAD:
            dead.append((i, enc.reason, enc.detail))
    header = (bytes(statuses), bytes(flags), ids.tobytes(), users.tobytes(), sizes.tobytes(),
              dead)
    return header, b"".join([enc.raw for enc in results])


_NOT_DEAD: tuple[Literal[""], str] = ("", "")


def _unpack_results(header: ResultHeader, blob: bytes) -> list[Encoded]:
    statuses, flags, id_bytes, user_bytes, size_bytes, dead = header
    ids, users, sizes = array("q"), array("q"), array("q")
    ids.frombytes(id_bytes)
    users.frombytes(user_bytes)
    sizes.frombytes(size_bytes)
    reasons = {i: (reason, detail) for i, reason, detail in dead}
    out, pos, view = [], 0, memoryview(blob)
    for i, status in enumerate(statuses):
        size, flag = sizes[i], flags[i]
        reason, detail = reasons.get(i, _NOT_DEAD)
        out.append(Encoded(status, bytes(view[pos:pos + size]), ids[i],
                           users[i] if flag & _HAS_USER else None, reason, detail,
                           bool(flag & _MATCH_ERROR)))
        pos += size
    return out


def _serve(recv: Connection, send: Connection) -> None:
    matchers: dict[int, Matcher] = {}
    while True:
        try:
            new, header = recv.recv()
            blob = recv.recv_bytes()
        except EOFError:
            return  # the store worker closed the pipe (or died): nothing is held here
        for generation, (track, follow, locations) in new.items():
            matchers[generation] = Matcher(track, follow, locations)
        results = [_encode_job(job, matchers) for job in _unpack_jobs(header, blob)]
        out_header, out_blob = _pack_results(results)
        send.send(out_header)
        send.send_bytes(out_blob)


def _encode_job(job: Job, matchers: dict[int, Matcher]) -> Encoded:
    matcher = matchers.get(job.generation)
    if matcher is None:
        return _PUNTED
    try:
        return encode(job, matcher)
    except Exception:  # a bug here must not lose the tweet: the store worker takes it
        return _PUNTED


def main() -> int:
    # The child lives and dies with its pipe: signals meant for the daemon (a terminal's ^C, a
    # systemd stop sent to the whole cgroup) must not end it before the store worker has drained.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    recv = Connection(os.dup(0), writable=False)
    send = Connection(os.dup(1), readable=False)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _serve(recv, send)
    return 0
