"""The operator's side of a running daemon: find it, ask it to reload, wait for its verdict.

``ingestd reload`` (the unit's ``ExecReload=``) cannot judge a settings file by itself: systemd
does not hand ``ExecReload=`` the service's credentials when the unit uses a mount namespace
(systemd issue 35227; see docs/systemd.md), so `${NAME}` secrets cannot be resolved there.
The verdict therefore comes from the daemon, which holds them: ``reload`` checks what it can
without secrets, sends SIGHUP to the supervisor and waits until the supervisor publishes its
verdict in ``run/reload.json`` and, for a good file, until both workers run the new generation.

Both ends of that file live here: the supervisor calls ``write_verdict``, the command reads it.
Commands that only look (``status``, ``reload``) load settings with ``secrets=False`` and find
the state folder with ``locate_state_dir``, so an operator's shell needs no secret.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingestd.config.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, ConfigError, ConfigErrors
from ingestd.config.schema import Settings
from ingestd.config.settings import load_settings
from ingestd.control import runstate

PIDFILE = "supervisor.pid"
LOCKFILE = "supervisor.lock"  # held (flock) by the supervisor and its workers: statelock
VERDICT_FILE = "reload.json"
# StateDirectory=ingestd in deploy/systemd/ingestd.service: where the unit's daemon keeps state
# when settings.yaml leaves state_dir null ($STATE_DIRECTORY is set only inside the unit).
# The template ingestd@NAME.service reads /etc/ingestd/NAME.yaml and keeps state in
# SYSTEMD_STATE_DIR/NAME (StateDirectory=ingestd/%i).
SYSTEMD_STATE_DIR = Path("/var/lib/ingestd")
PLAIN_UNIT_SETTINGS = "settings"
EXIT_NOT_RUNNING = 3  # no daemon to reload: as `ingestd status` (LSB "program is not running")
EXIT_NOPERM = 77  # EX_NOPERM: the daemon runs, but this user may not signal it
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Verdict:
    """The supervisor's answer to one SIGHUP: ``seq`` counts the reloads of supervisor ``pid``."""

    pid: int
    seq: int
    generation: int
    applied: bool
    errors: tuple[str, ...]
    changes: Mapping[str, Any]


def write_verdict(state_dir: Path, seq: int, generation: int, *,
                  errors: Sequence[str] = (), changes: Mapping[str, Any] | None = None) -> None:
    """Supervisor side: publish the outcome of reload number ``seq`` (errors = rejected)."""
    doc = {"seq": seq, "generation": generation, "applied": not errors,
           "errors": list(errors), "changes": dict(changes or {})}
    with contextlib.suppress(OSError):  # a full disk must not stop a reload being applied
        runstate.write_status(state_dir, VERDICT_FILE.removesuffix(".json"), doc)


def read_verdict(state_dir: Path) -> Verdict | None:
    doc = runstate.read_status(state_dir, VERDICT_FILE.removesuffix(".json"))
    if not doc:
        return None
    try:
        return Verdict(int(doc["pid"]), int(doc["seq"]), int(doc["generation"]),
                       bool(doc["applied"]), tuple(str(e) for e in doc["errors"]),
                       dict(doc.get("changes") or {}))
    except (KeyError, TypeError, ValueError):
        return None


def config_errors(exc: ConfigError) -> list[str]:
    """Each problem as ``file: key.path: reason`` (never a secret value)."""
    return [str(e) for e in exc.errors] if isinstance(exc, ConfigErrors) else [str(exc)]


# -- finding the daemon -----------------------------------------------------------------------


