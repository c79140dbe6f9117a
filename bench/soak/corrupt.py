"""Proof 3: ``SOAK_CORRUPTIONS`` (1000) random spool corruptions, each recovered and reconciled.

Each round builds a spool with the real ``SpoolWriter`` (small segments, payloads that hold the
record magic so resynchronising is exercised), acks a random prefix with the real ``SpoolReader``,
then damages it: byte flips, a truncated segment, a run of zeros, a lost checkpoint, a garbage
checkpoint, a checkpoint pointing inside a record or past the end, a checkpoint moved ahead with
its seq unchanged, or flips plus a lost checkpoint. Recovery is what a daemon start does: a new
``SpoolWriter`` appends fresh records, a new ``SpoolReader`` reads everything. Per round:

    unacked records written == recovered + damaged (counted by the reader)

where "damaged" is decided by an oracle that compares the bytes before and after (a record is
damaged if one of its bytes changed or was cut off). A missing record the oracle calls intact, a
damaged record missing while the reader counted nothing, garbage returned, or an exception is a
problem. Every ``SOAK_DAEMON_EVERY``-th round (20) the same kind of damage is applied to a spool
written by the real daemon, and the real daemon is restarted on it and reconciled with MongoDB.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pymongo

from bench.soak.common import (
    Daemon,
    SimProcess,
    Summary,
    env_int,
    say,
    soak_doc,
    stored_ids,
    wait_until,
)
from ingestd.spool.format import (
    CHECKPOINT,
    HEADER_SIZE,
    KIND_MESSAGE,
    MAGIC,
    PREFIX_SIZE,
    list_segments,
    read_checkpoint,
)
from ingestd.spool.reader import SpoolReader
from ingestd.spool.writer import SpoolWriter
from ingestd.tools.standin import StandIn

BIG = 10**9
KINDS = ("flip", "truncate", "zeros", "ckpt_lost", "ckpt_garbage", "ckpt_bad_offset",
         "ckpt_skip_ahead", "flip+ckpt_lost")


@dataclass(frozen=True)
class OnDisk:
    """One record as parsed by this oracle (independently of ingestd.spool)."""

    segment: str
    offset: int
    end: int
    seq: int
    payload: bytes
    kind: int = KIND_MESSAGE  # the daemon's spool also holds coverage markers (KIND_EVENT)


def scan(spool: Path) -> list[OnDisk]:
    out = []
    for name in list_segments(spool):
        data = (spool / name).read_bytes()
        pos = 0
        while pos + HEADER_SIZE <= len(data):
            magic, length, _ = struct.unpack_from("<4sII", data, pos)
            assert magic == MAGIC, f"undamaged spool has garbage at {name}:{pos}"
            seq = struct.unpack_from("<Q", data, pos + PREFIX_SIZE)[0]
            kind = data[pos + HEADER_SIZE - 1]  # the header's last byte
            end = pos + PREFIX_SIZE + length
            out.append(OnDisk(name, pos, end, seq, data[pos + HEADER_SIZE:end], kind))
            pos = end
    return out


# ---------------------------------------------------------------- damage


@dataclass
class Damage:
    kind: str
    changed: dict[str, set[int]] = field(default_factory=dict)  # segment → byte offsets
    cut: dict[str, int] = field(default_factory=dict)  # segment → new length
    detail: str = ""

    def hits(self, r: OnDisk) -> bool:
        if r.segment in self.cut and r.end > self.cut[r.segment]:
            return True
        return any(r.offset <= p < r.end for p in self.changed.get(r.segment, ()))


def damage(spool: Path, records: list[OnDisk], kind: str, rng: random.Random) -> Damage:
    d = Damage(kind)
    segments = [s for s in list_segments(spool) if (spool / s).stat().st_size > 0]
    for part in kind.split("+"):
        if part == "flip":
            for _ in range(rng.randint(1, 3)):
                _flip(spool, rng.choice(segments), rng, d)
        elif part == "truncate":
            name = rng.choice(segments)
            size = (spool / name).stat().st_size
            d.cut[name] = rng.randrange(0, size)
            os.truncate(spool / name, d.cut[name])
            d.detail = f"{name}:{d.cut[name]}/{size}"
        elif part == "zeros":
            name = rng.choice(segments)
            raw = bytearray((spool / name).read_bytes())
            start = rng.randrange(len(raw))
            end = min(len(raw), start + rng.randint(1, 200))
            changed = {i for i in range(start, end) if raw[i]}
            raw[start:end] = bytes(end - start)
            (spool / name).write_bytes(raw)
            d.changed.setdefault(name, set()).update(changed)
        else:
            _checkpoint(spool, records, part, rng, d)
    return d


def _flip(spool: Path, name: str, rng: random.Random, d: Damage) -> None:
    raw = bytearray((spool / name).read_bytes())
    pos = rng.randrange(len(raw))
    raw[pos] ^= 1 << rng.randrange(8)
    (spool / name).write_bytes(raw)
    d.changed.setdefault(name, set()).add(pos)


def _checkpoint(spool: Path, records: list[OnDisk], part: str, rng: random.Random,
                d: Damage) -> None:
    path = spool / CHECKPOINT
    ckpt = read_checkpoint(spool)
    if part == "ckpt_lost":
        path.unlink(missing_ok=True)
    elif part == "ckpt_garbage":
        path.write_bytes(rng.randbytes(rng.randint(0, 80)))
    elif part == "ckpt_bad_offset":
        seg = ckpt.segment if ckpt else rng.choice(records).segment
        size = (spool / seg).stat().st_size
        offset = rng.choice([size + rng.randint(1, 5000), rng.randrange(1, max(2, size))])
        seq = ckpt.seq if ckpt else 0
        path.write_bytes(orjson.dumps({"seq": seq, "segment": seg, "offset": offset}))
        d.detail = f"offset {offset} of {size}"
    elif part == "ckpt_skip_ahead":
        # A plausible checkpoint (a record boundary further on) whose seq was not moved with it.
        later = [r for r in records if ckpt is None or r.seq > ckpt.seq + 1]
        if later:
            r = rng.choice(later)
            seq = ckpt.seq if ckpt else 0
            path.write_bytes(orjson.dumps({"seq": seq, "segment": r.segment, "offset": r.offset}))
            d.detail = f"ahead to seq {r.seq} (checkpoint seq {seq})"


# ---------------------------------------------------------------- one in-process round


@dataclass
class Round:
    kind: str
    written: int = 0  # unacked records written before the damage
    recovered: int = 0
    damaged: int = 0  # unacked records the oracle calls damaged
    replayed: int = 0
    corrupt_records: int = 0
    missing: int = 0  # record numbers the reader counted as skipped (``missing_records``)
    corrupt_bytes: int = 0
    resets: int = 0
    crashed: bool = False  # an exception in process, or the daemon exited non-zero
    restarted: bool = False  # the supervisor restarted a worker during a daemon round
    problems: list[str] = field(default_factory=list)


def payload(tag: str, i: int, rng: random.Random) -> bytes:
    body = orjson.dumps({"id": i, "tag": tag, "text": "x" * rng.randint(10, 300)})
    return body + (MAGIC if rng.random() < 0.2 else b"")  # a magic inside a payload: resync


def build(spool: Path, rng: random.Random, n: int) -> tuple[dict[bytes, int], int]:
    """A spool of ``n`` records, a random prefix acked; (payload → seq, acked seq)."""
    writer = SpoolWriter(spool, segment_bytes=rng.choice([1024, 2048, 4096]), max_bytes=BIG,
                         max_records=BIG)
    seqs: dict[bytes, int] = {}
    i = 0
    while i < n:
        group = [payload("old", i + k, rng) for k in range(min(rng.randint(1, 5), n - i))]
        last = writer.append([(KIND_MESSAGE, p) for p in group], 1, 1, time.time_ns())
        seqs.update({p: last - len(group) + 1 + k for k, p in enumerate(group)})
        i += len(group)
    writer.close()
    reader = SpoolReader(spool, checkpoint_interval=0)
    take = rng.randint(0, n)
    got: list[Any] = []
    while len(got) < take and (chunk := reader.read(take - len(got), BIG)):
        got.extend(chunk)
    if got:
        reader.ack(got[-1])
    reader.close()
    return seqs, (got[-1].seq if got else 0)


def in_process_round(spool: Path, rng: random.Random, kind: str) -> Round:
    rnd = Round(kind)
    seqs, acked = build(spool, rng, rng.randint(20, 120))
    on_disk = scan(spool)
    d = damage(spool, on_disk, kind, rng)
    fresh = [payload("new", 10_000 + k, rng) for k in range(rng.randint(1, 10))]
    try:
        writer = SpoolWriter(spool, segment_bytes=4096, max_bytes=BIG, max_records=BIG)
        writer.append([(KIND_MESSAGE, p) for p in fresh], 2, 1, time.time_ns())
        writer.close()
        reader = SpoolReader(spool)
        got = []
        while chunk := reader.read(1000, BIG):
            got.extend(chunk)
            reader.ack(chunk[-1])
        reader.close()
    except Exception:  # a crash is the finding: report it with its traceback
        rnd.crashed = True
        rnd.problems.append(f"{kind}: exception {traceback.format_exc(limit=3)}")
        return rnd
    reconcile_round(rnd, d, on_disk, seqs, acked, fresh, got, reader)
    return rnd


def reconcile_round(rnd: Round, d: Damage, on_disk: list[OnDisk], seqs: dict[bytes, int],
                    acked: int, fresh: list[bytes], got: list[Any], reader: SpoolReader) -> None:
    returned = Counter(r.payload for r in got)
    unacked = [r for r in on_disk if r.seq > acked]
    rnd.written = len(unacked)
    rnd.recovered = sum(1 for r in unacked if r.payload in returned)
    rnd.damaged = sum(1 for r in unacked if d.hits(r))
    rnd.replayed = sum(1 for r in on_disk if r.seq <= acked and r.payload in returned)
    rnd.corrupt_records, rnd.corrupt_bytes = reader.corrupt_records, reader.corrupt_bytes
    rnd.missing = reader.missing_records
    rnd.resets = reader.checkpoint_resets
    known = set(seqs) | set(fresh)
    where = f"{rnd.kind} {d.detail}".strip()
    if any(p not in known for p in returned):
        rnd.problems.append(f"{where}: the reader returned a record that was never written")
    if any(n > 1 for n in returned.values()):
        rnd.problems.append(f"{where}: a record returned twice in one pass")
    intact_missing = [r.seq for r in unacked if r.payload not in returned and not d.hits(r)]
    if intact_missing:
        rnd.problems.append(f"{where}: {len(intact_missing)} intact unacked records never read "
                            f"(silent loss), seqs {intact_missing[:5]}")
    missing = rnd.written - rnd.recovered
    if missing and not (reader.corrupt_records or reader.missing_records):
        rnd.problems.append(f"{where}: {missing} unacked records missing, nothing counted")
    # Every record lost is a number skipped: exactly, while the checkpoint says what was stored;
    # without it, a lost record already stored counts too (the reader cannot know it was).
    exact = "ckpt_lost" not in rnd.kind
    if rnd.missing < missing or (exact and rnd.missing != missing):
        rnd.problems.append(f"{where}: {missing} unacked records lost, {rnd.missing} counted "
                            "missing")
    if any(p not in returned for p in fresh):
        rnd.problems.append(f"{where}: records appended after the damage were not read")


# ---------------------------------------------------------------- through the real daemon


class DaemonRounds:
    """A spool written by the real daemon (150 tweets stored, 150 spooled while MongoDB was
    unreachable), copied, damaged, and replayed by a fresh daemon into a fresh database that
    already holds the stored 150 (as production's collection would)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.standin = StandIn(work / "mongo").start()
        self.sim = SimProcess(work / "sim", "--rate", "0", "--max-tweets", "150",
                              "--control-every", "0", "--keepalive", "1", "--seed", "8").start()
        self.base = work / "base-spool"
        self.rounds = 0
        self.acked_ids: set[int] = set()

    def close(self) -> None:
        self.sim.stop()
        self.standin.stop()

    def prepare(self) -> None:
        doc = soak_doc(self.sim, self.standin.uri, "corrupt_base")
        doc["control"]["stop_timeout"] = 10
        daemon = Daemon(self.work / "base-daemon", doc)
        try:
            daemon.start().wait_ready(120)
            wait_until(lambda: daemon.counters("store").get("stored", 0) == 150, 120, "150 stored")
            assert daemon.stop()[0] == 0
            self.acked_ids = set(stored_ids(self.standin.uri, "corrupt_base"))
            daemon.doc["mongo"]["uri"] = "mongodb://127.0.0.1:9"  # discard port: unreachable
            daemon.write_settings(daemon.doc)
            daemon.start().wait_ready(120)
            wait_until(lambda: daemon.counters("stream").get("received") == 150, 120,
                       "150 spooled")
            daemon.stop()  # MongoDB unreachable: the store worker may have to be killed (exit 1)
        finally:
            daemon.kill()
        shutil.copytree(daemon.state_dir / "spool", self.base)
        # The replays get a simulator that sends no tweet: MongoDB then holds spool contents only.
        self.sim.stop()
        self.sim = SimProcess(self.work / "idle-sim", "--rate", "0", "--max-tweets", "0",
                              "--control-every", "0", "--keepalive", "1").start()

    def round(self, kind: str, rng: random.Random) -> Round:
        self.rounds += 1
        rnd = Round(f"daemon:{kind}")
        work = self.work / f"round-{self.rounds}"
        spool = work / "state" / "spool"
        shutil.copytree(self.base, spool)
        on_disk = scan(spool)
        acked = ckpt.seq if (ckpt := read_checkpoint(spool)) else 0
        d = damage(spool, on_disk, kind, rng)
        db = f"corrupt_{self.rounds}"
        self._preload(db)
        doc = soak_doc(self.sim, self.standin.uri, db)
        doc["state_dir"] = str(work / "state")
        daemon = Daemon(work, doc)
        try:
            daemon.start().wait_ready(120)
            first = wait_until(lambda: self._settled(daemon), 120, "the replay", 0.2)
            # Damage at the end of the spool is counted once the reader sees the segment sealed:
            # take the figures from a status published a second after the replay went idle.
            store = wait_until(lambda: self._settled(daemon, after=first["_time"] + 1.0), 60,
                               "a later status", 0.2)
            restarts = daemon.status("supervisor").get("restarts", {})
            code, _ = daemon.stop()
        finally:
            daemon.kill()
        self._reconcile(rnd, d, on_disk, acked, db, store, code, restarts)
        if not rnd.problems:  # a round with a problem keeps its spool and daemon log
            shutil.rmtree(work, ignore_errors=True)
        return rnd

    def _preload(self, db: str) -> None:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(self.standin.uri)
        try:
            client[db].tweets.insert_many([{"_id": i} for i in sorted(self.acked_ids)])
        finally:
            client.close()

    @staticmethod
    def _settled(daemon: Daemon, after: float = 0.0) -> dict[str, Any] | None:
        """The store counters once the replay is idle, from a status newer than ``after``."""
        daemon.assert_running()
        stream, status = daemon.status("stream"), daemon.status("store")
        store = dict(status.get("counters", {}))
        idle = store.get("pending") == 0 and stream.get("spool", {}).get("records") == 0
        fresh = float(status.get("time", 0)) > after
        return {**store, "_time": status["time"]} if idle and fresh and store.get(
            "records_read", 0) > 0 else None

    def _reconcile(self, rnd: Round, d: Damage, on_disk: list[OnDisk], acked: int, db: str,
                   store: dict[str, Any], code: int, restarts: dict[str, int]) -> None:
        ids = stored_ids(self.standin.uri, db)
        # Tweets only: a coverage marker is no document (its damage is counted all the same).
        tweets = [r for r in on_disk if r.kind == KIND_MESSAGE]
        tweet = {r.seq: int(orjson.loads(r.payload)["id"]) for r in tweets}
        unacked = [r for r in tweets if r.seq > acked]
        new = set(ids) - self.acked_ids
        rnd.written = len(unacked)
        rnd.recovered = sum(1 for r in unacked if tweet[r.seq] in new)
        rnd.damaged = sum(1 for r in unacked if d.hits(r))
        rnd.replayed = int(store.get("duplicates", 0))
        rnd.corrupt_records = int(store.get("spool_corrupt_records", 0))
        rnd.missing = int(store.get("spool_missing_records", 0))
        rnd.corrupt_bytes = int(store.get("spool_corrupt_bytes", 0))
        rnd.resets = int(store.get("spool_checkpoint_resets", 0))
        where = f"{rnd.kind} {d.detail}".strip()
        rnd.crashed, rnd.restarted = code != 0, any(restarts.values())
        if rnd.crashed or rnd.restarted:
            rnd.problems.append(f"{where}: exit {code}, worker restarts {restarts}")
        if len(ids) != len(set(ids)):
            rnd.problems.append(f"{where}: {len(ids) - len(set(ids))} ids stored twice")
        unknown = set(ids) - self.acked_ids - set(tweet.values())
        if unknown:
            rnd.problems.append(f"{where}: {len(unknown)} ids in MongoDB never spooled")
        lost = [r.seq for r in unacked if tweet[r.seq] not in new and not d.hits(r)]
        if lost:
            rnd.problems.append(f"{where}: {len(lost)} intact unacked tweets not stored {lost[:5]}")
        deadlettered = sum(dict(store.get("deadlettered", {})).values())
        missing = rnd.written - rnd.recovered
        if missing and not (rnd.corrupt_records or rnd.missing or deadlettered):
            rnd.problems.append(f"{where}: {missing} tweets missing, nothing counted")
        if rnd.missing < missing:  # (the count may include coverage markers: not tweets)
            rnd.problems.append(f"{where}: {missing} tweets lost, {rnd.missing} counted missing")


# ---------------------------------------------------------------- the proof


def run(work: Path) -> Summary:
    n = env_int("SOAK_CORRUPTIONS", 1000)
    every = env_int("SOAK_DAEMON_EVERY", 20)
    seed = env_int("SOAK_SEED", int(time.time()) % 100000)
    say(f"[corrupt] {n} corruptions, every {every}th through the daemon, seed {seed}")
    rng = random.Random(seed)
    summary = Summary("corrupt", extra={"rounds": n, "seed": seed})
    daemon_rounds = DaemonRounds(work / "daemon")
    rounds: list[Round] = []
    try:
        daemon_rounds.prepare()
        for i in range(1, n + 1):
            kind = KINDS[(i - 1) % len(KINDS)]
            if every and i % every == 0:
                # Kinds in turn among the daemon rounds too (``every`` may be a multiple of 8).
                kind = KINDS[daemon_rounds.rounds % len(KINDS)]
                rounds.append(daemon_rounds.round(kind, rng))
            else:
                spool = work / "spool"
                shutil.rmtree(spool, ignore_errors=True)
                rounds.append(in_process_round(spool, rng, kind))
            for p in rounds[-1].problems:
                say(f"[corrupt] round {i} PROBLEM {p}")
            if i % 50 == 0:
                say(f"[corrupt] {i}/{n} rounds, problems so far "
                    f"{sum(len(r.problems) for r in rounds)}")
    finally:
        daemon_rounds.close()
    tabulate(summary, rounds)
    return summary


def tabulate(summary: Summary, rounds: list[Round]) -> None:
    rows: dict[str, list[Round]] = {}
    for r in rounds:
        rows.setdefault(r.kind, []).append(r)
    lines = ["| kind | rounds | unacked written | recovered | damaged (counted) | replayed | "
             "counted missing | corrupt regions | corrupt bytes | checkpoint resets | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in sorted(rows):
        rs = rows[kind]
        lines.append(f"| {kind} | {len(rs)} | {sum(r.written for r in rs)} | "
                     f"{sum(r.recovered for r in rs)} | {sum(r.damaged for r in rs)} | "
                     f"{sum(r.replayed for r in rs)} | {sum(r.missing for r in rs)} | "
                     f"{sum(r.corrupt_records for r in rs)} | "
                     f"{sum(r.corrupt_bytes for r in rs)} | {sum(r.resets for r in rs)} | "
                     f"{sum(len(r.problems) for r in rs)} |")
    summary.extra["per kind"] = "\n" + "\n".join(lines)
    written = sum(r.written for r in rounds)
    recovered = sum(r.recovered for r in rounds)
    summary.delivered, summary.stored = written, recovered
    summary.duplicates = sum(r.replayed for r in rounds)
    summary.dropped = written - recovered  # damaged records, skipped and counted
    summary.lost = sum(1 for r in rounds for p in r.problems if "silent" in p or "nothing" in p)
    crashed = sum(r.crashed for r in rounds)
    restarted = sum(r.restarted for r in rounds)
    summary.restarts = f"{crashed} crashes, {restarted} rounds with restarted workers"
    summary.extra["columns"] = ("delivered = unacked records written; stored = recovered; "
                                "dropped = damaged records skipped and counted; duplicates = "
                                "acked records replayed; lost = rounds with an uncounted loss")
    for r in rounds:
        summary.problems.extend(r.problems)
