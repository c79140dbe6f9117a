"""How the store worker waits on MongoDB and on the dead-letter disk: retries, back-off, give-up.

A write that fails transiently is retried with exponential back-off and jitter, forever; auth and
configuration errors back off at the cap and set ``state`` to ``degraded: …``. A write that took
``mongo.slow_write_seconds`` or longer is logged with what pymongo saw meanwhile, and counted.
Every MongoDB call runs on a helper thread while this thread keeps calling ``tick`` (the
heartbeat) at least every 0.5 s. Once stop is requested and the drain deadline has passed, a
wait raises ``GiveUp``: the spool keeps what was not stored.
"""

from __future__ import annotations

import concurrent.futures
import errno
import random
import time
from collections.abc import Callable
from typing import TypeVar

import structlog

from ingestd.documents.labels import MessageReason
from ingestd.sink.attempt import Started
from ingestd.sink.counters import StoreCounters, bump
from ingestd.sink.deadletter import DeadLetterStore, Reason
from ingestd.sink.helper_thread import HelperThread
from ingestd.sink.mongo import (
    DRIVER_EVENTS,
    ErrorClass,
    classify_error,
    error_fields,
    error_key,
    error_name,
    tls_cause,
)
from ingestd.sink.target import MongoTarget
from ingestd.spool.format import (
    KIND_MESSAGE,
    Record,
    RecordRef,
    read_badframe,
    read_oversize,
)

log = structlog.get_logger("ingestd.sink.retry")

T = TypeVar("T")

TICK_INTERVAL = 0.25  # well under the 0.5 s heartbeat promise


class GiveUp(Exception):
    """Stop was requested and the drain deadline passed while MongoDB was failing."""


