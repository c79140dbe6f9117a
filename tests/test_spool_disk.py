"""The spool on a small, full or read-only disk: checkpoints that need no new block, segments
that roll so that stored ones can be freed, exact numbering across the rolls, and failures that
are reported, never fatal. Real file systems where it can be (a tmpfs, a read-only bind mount;
root only, skipped otherwise), fault injection at the OS call where it cannot."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ingestd.spool import reader as spool_reader
from ingestd.spool.format import (
    CHECKPOINT,
    KIND_MESSAGE,
    Checkpoint,
    list_segments,
    read_checkpoint,
    segment_name,
    write_checkpoint,
)
from ingestd.spool.reader import SpoolReader
from ingestd.spool.writer import SpoolWriteError, SpoolWriter
from tests.support.clock import FakeClock
from tests.support.creds import CREDS
from tests.support.daemon import settings_doc
from tests.support.mounts import bind_read_only
from tests.support.skips import unavailable

BIG = 10**9


def _mount(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, check=False)
    if done.returncode != 0:
        unavailable(f"cannot {' '.join(args[:3])}: {done.stderr.decode(errors='replace')}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (unmounted lazily at the end)."""
    where = tmp_path / "disk"
    where.mkdir()
    _mount(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)])
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def make_writer(directory: Path) -> SpoolWriter:
    # the product's default segment size: on a 1 MiB disk the first segment holds everything
    return SpoolWriter(directory, segment_bytes=64 << 20, max_bytes=BIG, max_records=BIG)


