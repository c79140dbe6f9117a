"""The store worker's encoder child: the process, its wire and its pipes.

Parsing a tweet into Python objects and encoding it to BSON is most of the store worker's CPU
(``bench/LOG.md``), and one process can use only one core. So the store worker keeps one
*encoder process* (a child running ``ingestd.sink.encoder_pool.main``) and splits each read of
the spool between it and itself: the child encodes the last part while the store worker
encodes and takes the first, then the store worker takes the child's results, in spool order.
Ordering, batching, control messages, MongoDB and the spool checkpoint stay in the store worker;
the child is a pure function of (payload, matcher) (``ingestd.documents.encoder``) and holds no
state that matters, so losing it loses nothing: its part is encoded again in-process and a new
child is started.

The child starts in the background: a new interpreter takes ~60–90 ms to import what it needs,
and a chunk written before then would hold the store worker up on a full pipe. So the child
writes one ``_STARTED`` byte once it is ready, and the store worker shares reads with it only
after it has seen that byte (``poll_started``).

Wire format between the two processes, over the child's stdin/stdout pipes: after that byte, one
frame per chunk each way, ``_FRAME`` (the lengths of a pickled header and of a blob), the header,
then the blob of concatenated payloads (or BSON documents); see ``_pack_jobs``. The blob travels
in a shared memory region (``Region``) whenever it fits, so that the pipes carry only headers.
A chunk's header also carries the filters of generations new to the child and the generations it
is to forget (the store worker keeps a bounded number, ``encoder_split.Matchers``); an answer's,
the generations the child then holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
from array import array
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import Any, NamedTuple, TypeAlias

from ingestd.documents.encoder import DEAD, PUNT, Encoded, JobLike, MatcherSpec, encode
from ingestd.documents.matching import Matcher, retire_superseded
from ingestd.memory import heap_trimmer, quiet_gc

PIPE_BYTES = 1 << 20
# A chunk leaves ~5 MB of freed documents and parsed tweets in the child's heap, which glibc keeps
# for reuse. Under an overload (or any pause) the child waits for MongoDB's acks with that memory
# held for nothing: when no chunk comes within this many seconds of an answer, the free heap pages
# go back to the OS (measured: −2 to −4 MB of PSS at the peak of a 10× overload,
# bench/LOG.md). At full speed the next chunk comes sooner: the pages are reused, no fault.
IDLE_TRIM_SECONDS = 0.1
_PUNTED = Encoded(PUNT)
_STARTED = b"\x01"  # the child's first byte: its imports are done, chunks are read at once
# Not ``-m``: anything pickled must name this module, not ``__main__``.
CHILD_CODE = "import sys, ingestd.sink.encoder_pool as e; sys.exit(e.main())"
# The shared region's two directions: payloads to the child, documents back. Each direction has
# two halves, one per read in flight (``begin_read``): a read's payloads are at most ~8 MiB
# (``sink.worker.BATCH_MAX_BYTES``) and its documents ~1.2x that; a blob that does not fit goes
# through the pipe. The region is sparse: only the pages a chunk touches use memory, and the
# second halves only while reads overlap (a store worker behind the stream).
REGION_IN_BYTES = 18 << 20
REGION_OUT_BYTES = 24 << 20
MAX_PENDING = 8  # chunks sent before the first one's answer is read (``can_queue``)


class Region:
    """A shared memory region (a memfd both processes map) that carries one direction's blob.

    Through a pipe, a 2–4 MB blob goes 1 MiB at a time (the pipe's size), each time a wake-up of
    the other side, and a writer holds while the reader has not drained it: the store worker
    measured 2.8 µs per tweet blocked in its writes (``bench/LOG.md``). Written here, a blob
    is one copy and no system call; the pipe carries only the header that names its size.
    """

    def __init__(self, fd: int, in_bytes: int, out_bytes: int) -> None:
        self.map = mmap.mmap(fd, in_bytes + out_bytes)
        view = memoryview(self.map)
        self.into = view[:in_bytes]  # payloads, store worker → child
        self.back = view[in_bytes:]  # documents, child → store worker

    @classmethod
    def create(cls, in_bytes: int, out_bytes: int) -> tuple[Region, int]:
        """A new region, and its memfd for the child (the caller closes it once passed)."""
        fd = os.memfd_create("ingestd-encoder", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, in_bytes + out_bytes)
            return cls(fd, in_bytes, out_bytes), fd
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        """Give the region's pages back: the next chunk faults in what it touches. Only while
        no chunk is in flight (the store worker decides: it knows when both halves are free)."""
        self.map.madvise(mmap.MADV_REMOVE)


def put(dest: memoryview, parts: Sequence[bytes | memoryview]) -> bool:
    """Copy ``parts`` one after the other to the start of ``dest``; False if they do not fit."""
    if sum(len(part) for part in parts) > len(dest):
        return False
    pos = 0
    for part in parts:
        end = pos + len(part)
        dest[pos:end] = part
        pos = end
    return True


class Job(NamedTuple):
    """What encoding one spool record needs (a ``spool.Record`` without its position); in the
    child, ``payload`` is a view into the chunk's blob (orjson parses it without a copy)."""

    payload: bytes | memoryview
    recv_ns: int
    conn_id: int
    generation: int
    seq: int


class EncoderProcess:
    """The store worker's handle on its encoder child: ``submit`` chunks, later their ``results``
    in the same order."""

    def __init__(self) -> None:
        self._region, fd = Region.create(REGION_IN_BYTES, REGION_OUT_BYTES)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_CODE, str(fd), str(REGION_IN_BYTES),
                 str(REGION_OUT_BYTES)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, pass_fds=(fd,))
        finally:
            os.close(fd)  # mapped here, inherited there
        assert self._proc.stdin is not None and self._proc.stdout is not None
        sizes = [_pipe_size(pipe.fileno()) for pipe in (self._proc.stdin, self._proc.stdout)]
        # Chunks queue up only where the pipes hold all their headers (see ``can_queue``).
        self.queues = min(sizes) >= PIPE_BYTES
        self._send = os.dup(self._proc.stdin.fileno())
        self._recv = os.dup(self._proc.stdout.fileno())
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._in_half = len(self._region.into) // 2
        self._out_half = len(self._region.back) // 2
        self.region_bytes = self._in_half  # payloads one read can send in the region
        self._matchers: set[int] = set()  # generations the child has a matcher for
        self.child_generations: tuple[int, ...] = ()  # what the child held at its last answer
        self.pending = 0  # chunks submitted and not yet collected
        self._half = 0  # the halves the current read's chunks use (``begin_read``)
        self._into_end = 0  # end of the current read's payloads so far in the region
        self._out_at = 0  # where the child writes the next chunk's documents (-1: after the last)
        self._piped = False  # a pending chunk's payloads went through the pipe
        self.started = False  # the child's ``_STARTED`` byte has been read

    def poll_started(self) -> bool:
        """Whether the child is ready for chunks, without waiting; ``EOFError``/``OSError`` if it
        died before it was."""
        if not self.started and select.select([self._recv], [], [], 0)[0]:
            self._await_start()
        return self.started

    def _await_start(self) -> None:
        if _read_exact(self._recv, len(_STARTED)) != _STARTED:
            raise OSError("encoder child: unexpected first byte")
        self.started = True

    def begin_read(self) -> None:
        """The next chunks are a new read's. While an earlier read's chunks are pending (their
        documents may still be being taken) it uses the other halves of the region, else the
        first ones. The caller has taken every answer of the read before the pending one."""
        self._start_half(1 - self._half if self.pending else 0)

    def _start_half(self, half: int) -> None:
        self._half = half
        self._into_end = half * self._in_half
        self._out_at = half * self._out_half

    def can_queue_read(self, size: int, chunks: int) -> bool:
        """Whether a new read of ``chunks`` chunks and ``size`` payload bytes can be sent behind
        the pending chunks (``can_queue`` for each of its chunks, in the other halves)."""
        return not self.pending or (self._queueable(chunks) and size <= self._in_half)

    def _queueable(self, chunks: int) -> bool:
        """Whether ``chunks`` more may queue behind the pending ones (pipes, count)."""
        return self.queues and not self._piped and self.pending + chunks <= MAX_PENDING

    def can_queue(self, size: int) -> bool:
        """Whether a chunk of ``size`` payload bytes may be sent now, before the pending ones'
        results are read.

        The child reads a chunk only between answers, and the store worker reads answers only
        when it collects them: a write that blocks on a full pipe while the other side does the
        same would hold both for ever. So a chunk joins pending ones only if nothing can block:
        its payloads go through the region (a header alone through the pipe), at most
        ``MAX_PENDING`` are pending, and the pipes are big enough for all their headers. A
        chunk that does not fit in the region goes alone, as the only one pending.
        """
        return not self.pending or (self._queueable(1)
                                    and self._into_end + size <= (self._half + 1) * self._in_half)

    def submit(self, jobs: Sequence[JobLike], matchers: dict[int, MatcherSpec]) -> None:
        """Send a chunk, with the matchers for generations the child does not have yet and the
        generations no longer in ``matchers``, which the child drops (the store worker keeps a
        bounded number: ``encoder_split.Matchers``). A record of a dropped generation is punted
        back; once the store worker has it again, its spec goes again with the next chunk."""
        payloads = [job.payload for job in jobs]
        size = sum(len(payload) for payload in payloads)
        if not self.can_queue(size):
            raise RuntimeError("encoder: collect the pending chunks before sending this one")
        new = {g: spec for g, spec in matchers.items() if g not in self._matchers}
        gone = [g for g in self._matchers if g not in matchers]
        if not self.pending:  # every answer has been taken: the current halves start again
            self._start_half(self._half)
        start, end = self._into_end, (self._half + 1) * self._in_half
        shared = put(self._region.into[start:end], payloads)
        # The child writes this chunk's documents at ``_out_at`` (-1: after its last answer),
        # never past the end of the current half.
        send_frame(self._send, (new, gone, _pack_jobs(jobs), start if shared else -1,
                                self._out_at, (self._half + 1) * self._out_half),
                   () if shared else payloads)
        self._matchers.difference_update(gone)
        self._matchers.update(new)
        self._out_at = -1
        if shared:
            self._into_end = start + size
        self._piped = not shared
        self.pending += 1

    def ready(self) -> bool:
        """Whether the oldest pending chunk's answer has come."""
        return bool(select.select([self._recv], [], [], 0)[0])

    def result(self) -> list[Encoded]:
        """The oldest chunk's results; raises ``EOFError``/``OSError`` if the child is gone."""
        return list(self.results())

    def results(self) -> Iterator[Encoded]:
        """``result`` one at a time: the answer is read now (and raises here), each document is
        copied out of the region only when its turn comes (the store worker frees the tweet's
        payload as it takes each one, and the next document reuses that memory). The child
        writes no other answer over it before a chunk is submitted with none pending."""
        if not self.started:
            self._await_start()  # submitted before it was ready: that byte comes first
        (header, start, self.child_generations), _ = recv_frame(self._recv)
        self.pending -= 1
        return _iter_results(header, self._region.back[start:])

    def release(self) -> None:
        """Idle: give the shared region's pages back (none while a chunk is in flight)."""
        if not self.pending:
            self._region.release()

    def close(self, timeout: float = 2.0) -> None:
        # The region is unmapped once nothing refers to it (results being taken may).
        for fd in (self._send, self._recv):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._send = self._recv = -1
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
# payloads (or BSON documents), sliced back apart on the other side. Copies of a tweet cost about
# a microsecond each on the benchmark machine: the blob is written from the parts (``writev``, no
# join) and read into one buffer (``readv``), and the child parses views of it.
_FRAME = struct.Struct("<QQ")  # header bytes, blob bytes
_IOV_MAX = 512  # buffers per writev (Linux allows 1024)


