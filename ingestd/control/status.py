"""``ingestd status``: a human-readable view of a running daemon, from its run-state files.

Exit codes follow ``systemctl status``: 0 running and healthy, 1 running but degraded,
3 not running (or the state folder holds no live daemon). ``collect()`` is also what the
metrics listener's ``/healthz`` answers with, so both always agree.

Liveness, one rule for the supervisor and both workers (``liveness``): each rewrites its
``run/<role>.json`` every second. A process whose pid is gone is ``not running`` (health down);
one alive whose last heartbeat is at most ``LATE_AFTER`` old is ``ok``; older is ``late``, and
past ``control.heartbeat_timeout`` ``hung`` (both degraded: the process exists but does not
work; the supervisor replaces a hung worker, nothing replaces a hung supervisor but systemd's
watchdog). While the run folder's file system is read-only (``files_frozen``) no status file can
be rewritten: the workers beat through the supervisor's pipe instead (``control.pool``), so an
old file proves nothing, and a live process is ``unknown`` rather than late or hung (degraded,
with the reason; the supervisor still replaces a worker whose beats stop).
A worker the supervisor had to restart ``CRASH_LOOP_RESTARTS`` times or more within
``control.crash_loop_window`` is ``crash-looping`` (down) whether or not its latest process is
alive at the moment one looks, so that the headline does not flip between two looks.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ingestd.config.errors import EXIT_CONFIG, ConfigError, ConfigErrors
from ingestd.config.schema import ControlSettings
from ingestd.config.settings import lenient_state_dir, load_settings
from ingestd.control import tally
from ingestd.control.daemonctl import locate_state_dir, locate_state_dir_of, pid_alive
from ingestd.control.runstate import RUN_DIR, read_status, utc_text

EXIT_OK, EXIT_DEGRADED, EXIT_NOT_RUNNING = 0, 1, 3
LATE_AFTER = 5.0  # seconds without a heartbeat (written every second) before a process is late
CRASH_LOOP_RESTARTS = 2  # restarts of one role within control.crash_loop_window: crash-looping
DEFAULT_HEARTBEAT_TIMEOUT = ControlSettings.heartbeat_timeout
ROLES = ("supervisor", "stream", "store")
NAMES = {"supervisor": "supervisor", "stream": "stream worker", "store": "store worker"}
STREAM_STATES = ("connecting", "connected", "reconnecting", "degraded", "stopped", "standby")
METRICS_ADDR_FILE = "metrics.addr"
# Store states after a MongoDB error was retried through (not "stopped: mongo unavailable…").
STORE_RECOVERED = ("running", "draining", "stopped")


def run_status(config: Path, *, as_json: bool) -> int:
    try:
        settings = load_settings(config, secrets=False)  # looking needs no credentials
    except ConfigError as exc:
        # The file on disk is broken (a reload of it was, or will be, refused): the daemon
        # runs on the settings in force all the same, and this is when its status matters.
        found = lenient_state_dir(config)
        if found is None:
            print(f"invalid settings (no state folder can be determined from them):\n{exc}",
                  file=sys.stderr)
            return EXIT_CONFIG
        view = collect(locate_state_dir_of(config, found))
        errors = [str(e) for e in exc.errors] if isinstance(exc, ConfigErrors) else [str(exc)]
        view["settings_invalid"] = errors
    else:
        view = collect(locate_state_dir(settings),
                       heartbeat_timeout=settings.control.heartbeat_timeout)
    if as_json:
        sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(view))
    return int(view["exit_code"])


def timeout_in_force(supervisor: Mapping[str, Any] | None,
                      fallback: float | None = None) -> float:
    """``control.heartbeat_timeout`` in force: the supervisor's published value, else the
    settings' (``fallback``), else the default."""
    value = (supervisor or {}).get("heartbeat_timeout")
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return fallback if fallback is not None else DEFAULT_HEARTBEAT_TIMEOUT


