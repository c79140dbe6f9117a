"""Upgrades and rollbacks over a live state folder (docs/design.md, "Upgrades and rollbacks").

A state folder carries its format stamp (``state/format``: ``{"format": N}``). A later version
that writes what this one would misread (a new spool record kind, a new checkpoint) raises N;
this version then refuses the folder at start (``state_dir_unusable``, exit 78, naming the file)
instead of dead-lettering as ``bad_frame``, cut to 64 KiB, every record of a kind it does not know.
Folders without a stamp (new ones, an older version's) start and are stamped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from ingestd.control import statedir
from ingestd.control.supervisor import Supervisor
from ingestd.spool.format import (
    HEADER_SIZE,
    KIND_BADFRAME,
    KIND_MESSAGE,
    KIND_OVERSIZE,
    KIND_PARTIAL,
    encode_record,
    list_segments,
    segment_name,
)
from ingestd.spool.generations import LEGACY_FIRST
from ingestd.spool.writer import SpoolWriter
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.mongo import stored_ids
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

TWEETS = 30
SCRIPT = [[{"deliver": TWEETS}, {"keepalive_only": 600}] for _ in range(4)]
LATER_KIND = 0xB5  # a record kind this version does not know (bench's prespool KIND_BSON)


class Folder:
    """The real daemon, the simulator and MongoDB on one state folder."""

    def __init__(self, tmp_path: Path, mongo_uri: str, database: str) -> None:
        self.uri, self.database = mongo_uri, database
        self.sim = SimProcess(tmp_path / "sim", "--rate", "200", "--keepalive", "1",
                              "--control-every", "0", script=SCRIPT).start()
        self.daemon = Daemon(tmp_path / "daemon", settings_doc(self.sim.url, mongo_uri, database))

    def stored_all(self, tweets: int) -> bool:
        self.daemon.assert_running()
        truth = set(self.sim.ground_truth().tweet_ids())
        return len(truth) >= tweets and truth <= set(stored_ids(self.uri, self.database))

    def run_and_stop(self, tweets: int) -> None:
        self.daemon.start().wait_ready()
        wait_until(lambda: self.stored_all(tweets), 60, f"{tweets} tweets stored")
        code, _ = self.daemon.stop()
        assert code == 0, self.daemon.tail()

    def command(self, *args: str) -> tuple[int, str]:
        """``ingestd ARGS --config …``: its exit code and output (a start that hangs is ended)."""
        proc = subprocess.Popen([sys.executable, "-m", "ingestd", *args, "--config",
                                 str(self.daemon.config)], env=self.daemon.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
        return proc.returncode, out


@pytest.fixture
def folder(tmp_path: Path, mongo_uri: str, mongo_database: str) -> Iterator[Folder]:
    folder = Folder(tmp_path, mongo_uri, mongo_database)
    try:
        yield folder
    finally:
        folder.daemon.kill()
        folder.sim.stop()


def later_versions_backlog(state_dir: Path) -> bytes:
    """What a later version leaves on a rollback: a record of a kind this one does not know,
    unstored, and its stamp. The segment's bytes, to compare."""
    spool = SpoolWriter(state_dir / "spool", max_bytes=1 << 30, max_records=10**6)
    spool.append([(LATER_KIND, orjson.dumps({"a": "later version's record"}))], 1, 1,
                 time.time_ns())
    spool.close()
    (state_dir / statedir.FORMAT_FILE).write_text(json.dumps({"format": statedir.FORMAT + 1}))
    return b"".join((state_dir / "spool" / n).read_bytes() for n in list_segments(
        state_dir / "spool"))


def test_a_folder_a_later_version_stamped_is_refused_and_left_as_it_is(folder: Folder) -> None:
    # Without the stamp the start dead-lettered the later version's record as bad_frame ("spool
    # record kind 181"), its payload cut to 64 KiB, and acked it: a misread, never to be undone.
    folder.run_and_stop(TWEETS)
    state_dir = folder.daemon.state_dir
    stamp = state_dir / statedir.FORMAT_FILE
    assert json.loads(stamp.read_text()) == {"format": statedir.FORMAT}  # the start stamped it
    segments = later_versions_backlog(state_dir)
    code, out = folder.command("run")
    assert code == Supervisor.EXIT_CONFIG, out
    events = [json.loads(line) for line in out.splitlines()]
    (line,) = [e for e in events if e["level"] in ("error", "critical")]
    assert line["event"] == "state_dir_unusable", out
    assert line["reason"].startswith(f"{stamp} says format {statedir.FORMAT + 1}: a later "
                                     "ingestd wrote this folder"), line
    assert "worker_started" not in [e["event"] for e in events]
    assert b"".join((state_dir / "spool" / n).read_bytes()
                    for n in list_segments(state_dir / "spool")) == segments
    assert not list((state_dir / "deadletter").glob("*.jsonl"))
    code, out = folder.command("check")  # says so before any start
    assert code == 78 and f"{stamp} says format {statedir.FORMAT + 1}" in out, out


def test_a_folder_without_a_stamp_starts_and_is_stamped(folder: Folder) -> None:
    """An older version's folder (no stamp) and a folder an older version ran after this one
    (the stamp left as this version wrote it) both start, stamped."""
    folder.run_and_stop(TWEETS)
    stamp = folder.daemon.state_dir / statedir.FORMAT_FILE
    stamp.unlink()
    folder.daemon.start().wait_ready()
    wait_until(lambda: folder.stored_all(2 * TWEETS), 60, "the second connection's tweets")
    finish(folder.daemon, folder.sim)
    assert json.loads(stamp.read_text()) == {"format": statedir.FORMAT}
    assert sorted(stored_ids(folder.uri, folder.database)) == sorted(
        folder.sim.ground_truth().tweet_ids())


