"""The control pipe: typed commands from the supervisor to a worker, over the worker's stdin.

One JSON object per line; the supervisor writes with ``CommandWriter`` (never blocking), the worker
reads with ``CommandReader`` (on a thread). Two commands exist:

- ``Reload(generation, text)``: settings the supervisor has already validated;
- ``Stop(budget)``: seconds left of the stop budget, sent just before SIGTERM.

A worker turns a ``Reload`` into ``Reloaded(generation, settings)``
(``worker.reload_settings``). Loaded by the supervisor and by both workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import orjson
import structlog

if TYPE_CHECKING:
    from ingestd.config.schema import Settings

log = structlog.get_logger("ingestd.worker")


# The settings in force, as the supervisor hands each worker it starts: the SHA-256 of their
# text. A worker whose file no longer holds that text (edited since the last reload) waits for the
# copy the supervisor sends right after the spawn instead of running the file (``worker.boot``).
IN_FORCE_ENV = "INGESTD_SETTINGS_IN_FORCE"


def settings_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Reload:
    """Run these settings (the whole file's text) as generation ``generation``."""

    generation: int
    text: str


@dataclass(frozen=True)
class Stop:
    """The drain may take at most ``budget`` seconds from the coming SIGTERM."""

    budget: float


Command = Reload | Stop


@dataclass(frozen=True)
class Reloaded:
    """A ``Reload`` a worker has loaded: the settings to apply and their generation."""

    generation: int
    settings: Settings


def encode(command: Command) -> bytes:
    """One JSON line: ``{"cmd": "reload", "generation": N, "text": ...}`` or
    ``{"cmd": "stop", "budget": S}``."""
    if isinstance(command, Reload):
        doc: dict[str, Any] = {"cmd": "reload", "generation": command.generation,
                               "text": command.text}
    else:
        doc = {"cmd": "stop", "budget": command.budget}
    return orjson.dumps(doc) + b"\n"


def decode(line: bytes) -> Command | None:
    """The command on ``line``; None (logged) for anything else."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        log.error("control_command_invalid")
        return None
    if not isinstance(doc, dict):
        return None
    if doc.get("cmd") == "reload":
        try:
            return Reload(int(doc["generation"]), str(doc["text"]))
        except (KeyError, TypeError, ValueError) as exc:
            log.error("reload_rejected", error=str(exc))
            return None
    if doc.get("cmd") == "stop" and isinstance(doc.get("budget"), int | float):
        return Stop(float(doc["budget"]))
    return None


class CommandWriter:
    """The supervisor's end: commands to one worker's stdin, written without ever blocking.

    A reload carries the whole config, so only the newest unsent command matters: one still
    waiting behind a slow reader is replaced, and a worker that never reads (hung) cannot make
    the supervisor block or buffer without bound.
    """

    def __init__(self, stream: IO[bytes] | None) -> None:
        self.stream = stream
        self.writing = b""  # the line being written, maybe partly
        self.waiting = b""  # the next line, replaced by newer ones
        if stream is not None:
            os.set_blocking(stream.fileno(), False)

    def send(self, command: Command) -> None:
        """Queue ``command`` (replacing any not yet started) and write what the pipe takes."""
        line = encode(command)
        if self.writing:
            self.waiting = line
        else:
            self.writing = line
        self.flush()

    def flush(self) -> None:
        """Write as much of the queued lines as the pipe accepts now."""
        while self.writing and self.stream is not None:
            try:
                sent = os.write(self.stream.fileno(), self.writing)
            except BlockingIOError:
                return
            except OSError:
                # BrokenPipe: the worker is exiting; its replacement re-reads the config file.
                self.close()
                return
            self.writing = self.writing[sent:]
            if not self.writing:
                self.writing, self.waiting = self.waiting, b""

    def close(self) -> None:
        """Drop anything queued and close the pipe."""
        self.writing = self.waiting = b""
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            self.stream = None


class CommandReader:
    """The worker's end: commands read on a thread, so the worker loop never blocks.

    The thread reads the raw file descriptor with ``os.read``: a daemon thread blocked inside a
    buffered ``sys.stdin`` read holds the buffer's lock and aborts interpreter shutdown.
    """

    def __init__(self, fd: int = 0) -> None:
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.closed = threading.Event()
        self._fd = fd
        threading.Thread(target=self._pump, name="control", daemon=True).start()

    def _pump(self) -> None:
        pending = b""
        while chunk := self._read():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip() and (command := decode(line)) is not None:
                    self.commands.put(command)
        self.closed.set()  # supervisor gone: the worker stops instead of running orphaned

    def _read(self) -> bytes:
        try:
            return os.read(self._fd, 1 << 16)
        except OSError:
            return b""

    def poll(self) -> Command | None:
        try:
            return self.commands.get_nowait()
        except queue.Empty:
            return None

    def wait_reload(self, timeout: float) -> Reload | None:
        """The first reload command within ``timeout`` s; other commands stay queued."""
        deadline = time.monotonic() + timeout
        others: list[Command] = []
        found = None
        while found is None and (left := deadline - time.monotonic()) > 0:
            try:
                command = self.commands.get(timeout=left)
            except queue.Empty:
                break
            if isinstance(command, Reload):
                found = command
            else:
                others.append(command)
        for command in others:
            self.commands.put(command)
        return found
