"""DeadLetterStore: durable JSONL entries, raw kept or encoded, bounded without silent loss."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from ingestd.sink.deadletter import RAW_CAP, DeadLetterStore


def put(store: DeadLetterStore, raw: bytes, reason: str = "invalid_json", seq: int = 1) -> None:
    store.put(reason, raw, conn_id=4, generation=2, seq=seq, code=None, detail="why")


def test_entry_fields_and_daily_file(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 1 << 20,
                            clock=lambda: datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC))
    store.put("mongo_rejected", b'{"id": 1}', conn_id=4, generation=2, seq=9, code=121,
              detail="DocumentValidationFailure")
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == ["deadletter-20240506.jsonl"]
    entry = orjson.loads(files[0].read_bytes())
    assert entry == {
        "time": "2024-05-06T07:08:09.000+00:00", "reason": "mongo_rejected", "code": 121,
        "detail": "DocumentValidationFailure", "conn_id": 4, "generation": 2, "seq": 9,
        "size": 9, "truncated": False, "raw": '{"id": 1}'}
    assert store.counts == {"mongo_rejected": 1}


def test_invalid_utf8_is_kept_as_base64(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 1 << 20)
    raw = b'{"text": "\xff\xfe"}'
    put(store, raw, "invalid_utf8")
    (entry,) = store.iter_entries()
    assert "raw" not in entry
    assert base64.b64decode(entry["raw_b64"]) == raw
    assert DeadLetterStore.raw_of(entry) == raw


def test_raw_is_capped_and_a_cut_character_is_not_bad_input(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 1 << 30)
    raw = b"a" * (RAW_CAP - 1) + "é".encode() * 10  # the cap splits the first "é"
    put(store, raw)
    (entry,) = store.iter_entries()
    assert entry["truncated"] is True
    assert entry["size"] == len(raw)
    assert entry["raw"] == "a" * (RAW_CAP - 1)


def test_store_full_drops_raw_but_keeps_and_counts_the_entry(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 2000)
    put(store, b"x" * 500, seq=1)
    put(store, b"y" * 2000, seq=2)
    entries = list(store.iter_entries())
    assert [e["seq"] for e in entries] == [1, 2]
    assert entries[0]["raw"] == "x" * 500
    assert entries[1]["raw_dropped"] == "store full"
    assert "raw" not in entries[1] and "raw_b64" not in entries[1]
    assert store.raw_dropped == 1
    assert store.counts == {"invalid_json": 2}


def test_existing_files_count_towards_the_bound(tmp_path: Path) -> None:
    first = DeadLetterStore(tmp_path, 1500)
    put(first, b"x" * 1000)
    first.close()
    second = DeadLetterStore(tmp_path, 1500)
    put(second, b"y" * 1000, seq=2)
    assert second.raw_dropped == 1
    assert [e["seq"] for e in second.iter_entries()] == [1, 2]


def test_put_reaches_the_disk_before_returning(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, 1 << 20)
    put(store, b"abc")
    # Another reader (a fresh store on the same dir) sees it without close(): flushed.
    assert [e["raw"] for e in DeadLetterStore(tmp_path, 1 << 20).iter_entries()] == ["abc"]


def test_raw_never_reaches_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = DeadLetterStore(tmp_path, 1 << 20)
    put(store, b"SECRET-PAYLOAD-CONTENT")
    out = capsys.readouterr()
    assert "SECRET-PAYLOAD-CONTENT" not in out.out + out.err