def locate_state_dir(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """The state folder of the daemon these settings describe.

    ``state_dir: null`` means ``$STATE_DIRECTORY`` inside the unit, but an operator's shell has
    no such variable: then the unit's folder is used when a daemon lives there and none lives
    next to the settings file.
    """
    return locate_state_dir_of(settings.path, settings.state_dir, env)


def locate_state_dir_of(config: Path, state_dir: Path,
                        env: Mapping[str, str] | None = None) -> Path:
    """``locate_state_dir`` for a settings file ``config`` whose ``state_dir`` reads so (also
    when the rest of the file is invalid: ``ingestd status`` still finds the daemon)."""
    env = os.environ if env is None else env
    default = Path(os.path.abspath(config)).parent / "state"
    if state_dir != default or env.get("STATE_DIRECTORY"):
        return state_dir
    for candidate in (default, *unit_state_dirs(config)):
        if supervisor_pid(candidate) is not None:
            return candidate
    return default


def unit_state_dirs(config: Path) -> tuple[Path, ...]:
    """The unit state folder ``config`` belongs to: ingestd.service's for settings.yaml,
    ingestd@NAME's for NAME.yaml (never another instance's, nor the plain unit's)."""
    name = Path(config).stem
    return (SYSTEMD_STATE_DIR if name == PLAIN_UNIT_SETTINGS else SYSTEMD_STATE_DIR / name,)


def supervisor_pid(state_dir: Path) -> int | None:
    """The live supervisor's pid from ``run/supervisor.pid``, else from its status file.

    The pid file is written once, at start: a tmp cleaner may take it, and the supervisor
    writes it back only at its next look (``Supervisor.RUN_FILES_LOOK``). Its status file,
    rewritten every second, names the same process meanwhile (``status_file_pid``).
    """
    path = state_dir / runstate.RUN_DIR / PIDFILE
    try:
        pid = int(path.read_text())
        when = path.stat().st_mtime
    except (OSError, ValueError):
        return status_file_pid(state_dir)
    # pid 0 or a negative one would signal a process group, or every process (kill(-1))
    if pid > 0 and started_before(pid, when):
        return pid
    return status_file_pid(state_dir)


def status_file_pid(state_dir: Path) -> int | None:
    """The pid ``run/supervisor.json`` names, if that process is verifiably the supervisor
    that wrote it: it started before the file's ``proc`` token was taken
    (``runstate.process_token``: the pid and the wall clock, in ns, of the writer's first
    status), so a pid the kernel handed out again since is never taken. None when a stopped
    supervisor wrote it last, or when the start time cannot be read: no guess."""
    doc = runstate.read_status(state_dir, "supervisor") or {}
    pid, proc = doc.get("pid"), doc.get("proc")
    if (doc.get("role") != "supervisor" or doc.get("state") == "stopped"
            or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0
            or not isinstance(proc, str)):
        return None
    token_pid, _, token_ns = proc.partition("-")
    if token_pid != str(pid) or not token_ns.isascii() or not token_ns.isdigit():
        return None
    started = start_time(pid)
    return pid if started is not None and started <= int(token_ns) / 1e9 + 1.0 else None


def started_before(pid: int, when: float) -> bool:
    """Whether process ``pid`` exists and started before ``when`` (epoch): not a reused pid.

    A stale pid file may name a pid the kernel has since given to another process, and SIGHUP
    kills most processes. Without /proc/stat (ProcSubset=pid) the pid's existence must do.
    """
    started = start_time(pid)
    if started is None:
        return pid_alive(pid)
    return started <= when + 1.0  # btime has whole-second resolution


def start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch s), or None if unknown (no such process, or no
    /proc/stat: ProcSubset=pid)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, StopIteration, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- ingestd reload ---------------------------------------------------------------------------


_LOCK_SUFFIX = f"/{runstate.RUN_DIR}/{LOCKFILE}"


