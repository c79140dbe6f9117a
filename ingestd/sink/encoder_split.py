"""The split of each spool read between the encoder child and the store worker itself.

The child (``encoder_pool.EncoderProcess``) encodes the last part of a read while this process
encodes and takes the first part; the share adapts so that neither side waits for the other. A
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
ENCODER_RESTART_INTERVAL = 10.0  # seconds between restarts of a lost encoder child


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
        self.offload_min = offload_min
        self.encoder: EncoderProcess | None = None
        self._retry_at = 0.0  # monotonic time before which no new child is started
        self._share = 0.5  # fraction of a read sent to the encoder child
        self._pending: EncoderProcess | None = None  # the child encoding a part of this read

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
            encoder.submit([r for r in records[-theirs:] if r.kind == KIND_MESSAGE],
                           self._matchers.specs)
        except OSError as exc:
            self._lost(exc)
            return 0
        self._pending = encoder
        return theirs

    def collect(self, theirs: list[Record]) -> Iterator[tuple[Record, Encoded | None]]:
        """The records ``submit`` sent, with the child's results, in spool order (None: the
        caller encodes that one as it takes it). ``theirs`` is the caller's list of them, newest
        first: each record is popped as it is yielded, so that nothing here holds a tweet's
        payload once the caller has taken it."""
        encoder, self._pending = self._pending, None
        results = self._results(encoder, len(theirs)) if encoder is not None else None
        while theirs:
            record = theirs.pop()
            if results is None or record.kind != KIND_MESSAGE:
                yield record, None
            else:
                yield record, next(results)

    def _results(self, encoder: EncoderProcess, count: int) -> Iterator[Encoded] | None:
        """The child's answer to its pending chunk; None if its records are to be encoded here
        (the child is gone, or was stopped meanwhile by new settings)."""
        if encoder is not self.encoder:
            return None  # ``stop`` closed it during a flush of this read (new settings)
        # Balance the split so that neither side waits for the other.
        self._share += SHARE_STEP if encoder.ready() else -SHARE_STEP
        self._share = min(0.9, max(0.1, self._share))
        try:
            results = encoder.results()
        except (EOFError, OSError) as exc:
            self._lost(exc)
            return None
        self._counters.offloaded += count
        return results

    def apply(self, settings: Settings) -> None:
        """New settings: stop the child if they no longer want it (it restarts on use)."""
        if not self._wanted(settings):
            self.stop()

    def stop(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None

    def _wanted(self, settings: Settings) -> bool:
        return settings.writer.encoder_process if self._choice is None else self._choice

    def _encoder_for(self, records: int, settings: Settings) -> EncoderProcess | None:
        """The encoder child when this read is worth sharing with it (started on first use)."""
        if records < self.offload_min or not self._wanted(settings):
            return None
        if self.encoder is None:
            if time.monotonic() < self._retry_at:
                return None  # lost recently: encode here for a while rather than spin
            try:
                self.encoder = EncoderProcess()
            except OSError as exc:
                log.error("encoder_start_failed", error=type(exc).__name__)
                self._retry_at = time.monotonic() + ENCODER_RESTART_INTERVAL
                return None
            # The child gets every matcher again: it is new.
            log.info("encoder_started", pid=self.encoder.pid)
        return self.encoder

    def _lost(self, exc: BaseException) -> None:
        """The child died or its pipe broke: its part is encoded here, a new one starts later."""
        c = self._counters
        c.encoder_restarts += 1
        log.error("encoder_lost", error=type(exc).__name__, restarts=c.encoder_restarts)
        self._retry_at = time.monotonic() + ENCODER_RESTART_INTERVAL
        if self.encoder is not None:
            self.encoder.close(timeout=0.5)
            self.encoder = None