def _pipe_size(fd: int) -> int:
    """Make the pipe ``PIPE_BYTES`` big if the system allows; its size."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    try:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        return 0


def send_frame(fd: int, header: Any, parts: Sequence[bytes | memoryview]) -> None:
    """Write one frame: the pickled ``header``, then ``parts`` as one blob."""
    head = pickle.dumps(header, pickle.HIGHEST_PROTOCOL)
    size = sum(len(part) for part in parts)
    _write_all(fd, [_FRAME.pack(len(head), size), head, *parts])


def recv_frame(fd: int) -> tuple[Any, bytearray]:
    """Read one frame; ``EOFError`` if the pipe closed (the other side is gone)."""
    head_size, size = _FRAME.unpack(_read_exact(fd, _FRAME.size))
    header = pickle.loads(_read_exact(fd, head_size))
    return header, _read_exact(fd, size)


def _write_all(fd: int, buffers: list[Any]) -> None:
    """``writev`` until everything is written (a pipe may take part of a call's buffers)."""
    views = [memoryview(b) for b in buffers if len(b)]
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i:i + _IOV_MAX])
        while written:
            size = len(views[i])
            if written < size:
                views[i] = views[i][written:]
                break
            written -= size
            i += 1


def _read_exact(fd: int, size: int) -> bytearray:
    buf = bytearray(size)
    view, pos = memoryview(buf), 0
    while pos < size:
        got = os.readv(fd, [view[pos:]])
        if got == 0:
            raise EOFError("encoder pipe closed")
        pos += got
    return buf
