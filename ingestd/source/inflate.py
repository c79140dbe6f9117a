"""A connection's compressed body, inflated here rather than by libcurl (docs/protocol.md §2.3).

We send ``Accept-Encoding: deflate, gzip`` ourselves and inflate with zlib-ng, which takes ~60 %
of zlib's CPU for a stream flushed after every message (each message a deflate block with its own
Huffman header: ISA-L, decoding such blocks, spends most of its time building its tables and took
~85 %; bench/LOG.md). libcurl would inflate with zlib and hand the output over 16 KiB at a
time; here a whole socket read reaches the framer at once.
"""

from __future__ import annotations

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
    members do)."""

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._z = zlib_ng.decompressobj(wbits)

    def inflate(self, data: bytes) -> Iterable[bytes]:
        """The bytes ``data`` completes, in pieces of at most ``PIECE_BYTES``.

        A paced stream comes a message (~430 bytes) per call: one ``decompress`` that takes it
        all is answered without generators (they cost ~0.6 µs of the ~6.6 per message)."""
        if len(data) > STEP_BYTES:
            return self._steps(data)
        z = self._z
        out = _decompress(z, data)
        if z.eof or z.unconsumed_tail or len(out) >= PIECE_BYTES:
            # the rest: a next gzip member, input not taken, or output held back
            return itertools.chain((out,) if out else (), self._inflate(z.unconsumed_tail))
        return (out,) if out else ()

    def _steps(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), STEP_BYTES):
            yield from self._inflate(view[start:start + STEP_BYTES])

    def _inflate(self, data: bytes | memoryview) -> Iterator[bytes]:
        z = self._z
        while True:
            out = _decompress(z, data)
            if out:
                yield out
            if z.eof:  # a stream ended: what follows is the next one (or nothing)
                data = z.unused_data
                if not data:
                    return
                z = self._z = zlib_ng.decompressobj(self._wbits)
                continue
            data = z.unconsumed_tail
            if not data and len(out) < PIECE_BYTES:
                return  # all input taken and no output held back


def _decompress(z: _Decompressor, data: bytes | memoryview) -> bytes:
    try:
        return z.decompress(data, PIECE_BYTES)
    except _InflateError as exc:
        raise BadEncoding(f"compressed body cannot be inflated: {exc}") from None


def body_decoder(content_encoding: str) -> Inflater | None:
    """The decoder for a response's ``Content-Encoding`` (None: the body is as sent)."""
    value = content_encoding.strip().lower()
    if value in _IDENTITY:
        return None
    if (wbits := _WBITS.get(value)) is not None:
        return Inflater(wbits)
    raise BadEncoding(f"Content-Encoding {content_encoding[:40]!r} was not asked for")
