"""The dead-letter store: messages that cannot be stored, kept on disk with the reason.

One JSON line per message in ``deadletter-YYYYMMDD.jsonl`` (UTC day). Every ``put`` is flushed and
fsynced before it returns, because the store worker acks the spool past a dead letter right after.
The store is bounded: once ``max_bytes`` would be exceeded the line is still written, without the
raw bytes (``raw_dropped: "store full"``) and counted, so nothing disappears without a trace. Those
evidence lines have their own allowance (``evidence_bytes``); past it a dead letter is only counted
(``lines_dropped``) and logged, so the files never exceed ``max_bytes + evidence_bytes`` (a
reload's bound, ``resize``, holds from the next dead letter: files past a lowered one stay).
A write that fails (disk full) is cut back off the file and raised: the caller keeps the message.
A file moved or deleted while the daemon runs (logrotate, ``mv``) is not written to any more: the
next dead letter creates the file at its path again (its inode is checked before every write).
Raw bytes are never logged, only written here.

Exactly once per spool record: the spool checkpoint is written after the dead letter, so a store
worker killed in between replays the record. At start the store worker calls
``remember_replays(checkpoint_seq)``: the entries for records after the checkpoint (the only ones
a replay can repeat; read back from the newest files, as durable as the entries) are remembered
by seq, and ``holds(seq)`` lets the store worker skip exactly those. Entries are not in seq order
(a parse failure is written when its record is taken, a rejection by MongoDB when its batch is
flushed), so nothing is inferred from the order. When the spool cannot vouch for its seqs (no
checkpoint, or a reset one) the store worker calls ``forget_spool``: ``spool-reset`` then marks the
end of the files, and only entries written after it count.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from ingestd.documents.labels import MessageReason
from ingestd.spool.format import fsync_dir

# A control message MongoDB rejected is dead-lettered too, but counted with the control messages.
Reason = MessageReason | Literal["control_rejected"]

RAW_CAP = 64 * 1024
DETAIL_CAP = 1024
MIN_EVIDENCE_BYTES = 1 << 20
FILE_RE = re.compile(r"deadletter-\d{8}\.jsonl")
SPOOL_RESET = "spool-reset"
REPLAY_FILES = 2  # a replay repeats the last minutes before a crash: today's file, or yesterday's

log = structlog.get_logger("ingestd.sink.deadletter")


class DeadLetterStore:
    """Append-only JSONL dead letters in ``directory``, bounded by ``max_bytes`` of raw content."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.directory = directory
        self.max_bytes = self.evidence_bytes = 0
        self.resize(max_bytes)
        self.counts: dict[str, int] = {}
        self.raw_dropped = 0
        self.lines_dropped = 0
        self._clock = clock
        directory.mkdir(parents=True, exist_ok=True)
        self.total_bytes = sum(p.stat().st_size for p in self._files())
        self._fd = -1
        self._file_day = ""
        self._held: set[int] = set()

    def resize(self, max_bytes: int) -> None:
        """Bound the store by ``max_bytes`` from the next dead letter on (a reload's
        ``deadletter.max_bytes``). Files already past a smaller bound stay: only new raw bytes,
        then new lines, are held back."""
        self.max_bytes = max_bytes
        # Lines without their raw bytes still need room: a bounded share on top of max_bytes.
        self.evidence_bytes = max(MIN_EVIDENCE_BYTES, max_bytes // 16)

    def remember_replays(self, after_seq: int) -> None:
        """Spool records after ``after_seq`` (the checkpoint) may be replayed: remember which of
        them are already here, written since the last ``forget_spool``."""
        self._held = {seq for seq in self._seqs_since_reset() if seq > after_seq}

    def holds(self, seq: int) -> bool:
        """Whether spool record ``seq`` was dead-lettered already (a replay after a crash)."""
        return seq in self._held

    def forget_spool(self) -> None:
        """The spool's seqs may start again: no entry so far can be a replay (durably)."""
        self._held = set()
        files = self._files()
        if not files:
            return
        _write_durably(self.directory / SPOOL_RESET,
                       orjson.dumps({"file": files[-1].name, "size": files[-1].stat().st_size}))
        log.info("deadletter_spool_seq_forgotten", file=files[-1].name)

    def _seqs_since_reset(self) -> Iterator[int]:
        """The seq of every whole entry in the newest files, past the ``spool-reset`` mark."""
        try:
            reset = orjson.loads((self.directory / SPOOL_RESET).read_bytes())
            floor = (str(reset["file"]), int(reset["size"]))
        except FileNotFoundError:
            floor = ("", 0)
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("deadletter_spool_reset_unreadable", effect="replays are written again")
            return
        for path in self._files()[-REPLAY_FILES:]:
            if path.name >= floor[0]:
                yield from _seqs(path, floor[1] if path.name == floor[0] else 0)

    def put(
        self,
        reason: Reason,
        raw: bytes,
        *,
        conn_id: int | None,
        generation: int | None,
        seq: int | None,
        code: int | None = None,
        detail: str = "",
        size: int | None = None,
        cut: bool = False,
    ) -> None:
        """Write one dead letter durably (flush + fsync) before returning.

        ``size``: the message's own size when ``raw`` is only its head (an over-size message);
        ``cut``: ``raw`` is only a head even where the size is unknown."""
        now = self._clock()
        size = len(raw) if size is None else size
        entry: dict[str, Any] = {
            "time": now.isoformat(timespec="milliseconds"),
            "reason": reason,
            "code": code,
            "detail": detail[:DETAIL_CAP],
            "conn_id": conn_id,
            "generation": generation,
            "seq": seq,
            "size": size,
        }
        line = self._encode(entry, raw, cut)
        if self.total_bytes + len(line) > self.max_bytes + self.evidence_bytes:
            self.lines_dropped += 1
            log.error("dead_letter_store_full", reason=reason, code=code, seq=seq, size=size,
                      lines_dropped=self.lines_dropped, rate_key=reason)
        else:
            self._write(now, line)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        # Detail may quote key names from the payload: it goes to the file, not the log.
        # Folded per reason (logging.error_interval): the first in full, then a `repeated`
        # count; every seq is in the file.
        log.warning("dead_letter", reason=reason, code=code, seq=seq, size=size, rate_key=reason)

    def _encode(self, entry: dict[str, Any], raw: bytes, cut: bool) -> bytes:
        head = raw[:RAW_CAP]
        entry["truncated"] = cut or entry["size"] > len(head)
        text = _utf8_or_none(head, entry["truncated"])
        if text is not None:
            entry["raw"] = text
        else:
            entry["raw_b64"] = base64.b64encode(head).decode("ascii")
        line = orjson.dumps(entry) + b"\n"
        if self.total_bytes + len(line) <= self.max_bytes:
            return line
        # Full: keep the evidence that it happened, drop only the content.
        entry.pop("raw", None)
        entry.pop("raw_b64", None)
        entry["raw_dropped"] = "store full"
        self.raw_dropped += 1
        return orjson.dumps(entry) + b"\n"

    def _write(self, now: datetime, line: bytes) -> None:
        fd = self._open_for(now.strftime("%Y%m%d"))
        start = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # No half line may stay behind: the next entry would be glued to it.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
        self.total_bytes += len(line)

    def _open_for(self, day: str) -> int:
        if self._fd >= 0 and self._file_day == day:
            if self._still_at_path():
                return self._fd
            # Moved or deleted away (logrotate, an operator's mv): write at the path again, and
            # bound what is there now.
            log.info("deadletter_file_reopened", file=f"deadletter-{day}.jsonl")
            self.close()
            self.total_bytes = sum(p.stat().st_size for p in self._files())
        self.close()
        path = self.directory / f"deadletter-{day}.jsonl"
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file_day = day
        if created:
            fsync_dir(self.directory)  # the new file's name must survive a crash too
        return self._fd

    def _still_at_path(self) -> bool:
        """Whether the open file is still the one at its path (one stat per dead letter)."""
        try:
            at_path = os.stat(self.directory / f"deadletter-{self._file_day}.jsonl")
        except FileNotFoundError:
            return False
        opened = os.fstat(self._fd)
        return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if FILE_RE.fullmatch(p.name))

    def iter_entries(self) -> Iterator[dict[str, Any]]:
        """Every dead letter in file order (for tests and tools). A last line with no newline yet
        is one being written (a line across a page boundary shows its first part early): it is
        left for the next look."""
        for path in self._files():
            with path.open("rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break
                    if line.strip():
                        yield orjson.loads(line)

    @staticmethod
    def raw_of(entry: dict[str, Any]) -> bytes | None:
        """The (possibly truncated) raw bytes an entry holds, or None if they were dropped."""
        if "raw" in entry:
            return str(entry["raw"]).encode("utf-8")
        if "raw_b64" in entry:
            return base64.b64decode(entry["raw_b64"])
        return None


def _utf8_or_none(head: bytes, truncated: bool) -> str | None:
    """``head`` as text if it is valid UTF-8 (allowing a character cut by the cap), else None."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A cap that splits a multi-byte character is not bad input: drop the partial tail.
        if truncated and exc.start >= len(head) - 3 and exc.reason == "unexpected end of data":
            try:
                return head[: exc.start].decode("utf-8")
            except UnicodeDecodeError:
                return None
        return None


def _seqs(path: Path, offset: int) -> Iterator[int]:
    """The ``seq`` of each whole, parseable line of ``path`` from ``offset`` (a crash can tear
    the last line; it was never acknowledged, so it is not remembered)."""
    with path.open("rb") as f:
        f.seek(offset)
        for line in f:
            try:
                seq = orjson.loads(line).get("seq")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if type(seq) is int:
                yield seq


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
