"""The two worker processes: ``stream`` (reader → spool) and ``store`` (spool → MongoDB).

Each worker reads its settings itself, publishes ``run/<role>.json`` every second (the heartbeat),
stops on SIGTERM, and takes reload commands as JSON lines on stdin from the supervisor (which has
already validated the text). SIGINT and SIGHUP are ignored here: on Ctrl-C the whole process group
gets SIGINT, and the supervisor must order the stop (stream first, then store drains the spool).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog

from ingestd.config.settings import EXIT_CONFIG, ConfigError, Settings, load_settings, secret_values
from ingestd.control.runstate import write_status
from ingestd.logs import bind_process, configure_logging, register_secret
from ingestd.source.connection import Reader
from ingestd.source.v2_rules import RulesSync
from ingestd.spool.writer import Group, SpoolWriteError, SpoolWriter

log = structlog.get_logger("ingestd.worker")

STATUS_INTERVAL = 1.0
HELD_RETRY_INTERVAL = 1.0
COALESCE_BYTES = 64 * 1024  # spool write size to aim at (see SpoolSink)
BOOT_SETTINGS_WAIT = 5.0  # seconds an invalid file waits for the supervisor's validated copy


class ControlChannel:
    """Reload commands from the supervisor, read on a thread so the worker loop never blocks.

    The thread reads the raw file descriptor with ``os.read``: a daemon thread blocked inside a
    buffered ``sys.stdin`` read holds the buffer's lock and aborts interpreter shutdown.
    """

    def __init__(self, fd: int = 0) -> None:
        self.commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.closed = threading.Event()
        self._fd = fd
        threading.Thread(target=self._pump, name="control", daemon=True).start()

    def _pump(self) -> None:
        pending = b""
        while chunk := self._read():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._parse(line)
        self.closed.set()  # supervisor gone: the worker stops instead of running orphaned

    def _read(self) -> bytes:
        try:
            return os.read(self._fd, 1 << 16)
        except OSError:
            return b""

    def _parse(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            cmd = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.error("control_command_invalid")
            return
        if isinstance(cmd, dict):
            self.commands.put(cmd)

    def poll(self) -> dict[str, Any] | None:
        try:
            return self.commands.get_nowait()
        except queue.Empty:
            return None

    def wait_reload(self, timeout: float) -> dict[str, Any] | None:
        """The first reload command within ``timeout`` s; other commands stay queued."""
        deadline = time.monotonic() + timeout
        others: list[dict[str, Any]] = []
        found = None
        while found is None and (left := deadline - time.monotonic()) > 0:
            try:
                cmd = self.commands.get(timeout=left)
            except queue.Empty:
                break
            if cmd.get("cmd") == "reload":
                found = cmd
            else:
                others.append(cmd)
        for cmd in others:
            self.commands.put(cmd)
        return found


class StopFlag:
    """Set by SIGTERM; the handler only records, the loops act on it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def __bool__(self) -> bool:
        return self.event.is_set()


class SpoolSink:
    """Appends framed messages to the spool; on a disk error holds them and blocks the reader.

    The messages of one reader pass (several libcurl callbacks) are written together, with one
    ``writev`` per ``COALESCE_BYTES`` or so: a write syscall costs ~12 µs here, plus the copy.
    The reader calls ``flush`` at the end of every pass, before it waits for the socket again, so
    nothing is kept back across a wait; the spool's bounds may be passed by one coalesced write.

    With ``when_full: block`` nothing is dropped: the held messages are retried every second and,
    while any are held, the reader pauses its connections (TCP pushes back on the endpoint).
    With ``drop_newest`` they are dropped and counted with the reason.
    """

    def __init__(self, spool: SpoolWriter, *, drop: bool) -> None:
        self.spool, self.drop = spool, drop
        self.held: list[Group] = []
        self.pending: list[Group] = []  # this pass's messages, not written yet
        self.dropped = 0
        self.last_error = ""
        self._pending_bytes = 0
        self._retry_at = 0.0

    def __call__(self, items: Sequence[tuple[int, bytes]], conn: int, gen: int, ns: int) -> None:
        if self.held:
            self._hold_or_drop([(items, conn, gen, ns)])
            return
        self.pending.append((items, conn, gen, ns))
        for _, payload in items:
            self._pending_bytes += len(payload)
        if self._pending_bytes >= COALESCE_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write this pass's messages (one write); on a disk error hold or drop them."""
        if not self.pending:
            return
        groups, self.pending, self._pending_bytes = self.pending, [], 0
        try:
            self.spool.append_many(groups)
        except SpoolWriteError as exc:
            self.last_error = f"spool write failed: {os.strerror(exc.errno or 0)}"
            log.error("spool_write_failed", error=self.last_error, policy="drop" if self.drop
                      else "block")
            self._hold_or_drop(groups)
            return
        if self.last_error:  # drop_newest holds nothing: the first good append is the recovery
            self.last_error = ""
            log.info("spool_write_recovered", dropped=self.dropped)

    def _hold_or_drop(self, groups: list[Group]) -> None:
        if self.drop:
            self.dropped += sum(len(group[0]) for group in groups)
        else:
            self.held.extend(groups)
            self._retry_at = time.monotonic() + HELD_RETRY_INTERVAL

    def retry(self) -> None:
        """Write held messages once the disk takes them again (called from the worker loop)."""
        if not self.held or time.monotonic() < self._retry_at:
            return
        try:
            while self.held:
                self.spool.append(*self.held[0])
                self.held.pop(0)
        except SpoolWriteError:
            self._retry_at = time.monotonic() + HELD_RETRY_INTERVAL
            return
        self.last_error = ""
        log.info("spool_write_recovered")

    def is_full(self) -> bool:
        return bool(self.held) or self.spool.is_full()