class Retrier:
    """Runs MongoDB calls on the helper thread until they succeed, ticking meanwhile.

    ``should_stop``, ``tick`` and ``drain_deadline`` are the caller's (see ``StoreWorker.run``);
    ``flush_spool`` writes the spool's coalesced checkpoint.
    """

    def __init__(self, target: MongoTarget, counters: StoreCounters,
                 flush_spool: Callable[[], None], rng: random.Random | None = None) -> None:
        self._target = target
        self._counters = counters
        self._flush_spool = flush_spool
        self._rng = rng or random.Random()
        # A daemon thread: a call abandoned at the drain deadline must not hold up the exit.
        self._executor = HelperThread("mongo")
        self.should_stop: Callable[[], bool] = lambda: False
        self.tick: Callable[[], None] = lambda: None
        self.drain_deadline: Callable[[], float | None] = lambda: None
        self._next_tick = 0.0
        # The operations being waited for, outermost first: a tick's write (the coverage ledger
        # with the checkpoint) waits inside an insert's wait, queued behind it on the one helper
        # thread, so the outermost is the one MongoDB did not answer.
        self._waiting: list[tuple[str, float]] = []
        # What the helper thread is running, since when: the operation MongoDB has not answered
        # while the worker waits for another one queued behind it (``_no_reply``).
        self._running: tuple[str, float] | None = None

    def start(self, fn: Callable[[], T], what: str) -> Started[T]:
        """``fn()`` started on the helper thread, not waited for: the first attempt of a later
        ``with_retry(..., first=)`` (the store worker takes the next batch meanwhile)."""
        started = time.monotonic()
        return Started(self._submit(fn, what), started)

    def _submit(self, fn: Callable[[], T], what: str) -> concurrent.futures.Future[T]:
        def run() -> T:
            self._running = (what, time.monotonic())
            try:
                return fn()
            finally:
                self._running = None
        return self._executor.submit(run)

    def with_retry(self, what: str, fn: Callable[[], T], first: Started[T] | None = None) -> T:
        """``fn()`` on the helper thread, retried while it fails transiently or for config reasons.

        ``first``: an attempt already started by ``start(fn)``, waited for before any retry.
        Failures classified per document or as duplicates are raised for the caller to sort out.
        """
        attempt = 0
        started = time.monotonic() if first is None else first.started
        while True:
            # Only ``fn``'s own failure is MongoDB's: one raised by a tick (heartbeat, status file)
            # while waiting must propagate as itself, not be retried as a MongoDB error.
            future = self._await(fn, what) if first is None else self._wait(first.future, what)
            # an attempt started earlier took until it ended, not until it was looked at
            ended, first = (None if first is None else first.ended), None
            try:
                result = future.result()
            except Exception as exc:
                cls = classify_error(exc)
                if cls in (ErrorClass.PER_DOCUMENT, ErrorClass.DUPLICATES_ONLY):
                    self._check_slow(what, started, attempt, exc, cls, ended)
                    raise
                self.failed(what, exc, cls)
                if not self._switch_failing_target():
                    self.backoff(attempt, cls)  # cut short if a reload brings a new target
                    attempt = 0 if self._switch_failing_target() else attempt + 1
                continue
            self._check_slow(what, started, attempt, None, None, ended)
            if self._counters.state.startswith("degraded"):
                log.info("mongo_recovered", after_retries=attempt)
                self.recovered()
            return result

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the helper thread, ticking here while it is in flight."""
        return self._await(fn).result()

    def failed(self, what: str, exc: BaseException, cls: ErrorClass) -> None:
        c = self._counters
        cause = tls_cause(exc)  # an untrusted certificate: the status says so, and what to set
        name = f"{error_name(exc)}: {cause}" if cause else error_name(exc)
        c.last_error, c.last_error_at = f"{what}: {name}", time.time()
        if cls is ErrorClass.FATAL_CONFIG:
            c.state = f"degraded: mongo rejects our configuration ({name})"
        else:
            c.state = f"degraded: mongo unavailable ({name})"
        c.retries += 1
        # What the server said (codes, names, messages, errInfo); write errors by code only:
        # their messages can quote document contents. Repeats fold by what the error is and
        # where (``retries`` and the message's timeouts change at every attempt).
        key = f"{what} {cls.value} {error_key(exc)} @{self._target.servers()}"
        log.error("mongo_write_failed", op=what, error_class=cls.value, retries=c.retries,
                  rate_key=key, **({"cause": cause} if cause else {}), **error_fields(exc))

    def recovered(self) -> None:
        self._counters.state = "draining" if self.should_stop() else "running"

    def healthy(self) -> bool:
        """MongoDB answered the last operation (no failure since, ``recovered`` or never)."""
        return not self._counters.state.startswith("degraded")

    def backoff(self, attempt: int, cls: ErrorClass) -> None:
        ws = self._target.settings.writer
        if cls is ErrorClass.FATAL_CONFIG:
            delay = ws.retry_cap  # retrying fast cannot fix credentials
        else:
            delay = min(ws.retry_cap, ws.retry_start * 2 ** min(attempt, 30))
            delay *= self._rng.uniform(0.5, 1.0)
        self._sleep(delay)

    def maybe_tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_tick:
            self._next_tick = now + TICK_INTERVAL
            self.tick()
            # A coalesced checkpoint must not wait for the next ack (e.g. during a MongoDB
            # back-off): the stream worker sizes the backlog from it.
            self._flush_spool()

    def tick_due_in(self) -> float:
        """Seconds until ``maybe_tick`` runs the caller's housekeeping again."""
        return max(0.0, self._next_tick - time.monotonic())

    def past_deadline(self) -> bool:
        deadline = self.drain_deadline()
        return deadline is not None and time.monotonic() >= deadline

    def close(self) -> None:
        self._executor.shutdown()

    def _await(self, fn: Callable[[], T],
               what: str = "mongo operation") -> concurrent.futures.Future[T]:
        """Submit ``fn`` to the helper thread and tick until it is done; its future."""
        return self._wait(self._submit(fn, what), what)

    def _wait(self, future: concurrent.futures.Future[T],
              what: str = "mongo operation") -> concurrent.futures.Future[T]:
        """Tick until ``future`` is done; ``future``. Giving up meanwhile (a stop past its drain
        deadline), the error is that the operation the helper thread is running got no reply (a
        paused or unreachable server whose driver has not timed out yet), unless the store is
        degraded by an error of its own. Not the one waited for: a ledger write queued behind a
        hung insert (a tick's, or the next batch's while the insert runs on) never reached
        MongoDB; naming it hid the insert (the CI's test_counts failures)."""
        self._waiting.append((what, time.monotonic()))
        try:
            while True:
                done, _ = concurrent.futures.wait([future], timeout=TICK_INTERVAL)
                if done:
                    return future
                self.maybe_tick(force=True)
                if self.should_stop() and self.past_deadline():
                    self._no_reply()
                    self._check_give_up()
        finally:
            self._waiting.pop()

    def _no_reply(self) -> None:
        c = self._counters
        if not (c.last_error and c.state.startswith("degraded")):
            what, started = self._running or self._waiting[0]
            c.last_error = (f"{what}: no reply from MongoDB after "
                            f"{time.monotonic() - started:.1f}s")
            c.last_error_at = time.time()

    def _check_slow(self, what: str, started: float, retries: int, exc: BaseException | None,
                    cls: ErrorClass | None, ended: float | None = None) -> None:
        """Warn about (and count) an operation that took ``mongo.slow_write_seconds`` or more.

        pymongo retries inside ``timeoutMS`` without raising, so an outage shorter than that
        shows only as time: the warning names what pymongo saw meanwhile (failed commands,
        cleared pools, servers lost) from its monitoring events.
        """
        elapsed = (time.monotonic() if ended is None else ended) - started
        threshold = self._target.settings.mongo.slow_write_seconds
        if elapsed < threshold:
            return
        self._counters.slow_writes += 1
        log.warning("mongo_write_slow", op=what, seconds=round(elapsed, 3), threshold=threshold,
                    retries=retries, outcome=_outcome(exc, cls),
                    causes=DRIVER_EVENTS.since(started) or ["none reported by pymongo"],
                    slow_writes=self._counters.slow_writes)

    def _switch_failing_target(self) -> bool:
        """A reload brought a new Mongo target while the current one fails: use it now.

        Normally a batch finishes against the target it was taken for; but when that target keeps
        failing (a wrong URI being fixed by the operator is the usual case), waiting for it would
        block the new settings forever. The same documents are retried against the new target.
        """
        target = self._target
        if not target.new_target_pending():
            return False
        new = target.next_settings
        assert new is not None
        log.warning("mongo_target_switched_during_retry", database=new.mongo.database,
                    collection=new.mongo.collection)
        target.switch()
        return True

    def _sleep(self, seconds: float) -> None:
        """Back-off wait; cut short when a reload brings a new Mongo target to try."""
        target = self._target
        end, epoch = time.monotonic() + seconds, target.epoch
        while ((left := end - time.monotonic()) > 0 and epoch == target.epoch
               and not target.new_target_pending()):
            self._check_give_up()
            self.maybe_tick(force=True)
            time.sleep(min(TICK_INTERVAL, left))
        self._check_give_up()

    def _check_give_up(self) -> None:
        if self.should_stop() and self.past_deadline():
            raise GiveUp(self._counters.last_error)


