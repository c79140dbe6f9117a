"""The daemon run's counts: each worker's counters plus what its earlier incarnations counted.

A worker publishes its own counters in ``run/<role>.json``, from zero for each process. The
supervisor lives on while workers are restarted: when it reaps one it *carries* that process's
last published counters (``Carried``) and publishes the sum per role in ``run/supervisor.json``
(``"carried"``), with the pids it holds. ``role_totals`` adds them to the running worker's, so the
metrics (the supervisor is the Prometheus target) and ``ingestd status`` keep counting across
worker restarts within one daemon run; a new daemon run starts again from zero.

A crash comes up to 1 s after a worker's last report. The messages a stream worker spooled in
that window are read back from the spool when it is reaped (``unreported_received``: numbered
from the report's ``spool.next_seq``, received after its ``counted_ns``) and carried as received,
so they reconcile. A store worker's successor reads again from the checkpoint on disk, behind or
ahead of the last report: of a store worker the supervisor carries, for the counters of the
identity below, its counts at that checkpoint (``control.settled``), so no record is counted
twice or not at all. Without them (a file that could not be written) it carries the last report,
less the records read but not resolved (``pending``), which its successor counts.

The identity (``reconciliation``; ``ingestd_messages_in_flight`` is the part on its way)::

    received + replayed = stored + duplicates + dead-lettered + control + skipped + dropped
                          + in_flight   (+ spool_missing: records lost to spool damage, if any)

``received`` counts the messages this run framed off the wire (``dropped`` ones included),
``replayed`` the records an earlier run received and left in the spool, read by this run or found
lost to damage. ``spool_missing`` counts every record lost to damage (a record number the reader
skipped), whichever run received it: a lost record of this run's is in ``received``, one of an
earlier run's in ``replayed`` (the store worker counts it there, ``StoreWorker.lost``: the
supervisor's replay boundary, ``REPLAY_ENV``, reaches the spool's ``written`` mark, so the records
cut off its end count too), so either way it is taken off once. Until the reader passes a lost
record, its number is in ``in_flight`` like any record not read yet.

Loaded by the supervisor, the metrics collector and ``ingestd status``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CARRIED_KEY = "carried"  # in run/supervisor.json
# Counter keys of the run files that are not counters (positions, sizes, times): never summed.
NOT_SUMMED = frozenset({"read_seq", "pending", "last_error_at", "last_batch_size",
                        "indexes_missing"})
# The store worker's replay boundary, set by the supervisor for each store worker it starts:
# ``<through>:<counted>``, records numbered up to ``through`` were appended by an earlier daemon
# run; those up to ``counted`` were already counted (as replayed, or lost to damage) by an earlier
# store worker of this run.
REPLAY_ENV = "INGESTD_SPOOL_REPLAY"


def num(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def counts(value: object) -> dict[str, float]:
    """A ``{label: count}`` dict from a run file, ignoring anything malformed."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): num(v) for k, v in value.items()}


def section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``doc[key]`` if it is a mapping, else an empty one (run files are read, never trusted)."""
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def add_counters(base: Mapping[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` + ``more``, key by key: numbers and ``{label: number}`` dicts are summed; other
    values (and the ``NOT_SUMMED`` keys) are taken from ``more`` if it has them."""
    out = dict(base)
    for key, value in more.items():
        have = out.get(key)
        if key in NOT_SUMMED or not (_is_num(value) or isinstance(value, Mapping)):
            out[key] = value
        elif _is_num(value):
            total = (have if _is_num(have) else 0) + value
            out[key] = round(total, 6) if isinstance(total, float) else total
        else:
            merged = dict(have) if isinstance(have, Mapping) else {}
            for label, n in value.items():
                if _is_num(n):
                    merged[label] = merged.get(label, 0) + n
            out[key] = merged
    return out


