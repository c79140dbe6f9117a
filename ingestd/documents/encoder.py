"""A v1.1 tweet's spool payload → its BSON document, here or in a helper process.

Parsing a tweet into Python objects and encoding it to BSON is most of the store worker's CPU
(``bench/RESULTS.md``), and one process can use only one core. So the store worker keeps one
*encoder process* (a child running ``ingestd.documents.encoder.main``) and splits each read of
the spool between it and itself: the child encodes the first part while the store worker
encodes the rest, then the store worker applies all results in spool order. Ordering, batching,
control messages, MongoDB and the spool checkpoint stay in the store worker; the child is a pure
function of (payload, matcher) and holds no state that matters, so losing it loses nothing: its
part is encoded again in-process and a new child is started.

Only v1.1 tweets are encoded here. Anything else (control messages, v2, invalid JSON) comes back
as ``PUNT`` and takes the store worker's usual path, so every dead-letter reason and counter has one
source.

Wire format between the two processes: ``multiprocessing.connection.Connection`` frames (a length
prefix, then a pickle or raw bytes) over the child's stdin/stdout pipes; see ``_pack_jobs``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import subprocess
import sys
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

import bson
import orjson
from bson.errors import InvalidDocument

from ingestd.documents.matching import Box, Matched, Matcher
from ingestd.documents.messages import InvalidTweet, MessageReason, classify, tweet_document

MAX_BSON_SIZE = 16 * 1024 * 1024
PIPE_BYTES = 1 << 20
OK, DEAD, PUNT = 0, 1, 2
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_MATCH = Matched()


class JobLike(Protocol):
    """A ``Job`` or a ``spool.Record`` (the store worker encodes records directly)."""

    @property
    def payload(self) -> bytes: ...
    @property
    def recv_ns(self) -> int: ...
    @property
    def conn_id(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def seq(self) -> int: ...


class Job(NamedTuple):
    """What encoding one spool record needs (a ``spool.Record`` without its position)."""

    payload: bytes
    recv_ns: int
    conn_id: int
    generation: int
    seq: int


class Encoded(NamedTuple):
    """``OK``: ``raw`` is the document; ``DEAD``: dead-letter with ``reason``/``detail``;
    ``PUNT``: not a v1.1 tweet, the store worker handles the record itself."""

    status: int
    raw: bytes = b""
    tweet_id: int = 0
    user_id: int | None = None  # for scrub_geo rules applied after encoding
    reason: MessageReason | Literal[""] = ""
    detail: str = ""
    match_error: bool = False


_PUNTED = Encoded(PUNT)


@functools.lru_cache(maxsize=4)  # the reader appends each network read with one recv_ns
def received_at(recv_ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=recv_ns // 1000)


def encode(job: JobLike, matcher: Matcher) -> Encoded:
    """Parse, match and encode one record's payload (pure: no state but the matcher's caches)."""
    try:
        obj = orjson.loads(job.payload)
    except orjson.JSONDecodeError:
        return _PUNTED
    if classify(obj) != "tweet":
        return _PUNTED
    return encode_tweet(obj, job, matcher)


def encode_tweet(obj: dict[str, Any], job: JobLike, matcher: Matcher) -> Encoded:
    """Match and encode a parsed v1.1 tweet (``obj`` is consumed: it becomes the document)."""
    match_error = False
    try:
        matched = matcher.match(obj)
    except Exception:  # matching only annotates: a matcher bug must never lose a tweet
        matched, match_error = _NO_MATCH, True
    try:
        doc = tweet_document(obj, received_at=received_at(job.recv_ns), conn_id=job.conn_id,
                             generation=job.generation, seq=job.seq, matched=matched)
    except InvalidTweet as exc:
        return Encoded(DEAD, reason="invalid_tweet", detail=exc.reason, match_error=match_error)
    return encode_document(doc, match_error)


def encode_document(doc: dict[str, Any], match_error: bool = False) -> Encoded:
    """The BSON of a built document, or the dead letter it becomes."""
    try:
        raw = bson.encode(doc)
    except (InvalidDocument, OverflowError) as exc:  # e.g. a NUL in a nested key, a huge int
        return Encoded(DEAD, reason="unencodable", detail=type(exc).__name__,
                       match_error=match_error)
    if len(raw) > MAX_BSON_SIZE:
        return Encoded(DEAD, reason="unencodable", detail="DocumentTooLarge",
                       match_error=match_error)
    user = doc.get("user")
    user_id = user.get("id") if isinstance(user, dict) else None
    return Encoded(OK, raw, doc["_id"], user_id if type(user_id) is int else None,
                   match_error=match_error)


MatcherSpec = tuple[Sequence[str], Sequence[int], Sequence[Box]]


class EncoderProcess:
    """The store worker's handle on its encoder child: ``submit`` a chunk, later ``result``."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            # Not ``-m``: anything pickled must name this module, not ``__main__``.
            [sys.executable, "-c",
             "import sys, ingestd.documents.encoder as e; sys.exit(e.main())"],
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
