"""The standby lease (``ha.mode: standby``): one document in MongoDB names the instance that may
open the stream; the others wait and take over when its holder stops renewing.

MongoDB supplies the guarantees: every change is a conditional update (compare-and-set on the
holder and an integer ``term``/``renew`` pair) acknowledged by a majority, so two instances can
never both believe they won the same term. Time is never compared across machines, nor read
from a date stored in the document: as in Kubernetes' client-go leader election,

- a standby considers the lease expired when its ``(holder, term, renew)`` has not changed for
  ``lease_seconds`` of the standby's own monotonic clock, counted from the moment a read
  returned that value (so after the holder wrote it);
- the holder considers itself active only until the start of its last successful renewal +
  ``lease_seconds`` - ``margin``: earlier than any standby can take over.

The document also names the holder's ``site`` (host name and state folder): a holder that is this
instance's own name at this site is this instance's previous process (restarted), whose lease is
taken back at once; the same name at another site is a second instance configured with the same
``ha.instance`` (a copied settings file), which is waited for like any holder and reported
(``LeaseView.conflict``), never taken back at once: the two would log each other out for good.

Loaded by the stream worker in standby mode only (it brings pymongo in).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pymongo
import structlog
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from ingestd.config.schema import HaSettings, MongoSettings

log = structlog.get_logger("ingestd.lease")

Document = dict[str, Any]

RELEASE_TIMEOUT = 1.0  # seconds a clean stop spends releasing the lease at most
EXPIRY_LOOK_MIN = 0.05  # s: the shortest wait before a look at an expiring lease (no busy loop)


def renew_interval(lease_seconds: float) -> float:
    """Renew (or look) five times per lease, at most once a second."""
    return min(1.0, lease_seconds / 5)


# A standby sees the holder's renewals at most this late, so it takes over at most this much
# later than the lease's expiry (the endpoint's first reconnect back-off is 0.25 s as well).
WATCH_INTERVAL = 0.25


def margin(lease_seconds: float) -> float:
    """How much earlier than a standby could take over the holder stops streaming: covers the
    stream loop's reaction time (its tick, a stand-down's drain) and clock-rate differences."""
    return lease_seconds / 5


@dataclass(frozen=True)
class Takeover:
    """This instance won the lease from another holder: one it watched hold it (expired, or
    released while this one stood by), or one that had released it before this instance first
    looked (``free_since``: a pair restarted after a full stop; no takeover, nobody was
    deposed, but the pair's gap since that holder's last message is the same)."""

    previous_holder: str | None
    last_recv_ns: int  # the previous holder's last received message (wall clock), 0 if unknown
    lease_age: float  # seconds the previous holder's lease went unrenewed, as seen here
    # Found released at this instance's first look: when (wall clock, s: MongoDB's time of the
    # release; None for a lease released before releases were dated).
    free_since: float | None = None
    found_free: bool = False
    released: bool = False  # the previous holder released it (a clean stop), not let it expire
    # The previous holder's wall clock at its last renewal (ns, 0 if unknown): against this
    # host's time of seeing that renewal (``lease_age`` ago), how far apart the clocks are.
    renewed_ns: int = 0

    @property
    def counted(self) -> bool:
        """A takeover proper (``takeovers``, ``ha_takeover``): not a free lease picked up."""
        return not self.found_free


@dataclass
class LeaseView:
    """What status and metrics show; a copy, safe to hand to another thread."""

    role: str = "standby"
    holder: str | None = None
    term: int = 0
    takeovers: int = 0
    renew_failures: int = 0
    last_error: str | None = None
    # Set at a stop (role "released" if it held the lease, else "stopped"; holder None): wall
    # clock of the release, and the holder last seen before it (this instance if the active).
    released_at: float | None = None
    last_holder: str | None = None
    # Another process holds the lease under this instance's own name (``ha.instance`` is not
    # unique): what ``ingestd status`` says (degraded) while it lasts.
    conflict: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class LeaseElector:
    """One compare-and-set step per call: renew our lease, or watch the holder's and take it
    when it expires. Not thread-safe: one thread calls ``step``; others read ``valid_until``."""

    def __init__(self, coll: Collection[Document], key: str, instance: str,
                 lease_seconds: float, clock: Callable[[], float] = time.monotonic,
                 site: str = "") -> None:
        self.coll, self.key, self.instance = coll, key, instance
        self.site = site  # where this instance runs (host:state folder; see the module doc)
        self.lease_seconds, self.clock = lease_seconds, clock
        self.term: int | None = None  # ours while we hold the lease
        self.valid_until = 0.0  # monotonic; we may stream before it
        self.observed: tuple[Any, ...] | None = None  # (holder, term, renew) last seen
        self.observed_at = 0.0
        self.view = LeaseView()
        self.takeovers: list[Takeover] = []  # consumed by the stream loop
        # Whether a live holder (not a released lease) was ever seen: a lease found released at
        # the first look is acquired, not taken over.
        self.saw_holder = False
        # A takeover tried and not known to have failed: if its reply was lost, the next step
        # finds the lease ours and completes it, still reporting the previous holder.
        self._attempt: Takeover | None = None

    def may_stream(self) -> bool:
        return self.clock() < self.valid_until

    def expires_in(self) -> float | None:
        """Watching another holder's lease: seconds until it expires unless it changes before
        (None while we hold it or have not read it yet)."""
        if self.term is not None or self.observed is None:
            return None
        return self.observed_at + self.lease_seconds - self.clock()

    def step(self, last_recv_ns: int) -> None:
        try:
            if self.term is not None:
                self._renew(last_recv_ns)
            else:
                self._watch(last_recv_ns)
        except PyMongoError as exc:
            self.view.renew_failures += 1
            self.view.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("lease_step_failed", holding=self.term is not None,
                        error=self.view.last_error,
                        valid_for=round(max(self.valid_until - self.clock(), 0.0), 3))
            return
        self.view.last_error = None

    def release(self) -> None:
        """Give the lease up at a clean stop, so a standby takes over at once. The view says so
        from here on: a stopped instance's last status must not call it the holder."""
        self.valid_until = 0.0
        self._stopped_view()
        if self.term is None:
            return
        try:
            with pymongo.timeout(RELEASE_TIMEOUT):  # the stop budget is the store drain's
                self.coll.update_one(
                    {"_id": self.key, "holder": self.instance, "term": self.term},
                    {"$set": {"holder": None, "released_by": self.instance},
                     "$inc": {"renew": 1}, "$currentDate": {"released_at": True}})
            log.info("lease_released", term=self.term)
        except PyMongoError as exc:
            log.warning("lease_release_failed", error=str(exc)[:300],
                        effect="a standby takes over once the lease expires")
            self.view.last_error = f"release: {type(exc).__name__}: {exc}"[:300]
        self.term = None

    def _stopped_view(self) -> None:
        """Stopping: no longer a holder nor a standby, whatever the release's outcome (a
        failed one lapses within the lease)."""
        held = self.term is not None
        last = self.instance if held else self.view.holder
        self.view.role = "released" if held else "stopped"
        self.view.holder, self.view.term, self.view.last_holder = None, 0, last
        self.view.released_at = time.time() if held else None

    # -- holding ---------------------------------------------------------------------------

    def _renew(self, last_recv_ns: int) -> None:
        start = self.clock()
        doc = self.coll.find_one_and_update(
            {"_id": self.key, "holder": self.instance, "term": self.term},
            {"$inc": {"renew": 1}, "$set": {"last_recv_ns": last_recv_ns,
                                            "renewed_ns": time.time_ns()},
             "$currentDate": {"renewed_at": True}},
            return_document=ReturnDocument.AFTER)
        if doc is None:
            self._lost()
            return
        self.valid_until = start + self.lease_seconds - margin(self.lease_seconds)

    def _lost(self) -> None:
        self.valid_until = 0.0
        doc = self.coll.find_one({"_id": self.key})
        holder = doc.get("holder") if doc else None
        log.warning("lease_lost", term=self.term, holder=holder,
                    action="stream closed; the spool keeps draining into MongoDB")
        self.term, self.observed = None, None
        self._set_view("standby", holder, _term(doc) if doc else 0)

    # -- watching --------------------------------------------------------------------------

    def _watch(self, last_recv_ns: int) -> None:
        doc = self.coll.find_one({"_id": self.key})
        now = self.clock()  # after the read returned: the value seen was written before now
        if doc is None:
            self._create(now, last_recv_ns)
            return
        seen = (doc.get("holder"), doc.get("term"), doc.get("renew"))
        if seen != self.observed:
            self.observed, self.observed_at = seen, now
        holder = doc.get("holder")
        if holder is not None and not self._mine(doc):
            self.saw_holder = True
        self._set_view("standby", holder, _term(doc))  # the holder's term, as last seen
        self._note_conflict(doc if holder == self.instance and not self._mine(doc) else None)
        free = holder is None or self._mine(doc)  # released, or ours from a past run
        if free or now - self.observed_at >= self.lease_seconds:
            self._take(doc, now - self.observed_at, last_recv_ns)

    def _mine(self, doc: Mapping[str, Any]) -> bool:
        """Held (or released) under this instance's name at this site: by this very instance,
        or its previous process. (A lease written before sites were recorded has none.)"""
        named = doc.get("holder") or doc.get("released_by")
        return named == self.instance and doc.get("site") in (None, "", self.site)

    def _note_conflict(self, doc: Mapping[str, Any] | None) -> None:
        """Report (once per episode) another process holding the lease under our own name."""
        if doc is None:
            if self.view.conflict is not None:
                log.info("ha_instance_conflict_over", instance=self.instance)
            self.view.conflict = None
            return
        if self.view.conflict is None:
            log.error("ha_instance_conflict", instance=self.instance, site=self.site,
                      other_site=doc.get("site"),
                      action="standing by until that process's lease expires; give every "
                      "instance of the pair its own ha.instance")
        self.view.conflict = (f"ha.instance {self.instance!r} is also used by the lease's "
                              f"holder at {doc.get('site')}; each instance needs its own name")

    def _create(self, now: float, last_recv_ns: int) -> None:
        try:
            self.coll.insert_one({"_id": self.key, "holder": self.instance, "term": 1,
                                  "renew": 0, "last_recv_ns": last_recv_ns,
                                  "renewed_ns": time.time_ns(),
                                  "lease_seconds": self.lease_seconds, "site": self.site})
        except DuplicateKeyError:
            return  # another instance created it first: watch it from the next step
        self._won(1, now)

    def _take(self, doc: Mapping[str, Any], age: float, last_recv_ns: int) -> None:
        start = self.clock()
        term = int(doc.get("term") or 0) + 1
        previous = doc.get("holder") or doc.get("released_by")
        if not self._mine(doc):
            self._attempt = self._takeover(doc, previous, age)
        # else: ours from a past run, or a take whose reply was lost: ``_attempt`` says which
        before = self.coll.find_one_and_update(
            {"_id": self.key, "holder": doc.get("holder"), "term": doc.get("term"),
             "renew": doc.get("renew")},
            {"$set": {"holder": self.instance, "term": term, "renew": 0,
                      "last_recv_ns": last_recv_ns, "renewed_ns": time.time_ns(),
                      "previous_holder": doc.get("holder"),
                      "lease_seconds": self.lease_seconds, "site": self.site},
             "$currentDate": {"renewed_at": True}},
            return_document=ReturnDocument.BEFORE)
        attempt, self._attempt = self._attempt, None
        if before is None:
            return  # someone renewed or took it meanwhile
        self._won(term, start)
        if attempt is not None:
            self.view.takeovers += attempt.counted
            self.takeovers.append(attempt)

    def _takeover(self, doc: Mapping[str, Any], previous: str | None, age: float) -> Takeover:
        last_recv_ns = int(doc.get("last_recv_ns") or 0)
        released = doc.get("holder") is None
        if not released or self.saw_holder:
            return Takeover(previous, last_recv_ns, round(age, 3), released=released,
                            renewed_ns=_int(doc.get("renewed_ns")))
        at = doc.get("released_at")  # MongoDB's clock, as is "renewed_at"
        since = at.timestamp() if isinstance(at, datetime) else None
        return Takeover(previous, last_recv_ns, 0.0, free_since=since, found_free=True,
                        released=True)

    def _won(self, term: int, start: float) -> None:
        self.term, self.saw_holder = term, False
        self._note_conflict(None)
        self.valid_until = start + self.lease_seconds - margin(self.lease_seconds)
        self._set_view("active", self.instance, term)
        log.info("lease_acquired", term=term, instance=self.instance)

    def _set_view(self, role: str, holder: Any, term: int) -> None:
        self.view.role, self.view.term = role, term
        self.view.holder = holder if isinstance(holder, str) else None
        self.view.released_at = self.view.last_holder = None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _term(doc: Mapping[str, Any]) -> int:
    term = doc.get("term")
    return term if isinstance(term, int) and not isinstance(term, bool) else 0