def run_reload(config: Path, *, pid: int | None, timeout: float) -> int:
    """SIGHUP the daemon and report its verdict: 0 applied, 78 rejected, 3 no daemon running,
    77 not allowed to signal it, 69 no verdict (or a worker behind) within ``timeout``."""
    try:
        settings = load_settings(config, secrets=False)
    except ConfigError as exc:
        print("not reloading (nothing was sent to the daemon):", *config_errors(exc),
              sep="\n", file=sys.stderr)
        return EXIT_CONFIG
    if pid is not None and (why := not_a_supervisor(pid)):
        print(f"ingestd: not signalling pid {pid}: {why}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    state_dir = locate_state_dir(settings)
    target = pid or supervisor_pid(state_dir)
    if target is None:
        print(f"ingestd: no running daemon (no live pid in {state_dir / runstate.RUN_DIR}; a "
              "daemon started with another state_dir, which a reload does not move, is found "
              "with --pid)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    # The folder the daemon runs in: the file may name another since (applied at a restart).
    state_dir = state_dir_of(target) or state_dir
    before = read_verdict(state_dir)
    try:
        os.kill(target, signal.SIGHUP)
    except OSError as exc:
        print(f"ingestd: cannot signal pid {target}: {exc.strerror}", file=sys.stderr)
        return EXIT_NOPERM if isinstance(exc, PermissionError) else EXIT_NOT_RUNNING
    verdict = await_verdict(state_dir, target, before, timeout)
    return report(verdict, state_dir, timeout, v2_rules=settings.stream.api == "v2")


def state_dir_of(pid: int) -> Path | None:
    """The state folder the supervisor ``pid`` runs in, from the lock file it holds open
    (``run/supervisor.lock``); None if its descriptors cannot be read."""
    try:
        return held_state_dir(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None


def held_state_dir(fds: Iterable[Path]) -> Path | None:
    """The state folder whose ``run/supervisor.lock`` one of ``fds`` (``/proc/PID/fd``
    entries) is open on, if any (a lock file a tmp cleaner took still counts)."""
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            link = os.readlink(fd).removesuffix(" (deleted)")
            if link.endswith(_LOCK_SUFFIX):
                return Path(link).parent.parent
    return None


def not_a_supervisor(pid: int) -> str | None:
    """Why ``reload --pid PID`` must not signal ``pid``, if its descriptors show it is no
    ingestd supervisor: SIGHUP ends most programs (pid 1's reloads its own configuration),
    and a worker's is no reload. None when it is one, or when they cannot be read (another
    user's process: the signal's own permission check answers)."""
    try:
        folder = held_state_dir(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return None  # gone (the signal says so) or not ours to look at
    if folder is None:
        return f"it is not an ingestd supervisor (it holds no {_LOCK_SUFFIX[1:]} open)"
    supervisor = supervisor_pid(folder)
    if supervisor is not None and supervisor != pid:
        return (f"it is not the supervisor of the daemon in {folder} but one of its "
                f"processes; its supervisor is pid {supervisor}")
    return None


def await_verdict(state_dir: Path, pid: int, before: Verdict | None,
                  timeout: float) -> Verdict | None:
    """The first verdict of ``pid`` newer than ``before``; None when none came in time."""
    deadline = time.monotonic() + timeout
    old_seq = before.seq if before is not None and before.pid == pid else 0
    while time.monotonic() < deadline:
        verdict = read_verdict(state_dir)
        if verdict is not None and verdict.pid == pid and verdict.seq > old_seq:
            return verdict
        if not pid_alive(pid):
            return None
        time.sleep(POLL_SECONDS)
    return None


def workers_at(state_dir: Path, generation: int, timeout: float) -> list[str]:
    """The workers that have not adopted ``generation`` within ``timeout`` (empty = all did)."""
    deadline = time.monotonic() + timeout
    while True:
        behind = [role for role in ("stream", "store")
                  if int((runstate.read_status(state_dir, role) or {}).get("generation", 0))
                  < generation]
        if not behind or time.monotonic() >= deadline:
            return behind
        time.sleep(POLL_SECONDS)


def rules_outcome(state_dir: Path, generation: int, timeout: float) -> list[str] | None:
    """v2: the endpoint's reasons if it refused the rules of ``generation`` (or of a newer one),
    [] once they (or newer ones) are in force, None if neither is known within ``timeout`` (the
    stream worker syncs them after adopting the generation, retrying transient failures)."""
    deadline = time.monotonic() + timeout
    while True:
        rules = (runstate.read_status(state_dir, "stream") or {}).get("rules") or {}
        accepted, refused = rules.get("generation") or 0, rules.get("refused_generation") or 0
        if refused >= generation and refused > accepted:
            return [str(e) for e in rules.get("refused") or []] or [str(rules.get("error"))]
        if accepted >= generation:
            return []
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_SECONDS)


def report(verdict: Verdict | None, state_dir: Path, timeout: float, *,
           v2_rules: bool = False) -> int:
    if verdict is None:
        print(f"ingestd: the daemon gave no verdict within {timeout:g}s (see its log)",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    if not verdict.applied:
        print(f"reload rejected by the daemon (pid {verdict.pid}); the settings of generation "
              f"{verdict.generation} stay in force:", *verdict.errors, sep="\n", file=sys.stderr)
        return EXIT_CONFIG
    behind = workers_at(state_dir, verdict.generation, timeout)
    if behind:
        print(f"ingestd: reload accepted as generation {verdict.generation}, but the "
              f"{' and '.join(behind)} worker has not adopted it within {timeout:g}s",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    if v2_rules and (code := report_rules(verdict, state_dir, timeout)) is not None:
        return code
    stream = runstate.read_status(state_dir, "stream") or {}
    standing_by = isinstance(ha := stream.get("ha"), dict) and ha.get("role") == "standby"
    print(f"reload applied: generation {verdict.generation} (pid {verdict.pid})"
          f"{describe(verdict.changes, standing_by)}")
    if later := verdict.changes.get("restart_needed"):
        verb = "takes" if len(later) == 1 else "take"
        print(f"note: {', '.join(map(str, later))} {verb} effect only after a restart "
              "(systemctl restart ingestd); until then the old values stay in force")
    return 0


def report_rules(verdict: Verdict, state_dir: Path, timeout: float) -> int | None:
    """v2: the rules are part of the settings but the endpoint judges them, after the workers
    adopted the generation: a refusal rejects the reload (78), an unknown outcome is 69."""
    refused = rules_outcome(state_dir, verdict.generation, timeout)
    if refused is None:
        print(f"ingestd: reload accepted as generation {verdict.generation}, but the endpoint "
              f"has not confirmed its stream.rules within {timeout:g}s (see `ingestd status`)",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    if refused:
        print(f"reload rejected: the endpoint refused the stream.rules of generation "
              f"{verdict.generation} (pid {verdict.pid}); the previous rules stay in force:",
              *refused, sep="\n", file=sys.stderr)
        return EXIT_CONFIG
    return None


def describe(changes: Mapping[str, Any], standing_by: bool = False) -> str:
    """``; track +ipod -iphone; new connection (stream.track changed)`` from the supervisor's
    reload fields, or a note that the connection stays. Whether it reconnects is the daemon's
    own ``filter_changed`` (the reader's rule), never guessed from the diff. A standby of a pair
    (``standing_by``) has no connection: its first one, once active, uses the new filters."""
    diff = changes.get("filter_diff")
    parts = [f"{name} " + " ".join([f"+{v}" for v in d.get("added", [])]
                                   + [f"-{v}" for v in d.get("removed", [])])
             for name, d in (diff.items() if isinstance(diff, dict) else ())
             if isinstance(d, dict) and (d.get("added") or d.get("removed"))]
    changed = changes.get("filter_changed")
    if changed is None:  # a verdict without the field (an older daemon): the diff alone
        return "; " + ", ".join(parts) if parts else ""
    if not changed:
        return "; filters unchanged (no reconnect)"
    keys = changes.get("reconnect") or ["stream settings"]
    notes = [", ".join(parts)] if parts else []
    changed_keys = ", ".join(map(str, keys))
    notes.append(f"no connection to change, standing by ({changed_keys} changed: used once "
                 "this instance becomes active)" if standing_by
                 else f"new connection ({changed_keys} changed)")
    return "; " + "; ".join(notes)
