"""The split of each spool read between the encoder child and the store worker itself.

The child (``encoder_pool.EncoderProcess``) encodes the last part of a read, sent in a few chunks,
while this process encodes and takes the first part; the share adapts so that neither side waits
for the other. Reads are encoded here while the child starts (it imports in the background). A
lost child loses nothing: its part is encoded here, and a new child is started no sooner than
``ENCODER_RESTART_INTERVAL`` later. Kept apart from ``encoder_pool``, which the child imports.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import structlog

from ingestd.config.schema import Settings
from ingestd.documents.encoder import Encoded, MatcherSpec
from ingestd.documents.matching import Matcher
from ingestd.sink.counters import StoreCounters
from ingestd.sink.encoder_pool import EncoderProcess
from ingestd.spool.format import KIND_MESSAGE, Record

log = structlog.get_logger("ingestd.sink.encoder_split")

MATCHER_GENERATIONS = 16
# Reads smaller than this are encoded in-process: at low rates a round trip to the encoder child
# would only add latency.
OFFLOAD_MIN = 64
SHARE_STEP = 0.02  # how fast the split between the two encoders adapts
CHUNKS = 4  # chunks the child's part of a read is sent in (``EncoderSplit._send``)
ENCODER_RESTART_INTERVAL = 10.0  # seconds between restarts of a lost encoder child
# A child not ready this long after it was started (its imports take ~0.1 s) is taken as lost.
ENCODER_START_TIMEOUT = 30.0
# ``writer.encoder_process: auto``: the child (a whole interpreter, ~14 MB of PSS) earns its memory
# only while encoding is what holds the store worker up. A batch's insert runs while the next one
# is taken (``StoreWorker._flush``), so the measure is the share of the worker's busy time (taking
# records, waiting for the insert before it; not its idle waits for data) spent waiting for
# inserts, smoothed over batches. It is ~0 while taking is the slower side: a child then shortens
# every cycle. Once an insert takes longer than taking a batch, a child cannot speed anything up;
# with a child halving the taking, the share passes 0.5 there. Behind a MongoDB that acks a batch
# in 0.5 s (a 10x overload: the spool holds the backlog) it is ~0.85. Two thresholds keep it from
# flapping: a child started at 0.25 (inserts ~1.3x the taking) sees ~0.62.
INSERT_SHARE_START = 0.25  # a child starts while waits for inserts take less of the time than this
INSERT_SHARE_STOP = 0.75  # and stops once they take more
INSERT_SHARE_WEIGHT = 0.5  # weight of the newest batch in the smoothed share


def matcher_spec(settings: Settings) -> MatcherSpec:
    stream = settings.stream
    return (list(stream.track), list(stream.follow), list(stream.locations))


class Matchers:
    """The matcher of each settings generation whose records may still be in the spool."""

    def __init__(self, generation: int, settings: Settings) -> None:
        self.newest = generation
        self._matchers: dict[int, Matcher] = {}
        self.specs: dict[int, MatcherSpec] = {}  # what the encoder child builds its matchers from
        self.add(generation, settings)

    def add(self, generation: int, settings: Settings) -> None:
        spec = matcher_spec(settings)
        self._matchers[generation] = Matcher(*spec)
        self.specs[generation] = spec
        for old in sorted(self._matchers)[:-MATCHER_GENERATIONS]:
            del self._matchers[old]
            self.specs.pop(old, None)
        self.newest = max(self.newest, generation)

    def get(self, generation: int) -> Matcher:
        """``generation``'s matcher; the newest one for a generation too old to be kept."""
        return self._matchers.get(generation) or self._matchers[self.newest]