def boot(config_path: Path, role: str, control: ControlChannel) -> Settings | int:
    """Load settings and configure logging; an exit code if the settings are invalid.

    A file edited since the last reload may be invalid: the supervisor then sends the settings
    in force right after spawning us, and we run those (it validated them) instead of exiting.
    """
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        fallback = control.wait_reload(BOOT_SETTINGS_WAIT)
        new = reload_settings(fallback, config_path) if fallback else None
        if new is None:
            configure_logging(role=role, pid=os.getpid())
            log.error("settings_invalid", error=str(exc))
            return EXIT_CONFIG
        settings = new[1]
        configure_worker_logging(settings, role)
        log.warning("settings_file_invalid", error=str(exc), generation=new[0],
                    action="running the settings in force, sent by the supervisor")
        return settings
    configure_worker_logging(settings, role)
    return settings


def configure_worker_logging(settings: Settings, role: str) -> None:
    lg = settings.logging
    configure_logging(lg.level, lg.format, secrets=secret_values(settings),
                      error_interval=lg.error_interval, role=role, pid=os.getpid())


def reload_settings(cmd: dict[str, Any], config_path: Path) -> tuple[int, Settings] | None:
    """The settings of a supervisor reload command, or None if they do not validate here."""
    from ingestd.config.settings import load_settings_text

    try:
        generation = int(cmd["generation"])
        settings = load_settings_text(str(cmd["text"]), config_path)
    except (KeyError, ValueError, ConfigError) as exc:
        log.error("reload_rejected", error=str(exc))
        return None
    for value in secret_values(settings):
        register_secret(value)  # new credentials must be masked from the first line on
    bind_process(generation=generation)
    return generation, settings


class RateMeter:
    """Events per second between two successive readings of a counter."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None
        self.rate = 0.0

    def update(self, count: int) -> float:
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            self.rate = (count - self._last[1]) / (now - self._last[0])
        self._last = (now, count)
        return self.rate


class Ticker:
    """Runs ``fn`` at most every ``interval`` seconds."""

    def __init__(self, interval: float, fn: Callable[[], None]) -> None:
        self.interval, self.fn, self._next = interval, fn, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self.fn()


def run_stream_worker(config_path: Path, generation: int) -> int:
    """Stream role: keep a connection open and append every framed message to the spool."""
    control = ControlChannel()
    booted = boot(config_path, "stream", control)
    if isinstance(booted, int):
        return booted
    settings = booted
    bind_process(generation=generation)
    stop = StopFlag()
    sp = settings.spool
    spool = SpoolWriter(settings.state_dir / "spool", segment_bytes=sp.segment_bytes,
                        max_bytes=sp.max_bytes, max_records=sp.max_records,
                        fsync_interval=sp.fsync_interval)
    sink = SpoolSink(spool, drop=sp.when_full == "drop_newest")
    reader = Reader(settings.stream, settings.auth, generation, sink, is_full=sink.is_full,
                    drop_when_full=sp.when_full == "drop_newest", flush=sink.flush)
    # X API v2: rules live on the server; synced at start and on every reload, on a thread,
    # while the connection keeps streaming (no-op for v1.1).
    rules = RulesSync()
    rules.request(settings.stream, settings.auth, generation)

    meter = RateMeter()

    def publish() -> None:
        records, nbytes = spool.backlog()
        stats = reader.stats.as_dict()
        # `received` counts records that reached the spool: the sink's disk-error drops were
        # framed by the reader but never spooled, so they move to `dropped`.
        stats["received"] -= sink.dropped
        stats["dropped"] = {**stats["dropped"], **({"disk_error": sink.dropped}
                                                    if sink.dropped else {})}
        state = sink.last_error or (f"degraded: {rules.error}; previous rules still in force"
                                    if rules.error else reader.state)
        write_status(settings.state_dir, "stream", {
            "generation": reader.generation, "state": state, "counters": stats,
            "progress": reader.stats.bytes + reader.stats.attempts,
            "conn": reader.active.conn_id if reader.active else None,
            "backoff": reader.backoff.last_delay,
            "rate": round(meter.update(reader.stats.received), 1),
            "spool": {"records": records, "bytes": nbytes, "next_seq": spool.next_seq,
                      "held": sum(len(h[0]) for h in sink.held),
                      "max_bytes": spool.max_bytes, "max_records": spool.max_records},
            "last_message_time": reader.last_message_ns / 1e9 if reader.last_message_ns else None,
            **({"rules": rules.status.as_dict()} if reader.stream.api == "v2" else {}),
        })

    status = Ticker(STATUS_INTERVAL, publish)

    def tick() -> None:
        spool.maybe_sync()
        sink.retry()
        while (cmd := control.poll()) is not None:
            if cmd.get("cmd") == "reload" and (new := reload_settings(cmd, config_path)):
                reader.reload(new[1].stream, new[1].auth, new[0])
                rules.request(new[1].stream, new[1].auth, new[0])
                log.info("reload_applied", generation=new[0])
        if control.closed.is_set():
            stop.event.set()
        status()

    log.info("stream_worker_started", generation=generation)
    try:
        reader.run(lambda: bool(stop), tick)
    finally:
        rules.close()
        spool.close()
        publish()
    log.info("stream_worker_stopped", received=reader.stats.received)
    return 0


def run_store_worker(config_path: Path, generation: int) -> int:
    """Store role: drain the spool into MongoDB (see writer.StoreWorker)."""
    control = ControlChannel()
    booted = boot(config_path, "store", control)
    if isinstance(booted, int):
        return booted
    bind_process(generation=generation)
    from ingestd.control.store_role import run_store_role

    return run_store_role(booted, config_path, generation, StopFlag(), control)