def liveness(status: Mapping[str, Any] | None, now: float,
             timeout: float = DEFAULT_HEARTBEAT_TIMEOUT, frozen: bool = False) -> str:
    """``ok``, ``late``, ``hung``, ``unknown`` or ``not running`` (see the module's doc): a
    live pid, and the age of its last heartbeat against ``LATE_AFTER`` and the heartbeat
    timeout; ``frozen``: the status files cannot be rewritten (``files_frozen``)."""
    pid = (status or {}).get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not pid_alive(pid):
        return "not running"
    age = now - float((status or {}).get("time", 0))
    if age <= min(LATE_AFTER, timeout):
        return "ok"
    if frozen:
        return "unknown"
    return "late" if age <= timeout else "hung"


def alive(status: Mapping[str, Any] | None, now: float,
          timeout: float = DEFAULT_HEARTBEAT_TIMEOUT, frozen: bool = False) -> bool:
    """Whether the process heart-beats: alive and not past the heartbeat timeout
    (``ingestd_worker_up``). With the files frozen, a live process counts: the supervisor sees
    its beats through the pipe and replaces it once they stop."""
    return liveness(status, now, timeout, frozen) in ("ok", "late", "unknown")


def files_frozen(state_dir: Path, pid: object = None) -> str | None:
    """Why no status file can be rewritten, if the run folder's file system says why: a
    read-only mount (a file system remounted read-only after errors, a read-only bind); or, for
    the daemon's process ``pid``, a folder its user may no longer use (its mode or owner changed,
    a mount over it: the daemon logs ``spool_unreadable``; ``status`` said HUNG)."""
    try:
        flags = os.statvfs(state_dir / RUN_DIR).f_flag
    except OSError:
        flags = 0
    if flags & os.ST_RDONLY:
        return "read-only file system"
    return _denied_to(pid, state_dir) if isinstance(pid, int) and pid > 0 else None


CAP_DAC_OVERRIDE = 1  # bit in /proc/PID/status CapEff: permission bits do not apply


def _denied_to(pid: int, state_dir: Path) -> str | None:
    """Why process ``pid`` (its effective uid, groups and capabilities, from /proc) cannot use
    the state folder or its run folder (read, write and search), or None if it can."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[1])
        gids = {int(g) for g in (fields["Gid"].split()[1], *fields["Groups"].split())}
        if int(fields["CapEff"].strip(), 16) >> CAP_DAC_OVERRIDE & 1:
            return None
    except (OSError, KeyError, ValueError, IndexError):
        return None
    for folder in (state_dir, state_dir / RUN_DIR):
        try:
            st = os.stat(folder)
        except OSError:
            return None
        shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
        if (st.st_mode >> shift) & 0o7 != 0o7:
            return (f"permission denied to the daemon's user (uid {uid}): {folder} is mode "
                    f"{stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid} (its "
                    "permissions changed, or a mount over it)")
    return None


def stream_state(state: str) -> str:
    """The stream worker's free-text state reduced to one of ``STREAM_STATES``, else ``other``."""
    word = state.split(":", 1)[0].split(" ", 1)[0].strip().lower()
    return word if word in STREAM_STATES else "other"


def metrics_address(state_dir: Path) -> str | None:
    """``host:port`` of the metrics listener, as the supervisor wrote it (None if none)."""
    try:
        return (state_dir / RUN_DIR / METRICS_ADDR_FILE).read_text().strip() or None
    except OSError:
        return None


# The supervisor's phases in which a worker is down by design (``reporting.Standing.phase``):
# said first, so that "down (stream worker not running)" during a stop's drain or the first
# second of a start is not read as a fault.
TRANSITIONS = {"starting": "supervisor starting (workers being started)",
               "stopping": "supervisor stopping (workers finishing: the store worker drains)"}