class LeaseKeeper:
    """Runs the elector on its own thread, every ``renew_interval``: a MongoDB round trip never
    blocks the stream loop, and a stuck one only lets the lease lapse (the loop then stops
    streaming by itself, at ``valid_until``)."""

    def __init__(self, elector: LeaseElector, last_recv_ns: Callable[[], int]) -> None:
        self.elector = elector
        self._last_recv_ns = last_recv_ns
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self.interval = renew_interval(elector.lease_seconds)
        # A stand-down may read on for this long: well inside the margin, so the stream is
        # closed before any standby may take over.
        self.drain_budget = min(margin(elector.lease_seconds) / 2, 0.5)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def may_stream(self) -> bool:
        return self.elector.may_stream()

    def take_takeovers(self) -> list[Takeover]:
        """Takeovers since the last call (list swap: atomic under the GIL)."""
        taken, self.elector.takeovers = self.elector.takeovers, []
        return taken

    def view(self) -> dict[str, Any]:
        return self.elector.view.as_dict()

    def close(self) -> None:
        """Stop the thread, then release the lease (the stream is already closed)."""
        self._stop.set()
        self._thread.join(timeout=RELEASE_TIMEOUT)
        if not self._thread.is_alive():
            self.elector.release()
        else:  # a stuck step: no release (the lease lapses), but the view must not say holder
            self.elector.valid_until = 0.0
        self.elector.coll.database.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.elector.step(self._last_recv_ns())
            except Exception as exc:  # e.g. a hand-edited lease document; never end the thread
                self.elector.view.renew_failures += 1
                self.elector.view.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.error("lease_step_crashed", error=self.elector.view.last_error,
                          action="not streaming until a lease step succeeds")
            self._stop.wait(self._next_wait(time.monotonic() - started))

    def _next_wait(self, elapsed: float) -> float:
        """Until the next step: the holder renews every ``interval``; a standby looks every
        ``WATCH_INTERVAL``, and again right when the lease it watches expires."""
        expires = self.elector.expires_in()
        if expires is None:
            return max(self.interval - elapsed, 0.0)
        wait = max(min(self.interval, WATCH_INTERVAL) - elapsed, 0.0)
        return min(wait, max(expires, EXPIRY_LOOK_MIN))