class EncoderSplit:
    """Encodes the tweets of each read, sharing it with the encoder child when that pays."""

    def __init__(self, matchers: Matchers, counters: StoreCounters, choice: bool | None,
                 offload_min: int = OFFLOAD_MIN) -> None:
        self._matchers = matchers
        self._counters = counters
        self._choice = choice  # None: settings.writer.encoder_process decides
        self.inserts = InsertShare()
        self.offload_min = offload_min
        self.encoder: EncoderProcess | None = None
        self._retry_at = 0.0  # monotonic time before which no new child is started
        self._started_at = 0.0  # monotonic time the current child was started
        self._share = 0.5  # fraction of a read sent to the encoder child
        self._pending: EncoderProcess | None = None  # the child encoding a part of this read
        self._chunks = 0  # chunks of this read sent to the child

    def submit(self, records: list[Record], settings: Settings) -> int:
        """Send the last part of ``records`` to the encoder child when the read is worth sharing;
        how many records (at the end of ``records``) it encodes: 0 if none, all are encoded here.

        The child takes the last part, so that this process can take its own part, the first one,
        as it encodes it (each tweet's payload then dies at once); then ``collect``.
        """
        encoder = self._encoder_for(len(records), settings)
        if encoder is None:
            return 0
        theirs = max(1, min(len(records) - 1, round(len(records) * self._share)))
        try:
            self._chunks = self._send(encoder, [r for r in records[-theirs:]
                                                if r.kind == KIND_MESSAGE])
        except OSError as exc:
            self._lost(exc)
            return 0
        self._pending = encoder
        return theirs

    def _send(self, encoder: EncoderProcess, messages: list[Record]) -> int:
        """Send ``messages`` to the child in ``CHUNKS`` chunks when it can queue them, else in one;
        how many. The child answers each chunk as it is done: this process takes one chunk's
        documents while the child encodes the next, and the child waits only while the last
        one's are taken (with one chunk, it waited while all of them were)."""
        size = sum(len(r.payload) for r in messages)
        count = CHUNKS if encoder.queues and size <= encoder.region_bytes else 1
        step = max(1, -(-len(messages) // count))
        chunks = [messages[i:i + step] for i in range(0, len(messages), step)] or [[]]
        for chunk in chunks:
            encoder.submit(chunk, self._matchers.specs)
        return len(chunks)

    def collect(self, theirs: list[Record]) -> Iterator[tuple[Record, Encoded | None]]:
        """The records ``submit`` sent, with the child's results, in spool order (None: the
        caller encodes that one as it takes it). ``theirs`` is the caller's list of them, newest
        first: each record is popped as it is yielded, so that nothing here holds a tweet's
        payload once the caller has taken it."""
        encoder, self._pending = self._pending, None
        results = self._results(encoder, self._chunks) if encoder is not None else None
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
        """In ``auto`` mode: whether encoding, not waiting for MongoDB, holds the worker up.
        Nothing is known before the first insert: that batch is encoded here."""
        if self._mode(settings) != "auto":
            return True
        share = self.inserts.share
        if share is None:
            return False
        return share < (INSERT_SHARE_STOP if self.encoder is not None else INSERT_SHARE_START)

    def _encoder_for(self, records: int, settings: Settings) -> EncoderProcess | None:
        """The encoder child when this read is worth sharing with it and the child is ready
        (started on first use; until it is ready, reads are encoded here)."""
        if records < self.offload_min or not self._wanted(settings):
            return None
        if not self._pays(settings):
            if self.encoder is not None:
                log.info("encoder_stopped", reason="waits for inserts take most of the time",
                         insert_share=round(self.inserts.share or 0.0, 2))
                self.stop()
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


class InsertShare:
    """The share of the store worker's busy time spent waiting for inserts, smoothed over batches:
    the wait for each batch's insert over that plus the time spent taking (reading, encoding) the
    records since the insert before."""

    def __init__(self) -> None:
        self.share: float | None = None  # None until the first insert

    def note(self, inserting: float, taking: float) -> None:
        """The worker took records for ``taking`` seconds, then waited ``inserting`` seconds for
        an insert."""
        busy = inserting + taking
        if busy <= 0:
            return
        share = inserting / busy
        old = self.share
        self.share = share if old is None else old + INSERT_SHARE_WEIGHT * (share - old)
