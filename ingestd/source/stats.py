"""The stream reader's counters, published in run/stream.json (and exported as metrics)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ingestd.source.backoff import Ending
from ingestd.spool.writer import DropReason

CUT_BY_DISCONNECT: DropReason = "cut_by_disconnect"  # a message cut by a connection's end


@dataclass
class ReaderStats:
    """What the reader received, dropped and how its connections ended."""

    received: int = 0
    keepalives: int = 0
    oversize: int = 0
    bad_frames: int = 0
    partial: int = 0
    dropped: Counter[DropReason] = field(default_factory=Counter)
    bytes: int = 0
    endings: Counter[str] = field(default_factory=Counter)
    disconnect_codes: Counter[str] = field(default_factory=Counter)
    limit_missed: int = 0
    warnings: int = 0
    attempts: int = 0

    def count_ending(self, ending: Ending, cut_bytes: int) -> None:
        self.endings[ending.value] += 1
        if cut_bytes:
            # A message cut by the connection's end is a routine loss of reconnecting, not bad
            # input: counted as dropped with the reconnect (the server resends nothing; the
            # ending's log line says a message was cut), never dead-lettered.
            self.partial += 1
            self.dropped[CUT_BY_DISCONNECT] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received, "keepalives": self.keepalives, "oversize": self.oversize,
            "bad_frames": self.bad_frames, "partial": self.partial, "dropped": dict(self.dropped),
            "bytes": self.bytes, "endings": dict(self.endings),
            "disconnect_codes": dict(self.disconnect_codes), "limit_missed": self.limit_missed,
            "warnings": self.warnings, "attempts": self.attempts,
        }
