"""X API v2 stream rules: read the server's rules, diff them with the settings, change only that.

Rules live on the server, not on the connection (docs/protocol.md §7.3): changing them never needs a
reconnect, so a reload loses nothing. A sync is

    1. ``GET …/rules``                       the rules in force now
    2. diff against ``stream.rules``         a rule is its (value, tag); a tag cannot be edited,
                                             so a new tag is a delete plus an add
    3. ``POST …/rules?dry_run=true`` adds    the server validates; any error stops here, nothing
                                             changed (the previous rules stay in force)
    4. ``POST …/rules`` delete, then add     only what changed; if the add still fails, the
                                             deleted rules are put back

The calls go through ``v2_rules_client.RulesClient``. ``RulesSync`` runs syncs on a thread so the
stream worker's read loop never waits for the rules endpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from ingestd.config.schema import AuthSettings, Rule, StreamSettings
from ingestd.source.v2_request import DIAGNOSE_401
from ingestd.source.v2_rules_client import REQUEST_TIMEOUT, RulesClient, RulesError, ServerRule

log = structlog.get_logger("ingestd.source.v2_rules")

RETRY_START, RETRY_CAP = 1.0, 60.0  # transient failures (network, 5xx, 429) of the rules calls
# Dry-run errors that the delete step resolves: the value is taken by a rule we delete first,
# or the cap counts rules we are about to delete (the dry run cannot know).
DUPLICATE_TITLE = "DuplicateRule"
CAP_TITLES = frozenset({"RulesCapExceeded"})


@dataclass(frozen=True, slots=True)
class RulesDiff:
    add: tuple[Rule, ...]
    delete: tuple[ServerRule, ...]
    keep: tuple[ServerRule, ...]

    def __bool__(self) -> bool:
        return bool(self.add or self.delete)

    def as_log(self) -> dict[str, Any]:
        return {"added": [_show(r.value, r.tag) for r in self.add],
                "deleted": [_show(r.value, r.tag) for r in self.delete],
                "unchanged": len(self.keep)}


def _show(value: str, tag: str | None) -> str:
    return f"{value} [{tag}]" if tag else value


def diff_rules(current: Sequence[ServerRule], desired: Sequence[Rule]) -> RulesDiff:
    """What to delete and add so the server holds exactly ``desired`` (order kept)."""
    wanted = {(r.value, r.tag) for r in desired}
    have = {r.key() for r in current}
    return RulesDiff(
        add=tuple(r for r in desired if (r.value, r.tag) not in have),
        delete=tuple(r for r in current if r.key() not in wanted),
        keep=tuple(r for r in current if r.key() in wanted),
    )


# ---------------------------------------------------------------- one sync


@dataclass
class SyncResult:
    diff: RulesDiff
    in_force: list[ServerRule]


def sync_rules(client: RulesClient, desired: Sequence[Rule]) -> SyncResult:
    """Make the server hold ``desired``; on a refusal the previous rules stay (RulesError)."""
    current = client.current()
    diff = diff_rules(current, desired)
    if not diff:
        return SyncResult(diff, current)
    if diff.add:
        client.add(diff.add, dry_run=True, ignore=_resolved_by_delete(diff))
    if diff.delete:
        client.delete([r.id for r in diff.delete])
    try:
        added = client.add(diff.add) if diff.add else []
    except RulesError as exc:
        _restore(client, diff)
        raise RulesError([*exc.messages, "previous rules restored"]) from None
    return SyncResult(diff, [*diff.keep, *added])


def _resolved_by_delete(diff: RulesDiff) -> Callable[[dict[str, Any]], bool]:
    deleted_values = {r.value for r in diff.delete}

    def ignore(err: dict[str, Any]) -> bool:  # the server's JSON: any value, hashable or not
        title, value = err.get("title"), err.get("value")
        if title == DUPLICATE_TITLE:
            return isinstance(value, str) and value in deleted_values
        return isinstance(title, str) and title in CAP_TITLES and bool(diff.delete)

    return ignore


def _restore(client: RulesClient, diff: RulesDiff) -> None:
    """Undo a half-applied change: remove what was added, re-add what was deleted."""
    try:
        now = client.current()
        wanted_back = {r.key() for r in diff.delete} | {r.key() for r in diff.keep}
        extra = [r.id for r in now if r.key() not in wanted_back]
        if extra:
            client.delete(extra)
        missing = {r.key() for r in now}
        back = [Rule(r.value, r.tag) for r in diff.delete if r.key() not in missing]
        if back:
            client.add(back)
    except RulesError as exc:
        log.error("rules_restore_failed", error=str(exc))


# ---------------------------------------------------------------- on a thread


@dataclass
class _Job:
    stream: StreamSettings
    auth: AuthSettings
    generation: int


@dataclass
class RulesStatus:
    """What run/stream.json shows about rules."""

    syncs: int = 0
    failures: int = 0
    in_force: list[dict[str, Any]] = field(default_factory=list)
    generation: int | None = None  # settings generation whose rules are in force
    error: str = ""  # last refusal; cleared by the next successful sync
    rate_limit: dict[str, str] = field(default_factory=dict)
    # The newest generation whose rules the endpoint refused, and its reasons: `ingestd reload`
    # reports that generation's reload as rejected, the supervisor counts it as a failed reload.
    refused_generation: int | None = None
    refused: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "failures": self.failures, "in_force": self.in_force,
                "generation": self.generation, "error": self.error,
                "rate_limit": self.rate_limit, "refused_generation": self.refused_generation,
                "refused": self.refused}


class RulesSync:
    """Runs rule syncs on one background thread; the newest request wins.

    Transient failures (network, 5xx, 429) are retried with back-off until they succeed or a
    newer request replaces them; refusals (invalid rule, duplicate, too many) are not retried:
    the previous rules stay in force and ``error`` says why until a reload fixes the settings.
    """

    def __init__(self, sleep: Callable[[float], bool] | None = None) -> None:
        self.status = RulesStatus()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._job: _Job | None = None
        self._sleep = sleep or self._wait
        self._thread: threading.Thread | None = None

    @property
    def error(self) -> str:
        return self.status.error

    def request(self, stream: StreamSettings, auth: AuthSettings, generation: int) -> None:
        """Sync to these settings' rules (no-op for v1.1)."""
        if stream.api != "v2":
            return
        with self._lock:
            self._job = _Job(stream, auth, generation)
        self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="v2-rules", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT + 1)

    def _wait(self, seconds: float) -> bool:
        """Sleep until ``seconds`` pass (True) or stop/a newer request (False)."""
        return not self._wake.wait(seconds) and not self._stop.is_set()

    def _take(self) -> _Job | None:
        with self._lock:
            job, self._job = self._job, None
            self._wake.clear()
            return job

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._take()
            if job is None:
                self._wake.wait()
                continue
            self._sync_with_retry(job)

    def _sync_with_retry(self, job: _Job) -> None:
        delay = RETRY_START
        client = RulesClient(job.stream, job.auth)
        while not self._stop.is_set():
            if self._sync_once(client, job):
                return
            if not self._sleep(delay):
                return  # stopping, or a newer request supersedes this one
            delay = min(delay * 2, RETRY_CAP)

    def _sync_once(self, client: RulesClient, job: _Job) -> bool:
        """One attempt; False means retry (transient failure)."""
        started = time.monotonic()
        try:
            result = sync_rules(client, job.stream.rules)
        except RulesError as exc:
            self.status.rate_limit = client.last_rate_limit
            return self._failed(exc, job)
        self.status.rate_limit = client.last_rate_limit
        self.status.syncs += 1
        self.status.error = ""
        self.status.generation = job.generation
        self.status.in_force = [{"id": r.id, "value": r.value, "tag": r.tag}
                                for r in result.in_force]
        event = "rules_synced" if result.diff else "rules_unchanged"
        log.info(event, generation=job.generation, took=round(time.monotonic() - started, 3),
                 in_force=len(result.in_force), **result.diff.as_log())
        return True

    def _failed(self, exc: RulesError, job: _Job) -> bool:
        self.status.failures += 1
        if exc.transient:
            log.warning("rules_sync_retry", generation=job.generation, error=str(exc)[:500])
            return False
        # what the endpoint filters by meanwhile: a first sync that failed left it none of ours
        kept = ("previous rules stay in force" if self.status.generation is not None
                else "the endpoint holds none of these settings' rules yet")
        if exc.credentials:  # not the rules' fault: the stream's own line says the same
            self.status.error = f"{DIAGNOSE_401} (rules endpoint: {exc})"[:500]
            action = f"{kept}; {DIAGNOSE_401}"
        else:
            self.status.error = f"rules not accepted: {exc}"[:500]
            action = f"{kept}; fix stream.rules and reload"
        self.status.refused_generation = job.generation
        self.status.refused = [self.status.error] if exc.credentials else exc.messages[:20]
        # Refused since the run began: whatever the connection does, the settings' filters are
        # not in force, and the coverage ledger says so (a rules_refused gap).
        effect = ({} if self.status.generation is not None else
                  {"effect": "the stream delivers nothing these settings' rules match: the "
                   "coverage ledger records a rules_refused gap until a sync is accepted"})
        log.error("rules_rejected", generation=job.generation, errors=exc.messages[:20],
                  rules=[r.value for r in job.stream.rules][:20], action=action, **effect)
        return True