def fill_up(path: Path) -> Path:
    """Write a file in ``path`` until its file system has no block left."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def append_until_full(writer: SpoolWriter, payload: bytes) -> tuple[list[int], SpoolWriteError]:
    seqs = []
    while True:
        try:
            seqs.append(writer.append([(KIND_MESSAGE, payload)], 1, 1, 1))
        except SpoolWriteError as exc:
            return seqs, exc


def test_checkpoint_is_written_in_place_on_a_full_disk(tmpfs: Path) -> None:
    write_checkpoint(tmpfs, Checkpoint(7, segment_name(1), 700))
    fill_up(tmpfs)
    with pytest.raises(OSError) as info:
        (tmpfs / "new-file").write_bytes(b"x" * 4096)
    assert info.value.errno == errno.ENOSPC
    # The temp file + rename cannot be done: the checkpoint is overwritten where it is.
    write_checkpoint(tmpfs, Checkpoint(123456, segment_name(100), 98765))
    assert read_checkpoint(tmpfs) == Checkpoint(123456, segment_name(100), 98765)
    # What a power loss in the middle of that write can leave is refused, not trusted.
    raw = bytearray((tmpfs / CHECKPOINT).read_bytes())
    at = raw.index(b"98765")
    raw[at:at + 5] = b"98766"
    (tmpfs / CHECKPOINT).write_bytes(bytes(raw))
    assert read_checkpoint(tmpfs) is None


def test_first_checkpoint_on_a_disk_already_full_uses_the_spare(tmpfs: Path) -> None:
    # MongoDB down from the start: nothing was ever acked, so there is no checkpoint file to
    # overwrite when the disk fills up; the reader set a spare aside when it opened the spool.
    spool = tmpfs / "spool"
    reader = SpoolReader(spool)
    writer = make_writer(spool)
    seqs, exc = append_until_full(writer, b"t" * 3000)
    assert exc.errno == errno.ENOSPC and len(seqs) > 100
    fill_up(tmpfs)
    records = []
    while chunk := reader.read(1000, BIG):
        records.extend(chunk)
    assert [r.seq for r in records] == seqs
    reader.ack(records[-1])  # old code: OSError ENOSPC out of the store worker's ack
    assert reader.checkpoint_error == "" and not reader.checkpoint_pending
    ckpt = read_checkpoint(spool)
    assert ckpt is not None and ckpt.seq == seqs[-1]
    # the stored segment is gone (the writer rolled at ENOSPC), its space is back
    assert list_segments(spool) == [writer.segment]
    assert writer.append([(KIND_MESSAGE, b"t" * 3000)], 1, 1, 1) == seqs[-1] + 1


def test_small_disk_default_segments_roll_free_and_number_exactly(tmpfs: Path) -> None:
    # 64 MiB segments on a 1 MiB disk, the store worker following: every time the disk fills,
    # the writer rolls, the reader stores and frees the segment, and the held write goes in.
    # Five disks' worth in all: numbering, damage counting and the written mark stay exact.
    spool = tmpfs / "spool"
    reader = SpoolReader(spool)
    writer = make_writer(spool)
    payload = b"p" * 2500
    written: list[int] = []
    read: list[int] = []
    fills = 0
    while len(written) * len(payload) < 5 << 20:
        seqs, exc = append_until_full(writer, payload)
        written.extend(seqs)
        assert exc.errno == errno.ENOSPC
        fills += 1
        while chunk := reader.read(1000, BIG):
            read.extend(r.seq for r in chunk)
            reader.ack(chunk[-1])
        # the held message: written once the stored segment's space is back
        written.append(writer.append([(KIND_MESSAGE, payload)], 1, 1, 1))
        assert len(list_segments(spool)) <= 2
    while chunk := reader.read(1000, BIG):
        read.extend(r.seq for r in chunk)
        reader.ack(chunk[-1])
    writer.close()
    reader.close()  # the last ack may be coalesced: written here
    assert fills >= 5
    assert read == written == list(range(1, len(written) + 1))
    assert reader.missing_records == reader.corrupt_records == 0
    assert reader.checkpoint_failures == 0
    # a new writer numbers on from the written mark, a new reader from the checkpoint
    again = make_writer(spool)
    assert again.next_seq == written[-1] + 1
    again.close()
    assert read_checkpoint(spool) is not None
    assert read_checkpoint(spool).seq == written[-1]  # type: ignore[union-attr]


def test_a_failed_checkpoint_write_is_reported_retried_and_never_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    writer = SpoolWriter(tmp_path, segment_bytes=4096, max_bytes=BIG, max_records=BIG)
    for _ in range(40):
        writer.append([(KIND_MESSAGE, b"x" * 500)], 1, 1, 1)
    reader = SpoolReader(tmp_path, clock=clock)
    first = reader.read(3, BIG)
    reader.ack(first[-1])
    assert read_checkpoint(tmp_path) == reader.acked
    segments = list_segments(tmp_path)

    def read_only(directory: Path, ckpt: Checkpoint) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(directory / ".checkpoint.tmp"))

    monkeypatch.setattr(spool_reader, "write_checkpoint", read_only)
    rest = []
    while chunk := reader.read(5, BIG):
        rest.extend(chunk)
        reader.ack(chunk[-1])  # old code: OSError out of the ack kills the store worker
        clock.now += 1.0
    assert reader.checkpoint_pending and reader.checkpoint_failures > 0
    assert ".checkpoint.tmp: Read-only file system (EROFS)" in reader.checkpoint_error
    assert read_checkpoint(tmp_path) == Checkpoint(first[-1].seq, first[-1].segment,
                                                  first[-1].end_offset)
    # nothing is deleted behind a checkpoint that is not on disk, but the sealed, fully
    # read segments were let go (a checkpoint naming a deleted one is safe: see _release_consumed)
    assert set(list_segments(tmp_path)) <= set(segments)
    reader.maybe_flush()  # still failing: reported, not raised
    monkeypatch.undo()  # writable again
    clock.now += 1.0
    reader.maybe_flush()
    assert not reader.checkpoint_pending and reader.checkpoint_error == ""
    ckpt = read_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.seq == rest[-1].seq


def test_segments_kept_behind_an_unwritable_checkpoint_are_freed_when_it_is_written(
        tmp_path: Path) -> None:
    # A folder in place of the checkpoint (an operator's mistake, a restore): acked segments
    # read in one burst were kept while it was there. Once removed, the idle tick wrote the
    # checkpoint but freed nothing: a quiet stream kept them until its next tweet.
    clock = FakeClock()
    writer = SpoolWriter(tmp_path, segment_bytes=4096, max_bytes=BIG, max_records=BIG)
    for _ in range(40):
        writer.append([(KIND_MESSAGE, b"x" * 500)], 1, 1, 1)
    (tmp_path / CHECKPOINT).mkdir()
    reader = SpoolReader(tmp_path, clock=clock)
    burst = reader.read(100, BIG)  # every record, across the segments, before any ack
    reader.ack(burst[-1])
    assert "checkpoint: Is a directory (EISDIR)" in reader.checkpoint_error
    assert len(list_segments(tmp_path)) > 1  # kept: no checkpoint on disk passes them
    (tmp_path / CHECKPOINT).rmdir()  # what the operator does (docs/reliability.md)
    clock.now += 1.0
    reader.maybe_flush()  # the store worker's idle tick: no tweet comes to ack
    assert reader.checkpoint_error == "" and read_checkpoint(tmp_path) == reader.acked
    assert list_segments(tmp_path) == [burst[-1].segment]


@pytest.fixture
def read_only_later(tmp_path: Path) -> Iterator[tuple[Path, list[bool]]]:
    """A folder, and a switch: ``switch[0] = True`` makes it read-only (a bind mount of itself,
    remounted read-only), ``False`` writable again."""
    where = tmp_path / "state"
    where.mkdir()
    _mount(["mount", "--bind", str(where), str(where)])
    state = [False]
    yield where, state
    subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, read_only: bool) -> None:
    option = "remount,bind,ro" if read_only else "remount,bind,rw"
    subprocess.run(["mount", "-o", option, str(where)], check=True)


def test_writer_started_on_a_read_only_spool_fails_appends_not_its_start(
        read_only_later: tuple[Path, list[bool]]) -> None:
    where, _ = read_only_later
    spool = where / "spool"
    first = make_writer(spool)
    last = first.append([(KIND_MESSAGE, b"before")], 1, 1, 1)
    first.close()
    remount(where, read_only=True)
    try:
        writer = make_writer(spool)  # old code: SpoolWriteError here, a worker crash loop
        with pytest.raises(SpoolWriteError) as info:
            writer.append([(KIND_MESSAGE, b"held")], 1, 1, 1)
        assert info.value.errno == errno.EROFS
        assert info.value.filename == str(spool / segment_name(last + 1))
    finally:
        remount(where, read_only=False)
    assert writer.append([(KIND_MESSAGE, b"held")], 1, 1, 1) == last + 1
    writer.close()
    reader = SpoolReader(spool)
    assert [r.payload for r in reader.read(10, BIG)] == [b"before", b"held"]


def test_status_file_that_cannot_be_written_is_a_warning_and_a_beat(
        read_only_later: tuple[Path, list[bool]], monkeypatch: pytest.MonkeyPatch) -> None:
    from ingestd.control.worker import StatusPublisher

    where, _ = read_only_later
    (where / "run").mkdir()
    beat_read, beat_write = os.pipe()
    monkeypatch.setenv("INGESTD_BEAT_FD", str(beat_write))
    publish = StatusPublisher(where, "store")
    publish({"state": "running"})
    remount(where, read_only=True)
    try:
        publish({"state": "running"})  # old code (runstate.write_status): OSError EROFS
        assert "store.json" in publish.error and "(EROFS)" in publish.error
        assert os.read(beat_read, 10) == b"."
    finally:
        remount(where, read_only=False)
    publish({"state": "running again"})
    assert publish.error == ""
    assert b"running again" in (where / "run" / "store.json").read_bytes()
    os.close(beat_read)
    os.close(beat_write)


def test_check_warns_when_spool_bounds_cannot_fit_the_file_system(tmpfs: Path) -> None:
    doc = settings_doc("http://127.0.0.1:9/1.1/statuses/filter.json", "mongodb://127.0.0.1:9",
                       "check")
    doc["state_dir"] = str(tmpfs / "state")
    config = tmpfs.parent / "small.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWITTER_")}
    result = subprocess.run([sys.executable, "-m", "ingestd", "check", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, env=env | CREDS)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [ln for ln in result.stdout.splitlines() if ln.startswith("warning: ")]
    size = os.statvfs(tmpfs).f_blocks * os.statvfs(tmpfs).f_frsize
    for key, value in (("segment_bytes", 64 << 20), ("max_bytes", 1 << 30)):
        assert any(f"spool.{key}: {value} bytes" in ln and f"{size} bytes" in ln
                   and str(tmpfs) in ln for ln in warnings), warnings


def test_a_coverage_marker_the_disk_refuses_is_logged_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stream worker writes a "stopped" marker as it exits; on a full disk that raised a
    # TypeError out of the log call (its field ``event`` clashed with structlog's own): an
    # uncaught exception at every stop of a stream worker on a full disk.
    from ingestd.spool.events import GapMarkers

    writer = make_writer(tmp_path)
    markers = GapMarkers(writer, None)  # the first start's marker, written
    written = markers.written

    def disk_full(fd: int, bufs: list[bytes]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", disk_full)
    markers.gap("stopped")
    assert markers.written == written


def test_drop_newest_state_clears_once_the_disk_takes_writes_without_a_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # drop_newest holds nothing to retry: when the stream delivered its last message while the
    # disk was failing, its state said "spool write failed" for ever. The spool is probed.
    from ingestd.spool.intake import SpoolIntake

    writer = make_writer(tmp_path)
    sink = SpoolIntake(writer, drop=True)
    sink([(KIND_MESSAGE, b"before")], 1, 1, 1)
    sink.flush()

    def disk_full(fd: int, bufs: list[bytes]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", disk_full)
    sink([(KIND_MESSAGE, b"dropped")], 1, 1, 2)
    sink.flush()
    assert sink.dropped == 1 and "No space left on device" in sink.last_error
    monkeypatch.undo()  # space is back; no message comes
    sink._retry_at = 0.0
    sink.retry()
    assert sink.last_error == ""
    sink([(KIND_MESSAGE, b"after")], 1, 1, 3)
    sink.flush()
    payloads = [r.payload for r in SpoolReader(tmp_path).read(10, BIG)]
    assert payloads[-2:] == [b"before", b"after"]


# a file in the folder open for writing nearly all the time, reopened every 20 ms while it can
BUSY_WRITER = ("import contextlib, sys, time\n"
               "while True:\n"
               "    with contextlib.suppress(OSError), open(sys.argv[1], 'wb') as f:\n"
               "        f.write(b'x')\n"
               "        time.sleep(0.02)\n"
               "    time.sleep(0.001)\n")


def test_read_only_bind_over_a_folder_being_written_is_one_step(tmp_path: Path) -> None:
    # The drills turn the state folder read-only under a running daemon. A bind mount then a
    # read-only remount failed ("mount point is busy", CI of ad8c332) when a file was opened
    # for writing in between: 1-3 times in 20 with this writer. bind_read_only has no window.
    where = tmp_path / "busy"
    where.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", BUSY_WRITER, str(where / "segment")])
    try:
        for _ in range(50):
            bind_read_only(where)
            try:
                with pytest.raises(OSError) as info:
                    (where / "new").open("wb")
                assert info.value.errno == errno.EROFS
            finally:
                subprocess.run(["umount", "-l", str(where)], check=True)
    finally:
        writer.kill()
        writer.wait()
