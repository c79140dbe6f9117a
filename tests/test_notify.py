"""``ingestd.control.notify`` against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd.control.notify import notify, reloading_message, watchdog_interval


@pytest.fixture
def path_socket() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can exceed it.
    with tempfile.TemporaryDirectory(prefix="nfy") as folder:
        path = str(Path(folder) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            yield sock, path


def test_no_socket_means_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_sends_one_datagram_to_a_path_socket(monkeypatch: pytest.MonkeyPatch,
                                             path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1\nSTATUS=connected gen=1") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=connected gen=1"


def test_at_sign_means_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ingestd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("WATCHDOG=1") is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_errors_are_swallowed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify("READY=1") is False


def test_a_full_socket_never_blocks(monkeypatch: pytest.MonkeyPatch,
                                    path_socket: tuple[socket.socket, str]) -> None:
    _, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    # Nobody reads: the receive queue fills, and then sends fail instead of blocking.
    results = [notify("STATUS=x" * 100) for _ in range(10_000)]
    assert results[0] is True and results[-1] is False


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("30000000", None, 30.0),
    ("30000000", "own", 30.0),
    ("30000000", "1", None),  # meant for another process (inherited variable)
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "own" else value)
    assert watchdog_interval() == expected


def test_reloading_message_carries_monotonic_usec() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = reloading_message()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = message.split("\n")
    assert first == "RELOADING=1"
    name, value = second.split("=")
    assert name == "MONOTONIC_USEC" and before <= int(value) <= after