_JOB_FIELDS = 5  # payload length, recv_ns, conn_id, generation, seq


def _pack_jobs(jobs: Sequence[JobLike]) -> bytes:
    meta = array("q")
    for job in jobs:
        meta.extend((len(job.payload), job.recv_ns, job.conn_id, job.generation, job.seq))
    return meta.tobytes()


def _unpack_jobs(header: bytes, blob: bytearray | memoryview) -> list[Job]:
    meta = array("q")
    meta.frombytes(header)
    sizes, f = meta[0::_JOB_FIELDS], _JOB_FIELDS
    columns = zip(accumulate(sizes), sizes, meta[1::f], meta[2::f], meta[3::f], meta[4::f],
                  strict=True)
    view = memoryview(blob)
    return [_new_tuple(Job, (view[end - size:end], recv_ns, conn_id, generation, seq))
            for end, size, recv_ns, conn_id, generation, seq in columns]


# Results travel as columns (one tuple per field of ``Encoded``, which pickle handles in C) plus
# the documents' sizes and the dead letters' reasons; the documents are the blob.
ResultHeader: TypeAlias = "tuple[tuple[int, ...], tuple[int, ...], tuple[int | None, ...], tuple[int, ...], tuple[bool, ...], tuple[tuple[int, ...], ...], list[tuple[int, str, str]]]"  # noqa: E501
_new_tuple = tuple.__new__  # a row of a NamedTuple without its Python-level __new__


