"""The split of each spool read between the encoder child and the store worker itself.

The child (``encoder_pool.EncoderProcess``) encodes the last part of a read, sent in a few chunks,
while this process encodes and takes the first part; the share adapts so that neither side waits
for the other. A worker behind the stream may also leave a read's part with the child while it
reads the next one (``submit`` while one is pending, ``collect`` in the same order): the child
then works while this process reads, flushes and takes. Reads are encoded here while the child
starts (it imports in the background). A lost child loses nothing: its part is encoded here, and
a new child is started no sooner than ``ENCODER_RESTART_INTERVAL`` later. Kept apart from
``encoder_pool``, which the child imports.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

import structlog

from ingestd.config.schema import Settings
from ingestd.documents.encoder import Encoded, MatcherSpec
from ingestd.documents.matching import Matcher, retire_superseded
from ingestd.sink.counters import StoreCounters, bump
from ingestd.sink.encoder_pool import EncoderProcess
from ingestd.spool.format import KIND_MESSAGE, Record
from ingestd.spool.generations import GenerationRecord, Unresolved

log = structlog.get_logger("ingestd.sink.encoder_split")

MATCHER_GENERATIONS = 16  # matchers kept besides the newest one's
UNRESOLVED_KEPT = 1024  # generations remembered as not found (each is logged once)
# Reads smaller than this are encoded in-process: at low rates a round trip to the encoder child
# would only add latency.
OFFLOAD_MIN = 64
SHARE_STEP = 0.02  # how fast the split between the two encoders adapts
CHUNKS = 4  # chunks the child's part of a read is sent in (``EncoderSplit._send``)
ENCODER_RESTART_INTERVAL = 10.0  # seconds between restarts of a lost encoder child
# A child not ready this long after it was started (its imports take ~0.1 s) is taken as lost.
ENCODER_START_TIMEOUT = 30.0
# ``writer.encoder_process: auto`` (docs/design.md, "Processes"): a child only while encoding, not
# the inserts, is the work (``inserts``: the share of the busy time spent waiting for inserts) and
# the worker cannot keep up alone: behind (``unread`` spool bytes) or busy nearly all the time
# (``busy``: the share of all the time not spent waiting for data, smoothed over seconds, as batch
# by batch it jumps between ~0.3 and 1 at a steady 10k tweets/s). A child where the worker keeps
# up alone cost 2–14 µs of CPU per tweet (bench/steady.py). Each pair of thresholds keeps it from
# flapping: a child started at inserts 0.25 sees ~0.62; one started at busy 0.9 leaves ~0.6.
INSERT_SHARE_START = 0.25  # a child starts while waits for inserts take less of the time than this
INSERT_SHARE_STOP = 0.75  # and stops once they take more
BUSY_SHARE_START = 0.9  # a child starts while the worker is busy at least this share of the time
BUSY_SHARE_STOP = 0.5  # and stops once it is busy less, with no backlog
BEHIND_BYTES = 16 * 1024 * 1024  # unread spool bytes that mean "behind" (~4 batches of tweets)
# A read's part is held with the child (``may_hold``) only while waits for inserts take less than
# this share of the busy time. Measured: 0.02–0.11 (median 0.04) in a burst into a MongoDB that
# acks at once, 0.13–0.45 behind one that acks each batch 0.05 s late, where holding slowed the
# drain ~4 % (bench/LOG.md, 2026-12-05).
HOLD_INSERT_SHARE = 0.1
SHARE_WEIGHT = 0.5  # weight of the newest batch in the insert share
BUSY_TIME_CONSTANT = 2.0  # seconds: the busy share follows a change by 63 % in this time
# A batch's idle time counts up to this much: a burst after a quiet hour is busy from its start.
IDLE_COUNTED_MAX = 1.0


class _Sent(NamedTuple):
    """A read's part with the child: its encoder and how many chunks it went in."""

    encoder: EncoderProcess
    chunks: int


def matcher_spec(settings: Settings) -> MatcherSpec:
    stream = settings.stream
    return (list(stream.track), list(stream.follow), list(stream.locations))


