"""The encoder child gives exactly what in-process encoding gives, and dies with its pipe."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import bson
import orjson
import pytest

from ingestd.documents.encoder import DEAD, OK, PUNT, Encoded, encode
from ingestd.documents.matching import Matcher
from ingestd.sink import encoder_pool
from ingestd.sink.encoder_pool import EncoderProcess, Job, recv_frame, send_frame
from tests.support.wait import wait_until

SPEC = (["beatles", "covid vaccine", "#music"], [783214, 12], [(-180.0, -90.0, 180.0, 90.0)])
SNOW = 1_400_000_000_000_000_000


def real_payloads() -> list[bytes]:
    data = resources.files("ingestd").joinpath("data", "real_tweets.jsonl").read_bytes()
    return [line for line in data.splitlines() if line.strip()]


def jobs_for(payloads: list[bytes], generation: int = 3) -> list[Job]:
    return [Job(p, 1_700_000_000_123_456_789 + i, 5, generation, 100 + i)
            for i, p in enumerate(payloads)]


@pytest.fixture
def child() -> Iterator[EncoderProcess]:
    proc = EncoderProcess()
    yield proc
    proc.close()


def test_child_encodes_real_tweets_exactly_as_in_process(child: EncoderProcess) -> None:
    payloads = [
        *real_payloads(),
        b'{"delete":{"status":{"id":1,"user_id":2}}}',  # control: the worker's path
        b'{"id": 1, "text": ',  # invalid JSON: the worker's path (it names the reason)
        orjson.dumps({"id": "x1", "text": "bad id", "user": {"id": 1}}),  # invalid tweet
        orjson.dumps({"id": SNOW, "text": "big", "user": {"id": 1}, "n": 2**64 - 1}),  # unencodable
    ]
    jobs = jobs_for(payloads)
    here = [encode(job, Matcher(*SPEC)) for job in jobs]
    child.submit(jobs, {3: SPEC})
    assert child.result() == here
    statuses = [e.status for e in here]
    # Mongo-export rows ({"$numberLong": …} ids) are invalid tweets, not encoding failures.
    assert statuses.count(OK) > 500 and statuses[-4:-2] == [PUNT, PUNT]
    assert (here[-2].reason, here[-1].reason) == ("invalid_tweet", "unencodable")
    ok = next(e for e in here if e.status == OK)
    doc = bson.decode(ok.raw)
    assert doc["_id"] == ok.tweet_id and doc["_ingest"]["generation"] == 3


def test_a_generation_the_child_was_not_told_about_is_punted(child: EncoderProcess) -> None:
    child.submit(jobs_for(real_payloads()[:3], generation=9), {3: SPEC})
    assert child.result() == [Encoded(PUNT)] * 3


def test_matchers_are_sent_once_per_generation(child: EncoderProcess) -> None:
    jobs = jobs_for(real_payloads()[:5])
    child.submit(jobs, {3: SPEC})
    first = child.result()
    child.submit(jobs, {3: SPEC})  # already known: not sent again, still used
    assert child.result() == first and all(e.status in (OK, DEAD) for e in first)


def test_child_ignores_signals_and_exits_when_its_pipe_closes() -> None:
    proc = EncoderProcess()
    proc.submit(jobs_for(real_payloads()[:2]), {3: SPEC})
    assert len(proc.result()) == 2  # running (signal handlers set)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # meant for the daemon
        os.kill(proc.pid, sig)
    proc.submit(jobs_for(real_payloads()[:2]), {3: SPEC})
    assert len(proc.result()) == 2
    proc.close(timeout=5.0)
    assert proc._proc.returncode == 0


def test_killed_child_raises_on_result() -> None:
    proc = EncoderProcess()
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc._proc.wait()
        with pytest.raises((EOFError, OSError)):
            proc.submit(jobs_for(real_payloads()[:2]), {3: SPEC})
            proc.result()
    finally:
        proc.close()


def test_chunks_queue_in_the_region_and_answers_come_in_order(child: EncoderProcess) -> None:
    payloads = real_payloads()
    chunks = [jobs_for(payloads[i:i + 100]) for i in range(0, 400, 100)]
    assert child.queues  # 1 MiB pipes here: all the headers fit
    for jobs in chunks:  # sent before any answer is read: each answered as it is done
        child.submit(jobs, {3: SPEC})
    assert child.pending == 4
    matcher = Matcher(*SPEC)
    for jobs in chunks:
        assert child.result() == [encode(job, matcher) for job in jobs]
    assert child.pending == 0


def test_a_second_read_in_flight_does_not_write_over_the_first_ones_answers(
        child: EncoderProcess) -> None:
    # A store worker behind the stream sends the next read's chunks before it takes the last
    # read's documents (``StoreWorker._take_all``): both reads are answered before the first
    # one's documents are copied out, so they must be in different halves of the region.
    payloads = real_payloads()
    first = [jobs_for(payloads[i:i + 60]) for i in range(0, 240, 60)]
    second = [jobs_for(payloads[i:i + 60]) for i in range(240, 480, 60)]
    child.begin_read()
    for jobs in first:
        child.submit(jobs, {3: SPEC})
    size = sum(len(job.payload) for jobs in second for job in jobs)
    assert child.can_queue_read(size, len(second))
    child.begin_read()
    for jobs in second:
        child.submit(jobs, {3: SPEC})
    assert child.pending == 8 and not child.can_queue_read(1, 1)  # MAX_PENDING: no third read
    # Every answer's header is read first: once the second read's last one is here, the child
    # has written all its documents. Only then are the first read's documents copied out.
    answers = [child.results() for _ in range(8)]
    assert child.pending == 0
    matcher = Matcher(*SPEC)
    for jobs, answer in zip(first + second, answers, strict=True):
        assert list(answer) == [encode(job, matcher) for job in jobs]


def test_a_chunk_too_big_for_the_region_goes_alone_through_the_pipe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The child reads a chunk only between answers, so a chunk whose payloads go through the
    # pipe could block on it while the child blocks on its answer: it is never queued with
    # others, and none is queued behind it.
    monkeypatch.setattr(encoder_pool, "REGION_IN_BYTES", 64 * 1024)
    proc = EncoderProcess()
    try:
        matcher = Matcher(*SPEC)
        big, small = jobs_for(real_payloads()[:200]), jobs_for(real_payloads()[:2])
        assert sum(len(job.payload) for job in big) > 64 * 1024
        proc.submit(small, {3: SPEC})
        assert not proc.can_queue(sum(len(job.payload) for job in big))
        with pytest.raises(RuntimeError):
            proc.submit(big, {3: SPEC})
        assert proc.result() == [encode(job, matcher) for job in small]
        proc.submit(big, {3: SPEC})  # none pending: through the pipe
        with pytest.raises(RuntimeError):
            proc.submit(small, {3: SPEC})
        assert proc.result() == [encode(job, matcher) for job in big]
    finally:
        proc.close()


def test_documents_too_big_for_the_region_are_punted_to_the_store_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_pool, "REGION_OUT_BYTES", 64 * 1024)
    proc = EncoderProcess()
    try:
        jobs = jobs_for(real_payloads()[:100])
        proc.submit(jobs, {3: SPEC})
        assert proc.result() == [Encoded(PUNT)] * len(jobs)  # encoded in-process instead
        few = jobs_for(real_payloads()[:3])
        proc.submit(few, {3: SPEC})
        assert proc.result() == [encode(job, Matcher(*SPEC)) for job in few]
    finally:
        proc.close()


def region_rss_kb(proc: EncoderProcess) -> int:
    """Resident kB of ``proc``'s shared region in this process (its line in /proc/self/smaps)."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(proc._region.map))
    lines = Path("/proc/self/smaps").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{start:x}-"))
    return next(int(line.split()[1]) for line in lines[at + 1:] if line.startswith("Rss:"))