def _pack_results(results: Sequence[Encoded]) -> tuple[ResultHeader, list[bytes]]:
    if not results:
        return ((), (), (), (), (), (), []), []
    statuses, raws, ids, users, reasons, details, errors, embedded = zip(*results, strict=True)
    dead = [(i, reasons[i], details[i]) for i, status in enumerate(statuses) if status == DEAD]
    return (statuses, ids, users, tuple(map(len, raws)), errors, embedded, dead), list(raws)


def _iter_results(header: ResultHeader, blob: memoryview) -> Iterator[Encoded]:
    statuses, ids, users, sizes, errors, embedded, dead = header
    reasons: list[str] = [""] * len(statuses)
    details: list[str] = [""] * len(statuses)
    for i, reason, detail in dead:
        reasons[i], details[i] = reason, detail
    with memoryview(blob) as view:
        raws = (bytes(view[end - size:end])
                for end, size in zip(accumulate(sizes), sizes, strict=True))
        for row in zip(statuses, raws, ids, users, reasons, details, errors, embedded,
                       strict=True):
            yield _new_tuple(Encoded, row)


def _serve(recv: int, send: int, region: Region) -> None:
    matchers: dict[int, Matcher] = {}
    trim = heap_trimmer()
    back = _Back(region)
    while _answer_chunk(recv, send, matchers, back):
        if trim is not None and not select.select([recv], [], [], IDLE_TRIM_SECONDS)[0]:
            trim()


class _Back:
    """The child's direction of the region: its answers, one after the other, from where the
    store worker says a read's first chunk goes (it knows which answers it has taken)."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.end = 0

    def put(self, at: int, limit: int, results: list[Encoded]) -> tuple[ResultHeader, int]:
        """Write ``results``' documents at ``at`` (-1: after the last answer), not past ``limit``;
        their header and where they start. Documents that do not fit are not sent: the chunk is
        punted and the store worker encodes it (never seen with real tweets: a read's documents
        take about 1.2x its payloads, ≤ 10 MB)."""
        start = self.end if at < 0 else at
        header, raws = _pack_results(results)
        if not put(self.region.back[start:limit], raws):
            header, raws = _pack_results([_PUNTED] * len(results))
        self.end = start + sum(map(len, raws))
        return header, start


def _answer_chunk(recv: int, send: int, matchers: dict[int, Matcher], back: _Back) -> bool:
    """Encode one chunk and send its results; False once the pipe is closed. A function of its
    own so that the chunk's buffers are freed when it returns, before the heap is trimmed."""
    try:
        (new, gone, header, start, out_at, out_limit), blob = recv_frame(recv)
    except EOFError:
        return False  # the store worker closed the pipe (or died): nothing is held here
    if new or gone:
        _update_matchers(matchers, new, gone)
    jobs = _unpack_jobs(header, back.region.into[start:] if start >= 0 else blob)
    results = [_encode_job(job, matchers) for job in jobs]
    # The payloads (a piped chunk's are ~2 MB) are freed before the answer, which waits in the
    # pipe until the store worker has encoded its own part.
    del blob, jobs
    send_frame(send, (*back.put(out_at, out_limit, results), tuple(matchers)), ())
    return True


def _update_matchers(matchers: dict[int, Matcher], new: dict[int, MatcherSpec],
                     gone: list[int]) -> None:
    """Hold the matchers the store worker holds: it names the generations it dropped (a child
    living as long as the daemon would otherwise keep one per reload, for ever), and the caches
    of all but the newest shrink as its own do."""
    for generation in gone:
        matchers.pop(generation, None)
    for generation, (track, follow, locations) in new.items():
        matchers[generation] = Matcher(track, follow, locations)
    retire_superseded(matchers)


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
    quiet_gc()
    fd, in_bytes, out_bytes = map(int, sys.argv[1:4])
    region = Region(fd, in_bytes, out_bytes)
    os.close(fd)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _write_all(1, [_STARTED])
        _serve(0, 1, region)
    return 0