class Matchers:
    """The matcher of each settings generation whose records may still be in the spool.

    A generation not known here (a record replayed from an earlier run, or one received under
    a reload that has not reached this process yet) is resolved from the state folder's record
    of generations (``spool.generations``: the supervisor writes each before any record can carry
    it). One whose filters cannot be found there is matched by the newest generation's, counted
    by reason in ``StoreCounters.matched_fallback`` and logged once (``generation_unknown``).
    """

    def __init__(self, generation: int, settings: Settings,
                 record: GenerationRecord | None = None,
                 counters: StoreCounters | None = None) -> None:
        self.newest = generation
        self._matchers: dict[int, Matcher] = {}
        self.specs: dict[int, MatcherSpec] = {}  # what the encoder child builds its matchers from
        self._record = record
        self._counters = counters if counters is not None else StoreCounters()
        self._unresolved: dict[int, Unresolved] = {}  # generations matched by the newest's
        # The start generation's filters as recorded; the worker's own settings if none were
        # (a worker started by hand, or by tests, without a supervisor).
        found = record.lookup(generation) if record is not None else None
        if isinstance(found, tuple):
            self._add_spec(generation, found)
        else:
            if record is not None and record.directory.is_dir():
                log.warning("generation_unrecorded", generation=generation, reason=found,
                            action="matching its records by this worker's settings")
            self.add(generation, settings)

    def add(self, generation: int, settings: Settings) -> None:
        self.newest = max(self.newest, generation)
        self._add_spec(generation, matcher_spec(settings))
        self._unresolved.pop(generation, None)

    def _add_spec(self, generation: int, spec: MatcherSpec) -> None:
        self._matchers.pop(generation, None)  # re-inserted as the most recent
        self._matchers[generation] = Matcher(*spec)
        self.specs[generation] = spec
        # The least recently added go first (never the newest): an old generation resolved for
        # a replay stays while its records are read. The encoder child drops what is dropped
        # here (``EncoderProcess.submit``): it holds no more matchers than this process.
        for old in [g for g in self._matchers if g != self.newest][:-MATCHER_GENERATIONS]:
            del self._matchers[old]
            self.specs.pop(old, None)
        retire_superseded(self._matchers)

    def get(self, generation: int) -> Matcher:
        """``generation``'s matcher: known, resolved from the record of generations, else the
        newest one (counted)."""
        matcher = self._matchers.get(generation)
        return matcher if matcher is not None else self._resolve(generation)

    def _resolve(self, generation: int) -> Matcher:
        reason = self._unresolved.get(generation)
        if reason is None:
            found = self._record.lookup(generation) if self._record is not None else "missing"
            if isinstance(found, tuple):
                log.info("generation_resolved", generation=generation, newest=self.newest)
                self._add_spec(generation, found)
                return self._matchers[generation]
            reason = found
            if len(self._unresolved) >= UNRESOLVED_KEPT:
                self._unresolved.clear()
            self._unresolved[generation] = reason
            # An older version's backlog replayed after an upgrade is routine (README,
            # "Upgrade"): a warning; filters lost or never recorded are an error.
            report = log.warning if reason == "before_record" else log.error
            report("generation_unknown", generation=generation, reason=reason,
                   action=f"matching its records by generation {self.newest}'s filters")
        bump(self._counters.matched_fallback, reason)
        return self._matchers[self.newest]


