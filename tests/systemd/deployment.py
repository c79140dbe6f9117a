"""ingestd installed by the README into a booted Debian container, fed by host-side test servers.

The simulator and the Mongo stand-in run on the host (loopback, shared with the container). The
daemon's run-state files are read from the host through the container's root directory.
"""

from __future__ import annotations

import copy
import shlex
import time
from pathlib import Path
from typing import Any

import orjson
import pymongo
import yaml

from ingestd.tools.standin import free_port
from tests.support.creds import CREDS
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until
from tests.systemd.install import install
from tests.systemd.machine import CACHE, BaseRoot, Container, fresh_copy

UNIT = "ingestd"
CONFIG = "/etc/ingestd/settings.yaml"
# DynamicUser= keeps StateDirectory= under /var/lib/private (the /var/lib/ingestd link points
# there).
STATE = "var/lib/private/ingestd"
# Shortened from the unit's 60 s so the watchdog test takes seconds; installed before the README's
# `daemon-reload && enable --now` so the daemon's own ping interval follows it from the start.
WATCHDOG_DROPIN = "[Service]\nWatchdogSec=10\n"
TRACK = ["iphone", "ipad", "ipod"]


def test_settings(src: Path, sim_url: str, mongo_uri: str, database: str,
                  metrics_port: int) -> dict[str, Any]:
    """The source tree's settings.yaml, pointed at the test servers (fast back-off numbers)."""
    doc: dict[str, Any] = yaml.safe_load((src / "settings.yaml").read_text())
    doc["stream"].update(url=sim_url, track=list(TRACK))
    doc["stream"]["backoff"].update(http_start=0.5, http_cap=4, rate_limit_start=1,
                                    rate_limit_cap=4, reconnect_delay=0.2,
                                    max_attempts_per_minute=60)
    doc["mongo"].update(uri=mongo_uri, database=database)
    doc["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    doc["logging"]["format"] = "json"
    return doc


class Deployment:
    """One release's container with ingestd installed and running under systemd."""

    def __init__(self, release: str, src: Path, workdir: Path, mongo_uri: str) -> None:
        self.release = release
        self.src = src
        self.workdir = workdir
        self.mongo_uri = mongo_uri
        self.database = f"systemd_{release}_{workdir.name[-8:]}".replace("-", "_")
        self.metrics_port = free_port()
        self.sim = SimProcess(workdir / "sim", "--rate", "300", "--max-tweets", "150",
                              "--control-every", "10", "--keepalive", "1", "--seed", "7")
        self.box: Container | None = None
        self.doc: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Deployment:
        base, self.timings["base root"] = BaseRoot(self.release).ensure()
        started = time.monotonic()
        root = fresh_copy(base, self.workdir)
        self.timings["copy"] = time.monotonic() - started
        self.sim.start()
        # pip's HTTP cache survives runs (when the index's responses may be cached).
        pip_cache = CACHE / "pip"
        pip_cache.mkdir(parents=True, exist_ok=True)
        # Read-only: the README's `pip install /path/to/ingestd` must write nothing into the
        # source tree (the build backend builds in a temporary folder).
        self.box = Container(root, [f"--bind-ro={self.src}:/src",
                                    f"--bind={pip_cache}:/root/.cache/pip"],
                             self.workdir / "console.log")
        self._timed("boot", self.box.boot)
        self.box.run("mkdir", "-p", "/etc/systemd/system/ingestd.service.d")
        self.box.run("sh", "-c", "cat > /etc/systemd/system/ingestd.service.d/test-watchdog.conf",
                     input=WATCHDOG_DROPIN)
        self.doc = test_settings(self.src, self.sim.url, self.mongo_uri, self.database,
                                 self.metrics_port)
        self._timed("README install", lambda: install(
            self.box_, self.src / "README.md", yaml.safe_dump(self.doc, sort_keys=False), CREDS))
        return self

    def stop(self) -> None:
        if self.box is not None:
            self.box.poweroff()
        self.sim.stop()

    def _timed(self, name: str, step: Any) -> None:
        started = time.monotonic()
        step()
        self.timings[name] = time.monotonic() - started

    @property
    def box_(self) -> Container:
        assert self.box is not None, "container not booted"
        return self.box

    # -- the unit ----------------------------------------------------------------------------

    def show(self, *props: str) -> dict[str, str]:
        return self.box_.show(UNIT, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def journal(self) -> str:
        # The template's instances too (tests/systemd/instances.py), once they exist.
        return (self.box_.journal(UNIT, f"{UNIT}@*") if self.box is not None
                else "(no container)")

    def write_settings(self, text: str) -> None:
        """Replace /etc/ingestd/settings.yaml in one rename, as root in the container."""
        tmp = f"{CONFIG}.new"
        self.box_.run("sh", "-c", f"umask 022; cat > {tmp} && mv -f {tmp} {CONFIG}", input=text)

    def write_doc(self, doc: dict[str, Any]) -> None:
        self.write_settings(yaml.safe_dump(doc, sort_keys=False))
        self.doc = copy.deepcopy(doc)

    def reload(self) -> tuple[int, str]:
        result = self.box_.systemctl("reload", UNIT, check=False)
        return result.returncode, result.stdout + result.stderr

    def wait_active(self, timeout: float = 60.0) -> dict[str, str]:
        def active() -> dict[str, str]:
            props = self.show("ActiveState", "SubState", "MainPID", "StatusText", "Result")
            if props["ActiveState"] == "failed":
                raise AssertionError(f"unit failed: {props}")
            ok = props["ActiveState"] == "active" and props["SubState"] == "running"
            return props if ok else {}
        return wait_until(active, timeout, "ingestd.service active (running)", interval=0.2)

    # -- the daemon's run state and output ---------------------------------------------------

    def status(self, role: str) -> dict[str, Any]:
        path = self.box_.root / STATE / "run" / f"{role}.json"
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def counters(self, role: str) -> dict[str, Any]:
        return dict(self.status(role).get("counters", {}))

    def run_in_root_shell(self, command: str) -> tuple[int, str]:
        result = self.box_.run(*shlex.split(command), check=False, timeout=60)
        return result.returncode, result.stdout + result.stderr

    def stored_ids(self) -> list[int]:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.mongo_uri, serverSelectionTimeoutMS=10000)
        try:
            return [int(d["_id"]) for d in client[self.database].tweets.find({}, {"_id": 1})]
        finally:
            client.close()

    def wait_stored(self, timeout: float = 60.0) -> set[int]:
        """Until the collection holds every tweet delivered so far, minus the deleted ones."""
        def caught_up() -> set[int]:
            truth = self.sim.ground_truth()
            want = set(truth.tweet_ids()) - set(truth.deleted_ids())
            return want if want and set(self.stored_ids()) == want else set()
        try:
            return wait_until(caught_up, timeout, "every delivered tweet to be stored",
                              interval=0.3)
        except AssertionError as exc:  # say which: a lost tweet and a missed delete differ
            truth = self.sim.ground_truth()
            delivered, deleted = set(truth.tweet_ids()), set(truth.deleted_ids())
            stored = set(self.stored_ids())
            raise AssertionError(
                f"{exc}: {len(delivered)} delivered, {len(deleted)} deleted, {len(stored)} "
                f"stored; missing {sorted(delivered - deleted - stored)[:20]}, extra "
                f"{sorted(stored - (delivered - deleted))[:20]}") from None

    def connections(self) -> list[dict[str, Any]]:
        """The simulator's answered-200 connections, in order."""
        return [c for c in self.sim.ground_truth().connections() if c["status"] == 200]
