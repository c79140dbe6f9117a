"""The spool's on-disk format: record encoding, segment names and the checkpoint file.

The stream and store workers share only the spool directory::

    <dir>/<first_seq:020d>.seg   append-only segments of records
    <dir>/checkpoint             {"seq": N, "segment": "<name>", "offset": O, "crc": C}: stored
                                 up to here (C: crc32c of "N <name> O"; spaces pad the file to
                                 CHECKPOINT_SIZE bytes)
    <dir>/.checkpoint.spare      CHECKPOINT_SIZE bytes set aside at start (see write_checkpoint)

Record layout (little-endian)::

    MAGIC(4) length u32  crc32c u32 | seq u64  recv_ns u64  conn_id u32  generation u32  kind u8
                                    | payload
    `length` counts and `crc32c` covers everything after the crc field.

An over-size message is a ``KIND_OVERSIZE_SIZED`` record: ``size u64  limit u64 | head``, its
real size as the framer counted it, the ``stream.max_message_bytes`` it was over, and its first
bytes. Spools written before that hold ``KIND_OVERSIZE`` records (the head only), still read.
A bad ``delimited=length`` line is a ``KIND_BADFRAME_SIZED`` record: ``size u64  reason_len u16 |
reason | head``, the line's size as the framer counted it (through its line end, or the body's end),
the framer's reason (UTF-8) and the line's first bytes. Older spools hold ``KIND_BADFRAME``
records (the head only), still read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ingestd.spool.checksum import crc32c

KIND_MESSAGE = 0
KIND_OVERSIZE = 1
KIND_BADFRAME = 2
KIND_PARTIAL = 3
# A coverage marker (JSON object: a gap began, a connection came up); see ingestd.spool.events.
KIND_EVENT = 4
# An over-size message with its size and the limit it was over (``OVERSIZE``), then its head.
# (KIND_OVERSIZE records, from older versions, hold only the head.)
KIND_OVERSIZE_SIZED = 5
OVERSIZE = struct.Struct("<QQ")  # size, max_message_bytes
# A bad length line with its size and the framer's reason (``BADFRAME``, then the reason), then
# its head. (KIND_BADFRAME records, from older versions, hold only the head.)
KIND_BADFRAME_SIZED = 6
BADFRAME = struct.Struct("<QH")  # size, length of the reason that follows

MAGIC = b"\xa5IR\x5a"
PREFIX = struct.Struct("<4sII")  # magic, length, crc
BODY = struct.Struct("<QQIIB")  # seq, recv_ns, conn_id, generation, kind
PREFIX_SIZE = PREFIX.size
HEADER_SIZE = PREFIX.size + BODY.size
_HEADER = struct.Struct("<4sIIQQIIB")  # PREFIX then BODY, packed at once by the writer
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_LENGTH = BODY.size + MAX_PAYLOAD

CHECKPOINT = "checkpoint"
CHECKPOINT_SPARE = f".{CHECKPOINT}.spare"
CHECKPOINT_TMP = f".{CHECKPOINT}.tmp"
# Every checkpoint file has this size (JSON padded with spaces; the longest is ~120 bytes), so
# that a new one can overwrite the old in place, within blocks the file already has.
CHECKPOINT_SIZE = 256
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
FIRST_SEQ = 1
_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")


class Record(NamedTuple):
    """One record read back from the spool; ``offset`` is where it starts in ``segment``.

    A named tuple, not a frozen dataclass: one is made per record read, and a frozen dataclass's
    ``__init__`` costs one ``object.__setattr__`` per field.
    """

    seq: int
    kind: int
    conn_id: int
    generation: int
    recv_ns: int
    payload: bytes
    segment: str
    offset: int

    @property
    def end_offset(self) -> int:
        """Offset just past this record: where the checkpoint points once it is stored."""
        return self.offset + HEADER_SIZE + len(self.payload)

    def ref(self) -> RecordRef:
        """This record without its payload."""
        return _new_tuple(RecordRef, (self.seq, self.conn_id, self.generation, self.recv_ns,
                                      self.segment, self.offset))


class RecordRef(NamedTuple):
    """A record's identity and place in the spool, without its payload: what the store worker
    keeps of a tweet once it is encoded, so that a batch does not hold each tweet twice (its JSON
    and its BSON). The record is not acked yet, so ``SpoolReader.reread`` can fetch it back."""

    seq: int
    conn_id: int
    generation: int
    recv_ns: int
    segment: str
    offset: int


_new_tuple = tuple.__new__  # a NamedTuple row without its Python-level __new__ (a frame per call)


class OversizeRecord(NamedTuple):
    """What an over-size message's record says: ``size`` and ``limit`` are None in a
    ``KIND_OVERSIZE`` record (written before they were recorded)."""

    size: int | None
    limit: int | None
    head: bytes


def oversize_payload(size: int, limit: int, head: bytes) -> bytes:
    """The payload of a ``KIND_OVERSIZE_SIZED`` record."""
    return OVERSIZE.pack(size, limit) + head


def read_oversize(kind: int, payload: bytes) -> OversizeRecord:
    """An over-size message's record, of either kind."""
    if kind != KIND_OVERSIZE_SIZED or len(payload) < OVERSIZE.size:
        return OversizeRecord(None, None, payload)
    size, limit = OVERSIZE.unpack_from(payload)
    return OversizeRecord(size, limit, payload[OVERSIZE.size:])


