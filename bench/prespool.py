"""Prototype for issue 15 (branch ``spike``): encode before the spool. Bench-only, not the daemon.

The ``prespool`` contender of ``bench/run.py`` is the real ``ingestd run`` daemon with two seams
replaced in its workers (``prespool_site/sitecustomize.py`` calls ``install`` in a worker process
when ``INGESTD_BENCH_PRESPOOL=1``):

* stream worker: ``EncodingIntake`` in place of ``spool.intake.SpoolIntake``. When it writes a
  pass's messages (``flush``, where the spool seqs are known), each v1.1 tweet is parsed, matched
  by the filter generation it was received under, built and encoded (``documents.encoder.encode``,
  the very code the encoder child runs) and spooled as ``KIND_BSON``; anything else (control
  messages, invalid JSON or tweets, v2) is spooled as today's JSON ``KIND_MESSAGE``, in stream
  order, so the store worker handles it, dead letters included, on its usual path.
* store worker: ``PreEncoded`` in place of ``sink.encoder_split.EncoderSplit``: no encoder child;
  a ``KIND_BSON`` record becomes an ``OK`` result carrying its payload as the document (its
  ``_id`` read from the BSON's first element), and the record is handed on as a
  ``KIND_MESSAGE`` so that ``StoreWorker._take_all`` takes it (the real batch, insert_many of
  ``RawBSONDocument`` entries, retries, coverage ledger, checkpointed acks).
* ``prespool-child`` (``INGESTD_BENCH_PRESPOOL_CHILD=1``): the store worker keeps the real
  ``EncoderSplit`` and its encoder child (``writer.encoder_process: auto``) for the JSON records;
  a ``KIND_BSON`` record is turned into an ``OK`` result at ``StoreWorker._take`` instead.

``KIND_BSON`` is 0xB5: 5 is ``KIND_OVERSIZE_SIZED`` since the first prototype (2026-12-07).

What the prototype leaves out (see bench/LOG.md): ``user_id`` and ``embedded_users`` for scrub_geo
rules and the ``match_error`` count are not carried in the record; a tweet encoded before the spool
that is dead-lettered at insert is re-read from the spool as its BSON, not its
JSON; messages held on a disk error
would be re-sequenced after a coverage marker; a reload adds its generation's matcher but the
generations are not pruned.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from ingestd.documents.encoder import OK, Encoded, encode
from ingestd.documents.matching import Matcher
from ingestd.spool.format import KIND_MESSAGE, Record
from ingestd.spool.intake import SpoolIntake

_new_tuple = tuple.__new__  # a Record without NamedTuple._replace's cost

# A v1.1 tweet's stored document, BSON-encoded by the stream worker: a kind the spool format does
# not use (5 and 6 became KIND_OVERSIZE_SIZED and KIND_BADFRAME_SIZED since the first prototype).
KIND_BSON = 0xB5
BUDGET_SLACK = 0.005  # seconds of encoding allowed at the start of each second
_INT64 = struct.Struct("<q")
_INT32 = struct.Struct("<i")
_ID64 = b"\x12_id\x00"  # bson.encode writes a top-level _id first
_ID32 = b"\x10_id\x00"


class Job(NamedTuple):
    """What ``documents.encoder.encode`` needs of a message (``JobLike``)."""

    payload: bytes
    recv_ns: int
    conn_id: int
    generation: int
    seq: int


class EncodingIntake(SpoolIntake):
    """``SpoolIntake`` that encodes v1.1 tweets to their BSON documents just before the write.

    ``share`` (``INGESTD_BENCH_PRESPOOL_SHARE``, default 1): the fraction of messages it encodes,
    spread evenly; the others go to the spool as JSON and the store worker encodes them itself
    (its existing path), so that the two workers' CPU per tweet can be balanced.

    ``budget`` (``INGESTD_BENCH_PRESPOOL_BUDGET``, default 1): the most CPU time the stream worker
    spends encoding per second (0.5: half a core); past it a write's messages go as JSON. Reading
    keeps the rest of the core whatever the rate (an overload), and the share adapts by itself.
    CPU time, not wall-clock time: on a busy machine preemption inflates the wall-clock time of an
    encoding pass (a first version measured wall-clock time and encoded only a quarter of the
    tweets of a plain run).
    """

    matchers: dict[int, Matcher]
    share = float(os.environ.get("INGESTD_BENCH_PRESPOOL_SHARE", "1"))
    budget = float(os.environ.get("INGESTD_BENCH_PRESPOOL_BUDGET", "1"))
    _credit = 0.0
    _window = 0.0  # start of the current second (monotonic)
    _busy = 0.0  # CPU seconds spent encoding in it

    def flush(self) -> None:
        if self.pending and self._within_budget():
            started = time.thread_time()
            self.pending = self._encoded(self.pending)
            self._busy += time.thread_time() - started
        super().flush()

    def _within_budget(self) -> bool:
        if self.budget >= 1.0:
            return True
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._busy = now, 0.0
        return self._busy < self.budget * (now - self._window) + BUDGET_SLACK

    def _encoded(self, groups: Sequence[Any]) -> list[Any]:
        seq = self.spool.next_seq  # the seqs this write will give its records
        share, credit = self.share, self._credit
        out = []
        for items, conn, gen, ns in groups:
            matcher = self.matchers.get(gen) or self.matchers[max(self.matchers)]
            new: list[tuple[int, bytes]] = []
            for kind, payload in items:
                credit += share
                if kind == KIND_MESSAGE and credit >= 1.0:
                    credit -= 1.0
                    enc = encode(Job(payload, ns, conn, gen, seq), matcher)
                    if enc.status == OK:
                        kind, payload = KIND_BSON, enc.raw
                new.append((kind, payload))
                seq += 1
            out.append((new, conn, gen, ns))
        self._credit = min(credit, 1.0)
        return out


def tweet_id_of(raw: bytes) -> int:
    """The ``_id`` of an encoded tweet document without decoding it."""
    head = raw[4:9]
    if head == _ID64:
        return int(_INT64.unpack_from(raw, 9)[0])
    if head == _ID32:
        return int(_INT32.unpack_from(raw, 9)[0])
    import bson  # not the encoder's layout: decode (never on the bench path)

    return int(bson.decode(raw)["_id"])


def as_message(r: Record) -> Record:
    """``r`` as a ``KIND_MESSAGE`` record (its payload the BSON)."""
    return _new_tuple(Record, (r.seq, KIND_MESSAGE, r.conn_id, r.generation, r.recv_ns, r.payload,
                               r.segment, r.offset))


class PreEncoded:
    """Stands in for ``EncoderSplit``: the records' BSON is already made; no encoder child.

    It claims every record of a read (``submit``) and hands each back in order (``collect``): a
    ``KIND_BSON`` record as an ``OK`` result, anything else as None (the store worker's usual
    in-process path)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.encoder = None

    def note(self, *times: object) -> None:
        """The store worker's times since its last insert: no child to decide on here."""

    def submit(self, records: list[Record], settings: object) -> int:
        return len(records)

    def may_hold(self) -> bool:
        """Nothing to keep busy between reads: every record is taken as the read comes."""
        return False

    def collect(self, theirs: list[Record]) -> Iterator[tuple[Record, Encoded | None]]:
        while theirs:  # newest first: popped in spool order
            record = theirs.pop()
            if record.kind == KIND_BSON:
                raw = record.payload
                # handed on as a message, so that StoreWorker._take takes it
                yield as_message(record), Encoded(OK, raw, tweet_id_of(raw))
            else:
                yield record, None

    def apply(self, settings: object) -> None:
        pass

    def release(self) -> None:
        pass

    def stop(self) -> None:
        pass