def test_an_idle_child_region_gives_its_pages_back(child: EncoderProcess) -> None:
    jobs = jobs_for(real_payloads()[:200])
    child.submit(jobs, {3: SPEC})
    child.release()  # a chunk is in flight: nothing is released, nothing is lost
    assert child.result() == [encode(job, Matcher(*SPEC)) for job in jobs]
    size = sum(len(job.payload) for job in jobs)
    assert region_rss_kb(child) * 1024 >= size  # its payloads, and its documents
    child.release()
    assert region_rss_kb(child) == 0
    child.submit(jobs, {3: SPEC})  # and it is used again as before
    assert child.result() == [encode(job, Matcher(*SPEC)) for job in jobs]


def test_frames_survive_partial_writes_and_many_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    # A signal can end a blocking writev after part of its buffers: here every call takes at
    # most 777 bytes (cutting buffers anywhere), and 1,500 parts exceed one writev's buffers.
    # The frame must still arrive whole and in order (a view among the parts included).
    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        assert len(buffers) <= 1024
        return os.write(fd, b"".join(buffers)[:777])

    monkeypatch.setattr(encoder_pool.os, "writev", short_writev)
    parts: list[bytes | memoryview] = [bytes([i % 251]) * (1 + i % 700) for i in range(1500)]
    parts[7] = memoryview(b"0123456789")[2:5]
    read_fd, write_fd = os.pipe()
    got: list[tuple[object, bytearray]] = []
    reader = threading.Thread(target=lambda: got.append(recv_frame(read_fd)))
    reader.start()
    try:
        send_frame(write_fd, {"chunk": 1}, parts)
    finally:
        os.close(write_fd)
        reader.join(timeout=30)
        os.close(read_fd)
    assert got == [({"chunk": 1}, bytearray(b"".join(parts)))]