class BadFrameRecord(NamedTuple):
    """What a bad length line's record says: ``size`` and ``reason`` are None in a
    ``KIND_BADFRAME`` record (written before they were recorded)."""

    size: int | None
    reason: str | None
    head: bytes


def badframe_payload(size: int, reason: str, head: bytes) -> bytes:
    """The payload of a ``KIND_BADFRAME_SIZED`` record."""
    text = reason.encode("utf-8")
    return BADFRAME.pack(size, len(text)) + text + head


def read_badframe(kind: int, payload: bytes) -> BadFrameRecord:
    """A bad length line's record, of either kind (one too short for its header: all head)."""
    if kind != KIND_BADFRAME_SIZED or len(payload) < BADFRAME.size:
        return BadFrameRecord(None, None, payload)
    size, reason_len = BADFRAME.unpack_from(payload)
    start = BADFRAME.size + reason_len
    if len(payload) < start:
        return BadFrameRecord(None, None, payload)
    reason = payload[BADFRAME.size:start].decode("utf-8", "replace")
    return BadFrameRecord(size, reason, payload[start:])


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    segment: str
    offset: int


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def segment_first_seq(name: str) -> int:
    """The seq a segment was named after (the first it was opened for)."""
    return int(name[:20])


def list_segments(directory: Path) -> list[str]:
    """Segment names, oldest first (zero-padded names sort numerically)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _SEGMENT_RE.match(n))


def read_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint, or None if it is missing or unreadable (a torn in-place write included:
    its crc does not match; checkpoints written before the crc have none, and are read)."""
    try:
        doc = json.loads((directory / CHECKPOINT).read_bytes())
        ckpt = Checkpoint(int(doc["seq"]), str(doc["segment"]), int(doc["offset"]))
        crc = doc.get("crc")
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return None  # OverflowError: a number past a float's range (1e999) is infinity in JSON
    if crc is not None and crc != _checkpoint_crc(ckpt):
        return None
    valid = _SEGMENT_RE.match(ckpt.segment) and ckpt.offset >= 0 and ckpt.seq >= 0
    return ckpt if valid else None


def _checkpoint_crc(ckpt: Checkpoint) -> int:
    return crc32c(f"{ckpt.seq} {ckpt.segment} {ckpt.offset}".encode())


def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """The checkpoint file's content: ``CHECKPOINT_SIZE`` bytes."""
    doc = {"seq": ckpt.seq, "segment": ckpt.segment, "offset": ckpt.offset,
           "crc": _checkpoint_crc(ckpt)}
    return json.dumps(doc).encode().ljust(CHECKPOINT_SIZE)


