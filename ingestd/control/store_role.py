"""The store worker process: spool → ``sink.worker.StoreWorker`` → MongoDB, with heartbeat,
reloads and the drain on stop. Loaded by the store worker only (pymongo, never pycurl)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from ingestd.control.pipe import Command, Reload, Stop
from ingestd.control.settled import SettledRecord
from ingestd.control.tally import REPLAY_ENV
from ingestd.control.worker import (
    STATUS_INTERVAL,
    RateMeter,
    StatusPublisher,
    Ticker,
    WorkerContext,
    run_role,
    sleep_until_signal,
    start_worker,
    wake_on_signals,
)
from ingestd.memory import quiet_gc
from ingestd.sink.deadletter import DeadLetterStore
from ingestd.sink.mongo import open_collection
from ingestd.sink.retry import GiveUp
from ingestd.sink.worker import StoreWorker
from ingestd.spool.reader import SpoolReader

log = structlog.get_logger("ingestd.store")

DRAIN_MARGIN = 1.0  # seconds kept back from the stop budget for closing and exiting
MIN_DRAIN = 0.5


class StoreRole:
    """Store until SIGTERM, then drain the spool within the stop budget; exit 0 either way.

    Exiting with a backlog is not a loss: the spool is durable and replayed at the next start.
    """

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx, self.generation = ctx, ctx.generation
        settings = ctx.settings
        self.reader = SpoolReader(settings.state_dir / "spool")
        deadletters = DeadLetterStore(settings.state_dir / "deadletter",
                                      settings.deadletter.max_bytes)
        self.worker = StoreWorker(settings, self.reader, open_collection, deadletters,
                                  generation=ctx.generation, replay=replay_boundary())
        written = self.reader.written
        self.settled = SettledRecord(settings.state_dir, written.seq if written else 0,
                                     self.worker.settled.counts)
        self.worker.on_checkpoint = self.before_checkpoint
        self.meter = RateMeter()
        self.write_status = StatusPublisher(settings.state_dir, "store")
        self.status = Ticker(STATUS_INTERVAL, self.publish)
        # Idle, the worker sleeps until the next heartbeat, new spool records or SIGTERM.
        self.worker.idle_wait = self.status.due_in
        wake_fd = wake_on_signals()
        self.reader.watch.extra_fds.append(wake_fd)
        self.worker.pause = sleep_until_signal(wake_fd)  # a gather pause ends on SIGTERM too
        # Seconds the drain may take once SIGTERM came; the supervisor sends what is left of its
        # stop budget just before the signal (less than stop_timeout if the stream worker took
        # part of it).
        self.budget = settings.control.stop_timeout
        self.stopping_since: float | None = None

    def run(self) -> int:
        log.info("store_worker_started", generation=self.generation)
        try:
            drained = self.worker.run(self.should_stop, self.tick, self.drain_deadline)
        finally:
            self.close_spool()
            self.worker.close()
            self.publish()
        counters = self.worker.counters()
        log.info("store_worker_stopped", drained=drained, **{
            k: counters[k] for k in ("stored", "duplicates", "records_read", "replayed")})
        return 0

    def close_spool(self) -> None:
        """Write the spool checkpoint the reader may still hold back (acks are coalesced).

        If that fails, or the coverage ledger it waits for cannot be written (MongoDB failing
        past the drain deadline), the next start replays records already stored: duplicates, not
        a loss.
        """
        try:
            self.reader.close()
        except (OSError, GiveUp) as exc:
            log.warning("spool_checkpoint_write_failed", error=str(exc) or type(exc).__name__,
                        effect="already stored records are replayed at the next start")

    def publish(self) -> None:
        counters = self.worker.counters()
        counters["spool_corrupt_records"] = self.reader.corrupt_records
        counters["spool_corrupt_bytes"] = self.reader.corrupt_bytes
        counters["spool_checkpoint_resets"] = self.reader.checkpoint_resets
        acked_seq, unacked_bytes = self.reader.unacked()
        counters["spool_read_failures"] = self.reader.read_failures
        state, error = str(counters["state"]), self.reader.checkpoint_error
        if self.reader.read_error:  # storing waits where it was until the folder is back
            if not state.startswith("degraded"):
                state = f"degraded: spool unreadable ({self.reader.read_error})"
            counters["last_error"] = f"spool unreadable: {self.reader.read_error}"
        elif error:  # storing goes on; the checkpoint (and the space behind it) waits
            if not state.startswith("degraded"):
                state = f"degraded: spool checkpoint unwritable ({error})"
            counters["last_error"] = f"spool checkpoint: {error}"
        self.write_status({
            "generation": self.generation, "state": state,
            "counters": counters, "progress": counters["records_read"] + counters["retries"],
            "rate": round(self.meter.update(int(counters["stored"])), 1),
            "last_error": counters["last_error"], "last_error_at": counters["last_error_at"],
            "hist": self.worker.histograms(),
            "loop_passes": self.worker.passes,
            # The checkpoint on disk: with the stream worker's last seq, the queue once it is
            # stopped (its own figure stops at its exit, before this worker's drain).
            "spool": {"acked_seq": acked_seq, "bytes": unacked_bytes,
                      "checkpoint_failures": self.reader.checkpoint_failures},
        })

    def before_checkpoint(self, seq: int) -> None:
        """Keep this worker's counts at checkpoint ``seq`` beside the one on disk (``settled``)."""
        written, settled = self.reader.written, self.worker.settled
        if settled.seq == seq:
            self.settled.before_checkpoint(written.seq if written else 0, seq, settled.counts)

    def tick(self) -> None:
        while (command := self.ctx.control.poll()) is not None:
            self.command(command)
        self.ctx.orphaned()
        self.status()

    def command(self, command: Command) -> None:
        """A supervisor command: a reload (already validated) or the stop budget."""
        if isinstance(command, Reload) and (new := self.ctx.reload(command)):
            self.worker.apply_settings(new.generation, new.settings)
            self.generation = new.generation
            log.info("reload_applied", generation=new.generation)
        elif isinstance(command, Stop):
            self.budget = min(self.budget, command.budget)

    def should_stop(self) -> bool:
        stop = self.ctx.stop
        if stop and self.stopping_since is None:
            self.stopping_since = time.monotonic()
            log.info("store_draining", budget=round(self.budget, 3))
        return bool(stop)

    def drain_deadline(self) -> float | None:
        """When to stop taking records: early enough for the last batch's insert and the exit."""
        if self.stopping_since is None:
            return None
        margin = DRAIN_MARGIN + self.batch_seconds()
        return self.stopping_since + max(self.budget - margin, MIN_DRAIN)

    def batch_seconds(self) -> float:
        """Twice the mean insert time of a batch so far (the final flush comes after the
        deadline), at most a quarter of the budget."""
        totals = self.worker.totals
        mean = totals.insert_seconds_total / totals.batches if totals.batches else 0.0
        return min(2 * mean, self.budget / 4)


def replay_boundary() -> tuple[int, int]:
    """(through, counted) from the supervisor (``tally.REPLAY_ENV``); (0, 0) without it."""
    through, _, counted = os.environ.get(REPLAY_ENV, "").partition(":")
    try:
        return int(through), int(counted or 0)
    except ValueError:
        return 0, 0


def run_store_worker(config_path: Path, generation: int) -> int:
    """``ingestd worker --role store``: the process's body; its exit code."""
    ctx = start_worker(config_path, "store", generation)
    if isinstance(ctx, int):
        return ctx
    quiet_gc()
    return run_role(ctx, "store", StoreRole)
