"""Status files keep beating when the disk is full (the supervisor's heartbeat depends on them)."""

from __future__ import annotations

import errno
from pathlib import Path

import orjson
import pytest

from ingestd.control import runstate
from ingestd.logs import register_secret


def test_status_round_trip_and_padding(tmp_path: Path) -> None:
    runstate.run_dir(tmp_path)
    runstate.write_status(tmp_path, "stream", {"state": "connected", "counters": {"received": 3}})
    raw = runstate.status_path(tmp_path, "stream").read_bytes()
    assert len(raw) % runstate.PAD == 0
    status = runstate.read_status(tmp_path, "stream")
    assert status is not None and status["counters"] == {"received": 3} and status["pid"] > 0


def test_full_disk_overwrites_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runstate.run_dir(tmp_path)
    runstate.write_status(tmp_path, "store", {"state": "running", "progress": 1})

    def no_space(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    runstate.write_status(tmp_path, "store", {"state": "degraded: disk full", "progress": 2})
    status = runstate.read_status(tmp_path, "store")
    assert status is not None and status["progress"] == 2 and status["state"].startswith("degr")
    assert not list((tmp_path / "run").glob(".*.tmp")), "no temp file left behind"


def test_other_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runstate.run_dir(tmp_path)

    def denied(self: Path, data: bytes) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(PermissionError):
        runstate.write_status(tmp_path, "stream", {"state": "x"})


def test_a_reason_quoting_a_secret_is_masked_in_the_status_file(tmp_path: Path) -> None:
    """The secrets audit: a 401 body that echoed the request's Authorization header reached
    ``ingestd status``, ``/healthz`` and systemd's STATUS= through the stream worker's status
    file, while the log line of the same event was masked."""
    register_secret("bearer-canary-5555")
    (tmp_path / runstate.RUN_DIR).mkdir()
    reason = ("token rejected (rules endpoint: HTTP 401: bad Bearer bearer-canary-5555; "
              "Authorization: OAuth oauth_signature=\"sig-canary\"; at mongodb://u:pw-canary@h/)")
    runstate.write_status(tmp_path, "stream", {
        "state": f"degraded: {reason}", "reasons": [reason], "counts": {"auth_failures": 3}})
    text = runstate.status_path(tmp_path, "stream").read_text()
    for secret in ("bearer-canary-5555", "sig-canary", "pw-canary"):
        assert secret not in text, text
    status = runstate.read_status(tmp_path, "stream")
    assert status is not None and status["counts"] == {"auth_failures": 3}  # keys kept
    assert status["state"].startswith("degraded: token rejected (rules endpoint: HTTP 401")


def test_a_status_is_rewritten_in_place_and_one_that_outgrew_its_file_replaces_it(
        tmp_path: Path) -> None:
    """In place: no temp file renamed over the old one each second (ext4 starts writing back a
    file renamed over another: ~400 µs of CPU a write, bench/LOG.md "Status files rewritten in
    place"). A status longer than the file is written whole to a new one, atomically."""
    runstate.run_dir(tmp_path)
    path = runstate.status_path(tmp_path, "stream")
    runstate.write_status(tmp_path, "stream", {"state": "connected", "progress": 1})
    inode = path.stat().st_ino
    runstate.write_status(tmp_path, "stream", {"state": "connected", "progress": 2})
    assert path.stat().st_ino == inode and len(path.read_bytes()) == runstate.PAD
    status = runstate.read_status(tmp_path, "stream")
    assert status is not None and status["progress"] == 2 and status["time_end"] == status["time"]
    runstate.write_status(tmp_path, "stream", {"state": "x" * runstate.PAD, "progress": 3})
    assert path.stat().st_ino != inode and len(path.read_bytes()) == 2 * runstate.PAD
    status = runstate.read_status(tmp_path, "stream")
    assert status is not None and status["progress"] == 3
    runstate.write_status(tmp_path, "stream", {"state": "connected", "progress": 4})  # shorter
    status = runstate.read_status(tmp_path, "stream")
    assert status is not None and status["progress"] == 4 and status["state"] == "connected"
    assert not list((tmp_path / "run").glob(".*")), "no temp file left behind"


def test_a_status_caught_half_way_through_a_write_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-place write is not atomic: a read that got the new status's head and the old one's
    tail (valid JSON, as often as not) must not be taken for a status."""
    runstate.run_dir(tmp_path)
    path = runstate.status_path(tmp_path, "store")
    # times of one length, so that both statuses have their fields at the same offsets
    runstate.write_status(tmp_path, "store", {"time": 1000.5, "counters": {"stored": 1000}})
    old = path.read_bytes()
    runstate.write_status(tmp_path, "store", {"time": 2000.5, "counters": {"stored": 2000}})
    new = path.read_bytes()
    cut = new.index(b'"counters"')
    assert cut == old.index(b'"counters"')
    torn = new[:cut] + old[cut:]  # the new time, the old counters and time_end
    assert isinstance(orjson.loads(torn), dict)
    reads = iter([torn, new[:cut], new])  # torn, then cut short, then whole
    monkeypatch.setattr(Path, "read_bytes", lambda self: next(reads))
    status = runstate.read_status(tmp_path, "store")
    assert status is not None and status["counters"] == {"stored": 2000}
    monkeypatch.setattr(Path, "read_bytes", lambda self: torn)
    assert runstate.read_status(tmp_path, "store") is None  # never a mixed status