def add_histograms(base: Mapping[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """``Histogram.as_dict()`` dicts by name, summed (same buckets; else ``more``'s wins)."""
    out = dict(base)
    for name, hist in more.items():
        have = out.get(name)
        if (isinstance(have, Mapping) and isinstance(hist, Mapping)
                and have.get("buckets") == hist.get("buckets")
                and isinstance(have.get("counts"), list) and isinstance(hist.get("counts"), list)
                and len(have["counts"]) == len(hist["counts"])):
            out[name] = {**hist, "counts": [num(a) + num(b) for a, b in
                                            zip(have["counts"], hist["counts"], strict=True)],
                         "sum": num(have.get("sum")) + num(hist.get("sum"))}
        else:
            out[name] = hist
    return out


def resolved_part(role: str, counters: Mapping[str, Any]) -> dict[str, Any]:
    """What of a dead worker's counters to carry: all of them, except that the store worker's
    records read but not resolved (``pending``) are read again by its successor."""
    out = {k: v for k, v in counters.items() if k not in NOT_SUMMED}
    if role == "store" and _is_num(out.get("records_read")):
        out["records_read"] = max(0, int(num(out["records_read"]) - num(counters.get("pending"))))
    return out


CARRIED_KEPT = 20  # the last workers carried whose identity is kept: a status file moves on


def worker_key(doc: Mapping[str, Any]) -> object:
    """The process that wrote a status ``doc``: its ``proc`` token (``runstate.process_token``),
    unique where a pid is reused; its pid in a file without one (an older version's)."""
    proc = doc.get("proc")
    return proc if isinstance(proc, str) else doc.get("pid")


class Carried:
    """The supervisor's sum of one role's dead workers' last published counters."""

    def __init__(self) -> None:
        self.pids: deque[int] = deque(maxlen=CARRIED_KEPT)
        self.procs: deque[object] = deque(maxlen=CARRIED_KEPT)  # ``worker_key`` of each
        self.counters: dict[str, Any] = {}
        self.hist: dict[str, Any] = {}
        # store: the newest record a dead store worker counted (as read, or lost): its successors
        # do not count it again as replayed (``REPLAY_ENV``)
        self.read_seq = 0
        # The last one carried: where its counts leave off (``read_seq``, ``pending``), which
        # its run file, left until a successor reports, must not contradict (``role_totals``).
        self.position: dict[str, object] = {}

    def carry(self, role: str, pid: int, doc: Mapping[str, Any] | None,
              received_after: int = 0, settled: tuple[int, Mapping[str, Any]] | None = None
              ) -> None:
        """Add the last status ``doc`` of worker ``pid`` (nothing if it is another process's),
        and ``received_after``: the messages a stream worker spooled after that report
        (``unreported_received``). ``settled``: a store worker's (checkpoint seq, its counts of
        the records up to it), which replace the report's for those counters."""
        # Not ``pid`` in the carried pids: a pid comes back once the kernel's counter wraps, and
        # a later worker's own counts would be lost. The file a worker leaves until a successor
        # reports is the same process's, already carried, when its successor dies first.
        if doc is None or doc.get("pid") != pid or worker_key(doc) in self.procs:
            return
        c = section(doc, "counters")
        self.pids.append(pid)
        self.procs.append(worker_key(doc))
        seq: object = c.get("read_seq")
        if settled is not None:
            seq, counts = settled
            part = {k: v for k, v in c.items() if k not in NOT_SUMMED} | dict(counts)
            self.position = {"pid": pid, "proc": worker_key(doc), "read_seq": seq, "pending": 0}
        else:
            part = resolved_part(role, c)
            self.position = {}
        self.counters = add_counters(self.counters, part)
        if received_after:
            self.counters = add_counters(self.counters, {"received": received_after})
        self.hist = add_histograms(self.hist, section(doc, "hist"))
        if isinstance(seq, int):
            self.read_seq = max(self.read_seq, seq)

    def as_dict(self) -> dict[str, Any]:
        return {"pids": list(self.pids), "procs": list(self.procs), "counters": self.counters,
                "hist": self.hist, "position": self.position}


def unreported_received(spool_dir: Path, doc: Mapping[str, Any] | None) -> int:
    """Messages an exited stream worker spooled after its last report (``doc``), which it never
    counted as received: a kill (SIGKILL, the OOM killer, a hang) comes up to a second after a
    report. They are in the spool all the same, and the store worker reads them: numbered from
    the report's ``spool.next_seq``, received after its ``counted_ns`` (0 without those: a file
    from another version)."""
    spool = section(doc or {}, "spool")
    next_seq, counted_ns = spool.get("next_seq"), (doc or {}).get("counted_ns")
    if not isinstance(next_seq, int) or not isinstance(counted_ns, int):
        return 0
    from ingestd.spool.cursor import messages_after  # the supervisor reads the spool only here

    return messages_after(spool_dir, next_seq, counted_ns)


def role_totals(role_doc: Mapping[str, Any] | None,
                supervisor_doc: Mapping[str, Any] | None, role: str) -> dict[str, Any]:
    """``role``'s status doc with its ``counters`` (and ``hist``) summed over the daemon run.

    A worker's file still there after the supervisor carried it (the same process:
    ``worker_key``) adds nothing more; its position is the one its carried counts leave off at
    (a store worker carried at its checkpoint: that seq, nothing pending), so the records after
    it are in flight.
    """
    doc = dict(role_doc or {})
    carried = section(section(supervisor_doc or {}, CARRIED_KEY), role)
    if not carried:
        return doc
    procs = carried.get("procs")
    if isinstance(procs, list):
        counted = worker_key(doc) in procs
    else:  # a supervisor of an older version: pids only
        pids = carried.get("pids")
        counted = isinstance(pids, list) and doc.get("pid") in pids
    own = section(doc, "counters")
    current = dict(own)
    if counted:
        position = section(carried, "position")
        at = position if worker_key(position) == worker_key(doc) else {}
        current = {k: at.get(k, v) for k, v in own.items() if k in NOT_SUMMED}
    doc["counters"] = add_counters(section(carried, "counters"), current)
    doc["hist"] = add_histograms(section(carried, "hist"),
                                 {} if counted else section(doc, "hist"))
    return doc


def received_total(stream_counters: Mapping[str, Any]) -> float:
    """Every message framed off the wire.

    The stream worker's ``received`` counts every record handed to the spool; messages not
    spooled (``spool_full``, ``disk_error``, and a message cut by a connection end,
    ``cut_by_disconnect``) are in ``dropped`` and added back here so the reconciliation holds.
    """
    dropped = counts(stream_counters.get("dropped"))
    return num(stream_counters.get("received")) + sum(dropped.values())


def in_flight(stream: Mapping[str, Any], store_counters: Mapping[str, Any]) -> float:
    """Messages received (or replayed) but not yet resolved into one of the outcome counters.

    Exact when the workers publish spool positions (stream ``spool.next_seq``, store
    ``read_seq``): records not yet read plus tweets read into a batch not yet inserted. Without
    them, the spool backlog (appended, not yet acknowledged) is used: exact whenever the store
    worker has acknowledged what it counted, at most one batch high while one is being written.
    """
    spool = section(stream, "spool")
    next_seq, read_seq = spool.get("next_seq"), store_counters.get("read_seq")
    if isinstance(next_seq, int) and isinstance(read_seq, int):
        # Coverage markers (``spool.markers``: their seqs) take seqs but are not messages.
        markers = spool.get("markers")
        unread_markers = sum(1 for m in markers if isinstance(m, int) and m > read_seq) \
            if isinstance(markers, list) else 0
        unread = max(next_seq - 1 - read_seq - unread_markers, 0)
        return unread + num(store_counters.get("pending"))
    return num(spool.get("records"))


def reconciliation(stream: Mapping[str, Any], store: Mapping[str, Any]) -> dict[str, int]:
    """Both sides of the identity (module doc) from the run's totals (``role_totals``)."""
    sc, wc = section(stream, "counters"), section(store, "counters")
    received, replayed = received_total(sc), num(wc.get("replayed"))
    resolved = (num(wc.get("stored")) + num(wc.get("duplicates"))
                + sum(counts(wc.get("deadlettered")).values())
                + sum(counts(wc.get("control")).values())
                + sum(counts(wc.get("skipped")).values()) + sum(counts(sc.get("dropped")).values()))
    flight, missing = in_flight(stream, wc), num(wc.get("spool_missing_records"))
    return {"received": int(received), "replayed": int(replayed), "resolved": int(resolved),
            "in_flight": int(flight), "spool_missing": int(missing),
            "difference": int(received + replayed - resolved - flight - missing)}
