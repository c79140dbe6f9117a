"""X API v2 stream rules: read the server's rules, diff them with the settings, change only that.

Rules live on the server, not on the connection (protocol.md §7.3): changing them never needs a
reconnect, so a reload loses nothing. A sync is

    1. ``GET …/rules``                       the rules in force now
    2. diff against ``stream.rules``         a rule is its (value, tag); a tag cannot be edited,
                                             so a new tag is a delete plus an add
    3. ``POST …/rules?dry_run=true`` adds    the server validates; any error stops here, nothing
                                             changed (the previous rules stay in force)
    4. ``POST …/rules`` delete, then add     only what changed; if the add still fails, the
                                             deleted rules are put back

HTTP is pycurl easy handles, like the stream: one HTTP stack, the same CA bundle
(``stream.ca_file``) and the same TLS policy (always verified; plain http only for loopback, which
settings.py enforces on ``stream.url``, the base of the rules URL). ``RulesSync`` runs syncs on a
thread so the stream worker's read loop never waits for the rules endpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import certifi
import orjson
import pycurl
import structlog

from ingestd.config.schema import AuthSettings, Rule, StreamSettings
from ingestd.source.headers import parse_header_line
from ingestd.source.v2_request import bearer_headers, rules_url

log = structlog.get_logger("ingestd.source.v2_rules")

REQUEST_TIMEOUT = 30  # seconds for one rules call
MAX_BODY = 4 << 20
RETRY_START, RETRY_CAP = 1.0, 60.0  # transient failures (network, 5xx, 429) of the rules calls
# Dry-run errors that the delete step resolves: the value is taken by a rule we delete first,
# or the cap counts rules we are about to delete (the dry run cannot know).
DUPLICATE_TITLE = "DuplicateRule"
CAP_TITLES = frozenset({"RulesCapExceeded"})


@dataclass(frozen=True, slots=True)
class ServerRule:
    """A rule as the server holds it."""

    id: str
    value: str
    tag: str | None = None

    def key(self) -> tuple[str, str | None]:
        return self.value, self.tag


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


class RulesError(Exception):
    """The server refused a rules call; ``messages`` are its own words, one per problem."""

    def __init__(self, messages: Sequence[str], *, transient: bool = False) -> None:
        super().__init__("; ".join(messages))
        self.messages = list(messages)
        self.transient = transient


def diff_rules(current: Sequence[ServerRule], desired: Sequence[Rule]) -> RulesDiff:
    """What to delete and add so the server holds exactly ``desired`` (order kept)."""
    wanted = {(r.value, r.tag) for r in desired}
    have = {r.key() for r in current}
    return RulesDiff(
        add=tuple(r for r in desired if (r.value, r.tag) not in have),
        delete=tuple(r for r in current if r.key() not in wanted),
        keep=tuple(r for r in current if r.key() in wanted),
    )


# ---------------------------------------------------------------- the HTTP client


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


class RulesClient:
    """``GET``/``POST /2/tweets/search/stream/rules`` with the bearer token."""

    def __init__(self, stream: StreamSettings, auth: AuthSettings) -> None:
        self.url = rules_url(stream)
        self.ca_file = stream.ca_file or certifi.where()
        self.connect_timeout = max(1, round(stream.connect_timeout))
        self._headers = bearer_headers(auth)
        self.last_rate_limit: dict[str, str] = {}

    def current(self) -> list[ServerRule]:
        reply = self._call("GET", self.url, None)
        self._raise_errors(reply)
        return [_server_rule(r) for r in _list(reply.body.get("data"))]

    def add(self, rules: Sequence[Rule], *, dry_run: bool = False,
            ignore: Callable[[dict[str, Any]], bool] = lambda _e: False) -> list[ServerRule]:
        body = {"add": [{"value": r.value, **({"tag": r.tag} if r.tag else {})} for r in rules]}
        url = self.url + ("?dry_run=true" if dry_run else "")
        reply = self._call("POST", url, body)
        self._raise_errors(reply, ignore)
        return [_server_rule(r) for r in _list(reply.body.get("data"))]

    def delete(self, ids: Sequence[str]) -> int:
        reply = self._call("POST", self.url, {"delete": {"ids": list(ids)}})
        self._raise_errors(reply)
        summary = reply.body.get("meta", {}).get("summary", {})
        return int(summary.get("deleted", 0)) if isinstance(summary, dict) else 0

    def _call(self, method: str, url: str, payload: dict[str, Any] | None) -> _Response:
        buf, status = BytesIO(), [0]
        headers: dict[str, str] = {}

        def on_header(line: bytes) -> None:
            if (code := parse_header_line(line, headers)) is not None:
                status[0] = code

        def on_data(data: bytes) -> int | None:
            if buf.tell() + len(data) > MAX_BODY:
                return 0  # abort: no rules reply is this large
            buf.write(data)
            return None

        curl = pycurl.Curl()
        try:
            self._configure(curl, method, url, payload, on_header, on_data)
            curl.perform()
        except pycurl.error as exc:
            raise RulesError([f"rules endpoint unreachable: {exc.args[1]} (curl error "
                              f"{exc.args[0]})"], transient=True) from None
        finally:
            curl.close()
        self.last_rate_limit = {k: v for k, v in headers.items() if k.startswith("x-rate-limit")}
        return _Response(status[0], headers, _json_object(buf.getvalue()))

    def _configure(self, curl: pycurl.Curl, method: str, url: str,
                   payload: dict[str, Any] | None, on_header: Callable[[bytes], None],
                   on_data: Callable[[bytes], int | None]) -> None:
        lines = list(self._headers)
        curl.setopt(pycurl.URL, url)
        if method == "POST":
            lines.append("Content-Type: application/json")
            curl.setopt(pycurl.POSTFIELDS, orjson.dumps(payload).decode())
        curl.setopt(pycurl.HTTPHEADER, lines)
        curl.setopt(pycurl.HEADERFUNCTION, on_header)
        curl.setopt(pycurl.WRITEFUNCTION, on_data)
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.TIMEOUT, REQUEST_TIMEOUT)
        curl.setopt(pycurl.CONNECTTIMEOUT, self.connect_timeout)
        # TLS is always verified; settings refuse plain http:// for anything but loopback.
        curl.setopt(pycurl.CAINFO, self.ca_file)
        curl.setopt(pycurl.SSL_VERIFYPEER, 1)
        curl.setopt(pycurl.SSL_VERIFYHOST, 2)

    @staticmethod
    def _raise_errors(reply: _Response,
                      ignore: Callable[[dict[str, Any]], bool] | None = None) -> None:
        reported = [e for e in _list(reply.body.get("errors")) if isinstance(e, dict)]
        errors = [e for e in reported if ignore is None or not ignore(e)]
        # A dry run refused only for reasons the delete step resolves counts as accepted.
        if not errors and (200 <= reply.status < 300 or reported):
            return
        messages = [_describe_error(e) for e in errors] or [_describe_problem(reply)]
        transient = reply.status == 429 or reply.status >= 500 or reply.status == 0
        raise RulesError(messages, transient=transient)


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        return {"detail": raw[:300].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {}


def _server_rule(raw: object) -> ServerRule:
    if not isinstance(raw, dict):
        return ServerRule("", "")
    tag = raw.get("tag")
    return ServerRule(str(raw.get("id", "")), str(raw.get("value", "")),
                      tag if isinstance(tag, str) and tag else None)


def _describe_error(err: dict[str, Any]) -> str:
    """``Title: 'rule value': detail`` in the server's own words."""
    title = str(err.get("title") or err.get("type") or "error")
    details = err.get("details")
    detail = "; ".join(str(d) for d in details) if isinstance(details, list) else ""
    detail = detail or str(err.get("detail") or err.get("message") or "")
    value = err.get("value")
    where = f" {value!r}" if isinstance(value, str) else ""
    return f"{title}{where}: {detail}" if detail else f"{title}{where}"


def _describe_problem(reply: _Response) -> str:
    body = reply.body
    title = str(body.get("title") or "")
    detail = str(body.get("detail") or "")
    text = ": ".join(p for p in (title, detail) if p) or "no details"
    return f"HTTP {reply.status}: {text}"


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

    def ignore(err: dict[str, Any]) -> bool:
        title = err.get("title")
        if title == DUPLICATE_TITLE:
            return err.get("value") in deleted_values
        return title in CAP_TITLES and bool(diff.delete)

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

    def as_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "failures": self.failures, "in_force": self.in_force,
                "generation": self.generation, "error": self.error,
                "rate_limit": self.rate_limit}


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
        self.status.error = f"rules not accepted: {exc}"[:500]
        log.error("rules_rejected", generation=job.generation, errors=exc.messages[:20],
                  action="previous rules stay in force; fix stream.rules and reload")
        return True