@pytest.mark.parametrize("text", ["", "{\"format\": \"2\"}", "[2]", "{\"format\": true}"])
def test_a_stamp_of_another_shape_is_refused_naming_it(tmp_path: Path, text: str) -> None:
    (tmp_path / statedir.FORMAT_FILE).write_text(text)
    with pytest.raises(statedir.StateDirUnusable) as caught:
        statedir.prepare(tmp_path)
    assert caught.value.reason.startswith(f"{tmp_path / statedir.FORMAT_FILE} is not a format "
                                          "stamp")
    assert (tmp_path / statedir.FORMAT_FILE).read_text() == text  # left for the operator


def test_the_stamp_is_written_once(tmp_path: Path) -> None:
    statedir.prepare(tmp_path)
    stamp = tmp_path / statedir.FORMAT_FILE
    first = stamp.stat().st_ino
    statedir.prepare(tmp_path)
    assert stamp.stat().st_ino == first and stamp.read_text() == '{"format": 1}\n'
    assert statedir.inspect(tmp_path) is None


def tweet(tweet_id: int) -> bytes:
    return orjson.dumps({"id": tweet_id, "id_str": str(tweet_id), "text": "my iphone",
                         "created_at": "Sat Dec 05 10:00:00 +0000 2026",
                         "user": {"id": 7, "screen_name": "me"},
                         "entities": {"hashtags": [], "user_mentions": [], "urls": []}})


OLD_IDS = [9_200_000_000_000_000_001 + i for i in range(3)]


def oldest_layout(state_dir: Path) -> None:
    """A state folder as the first layout (222ace4, 2026-12-03) left it at a stop with MongoDB
    down, written from the documented layout (spool/format.py): one segment, a checkpoint of
    three fields (no crc, not padded) after its first tweet (stored), a backlog of two tweets and
    a record of each kind older versions wrote, and the dead letter that version wrote already for
    the backlog's invalid message. No generations/, written mark, coverage marker or stamp."""
    records = [(KIND_MESSAGE, tweet(OLD_IDS[0])), (KIND_MESSAGE, tweet(OLD_IDS[1])),
               (KIND_OVERSIZE, b'{"id": 1, "text": "an over-size mess'),
               (KIND_BADFRAME, b"12x3\r\n"), (KIND_PARTIAL, b'{"id": 2, "te'),
               (KIND_MESSAGE, b'{"id": 3, "text": '), (KIND_MESSAGE, tweet(OLD_IDS[2]))]
    now = time.time_ns()
    data = [encode_record(seq, kind, payload, 1, 1, now)
            for seq, (kind, payload) in enumerate(records, start=1)]
    spool = state_dir / "spool"
    spool.mkdir(parents=True)
    (spool / segment_name(1)).write_bytes(b"".join(data))
    (spool / "checkpoint").write_text(json.dumps(
        {"seq": 1, "segment": segment_name(1), "offset": len(data[0])}))
    assert len(data[0]) == HEADER_SIZE + len(records[0][1])
    letters = state_dir / "deadletter"
    letters.mkdir()
    day = datetime.now(UTC)
    (letters / f"deadletter-{day:%Y%m%d}.jsonl").write_bytes(orjson.dumps({
        "time": day.isoformat(timespec="milliseconds"), "reason": "invalid_json", "code": None,
        "detail": "unexpected end of data", "conn_id": 1, "generation": 1, "seq": 6, "size": 18,
        "truncated": False, "raw": '{"id": 3, "text": '}) + b"\n")


def test_the_oldest_layouts_backlog_is_replayed_once(folder: Folder) -> None:
    """An upgrade from the first layout: the backlog after its checkpoint is stored or
    dead-lettered once, the record before it is not replayed, the dead letter that version wrote
    is not written again, and the old generation's tweets are counted as matched by this start's
    filters (``before_record``)."""
    state_dir = folder.daemon.state_dir
    oldest_layout(state_dir)
    folder.daemon.start().wait_ready()
    wait_until(lambda: folder.stored_all(TWEETS), 60, "the simulator's tweets stored")
    store = wait_until(lambda: (c if (c := folder.daemon.counters("store")).get(
        "replayed") == 6 and c.get("pending") == 0 else None), 30, "the backlog counted")
    finish(folder.daemon, folder.sim)
    assert set(stored_ids(folder.uri, folder.database)) == (
        set(folder.sim.ground_truth().tweet_ids()) | set(OLD_IDS[1:]))  # not OLD_IDS[0]
    letters = [json.loads(line) for f in sorted((state_dir / "deadletter").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert sorted((e["seq"], e["reason"]) for e in letters) == [
        (3, "oversize"), (4, "bad_frame"), (5, "partial_message"), (6, "invalid_json")]
    # the replayed invalid message counts as dead-lettered (its line is the older version's)
    assert store["deadlettered"] == {"oversize": 1, "bad_frame": 1, "partial_message": 1,
                                     "invalid_json": 1}
    assert store["matched_fallback"] == {"before_record": 2}
    assert folder.daemon.status("supervisor")["generation"] == LEGACY_FIRST
    assert json.loads((state_dir / statedir.FORMAT_FILE).read_text()) == {
        "format": statedir.FORMAT}
