"""``ingestd demo``: the whole data path on one machine, then a reconciled report.

Starts the endpoint simulator, a MongoDB (the embedded nx-27017 stand-in unless
``INGESTD_DEMO_MONGO_URI`` points at a real one) and ``ingestd run``; ingests for a while, changes
the keywords with SIGHUP half-way, stops the daemon with SIGTERM, and prints what landed, reconciled
against the simulator's record of what it delivered.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pymongo
import yaml

from ingestd.config.mongo_uri import mask_userinfo
from ingestd.control import runstate
from ingestd.tools.standin import StandIn

DEMO_CREDS = {
    "TWITTER_CONSUMER_KEY": "demoConsumerKey0000000001",
    "TWITTER_CONSUMER_SECRET": "demo-consumer-secret",
    "TWITTER_ACCESS_TOKEN": "1-demoAccessToken",
    "TWITTER_ACCESS_TOKEN_SECRET": "demo-access-token-secret",
}
TRACK_BEFORE = ["iphone", "ipad", "ipod"]
TRACK_AFTER = ["iphone", "ipad", "android"]


# A folder the demo made holds this file: the next demo empties it. Any other folder is the
# user's: `--workdir ~` or `--workdir /var/lib/ingestd` deleted it whole.
DEMO_MARK = ".ingestd-demo"
# What a demo folder held before it was marked (its simulator's log and ground truth).
UNMARKED_DEMO_FILES = ("simulator.log", "truth.jsonl")


class WorkdirRefused(Exception):
    """``--workdir`` names a folder the demo must not empty, or cannot make."""


def run_demo(seconds: float, workdir: Path) -> int:
    workdir = workdir.resolve()  # settings resolve relative paths against their own folder
    try:
        prepare_workdir(workdir)
    except WorkdirRefused as exc:
        print(f"ingestd demo: {exc}", file=sys.stderr)
        return 2
    env = {**os.environ, **DEMO_CREDS}
    mongo_uri = os.environ.get("INGESTD_DEMO_MONGO_URI")
    standin = None if mongo_uri else StandIn(workdir / "mongo").start()
    mongo_uri = mongo_uri or (standin.uri if standin else "")
    # A given URI may hold a password: the settings name the variable, the output masks it.
    settings_uri = "${INGESTD_DEMO_MONGO_URI}" if not standin else mongo_uri
    step(f"MongoDB: {'embedded stand-in (nx-27017) at ' if standin else ''}"
         f"{mask_userinfo(mongo_uri)}")
    sim = start_simulator(workdir, env)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        port = wait_for_file(workdir / "sim.port", 20.0, sim)
        url = f"http://127.0.0.1:{port}/1.1/statuses/filter.json"
        step(f"simulator: {url} (track/follow/locations filtering, OAuth 1.0a checked)")
        config = write_settings(workdir, url, settings_uri, TRACK_BEFORE)
        with (workdir / "daemon.log").open("wb") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "ingestd", "run", "--config", str(config)],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        step(f"daemon: ingestd run --config {config} (pid {daemon.pid}); logs in "
             f"{workdir / 'daemon.log'}")
        ingest(workdir, config, daemon, settings_uri, url, seconds)
        step("stopping the simulator first: its clean close means every delivered byte is read")
        sim.send_signal(signal.SIGTERM)
        sim.wait(20)
        wait_caught_up(workdir, 30.0)
        step("stopping the daemon with SIGTERM (drains the spool, flushes the last batch)")
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        step(f"daemon exited with {code} after {time.monotonic() - started:.1f}s")
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        if sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
            sim.wait(20)
    try:
        report(workdir, mongo_uri)
    finally:
        if standin is not None:
            standin.stop()
    print_next_steps(config)
    return 0 if code == 0 else 1


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def prepare_workdir(workdir: Path) -> None:
    """An empty folder for this run, marked as the demo's: a previous demo's is emptied, a new
    one made; anything else raises ``WorkdirRefused`` and is left as it is."""
    try:
        if workdir.exists() and not is_empty_dir(workdir):
            if not is_demo_folder(workdir):
                raise WorkdirRefused(
                    f"--workdir {workdir} exists and is not a folder an earlier demo made (no "
                    f"{DEMO_MARK} in it): not emptying it; name a new folder")
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / DEMO_MARK).write_text("made by `ingestd demo`; the next demo empties it\n")
    except OSError as exc:
        raise WorkdirRefused(f"--workdir {workdir}: {exc.strerror or exc}") from None


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def is_demo_folder(path: Path) -> bool:
    """Made by a demo: marked, or (before the mark) holding its simulator's files."""
    if not path.is_dir():
        return False
    return (path / DEMO_MARK).is_file() or all((path / n).is_file() for n in UNMARKED_DEMO_FILES)