def test_a_closed_pipe_mid_frame_is_eof() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, struct.pack("<QQ", 4, 100) + b"abc")  # header cut short
    os.close(write_fd)
    try:
        with pytest.raises(EOFError):
            recv_frame(read_fd)
    finally:
        os.close(read_fd)


def test_an_idle_child_gives_its_free_heap_back_once_per_pause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps a chunk's freed documents in the heap (~5 MB): a child that gets no new chunk
    within IDLE_TRIM_SECONDS of an answer trims it, once per pause, and encodes as before."""
    assert encoder_pool.heap_trimmer() is not None  # glibc here: the real malloc_trim
    trims: list[float] = []
    monkeypatch.setattr(encoder_pool, "heap_trimmer",
                        lambda: lambda: trims.append(time.monotonic()))
    to_child, child_in = os.pipe()
    child_out, from_child = os.pipe()
    region, fd = encoder_pool.Region.create(1 << 20, 1 << 20)
    os.close(fd)
    server = threading.Thread(target=encoder_pool._serve, args=(to_child, from_child, region))
    server.start()
    jobs = jobs_for(real_payloads()[:50])
    try:
        for pause in (1, 2):
            # (new matchers, generations dropped, jobs, payloads in the pipe, documents at 0,
            # not past the region's end)
            send_frame(child_in, ({3: SPEC} if pause == 1 else {}, [],
                                  encoder_pool._pack_jobs(jobs), -1, 0, 1 << 20),
                       [job.payload for job in jobs])
            (header, start, held), _ = recv_frame(child_out)
            assert held == (3,)
            assert list(encoder_pool._iter_results(header, region.back[start:])) \
                == [encode(job, Matcher(*SPEC)) for job in jobs]
            wait_until(lambda n=pause: len(trims) >= n, 10, f"trim after pause {pause}")
    finally:
        os.close(child_in)  # EOF: the child's loop ends
        server.join(timeout=30)
        for fd in (to_child, child_out, from_child):
            os.close(fd)
    assert not server.is_alive() and len(trims) == 2  # one per pause, none while blocked


def test_a_chunks_payloads_are_freed_before_its_answer_is_sent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer can wait in the pipe until the store worker has encoded its own part: the
    child must not hold the chunk's payloads (~2 MB) meanwhile."""

    class Blob(bytearray):  # a bytearray that can be watched with a weak reference
        pass

    jobs = jobs_for(real_payloads()[:20])
    received: list[weakref.ref[Blob]] = []
    alive_at_send: list[bool] = []

    def recv(fd: int) -> tuple[object, bytearray]:
        if received:
            raise EOFError
        blob = Blob(b"".join(job.payload for job in jobs))
        received.append(weakref.ref(blob))
        return ({3: SPEC}, [], encoder_pool._pack_jobs(jobs), -1, 0, 1 << 20), blob

    def send(fd: int, header: object, parts: list[bytes]) -> None:
        alive_at_send.append(received[0]() is not None)

    monkeypatch.setattr(encoder_pool, "recv_frame", recv)
    monkeypatch.setattr(encoder_pool, "send_frame", send)
    monkeypatch.setattr(encoder_pool, "heap_trimmer", lambda: None)
    region, fd = encoder_pool.Region.create(4096, 1 << 20)
    os.close(fd)
    encoder_pool._serve(-1, -1, region)
    assert alive_at_send == [False]