class DeadLetterWriter:
    """Writes dead letters, retrying while the disk refuses them (full, I/O error).

    The spool is acked past a dead letter only once it is on disk, so waiting here loses
    nothing: the spool keeps absorbing the stream meanwhile.
    """

    def __init__(self, store: DeadLetterStore, counters: StoreCounters, retrier: Retrier,
                 reread: Callable[[RecordRef], Record | None]) -> None:
        self.store = store
        self._counters = counters
        self._retrier = retrier
        self._reread = reread  # the spool's copy of a batched tweet (``SpoolReader.reread``)

    def add(self, reason: MessageReason, record: Record, *, code: int | None = None,
            detail: str = "") -> None:
        """Dead-letter a record that ends here (counted under ``deadlettered``)."""
        self.put(reason, record, code=code, detail=detail)
        bump(self._counters.deadlettered, reason)

    def add_oversize(self, record: Record) -> None:
        """Dead-letter an over-size message's record: its head, with the size the framer
        counted (not recorded by a spool of an older version: the detail says so)."""
        size, limit, head = read_oversize(record.kind, record.payload)
        if size is None:
            detail = ("message over stream.max_message_bytes; its size was not recorded "
                      f"(spooled by an older version), its first {len(head)} bytes kept")
        else:
            detail = f"message of {size} bytes over stream.max_message_bytes {limit}"
        self.put("oversize", record._replace(payload=head), detail=detail, size=size, cut=True)
        bump(self._counters.deadlettered, "oversize")

    def add_bad_frame(self, record: Record) -> None:
        """Dead-letter a bad length line's ``KIND_BADFRAME_SIZED`` record: its head, with the
        size the framer counted (``truncated`` when the head is less) and the framer's reason."""
        size, reason, head = read_badframe(record.kind, record.payload)
        if size is None:  # a record too short for its header: say what it is, keep its bytes
            self.add("bad_frame", record, detail=f"spool record kind {record.kind}")
            return
        detail = f"{reason}: a line of {size} bytes, its first {len(head)} kept"
        self.put("bad_frame", record._replace(payload=head), detail=detail, size=size)
        bump(self._counters.deadlettered, "bad_frame")

    def add_ref(self, reason: MessageReason, ref: RecordRef, *, code: int | None = None,
                detail: str = "") -> None:
        """``add`` for a batched tweet, whose payload is read back from the spool (not acked
        yet, so still there). Should it be unreadable, the dead letter says so: never dropped."""
        record = self._reread(ref)
        if record is None:
            log.error("dead_letter_payload_unreadable", seq=ref.seq, segment=ref.segment,
                      offset=ref.offset)
            detail = f"{detail}; payload unreadable from spool {ref.segment}@{ref.offset}"
            record = Record(ref.seq, KIND_MESSAGE, ref.conn_id, ref.generation, ref.recv_ns, b"",
                            ref.segment, ref.offset)
        self.add(reason, record, code=code, detail=detail)

    def put(self, reason: Reason, record: Record, *, code: int | None = None,
            detail: str = "", size: int | None = None, cut: bool = False) -> None:
        """Write a dead letter (not counted: a rejected control message is counted as such);
        ``size`` and ``cut`` as in ``DeadLetterStore.put``."""
        if self.store.holds(record.seq):
            log.info("dead_letter_replayed", reason=reason, seq=record.seq)
            return  # written before a crash that came ahead of the spool checkpoint
        attempt = 0
        while True:
            try:
                self.store.put(reason, record.payload, conn_id=record.conn_id,
                               generation=record.generation, seq=record.seq, code=code,
                               detail=detail, size=size, cut=cut)
            except OSError as exc:
                self._failed(exc)
                self._retrier.backoff(attempt, ErrorClass.TRANSIENT)
                attempt += 1
                continue
            if self._counters.state.startswith("degraded: dead-letter"):
                log.info("deadletter_write_recovered", after_retries=attempt)
                self._retrier.recovered()
            return

    def _failed(self, exc: OSError) -> None:
        c = self._counters
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        c.last_error, c.last_error_at = f"dead-letter write: {name}", time.time()
        c.state = f"degraded: dead-letter store unwritable ({name})"
        c.retries += 1
        log.error("deadletter_write_failed", error=name, retries=c.retries)


def _outcome(exc: BaseException | None, cls: ErrorClass | None) -> str:
    """How a slow write ended. ``ok_ids_present``: every document is in the collection, some
    already were (an attempt the server applied but whose reply was lost, e.g. in a failover)."""
    if exc is None:
        return "ok"
    return "ok_ids_present" if cls is ErrorClass.DUPLICATES_ONLY else error_name(exc)