def install() -> None:
    """Patch the seams in this worker process (called before the worker module runs)."""
    role = sys.argv[sys.argv.index("--role") + 1] if "--role" in sys.argv else ""
    if role == "stream":
        _install_stream()
    elif role == "store":
        import ingestd.sink.worker as worker

        if os.environ.get("INGESTD_BENCH_PRESPOOL_CHILD") == "1":
            _install_store_child(worker)
        else:
            worker.EncoderSplit = PreEncoded  # type: ignore[misc,assignment]


def _install_store_child(worker: Any) -> None:
    """``prespool-child``: the real ``EncoderSplit`` (and its encoder child) stays for the JSON
    records; a ``KIND_BSON`` record, wherever the split puts it (the store worker's own part, or
    the child's: ``EncoderSplit`` sends the child only ``KIND_MESSAGE`` records and yields any
    other with None), is taken as an ``OK`` result at ``StoreWorker._take``."""
    original_take = worker.StoreWorker._take

    def take(self: Any, record: Record, encoded: Encoded | None) -> None:
        if record.kind == KIND_BSON:
            raw = record.payload
            original_take(self, as_message(record), Encoded(OK, raw, tweet_id_of(raw)))
        else:
            original_take(self, record, encoded)

    worker.StoreWorker._take = take


def _matcher(stream: Any) -> Matcher:
    """The filter of a ``stream`` settings section (``encoder_split.matcher_spec``'s fields)."""
    return Matcher(list(stream.track), list(stream.follow), list(stream.locations))


def _install_stream() -> None:
    import ingestd.control.stream_role as stream_role

    stream_role.SpoolIntake = EncodingIntake  # type: ignore[misc]
    original_init = stream_role.StreamRole.__init__
    original_reload = stream_role.StreamRole.reload

    def init(self: Any, ctx: Any) -> None:
        original_init(self, ctx)
        self.intake.matchers = {ctx.generation: _matcher(ctx.settings.stream)}

    def reload(self: Any, command: Any) -> None:
        original_reload(self, command)
        reader = self.reader  # it took the new generation's settings, if they validated
        self.intake.matchers.setdefault(reader.generation, _matcher(reader.stream))

    stream_role.StreamRole.__init__ = init  # type: ignore[method-assign]
    stream_role.StreamRole.reload = reload  # type: ignore[method-assign]