def collect(state_dir: Path, *, heartbeat_timeout: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, with ``health`` (ok/degraded/down) and its ``reasons``.
    ``heartbeat_timeout``: the settings' value, used when the supervisor published none."""
    now = time.time()
    roles = {role: read_status(state_dir, role) for role in ROLES}
    timeout = timeout_in_force(roles["supervisor"], heartbeat_timeout)
    frozen = files_frozen(state_dir, (roles["supervisor"] or {}).get("pid"))
    live = {role: liveness(st, now, timeout, bool(frozen)) for role, st in roles.items()}
    age = {r: round(now - float(st.get("time", 0)), 1) for r, st in roles.items() if st}
    sup_up = live["supervisor"] != "not running"
    looping = _crash_looping(roles["supervisor"] or {}) if sup_up else {}
    down = [f"{NAMES[role]} crash-looping ({looping[role]})" if role in looping
            else f"{NAMES[role]} not running" for role in ROLES
            if role in looping or live[role] == "not running"]
    phase = str((roles["supervisor"] or {}).get("state", "")) if sup_up else ""
    if down and phase in TRANSITIONS:  # workers not (or no longer) running is the phase's own
        down.insert(0, TRANSITIONS[phase])
    degraded = [*_unresponsive(live, age, timeout), *_degraded_reasons(roles, now)]
    if frozen and "unknown" in live.values():
        oldest = max(age[r] for r in ROLES if live[r] == "unknown")
        degraded.insert(0, f"status files cannot be written ({state_dir / RUN_DIR}: {frozen}); "
                        f"figures up to {oldest:.0f}s old, liveness unknown; the logs are live")
    if sup_up and (refused := _reload_refused(roles["supervisor"] or {})):
        degraded.append(refused)
    if down:
        code, health, reasons = EXIT_NOT_RUNNING, "down", down
    elif degraded:
        code, health, reasons = EXIT_DEGRADED, "degraded", degraded
    else:
        code, health, reasons = EXIT_OK, "ok", []
    running = {role: live[role] != "not running" for role in ROLES}
    beating = {role: live[role] in ("ok", "late", "unknown") for role in ROLES}
    records, nbytes = queue(roles["stream"] or {}, roles["store"] or {}, beating["stream"])
    # the daemon run's counts, across worker restarts (``tally``)
    totals = {role: tally.role_totals(roles[role], roles["supervisor"], role)
              for role in ("stream", "store")}
    return {"state_dir": str(state_dir), "health": health, "reasons": reasons,
            "running": running, "liveness": live, "heartbeat_timeout": timeout,
            "workers": roles, "exit_code": code,
            "queue": {"records": records, "bytes": nbytes,
                      **bound(roles["stream"] or {}, beating["stream"])},
            "counters": {role: dict(doc.get("counters") or {}) for role, doc in totals.items()},
            "reconciliation": tally.reconciliation(totals["stream"], totals["store"]),
            "heartbeat_age": age,
            # only while the supervisor (whose thread serves it) answers
            "metrics": metrics_address(state_dir) if live["supervisor"] in ("ok", "unknown")
            else None}


def _unresponsive(live: Mapping[str, str], age: Mapping[str, float],
                  timeout: float) -> list[str]:
    """Processes alive but silent: late or hung (degraded)."""
    reasons = []
    for role in ROLES:
        if live[role] not in ("late", "hung"):
            continue
        since = f"last heartbeat {age.get(role, 0):.0f}s ago"
        if role == "supervisor":
            reasons.append(f"supervisor not responding ({since})")
        elif live[role] == "late":
            reasons.append(f"{NAMES[role]} late ({since}; replaced after {timeout:g}s)")
        else:
            reasons.append(f"{NAMES[role]} hung ({since}, over control.heartbeat_timeout "
                           f"{timeout:g}s)")
    return reasons


def _crash_looping(supervisor: Mapping[str, Any]) -> dict[str, str]:
    """Role → why it is crash-looping, from the supervisor's recent restarts."""
    recent, window = _mapping(supervisor.get("recent_restarts")), supervisor.get(
        "crash_loop_window")
    return {role: f"{n} restarts in the last {window:g}s" for role, n in recent.items()
            if isinstance(n, int) and n >= CRASH_LOOP_RESTARTS
            and isinstance(window, int | float)}


def _reload_refused(supervisor: Mapping[str, Any]) -> str | None:
    """While the latest reload attempt was refused: why, and the generation still in force."""
    refused = _mapping(supervisor.get("reload_refused"))
    if not refused:
        return None
    return (f"last reload refused: {refused.get('reason')}; generation "
            f"{refused.get('generation', supervisor.get('generation'))} in force")


def queue(stream: Mapping[str, Any], store: Mapping[str, Any],
          stream_running: bool) -> tuple[int, int]:
    """(records, bytes) waiting in the spool: the stream worker's figure while it runs (the
    writer, who sees the bound). Its last one, written as it stopped, predates the store worker's
    drain: once it is gone nothing more is appended, and the store worker's checkpoint (published
    after its final write) against the stream's last seq is the newer word. Both only ever
    overstate (an older checkpoint), so the smaller is the truer."""
    spool, store_spool = _mapping(stream.get("spool")), store.get("spool")
    records, nbytes = _int(spool.get("records")), _int(spool.get("bytes"))
    if stream_running or not isinstance(store_spool, Mapping):
        return records, nbytes
    next_seq, acked, markers = spool.get("next_seq"), store_spool.get("acked_seq"), spool.get(
        "markers")
    if isinstance(next_seq, int) and isinstance(acked, int):
        unacked_markers = len([m for m in markers if isinstance(m, int) and m > acked]
                              if isinstance(markers, list) else [])
        records = min(records, max(0, next_seq - 1 - acked - unacked_markers))
    return records, min(nbytes, _int(store_spool.get("bytes", nbytes)))


def bound(stream: Mapping[str, Any], stream_running: bool) -> dict[str, Any]:
    """The spool's bound and policy as the stream worker last published them, and since when
    it has been full (None: room; only while the stream worker runs)."""
    spool = _mapping(stream.get("spool"))
    if "max_records" not in spool:
        return {}
    full_since = spool.get("full_since") if stream_running else None
    return {"max_records": spool.get("max_records"), "max_bytes": spool.get("max_bytes"),
            "when_full": spool.get("when_full"), "full_since": full_since}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _degraded_reasons(roles: Mapping[str, dict[str, Any] | None], now: float) -> list[str]:
    stream, store = roles["stream"] or {}, roles["store"] or {}
    reasons = []
    # A spool write failure replaces the state text; anything unrecognised is worth a look.
    if stream_state(str(stream.get("state", ""))) in ("degraded", "other"):
        reasons.append(f"stream: {stream.get('state')}")
    elif (outage := stream_outage(stream, now)) is not None:
        reasons.append(f"stream: {outage}")
    if str(store.get("state", "")).startswith("degraded"):
        reasons.append(f"store: {store.get('state')}")
    if missing := indexes_missing(store):
        reasons.append(f"store: {missing}")
    return reasons


def indexes_missing(store: Mapping[str, Any]) -> str | None:
    """The indexes the store worker could not make (analysts' queries scan the collection; no
    TTL: tombstones are never removed), and why the first one failed."""
    missing = _mapping(_mapping(store.get("counters")).get("indexes_missing"))
    if not missing:
        return None
    names = sorted(missing)
    return (f"{len(names)} indexes missing ({', '.join(names[:3])}"
            f"{', …' if len(names) > 3 else ''}): {missing[names[0]]}")


def stream_outage(stream: Mapping[str, Any], now: float) -> str | None:
    """Why the stream cannot deliver, if it cannot: every attempt since the last accepted
    connection answered with an HTTP error (at once: 401, 420, 5xx… are no network blip), or
    no accepted connection for longer than the worker's ``outage_grace`` (a reconnect within
    it is not an outage). Never for a standby of a pair: it has no connection by design."""
    ha = _mapping(stream.get("ha"))
    if ha.get("mode") == "standby" and ha.get("role") != "active":
        return None
    refused = _mapping(stream.get("refused"))
    if refused:
        return (f"every attempt refused since {utc_text(refused.get('since'))} "
                f"({refused.get('attempts')} attempts, none accepted): {refused.get('reason')}")
    since, grace = stream.get("unconnected_since"), stream.get("outage_grace")
    if (isinstance(since, int | float) and isinstance(grace, int | float)
            and now - since > grace):
        return f"no connection since {utc_text(since)} (grace {grace:g}s): {stream.get('state')}"
    return None


def render(view: dict[str, Any]) -> str:
    """The human-readable report: one block per process, figures an operator acts on."""
    head = f"ingestd: {view['health']}"
    if view["reasons"]:
        head += " (" + "; ".join(view["reasons"]) + ")"
    lines = [head, *_settings_lines(view), *_supervisor_lines(view), *_stream_lines(view),
             *_store_lines(view), *_reconciliation_lines(view)]
    if error := _last_error(view["workers"].get("store") or {}):
        lines.append(f"  last error  {error}")
    if view.get("metrics"):
        lines.append(f"  metrics     http://{view['metrics']}/metrics")
    lines.append(f"  state dir   {view['state_dir']}")
    return "\n".join(lines)


def _last_error(store: Mapping[str, Any]) -> str | None:
    """The store worker's last MongoDB/dead-letter error, with when it happened, and said to be
    past once the store got through it (it is kept: the cause of a recent outage)."""
    error = store.get("last_error")
    if not error:
        return None
    at = store.get("last_error_at")
    text = f"{utc_text(at)} {error}" if isinstance(at, int | float) else str(error)
    state = store.get("state")
    if state in STORE_RECOVERED:
        text += f" (past: the store is {state} since)"
    return text


def _settings_lines(view: dict[str, Any]) -> list[str]:
    """One line when the settings file on disk is invalid (the daemon runs on those in force)."""
    errors = view.get("settings_invalid")
    if not errors:
        return []
    more = f" (+{len(errors) - 1} more: ingestd check)" if len(errors) > 1 else ""
    return [f"  settings    the file on disk is invalid, not in force: {errors[0]}{more}"]


def _supervisor_lines(view: dict[str, Any]) -> list[str]:
    sup = view["workers"].get("supervisor") or {}
    restarts = ", ".join(f"{k}={v}" for k, v in dict(sup.get("restarts", {})).items()) or "-"
    return [f"  supervisor  {_run(view, 'supervisor')}{_state(view, 'supervisor')}  "
            f"generation {sup.get('generation', '-')}  reload failures "
            f"{sup.get('reload_failures', 0)}  restarts {restarts}"]


def _stream_lines(view: dict[str, Any]) -> list[str]:
    stream = view["workers"].get("stream") or {}
    c = _counters(view, "stream")
    spool = dict(view.get("queue") or stream.get("spool", {}))  # hand-made views lack "queue"
    dropped = sum(dict(c.get("dropped", {})).values())
    endings = ", ".join(f"{k}={v}" for k, v in sorted(dict(c.get("endings", {})).items())) or "-"
    return [
        f"  stream      {_run(view, 'stream')}{_state(view, 'stream')}",
        f"              received {c.get('received', 0)}  ({stream.get('rate', 0):.1f} msg/s)  "
        f"keep-alives {c.get('keepalives', 0)}  limit-missed {c.get('limit_missed', 0)}  "
        f"dropped {dropped}",
        f"              connection ends {endings}  back-off {stream.get('backoff') or 0:.1f}s",
        *_ha_lines(dict(stream.get("ha") or {}),
                   dict(view.get("liveness") or {}).get("stream", "ok") != "ok"),
        f"  queue       {spool.get('records', 0)} records / {spool.get('bytes', 0) / 1e6:.1f} MB "
        f"waiting in the spool{_bound_text(spool)}",
        *_full_lines(spool),
    ]


def _bound_text(spool: Mapping[str, Any]) -> str:
    if not isinstance(spool.get("max_records"), int) or not isinstance(
            spool.get("max_bytes"), int):
        return ""
    return f" (bound {spool['max_records']} records / {spool['max_bytes'] / 1e6:.1f} MB)"


def _full_lines(spool: Mapping[str, Any]) -> list[str]:
    if not spool.get("full_since"):
        return []
    since = utc_text(spool["full_since"])
    if spool.get("when_full") == "drop_newest":
        return [f"              spool full since {since}: newest messages dropped (when_full: "
                "drop_newest)"]
    return [f"              spool full since {since}: intake paused at the bound, the endpoint "
            "held back (when_full: block)"]


def _ha_lines(ha: dict[str, Any], stale: bool = False) -> list[str]:
    """Standby/redundant role, lease holder and takeovers (nothing for a single daemon);
    ``stale``: the stream worker is not up, so this is what it last said (a frozen active's
    file still calls it the holder while the standby takes over)."""
    if ha.get("mode", "single") == "single":
        return []
    if ha["mode"] == "redundant":
        return ["  ha          redundant: every instance streams"]
    # (a stop's own last word, released or stopped, already reads as the past)
    last = "last said: " if stale and ha.get("role") not in ("released", "stopped") else ""
    return [f"  ha          {last}{ha.get('role', '-')} ({ha.get('instance', '-')})  "
            f"{_holder(ha)}  "
            f"takeovers {ha.get('takeovers', 0)}  lease failures {ha.get('renew_failures', 0)}",
            # the pair's name in the alerts (their ``lease`` label)
            f"              lease {ha.get('lease') or '-'}"]


def _holder(ha: Mapping[str, Any]) -> str:
    """The holder as this instance knows it; once stopped, what it last knew (it holds none)."""
    if ha.get("role") == "released":
        return f"lease released at {utc_text(ha.get('released_at'))}"
    if ha.get("role") == "stopped":
        return f"lease last held by {ha.get('last_holder') or '-'}"
    if ha.get("last_error"):  # the holder last seen: nobody may hold it now (not even itself)
        return f"lease unreachable (last seen held by {ha.get('holder') or '-'})"
    return f"lease holder {ha.get('holder') or '-'}"


def _store_lines(view: dict[str, Any]) -> list[str]:
    store = view["workers"].get("store") or {}
    c = _counters(view, "store")
    dead = dict(c.get("deadlettered", {}))
    detail = " (" + ", ".join(f"{k}={v}" for k, v in sorted(dead.items())) + ")" if dead else ""
    lines = [
        f"  store       {_run(view, 'store')}{_state(view, 'store')}",
        f"              stored {c.get('stored', 0)}  ({store.get('rate', 0):.1f} tweets/s)  "
        f"duplicates {c.get('duplicates', 0)}  dead-lettered {sum(dead.values())}{detail}  "
        f"deletes {c.get('deletes_applied', 0)}  replayed {c.get('replayed', 0)}",
    ]
    if indexes := indexes_missing(store):
        lines.append(f"              {indexes} (journal: index_create_failed)")
    missing, regions = c.get("spool_missing_records", 0), c.get("spool_corrupt_records", 0)
    if missing or regions:  # only a damaged disk or a hand: say it where the operator looks
        lines.append(f"              spool damage: {missing} records lost, {regions} damaged "
                     "regions skipped (journal: spool_records_missing)")
    return lines


def _counters(view: dict[str, Any], role: str) -> dict[str, Any]:
    """``role``'s counts over the daemon run (its worker's own, in hand-made views)."""
    counters = (view.get("counters") or {}).get(role)
    if counters is None:
        counters = (view["workers"].get(role) or {}).get("counters", {})
    return dict(counters)


def _reconciliation_lines(view: dict[str, Any]) -> list[str]:
    """README's identity with this run's figures: received + replayed = resolved + in flight."""
    r = view.get("reconciliation")
    if not r:
        return []
    missing = f" + spool-lost {r['spool_missing']}" if r["spool_missing"] else ""
    diff = r["difference"]
    verdict = "holds" if diff == 0 else (
        f"off by {diff:+d}: the workers report up to 1 s apart; if it lasts after a worker "
        "crash, look for worker_counts_unsettled in the log (README, log events)")
    return [f"  reconcile   received {r['received']} + replayed {r['replayed']} = resolved "
            f"{r['resolved']} + in flight {r['in_flight']}{missing}  ({verdict})"]


def _run(view: dict[str, Any], role: str) -> str:
    """``pid N up``, ``pid N late|hung (last heartbeat Ns ago)``, or ``not running (…)``:
    the same judgement (``liveness``) as the headline's."""
    st = view["workers"].get(role) or {}
    live = dict(view.get("liveness") or {}).get(role)
    if live is None:  # a hand-made view without it
        live = "ok" if view["running"][role] else "not running"
    age = view.get("heartbeat_age", {}).get(role)
    since = f" (last heartbeat {age:.0f}s ago)" if age is not None else ""
    if live == "ok":
        return f"pid {st.get('pid', '-')} up"
    if live == "not running":
        return "not running" + since
    if live == "unknown":  # alive; its status file cannot be rewritten (``files_frozen``)
        return f"pid {st.get('pid', '-')} alive (status file not rewritable; {age or 0:.0f}s old)"
    return f"pid {st.get('pid', '-')} {live.upper()}{since}"


def _state(view: dict[str, Any], role: str) -> str:
    """The process's own state text; once it is not up, marked as what it last said."""
    state = (view["workers"].get(role) or {}).get("state")
    if state is None:
        return "  -"
    live = dict(view.get("liveness") or {}).get(role, "ok")
    return f"  {state}" if live == "ok" else f"  last state: {state}"