def start_simulator(workdir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (workdir / "simulator.log").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ingestd", "simulate", "--port", "0",
             "--port-file", str(workdir / "sim.port"),
             "--ground-truth", str(workdir / "truth.jsonl"),
             "--rate", "150", "--keepalive", "5", "--control-every", "20"],
            env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_file(path: Path, timeout: float, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the simulator did not start; see {path.parent / 'simulator.log'}")
        time.sleep(0.05)
    return path.read_text().strip()


def write_settings(workdir: Path, url: str, mongo_uri: str, track: list[str]) -> Path:
    doc: dict[str, Any] = {
        "stream": {"url": url, "track": track, "read_timeout": 30},
        "auth": {k.lower().removeprefix("twitter_"): f"${{{k}}}" for k in DEMO_CREDS},
        "mongo": {"uri": mongo_uri, "database": "twitter", "collection": "tweets"},
        "writer": {"batch_size": 500, "flush_interval": 0.5},
        "metrics": {"listen": None},
        "logging": {"format": "json"},
        "state_dir": str(workdir / "state"),
    }
    path = workdir / "settings.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)  # never let the daemon read a half-written file
    return path


def ingest(workdir: Path, config: Path, daemon: subprocess.Popen[bytes], settings_uri: str,
           url: str, seconds: float) -> None:
    step(f"ingesting for {seconds:.0f}s; keywords {TRACK_BEFORE}, switching to {TRACK_AFTER} "
         "half-way (SIGHUP)")
    started, reloaded = time.monotonic(), False
    while (elapsed := time.monotonic() - started) < seconds:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited early ({daemon.returncode}); see daemon.log")
        if not reloaded and elapsed >= seconds / 2:
            write_settings(workdir, url, settings_uri, TRACK_AFTER)
            daemon.send_signal(signal.SIGHUP)
            reloaded = True
            print("    SIGHUP sent: new keywords, make-before-break reconnect", flush=True)
        progress(workdir, elapsed)
        time.sleep(1.0)


def progress(workdir: Path, elapsed: float) -> None:
    stream, store = read_run(workdir, "stream"), read_run(workdir, "store")
    received = stream.get("counters", {}).get("received", 0)
    stored = store.get("counters", {}).get("stored", 0)
    print(f"    [{elapsed:4.0f}s] received {received:6d} messages, stored {stored:6d} tweets; "
          f"{stream.get('state', 'starting')}", flush=True)


def read_run(workdir: Path, role: str) -> dict[str, Any]:
    return runstate.read_status(workdir / "state", role) or {}


def wait_caught_up(workdir: Path, timeout: float) -> None:
    """Until the store worker has read every message the stream worker received, and those an
    earlier run left in the spool (``replayed``: a state folder kept from a previous demo)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        received = read_run(workdir, "stream").get("counters", {}).get("received", -1)
        store = read_run(workdir, "store").get("counters", {})
        if received + store.get("replayed", 0) == store.get("records_read", -2):
            return
        time.sleep(0.2)


def ground_truth(path: Path) -> tuple[set[int], Counter[str], set[int]]:
    tweets: set[int] = set()
    controls: Counter[str] = Counter()
    deletes: set[int] = set()
    for line in path.read_bytes().splitlines():
        ev = orjson.loads(line)
        if ev.get("event") == "tweet":
            tweets.add(int(ev["id"]))
        elif ev.get("event") == "control":
            controls[str(ev.get("type"))] += 1
            if ev.get("type") == "delete" and ev.get("id") is not None:
                deletes.add(int(ev["id"]))
    return tweets, controls, deletes


def report(workdir: Path, mongo_uri: str) -> None:
    delivered, controls, deletes = ground_truth(workdir / "truth.jsonl")
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    col = client.twitter.tweets
    stored = {int(d["_id"]) for d in col.find({}, {"_id": 1})}
    store = read_run(workdir, "store")["counters"]
    expected = delivered - deletes
    step("what landed (reconciled against the simulator's ground truth)")
    print(f"    simulator delivered   {len(delivered)} tweets, {sum(controls.values())} control "
          f"messages {dict(controls)}")
    print(f"    stored in MongoDB     {len(stored)} tweets (twitter.tweets)")
    print(f"    deleted on request    {len(delivered & deletes)} tweets removed by delete notices")
    print(f"    duplicates absorbed   {store.get('duplicates', 0)}")
    print(f"    dead-lettered         {sum(dict(store.get('deadlettered', {})).values())}")
    missing, unexpected = len(expected - stored), len(stored - expected)
    print(f"    missing               {missing}   unexpected {unexpected}")
    step("example queries (more in docs/cookbook.md, for a real MongoDB: the stand-in evaluates "
         "only some)")
    per_term = col.aggregate([{"$unwind": "$_ingest.matched.track"},
                              {"$group": {"_id": "$_ingest.matched.track", "n": {"$sum": 1}}},
                              {"$sort": {"n": -1}}])
    print("    tweets per keyword:  " + ", ".join(f"{d['_id']}={d['n']}" for d in per_term))
    per_minute = col.aggregate([
        {"$group": {"_id": {"$dateToString": {"format": "%H:%M",
                                              "date": "$_ingest.received_at"}},
                    "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}])
    minutes = ", ".join(f"{d['_id']}={d['n']}" for d in per_minute)
    print(f"    stored per minute:   {minutes} (UTC, by time received)")
    langs = col.aggregate([{"$group": {"_id": "$lang", "n": {"$sum": 1}}}, {"$sort": {"n": -1}},
                           {"$limit": 5}])
    print("    top languages:       " + ", ".join(f"{d['_id']}={d['n']}" for d in langs))
    client.close()


def print_next_steps(config: Path) -> None:
    step("next steps")
    print(f"""    The settings used are in {config}. To run against a real endpoint and MongoDB:
      1. copy settings.yaml from the repository, set stream.url to the endpoint (https only),
         your keywords, and mongo.uri to your MongoDB;
      2. export TWITTER_CONSUMER_KEY, TWITTER_CONSUMER_SECRET, TWITTER_ACCESS_TOKEN and
         TWITTER_ACCESS_TOKEN_SECRET (or use systemd credentials: see the README);
      3. ingestd check --config settings.yaml --online
      4. ingestd run --config settings.yaml""")
