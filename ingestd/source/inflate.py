"""A connection's compressed body, inflated here rather than by libcurl (docs/protocol.md §2.3).

We send ``Accept-Encoding: deflate, gzip`` ourselves and inflate with zlib-ng, which takes ~60 %
of zlib's CPU for a stream flushed after every message (each message a deflate block with its own
Huffman header: ISA-L, decoding such blocks, spends most of its time building its tables and took
~85 %; bench/LOG.md). libcurl would inflate with zlib and hand the output over 16 KiB at a
time; here a whole socket read reaches the framer at once.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from typing import cast

from zlib_ng import zlib_ng

# Compressed bytes inflated per step: a tweet stream inflates ~9×, so one step's output (~150 KB)
# is what the framer and the spool intake hold at once, however large the socket read was.
STEP_BYTES = 16 * 1024
# The most output one step makes: a small body that inflates to gigabytes (a compression bomb)
# reaches the framer in pieces of this size, which bounds its memory like any other long read.
PIECE_BYTES = 256 * 1024
# Input between two snapshots of the decompressor (``Inflater``): a copy costs ~1 µs, so taken
# once per ~150 messages it is ~0.01 µs per message; an error replays at most this much again.
SNAPSHOT_BYTES = 64 * 1024
_IDENTITY = frozenset({"", "identity"})
# Content-Encoding → the wrapper around the deflate data: gzip's header and trailer, or zlib's
# (HTTP's "deflate", RFC 9110 §8.4.1.2).
_WBITS = {"gzip": 16 + zlib_ng.MAX_WBITS, "x-gzip": 16 + zlib_ng.MAX_WBITS,
          "deflate": zlib_ng.MAX_WBITS}
_Decompressor = zlib_ng._Decompress  # what decompressobj returns
# The stub declares ``error`` as an instance (as isal's and CPython's old ones did): it is a class.
_InflateError = cast("type[Exception]", zlib_ng.error)


class BadEncoding(ValueError):
    """A body that cannot be decoded: the connection ends (NETWORK) with this reason."""


class Inflater:
    """One compressed body → its bytes, piece by piece (streams in a row make one body, as gzip
    members do).

    Bytes that cannot be inflated make zlib-ng drop the output of the call that met them and leave
    the decompressor unusable, yet the input before them may hold complete messages. So the
    inflater keeps a copy of the decompressor (a snapshot, every ``SNAPSHOT_BYTES`` of input) and
    the input taken since: on an error it inflates them again (``_salvage``) to hand over what the
    input before the bad bytes completes, then raises ``BadEncoding``."""

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._z = zlib_ng.decompressobj(wbits)
        self._snapshot: _Decompressor | None = None  # None: the start of the current member
        # The input self._z took since the snapshot, all of whose output was handed over: the
        # pieces as given (not copied), and their size.
        self._fed: list[bytes | memoryview] = []
        self._fed_bytes = 0
        # The snapshot was taken at a full piece: it holds output not handed over yet, and no
        # input was fed since (a replay must not ask it for that output).
        self._snapshot_owes = False
        self._salvaged = False  # an error was met: self._z raises from then on

    def inflate(self, data: bytes) -> Iterable[bytes]:
        """The bytes ``data`` completes, in pieces of at most ``PIECE_BYTES``; undecodable bytes
        end the iteration with ``BadEncoding`` after the pieces that the bytes before them make.

        A paced stream comes a message (~430 bytes) per call: one ``decompress`` that takes it
        all is answered without generators (they cost ~0.6 µs of the ~6.6 per message)."""
        size = len(data)
        if size > STEP_BYTES:
            return self._steps(data)
        z = self._z
        try:
            out = z.decompress(data, PIECE_BYTES)
        except _InflateError as exc:
            return self._salvage(data, exc)
        if z.eof or len(out) >= PIECE_BYTES:  # (input is left over only when output is full)
            rest = self._took(z, data, out)  # the next gzip member, or input and output held
            head = (out,) if out else ()
            return head if rest is None else itertools.chain(head, self._inflate(rest))
        self._fed.append(data)
        self._fed_bytes += size
        if self._fed_bytes >= SNAPSHOT_BYTES:
            self._take_snapshot(z)
        return (out,) if out else ()

    def _steps(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), STEP_BYTES):
            yield from self._inflate(view[start:start + STEP_BYTES])
        if self._fed:  # slices of this read: a snapshot lets it go (~1 µs a read of 16 KiB+)
            self._take_snapshot(self._z)

    def _inflate(self, data: bytes | memoryview) -> Iterator[bytes]:
        while True:
            z = self._z
            try:
                out = z.decompress(data, PIECE_BYTES)
            except _InflateError as exc:
                yield from self._salvage(data, exc)  # raises BadEncoding
                return
            rest = self._took(z, data, out)  # before the yield: the caller may stop iterating
            if out:
                yield out
            if rest is None:
                return
            data = rest

    def _took(self, z: _Decompressor, data: bytes | memoryview, out: bytes) -> bytes | None:
        """Note what a ``decompress`` of ``data`` took; the input to give next (None: none)."""
        self._snapshot_owes = False
        if z.eof:  # a stream ended: what follows is the next one (or nothing)
            self._z = zlib_ng.decompressobj(self._wbits)
            self._snapshot = None
            self._fed.clear()
            self._fed_bytes = 0
            return z.unused_data or None
        if len(out) >= PIECE_BYTES:
            # Output may be held back (and input left): a replay starts here, and the snapshot
            # gives that output again, as the caller does not have it.
            self._take_snapshot(z)
            self._snapshot_owes = True
            return z.unconsumed_tail  # b"": still asked for the output held back
        self._fed.append(data)
        self._fed_bytes += len(data)
        if self._fed_bytes >= SNAPSHOT_BYTES:
            self._take_snapshot(z)
        return None

    def _take_snapshot(self, z: _Decompressor) -> None:
        self._snapshot = copy.copy(z)  # ~1 µs: once per SNAPSHOT_BYTES, not per message
        self._fed.clear()
        self._fed_bytes = 0

    def _salvage(self, data: bytes | memoryview, exc: Exception) -> Iterator[bytes]:
        """What the input before the bad bytes in ``data`` inflates to, then ``BadEncoding``.

        A copy of the snapshot takes again the input fed since (output the caller has), then
        ``data`` a byte at a time (at most ``STEP_BYTES``) up to the byte that fails."""
        message = f"compressed body cannot be inflated: {exc}"
        if self._salvaged:  # called again (an error body's next bytes): nothing after the error
            raise BadEncoding(message)
        self._salvaged = True
        z = self._replayed()
        out = bytearray()
        for i in range(len(data)):
            try:
                out += z.decompress(data[i:i + 1])  # a byte makes ~1 KB at most: no cap needed
            except _InflateError:
                break
            if z.eof:  # one byte at a time: nothing is left over for the next member
                z = zlib_ng.decompressobj(self._wbits)
            if len(out) >= PIECE_BYTES:
                yield bytes(out)
                out.clear()
        if out:
            yield bytes(out)
        raise BadEncoding(message)

    def _replayed(self) -> _Decompressor:
        """A decompressor where ``self._z`` was before the call that failed."""
        snapshot = self._snapshot
        z = zlib_ng.decompressobj(self._wbits) if snapshot is None else copy.copy(snapshot)
        if self._snapshot_owes:
            return z  # its output held back is the caller's next
        data = b"".join(self._fed)
        while True:  # this input inflated once: no error, and the member does not end in it
            out = z.decompress(data, PIECE_BYTES)
            data = z.unconsumed_tail
            if not data and len(out) < PIECE_BYTES:
                return z


def body_decoder(content_encoding: str) -> Inflater | None:
    """The decoder for a response's ``Content-Encoding`` (None: the body is as sent)."""
    value = content_encoding.strip().lower()
    if value in _IDENTITY:
        return None
    if (wbits := _WBITS.get(value)) is not None:
        return Inflater(wbits)
    raise BadEncoding(f"Content-Encoding {content_encoding[:40]!r} was not asked for")