class ThreadChild:
    """``subprocess.Popen`` for ``EncoderProcess``: the child's own code (``_serve`` behind its
    ``_STARTED`` byte) run in a thread of this process, so that the matchers it holds can be
    counted (``CountedMatcher``). Pipes, shared region and wire are the real ones."""

    def __init__(self, args: list[str], **_: object) -> None:
        fd, in_bytes, out_bytes = map(int, args[-3:])
        region = encoder_pool.Region(fd, in_bytes, out_bytes)  # mapped: the caller closes fd
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        self.stdin, self.stdout = os.fdopen(to_child, "wb"), os.fdopen(from_child, "rb")
        self.pid, self.returncode = os.getpid(), None

        def serve() -> None:
            try:
                encoder_pool._write_all(child_out, [encoder_pool._STARTED])
                encoder_pool._serve(child_in, child_out, region)
            finally:
                os.close(child_in)
                os.close(child_out)

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        assert not self._thread.is_alive()
        self.returncode = 0
        return 0

    def kill(self) -> None:
        raise AssertionError("the thread child ends when its pipe closes")


def test_the_child_holds_no_more_matchers_than_the_store_worker_and_old_ones_still_match(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``encoder_process: true`` the child lives as long as the daemon, through every reload:
    it must hold the matchers of the generations the store worker keeps (16 plus the newest), not
    one per reload for ever, and only the newest's caches at full size. A record of a generation
    it dropped (a backlog) is still matched by that generation's own filters."""
    from ingestd.documents.match_track import RETIRED_CACHE_SIZE
    from ingestd.sink.encoder_split import MATCHER_GENERATIONS, Matchers
    from ingestd.spool.generations import GenerationRecord
    from tests.test_writer import make_settings

    made: list[weakref.ref[Matcher]] = []

    class CountedMatcher(Matcher):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            made.append(weakref.ref(self))

    def alive() -> list[Matcher]:
        return [m for m in (ref() for ref in made) if m is not None]

    monkeypatch.setattr(encoder_pool, "Matcher", CountedMatcher)  # the child's, not the worker's
    monkeypatch.setattr(encoder_pool.subprocess, "Popen", ThreadChild)
    monkeypatch.setattr(encoder_pool, "heap_trimmer", lambda: None)

    def track(g: int) -> tuple[str, ...]:  # generation 1 matches much of the sample, others little
        return ("the", "covid vaccine", "#music") if g == 1 else (f"word{g}", "beatles")

    record = GenerationRecord(tmp_path)
    record.record(1, (list(track(1)), [], []))
    matchers = Matchers(1, make_settings("mongodb://127.0.0.1:1", "db", track=track(1)), record)
    payloads = real_payloads()[:60]
    last = MATCHER_GENERATIONS + 24
    proc = EncoderProcess()
    try:
        for g in range(1, last + 1):
            if g > 1:  # a reload
                record.record(g, (list(track(g)), [], []))
                matchers.add(g, make_settings("mongodb://127.0.0.1:1", "db", track=track(g)))
            jobs = jobs_for(payloads, g)
            proc.submit(jobs, matchers.specs)
            assert proc.result() == [encode(job, Matcher(track(g))) for job in jobs]
            assert len(alive()) <= MATCHER_GENERATIONS + 1, f"after generation {g}"
        assert set(proc.child_generations) == set(matchers.specs) and 1 not in matchers.specs
        assert all(m.track == list(track(last)) or m._track is None
                   or m._track.cache_size == RETIRED_CACHE_SIZE for m in alive())
        # A backlog of generation 1 read now: the child dropped it, so its first read is punted
        # and the store worker matches it itself (resolved again from the record); the next read
        # goes to the child with generation 1's filters sent again.
        jobs = jobs_for(payloads, 1)
        reference = [encode(job, Matcher(track(1))) for job in jobs]
        proc.submit(jobs, matchers.specs)
        answers = proc.result()
        assert answers == [Encoded(PUNT)] * len(jobs)
        taken = [encode(job, matchers.get(1)) if e.status == PUNT else e  # StoreWorker's path
                 for job, e in zip(jobs, answers, strict=True)]
        assert taken == reference
        proc.submit(jobs, matchers.specs)
        assert proc.result() == reference and 1 in proc.child_generations
        assert len(alive()) <= MATCHER_GENERATIONS + 1
        matched = [bson.decode(e.raw)["_ingest"]["matched"]["track"]
                   for e in reference if e.status == OK]
        assert sum(bool(m) for m in matched) > 10  # generation 1's filters, not the newest's
    finally:
        proc.close()