class EncoderSplit:
    """Encodes the tweets of each read, sharing it with the encoder child when that pays."""

    def __init__(self, matchers: Matchers, counters: StoreCounters, choice: bool | None,
                 offload_min: int = OFFLOAD_MIN) -> None:
        self._matchers = matchers
        self._counters = counters
        self._choice = choice  # None: settings.writer.encoder_process decides
        self.inserts = TimeShare()  # of the busy time, waiting for inserts
        # Of all the time, not waiting for data: a new worker is taken to keep up until its
        # batches say otherwise (its first one's time holds its connection and index builds).
        self.busy = TimeShare(0.0, BUSY_TIME_CONSTANT)
        self.unread = 0  # the spool's unread bytes after the last insert
        self.offload_min = offload_min
        self.encoder: EncoderProcess | None = None
        self._retry_at = 0.0  # monotonic time before which no new child is started
        self._started_at = 0.0  # monotonic time the current child was started
        self._share = 0.5  # fraction of a read sent to the encoder child
        self._sent: deque[_Sent] = deque()  # parts with the child, oldest first (at most two)

    def may_hold(self) -> bool:
        """Whether a read's part may stay with the child while the next read is taken: only while
        encoding, not waiting for inserts, is nearly all the work (behind a MongoDB that acks each
        batch late, a busier worker thread only delays the inserts' own Python work)."""
        share = self.inserts.share
        return self.encoder is not None and share is not None and share < HOLD_INSERT_SHARE

    def submit(self, records: list[Record], settings: Settings) -> int:
        """Send the last part of ``records`` to the encoder child when the read is worth sharing;
        how many records (at the end of ``records``) it encodes: 0 if none, all are encoded here.

        The child takes the last part, so that this process can take its own part, the first one,
        as it encodes it (each tweet's payload then dies at once); then ``collect``. One earlier
        read's part may still be pending (collected first): this one queues behind it when the
        child can take both at once, else it is encoded here.
        """
        if len(self._sent) > 1:
            raise RuntimeError("encoder split: collect the pending read before sending another")
        encoder = self._encoder_for(len(records), settings)
        if encoder is None:
            return 0
        theirs = max(1, min(len(records) - 1, round(len(records) * self._share)))
        messages = [r for r in records[-theirs:] if r.kind == KIND_MESSAGE]
        size = sum(len(r.payload) for r in messages)
        count = CHUNKS if encoder.queues and size <= encoder.region_bytes else 1
        if not encoder.can_queue_read(size, count):
            return 0
        try:
            self._sent.append(_Sent(encoder, self._send(encoder, messages, count)))
        except OSError as exc:
            self._lost(exc)
            return 0
        return theirs

    def _send(self, encoder: EncoderProcess, messages: list[Record], count: int) -> int:
        """Send ``messages`` to the child in ``count`` chunks (``CHUNKS`` when it can queue them,
        else one); how many. The child answers each chunk as it is done: this process takes one
        chunk's documents while the child encodes the next, and the child waits only while the
        last one's are taken (with one chunk, it waited while all of them were)."""
        step = max(1, -(-len(messages) // count))
        chunks = [messages[i:i + step] for i in range(0, len(messages), step)] or [[]]
        encoder.begin_read()
        for chunk in chunks:
            encoder.submit(chunk, self._matchers.specs)
        return len(chunks)

    def collect(self, theirs: list[Record]) -> Iterator[tuple[Record, Encoded | None]]:
        """The records of the oldest part ``submit`` sent (none sent: encoded by the caller),
        with the child's results, in spool order (None: the caller encodes that one as it takes
        it). ``theirs`` is the caller's list of them, newest first: each record is popped as it
        is yielded, so that nothing here holds a tweet's payload once the caller has taken it."""
        sent = self._sent.popleft() if self._sent else None
        results = self._results(sent.encoder, sent.chunks) if sent is not None else None
        while theirs:
            record = theirs.pop()
            encoded = None
            if results is not None and record.kind == KIND_MESSAGE:
                encoded = next(results, None)
                if encoded is None:  # the child is gone: the rest is encoded here
                    results = None
            yield record, encoded

    def _results(self, encoder: EncoderProcess, chunks: int) -> Iterator[Encoded]:
        """The child's answers to this read's chunks, each read when its turn comes; they end
        early if the child is lost, or was stopped meanwhile by new settings."""
        for chunk in range(chunks):
            if encoder is not self.encoder:
                return  # ``stop`` closed it during a flush of this read (new settings)
            if chunk == chunks - 1:  # balance the split: neither side should wait
                self._share += SHARE_STEP if encoder.ready() else -SHARE_STEP
                self._share = min(0.9, max(0.1, self._share))
            try:
                answer = encoder.results()
            except (EOFError, OSError) as exc:
                self._lost(exc)
                return
            for encoded in answer:
                self._counters.offloaded += 1
                yield encoded

    def note(self, inserting: float, taking: float, busy: float, idle: float,
             unread: int | None) -> None:
        """The time since the worker's last insert: ``inserting`` waiting for this one and
        ``taking`` records; ``busy`` not waiting for data and ``idle`` waiting (a quiet hour
        before a burst counts as ``IDLE_COUNTED_MAX``); ``unread`` spool bytes (None: unknown,
        the last value stands)."""
        self.inserts.note(inserting, taking)
        self.busy.note(busy, min(idle, IDLE_COUNTED_MAX))
        if unread is not None:
            self.unread = unread

    def apply(self, settings: Settings) -> None:
        """New settings: stop the child if they no longer want it (it restarts on use)."""
        if not self._wanted(settings):
            self.stop()

    def release(self) -> None:
        """Idle after a burst: the child's shared region gives its pages back."""
        if self.encoder is not None and self.encoder.started:
            self.encoder.release()

    def stop(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None

    def _wanted(self, settings: Settings) -> bool:
        return self._mode(settings) is not False

    def _mode(self, settings: Settings) -> bool | str:
        return settings.writer.encoder_process if self._choice is None else self._choice

    def _pays(self, settings: Settings) -> bool:
        """In ``auto`` mode: whether the worker cannot keep up alone and encoding, not waiting
        for MongoDB, holds it up. Nothing is known before the first insert: that batch is
        encoded here."""
        if self._mode(settings) != "auto":
            return True
        inserts, busy = self.inserts.share, self.busy.share
        if inserts is None or busy is None:
            return False
        behind = self.unread >= BEHIND_BYTES
        if self.encoder is not None:
            # Also kept while the newest batch had no wait for data: the smoothed share lags
            # by seconds, and a burst's end (the last few batches, no longer behind) would
            # otherwise be taken alone with the child idle (bench/LOG.md, "A burst's tail").
            working = busy >= BUSY_SHARE_STOP or (self.busy.last or 0.0) >= BUSY_SHARE_START
            return inserts < INSERT_SHARE_STOP and (behind or working)
        return inserts < INSERT_SHARE_START and (behind or busy >= BUSY_SHARE_START)

    def _encoder_for(self, records: int, settings: Settings) -> EncoderProcess | None:
        """The encoder child when this read is worth sharing with it and the child is ready
        (started on first use; until it is ready, reads are encoded here)."""
        if not self._wanted(settings):
            return None
        if not self._pays(settings):
            if self.encoder is not None:  # also on a small read: a slow stream frees its memory
                log.info("encoder_stopped", insert_share=round(self.inserts.share or 0.0, 2),
                         busy_share=round(self.busy.share or 0.0, 2))
                self.stop()
            return None
        if records < self.offload_min:
            return None
        encoder = self.start_child()
        if encoder is None or encoder.started:
            return encoder
        try:
            ready = encoder.poll_started()
        except (EOFError, OSError) as exc:
            self._lost(exc)
            return None
        if ready:
            log.info("encoder_started", pid=encoder.pid,
                     after=round(time.monotonic() - self._started_at, 3))
            return encoder
        if time.monotonic() - self._started_at > ENCODER_START_TIMEOUT:
            self._lost(TimeoutError(f"not ready after {ENCODER_START_TIMEOUT:.0f} s"))
        return None

    def start_child(self) -> EncoderProcess | None:
        """The encoder child, started now if there is none; None if it cannot be started yet.
        The child gets ready in the background (``EncoderProcess.poll_started``)."""
        if self.encoder is None:
            if time.monotonic() < self._retry_at:
                return None  # lost recently: encode here for a while rather than spin
            try:
                self.encoder = EncoderProcess()  # it gets every matcher again: it is new
            except OSError as exc:
                log.error("encoder_start_failed", error=type(exc).__name__)
                self._retry_at = time.monotonic() + ENCODER_RESTART_INTERVAL
                return None
            self._started_at = time.monotonic()
        return self.encoder

    def _lost(self, exc: BaseException) -> None:
        """The child died or its pipe broke: its part is encoded here, a new one starts later."""
        c = self._counters
        c.encoder_restarts += 1
        log.error("encoder_lost", error=type(exc).__name__, detail=str(exc)[:200],
                  restarts=c.encoder_restarts)
        self._retry_at = time.monotonic() + ENCODER_RESTART_INTERVAL
        if self.encoder is not None:
            self.encoder.close(timeout=0.5)
            self.encoder = None


class TimeShare:
    """A share of the store worker's time, smoothed: of each batch's time, the part spent one way
    (e.g. waiting for its insert) over that plus the rest. The newest batch weighs
    ``SHARE_WEIGHT``, or, with a ``time_constant``, by its length (a short batch moves the share
    little: a burst of short batches is noticed in about that time, not in two batches)."""

    def __init__(self, share: float | None = None, time_constant: float | None = None) -> None:
        self.share = share  # None: nothing known until the first batch
        self.last: float | None = None  # the newest batch's own share, unsmoothed
        self._time_constant = time_constant

    def note(self, part: float, rest: float) -> None:
        """Of a batch's time, ``part`` seconds went one way and ``rest`` seconds the other."""
        total = part + rest
        if total <= 0:
            return
        share = self.last = part / total
        old = self.share
        if old is None:
            self.share = share
            return
        tau = self._time_constant
        weight = SHARE_WEIGHT if tau is None else 1 - math.exp(-total / tau)
        self.share = old + weight * (share - old)
