"""The store worker's loop: spool → writer.StoreWorker → MongoDB, with heartbeat and reloads."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ingestd.deadletter import DeadLetterStore
from ingestd.mongo import open_collection
from ingestd.runstate import write_status
from ingestd.settings import Settings
from ingestd.spool import SpoolReader
from ingestd.workers import STATUS_INTERVAL, RateMeter, Ticker, reload_settings
from ingestd.writer import StoreWorker

if TYPE_CHECKING:
    from ingestd.workers import ControlChannel, StopFlag

log = structlog.get_logger("ingestd.store")

DRAIN_MARGIN = 1.0  # seconds kept back from stop_timeout for closing and exiting


def run_store_role(settings: Settings, config_path: Path, generation: int, stop: StopFlag,
                   control: ControlChannel) -> int:
    """Store until SIGTERM, then drain the spool within the stop budget; exit 0 either way.

    Exiting with a backlog is not a loss: the spool is durable and replayed at the next start.
    """
    # Long-lived objects made at start-up never need collecting; freezing them keeps the
    # cyclic collector's passes short on the hot path.
    gc.freeze()
    reader = SpoolReader(settings.state_dir / "spool")
    deadletters = DeadLetterStore(settings.state_dir / "deadletter",
                                  settings.deadletter.max_bytes)
    worker = StoreWorker(settings, reader, open_collection, deadletters, generation=generation)
    stopping_since: list[float] = []
    meter = RateMeter()

    def publish() -> None:
        counters = worker.counters()
        counters["spool_corrupt_records"] = reader.corrupt_records
        counters["spool_corrupt_bytes"] = reader.corrupt_bytes
        counters["spool_checkpoint_resets"] = reader.checkpoint_resets
        write_status(settings.state_dir, "store", {
            "generation": generation_now[0], "state": counters["state"],
            "counters": counters, "progress": counters["records_read"] + counters["retries"],
            "rate": round(meter.update(int(counters["stored"])), 1),
            "last_error": counters["last_error"],
        })

    generation_now = [generation]
    status = Ticker(STATUS_INTERVAL, publish)

    def tick() -> None:
        while (cmd := control.poll()) is not None:
            if cmd.get("cmd") == "reload" and (new := reload_settings(cmd, config_path)):
                worker.apply_settings(*new)
                generation_now[0] = new[0]
                log.info("reload_applied", generation=new[0])
        if control.closed.is_set():
            stop.event.set()
        status()

    def should_stop() -> bool:
        if stop and not stopping_since:
            stopping_since.append(time.monotonic())
            log.info("store_draining")
        return bool(stop)

    def drain_deadline() -> float | None:
        if not stopping_since:
            return None
        return stopping_since[0] + max(settings.control.stop_timeout - DRAIN_MARGIN, 0.5)

    log.info("store_worker_started", generation=generation)
    try:
        drained = worker.run(should_stop, tick, drain_deadline)
    finally:
        worker.close()
        publish()
    log.info("store_worker_stopped", drained=drained, **{
        k: v for k, v in worker.counters().items() if k in ("stored", "duplicates", "records_read")
    })
    return 0