def write_checkpoint(directory: Path, ckpt: Checkpoint) -> None:
    """Replace the checkpoint atomically and durably (two fsyncs; raises OSError).

    On a full disk (ENOSPC, EDQUOT) the temp file gets no block, and the deadlock would be
    complete: no checkpoint, so no consumed segment deleted, so no space. The checkpoint is then
    overwritten in place, within the blocks it has (or, if there is none yet, the spare that
    ``reserve_checkpoint`` set aside is written and renamed to it), and fsynced. Not atomic: a
    power loss in the middle of that write can leave a checkpoint whose crc does not match, read
    as none; the next start then replays the spool from its oldest segment (records already
    stored come again as duplicates; none is skipped).
    """
    data = checkpoint_bytes(ckpt)
    tmp = directory / CHECKPOINT_TMP
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / CHECKPOINT)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not _overwrite(directory / CHECKPOINT, data):
            if not _overwrite(directory / CHECKPOINT_SPARE, data):
                raise
            os.replace(directory / CHECKPOINT_SPARE, directory / CHECKPOINT)
    fsync_dir(directory)


def reserve_checkpoint(directory: Path) -> None:
    """Set aside a checkpoint-sized file, for the first checkpoint of a spool whose disk is
    already full (``write_checkpoint``). Best effort: a disk full already cannot give one."""
    for name in (CHECKPOINT_SPARE, CHECKPOINT):  # one of an older version is shorter
        with contextlib.suppress(OSError):
            if (directory / name).stat().st_size >= CHECKPOINT_SIZE:
                return
    with contextlib.suppress(OSError):
        fd = os.open(directory / CHECKPOINT_SPARE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, b" " * CHECKPOINT_SIZE)
            os.fsync(fd)
        finally:
            os.close(fd)


def _overwrite(path: Path, data: bytes) -> bool:
    """Write ``data`` over ``path`` in place and fsync; False if it is missing or too short
    (writing past its end could need a new block)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size < len(data):
            return False
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.EIO, "short checkpoint write")
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# A rename fails with these when its target is in the way (a folder where the file should be).
_TARGET_IN_THE_WAY = frozenset({errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST})


def os_error_text(exc: OSError, where: object) -> str:
    """``<where>: <strerror> (<ERRNO>)``: the file at fault and the cause, as every error about
    the state folder is said (``where`` is the caller's: the error's own file is not always the
    one at fault, ``file_at_fault``)."""
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return f"{where}: {exc.strerror or exc} ({name})"


def file_at_fault(exc: OSError) -> str | None:
    """The file an ``OSError`` is about: a rename's target when that is what stopped it (its
    ``filename`` is the temp file, which is never the culprit then), else its ``filename``."""
    if exc.filename2 is not None and exc.errno in _TARGET_IN_THE_WAY:
        return str(exc.filename2)
    return None if exc.filename is None else str(exc.filename)


@contextlib.contextmanager
def writing_for(target: Path, tmp: Path) -> Iterator[None]:
    """Around the write of ``tmp``, a temp file renamed over ``target`` after: an ``OSError``
    comes out naming ``target`` (a write's error names no file, and a full disk's reason must)
    and ``tmp`` is removed (no temp file left behind by each refused start)."""
    try:
        yield
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(exc.errno, exc.strerror, str(target)) from None


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, and durably (file and folder fsynced); an error names
    ``path`` and leaves no temp file (``writing_for``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing_for(path, tmp), tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


BUFFERS_PER_RECORD = 2  # what encode_records appends per record: its header, its payload


def encode_records(
    out: list[bytes],
    seq: int,
    items: Sequence[tuple[int, bytes]],
    conn_id: int,
    generation: int,
    recv_ns: int,
) -> int:
    """Append each record's header and payload to ``out`` (no copy of the payload); next seq."""
    pack_body, pack_header, body_size = BODY.pack, _HEADER.pack, BODY.size
    for kind, payload in items:
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"spool payload of {len(payload)} bytes > {MAX_PAYLOAD}")
        crc = crc32c(payload, crc32c(pack_body(seq, recv_ns, conn_id, generation, kind)))
        # the header in one pack (not prefix + body joined): a record costs two objects
        out.append(pack_header(MAGIC, body_size + len(payload), crc, seq, recv_ns, conn_id,
                               generation, kind))
        out.append(payload)
        seq += 1
    return seq


def encode_record(
    seq: int, kind: int, payload: bytes, conn_id: int, generation: int, recv_ns: int
) -> bytes:
    """One record's bytes, as the writer encodes them (for tests that craft spool files)."""
    out: list[bytes] = []
    encode_records(out, seq, ((kind, payload),), conn_id, generation, recv_ns)
    return b"".join(out)