def open_lease_collection(mongo: MongoSettings, ha: HaSettings) -> Collection[Document]:
    """The lease collection on a client of its own: majority-acknowledged writes, majority
    reads, and operations bounded well inside the lease. ``connect=False``: an SRV name that
    does not resolve fails a lease operation (this instance stands by), not the worker."""
    client: pymongo.MongoClient[Document] = pymongo.MongoClient(
        mongo.uri.reveal(), connect=False, appname="ingestd-lease", tz_aware=True,
        timeoutMS=max(int(ha.lease_seconds * 1000 / 2), 500))
    return client[mongo.database].get_collection(
        ha.collection, write_concern=WriteConcern("majority"),
        read_concern=pymongo.read_concern.ReadConcern("majority"))


def lease_site(state_dir: Path) -> str:
    """Where an instance runs, as the lease records it: its host and its state folder."""
    return f"{socket.gethostname()}:{state_dir.resolve()}"


def start_lease(mongo: MongoSettings, ha: HaSettings, last_recv_ns: Callable[[], int],
                state_dir: Path) -> LeaseKeeper:
    coll = open_lease_collection(mongo, ha)
    site = lease_site(state_dir)
    elector = LeaseElector(coll, ha.lease_key, ha.instance, ha.lease_seconds, site=site)
    log.info("lease_watch_started", instance=ha.instance, key=ha.lease_key,
             lease_seconds=ha.lease_seconds, collection=ha.collection, site=site)
    return LeaseKeeper(elector, last_recv_ns).start()
