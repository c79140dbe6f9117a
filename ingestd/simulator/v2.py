"""The simulator's X API v2 filtered stream (docs/protocol.md §7): rules endpoint and stream.

Model. The app has one set of rules on the server (``GET``/``POST /2/tweets/search/stream/rules``:
add, delete, ``dry_run``, ``DuplicateRule``, invalid syntax, too many rules; ``GET`` in pages of
``max_results``, 1-1000, default 1000, with an opaque ``next_token``). A **firehose**
thread publishes tweets at ``--rate`` per second for as long as the simulator runs, whether or not
a client is connected: each candidate is evaluated against the rules in force at that moment, and
one that matches is *published* with its ``matching_rules``, kept in the delivery log (5 minutes),
and queued for each connected stream — or, with no stream connected, recorded as ``missed``. So a
rules change on the live connection takes effect for the next tweet without a reconnect, and a
reconnect gap really loses tweets unless the client asks for ``backfill_minutes``, which replays
the log's last N minutes (duplicates included, as documented).

Streams: bearer auth (401 problem JSON), ``--redundant`` connections per app (1 by default; one
more gets 429 ``TooManyConnections``; each connected one is queued every published tweet, as v2
Enterprise redundant connections carry the same tweets), ``x-rate-limit-*`` headers, ``\\r\\n``
keep-alives, scripted faults (``deliver``, ``keepalive_only``, ``stall``, ``close``, ``reset``,
``status``, ``bad_lines``; ``disconnect`` sends ``operational-disconnect``).
Ground truth: ``connect``/``close`` per request, ``tweet`` per line written, ``bad_line`` per bad
line, ``missed`` per published tweet never written (per connection it was queued for),
``backfill`` and ``rules`` (every change, with ids, values, tags).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from ingestd.simulator.script import Step, run_steps
from ingestd.simulator.session import bad_line
from ingestd.simulator.state import SimState
from ingestd.simulator.v2_rules import Expr, RuleSyntaxError, TweetView, matches, parse_rule
from ingestd.simulator.v2_rules import positive_branch as branch_terms
from ingestd.simulator.v2_tweets import Fields, V2Tweets
from ingestd.simulator.wire import GivenUp, Stopping, Wire

STREAM_PATH = "/2/tweets/search/stream"
RULES_PATH = STREAM_PATH + "/rules"
PREFIX = "/2/"
LOG_SECONDS = 300.0  # backfill_minutes is at most 5
TICK = 0.05  # firehose and session poll period (also how fast a vanished client is noticed)
STREAM_LIMIT, RULES_LIMIT, WINDOW = 50, 450, 900  # documented allowances per 15 minutes
MAX_BODY = 1 << 20
PAGE_MAX = 1000  # GET rules: max_results is 1-1000, 1000 when absent
PROBLEMS = "https://api.twitter.com/2/problems/"
UNAUTHORIZED = {"title": "Unauthorized", "type": "about:blank", "status": 401,
                "detail": "Unauthorized"}
TOO_MANY_CONNECTIONS = {
    "title": "ConnectionException",
    "detail": "This stream is currently at the maximum allowed connection limit.",
    "connection_issue": "TooManyConnections", "type": PROBLEMS + "streaming-connection"}
TOO_MANY_REQUESTS = {"title": "Too Many Requests", "detail": "Too Many Requests",
                     "type": "about:blank", "status": 429}
OPERATIONAL_DISCONNECT = {"errors": [{
    "title": "operational-disconnect", "disconnect_type": "UpstreamOperationalDisconnect",
    "detail": "This stream has been disconnected upstream for operational reasons.",
    "type": PROBLEMS + "operational-disconnect"}]}


@dataclass(frozen=True, slots=True)
class V2Options:
    """``ingestd simulate`` flags for v2 (an empty token refuses every v2 request)."""

    bearer_token: str = ""
    max_rules: int = 25
    max_rule_length: int = 512
    # Seconds a stream whose client went away still counts as the app's connection (a real
    # endpoint notices a closed client late): a reconnect meanwhile gets 429 TooManyConnections.
    close_lag: float = 0.0


@dataclass(frozen=True, slots=True)
class StoredRule:
    id: str
    value: str
    tag: str | None
    expr: Expr

    def public(self) -> dict[str, str]:
        return {"id": self.id, "value": self.value, **({"tag": self.tag} if self.tag else {})}


@dataclass(slots=True)
class Published:
    t: float
    id: int
    tweet: dict[str, Any]
    rules: list[dict[str, str]]


class _Window:
    """Requests in the last 15 minutes, for ``x-rate-limit-*`` headers."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.times: deque[float] = deque()

    def hit(self) -> dict[str, str]:
        now = time.time()
        while self.times and now - self.times[0] >= WINDOW:
            self.times.popleft()
        self.times.append(now)
        reset = int((self.times[0] if self.times else now) + WINDOW)
        return {"x-rate-limit-limit": str(self.limit),
                "x-rate-limit-remaining": str(max(self.limit - len(self.times), 0)),
                "x-rate-limit-reset": str(reset)}


# ---------------------------------------------------------------- the app (shared state)


class V2App:
    """Rules, firehose, delivery log and the connected streams; guarded by ``lock``."""

    def __init__(self, state: SimState, options: V2Options) -> None:
        self.state, self.options = state, options
        self.lock = threading.Lock()
        self.rules: dict[str, StoredRule] = {}
        self.log: deque[Published] = deque()
        self.active: list[V2Session] = []  # at most --redundant live streams
        seed = state.config.seed
        self.rng = random.Random(f"{seed}:v2" if seed is not None else None)
        self.tweets = V2Tweets(self.rng, state.ids)
        self.published = 0
        self.stream_window, self.rules_window = _Window(STREAM_LIMIT), _Window(RULES_LIMIT)
        self._firehose: threading.Thread | None = None

    def ensure_firehose(self) -> None:
        with self.lock:
            if self._firehose is None:
                self._firehose = threading.Thread(target=self._run_firehose, daemon=True,
                                                  name="sim-v2-firehose")
                self._firehose.start()

    # -- the firehose

    def _run_firehose(self) -> None:
        rate = self.state.config.rate or 1000.0
        limit = self.state.config.max_tweets
        start, made = time.monotonic(), 0
        while not self.state.stopping.wait(TICK):
            if limit is not None and self.published >= limit:
                continue
            with self.lock:
                idle = not self.rules
            if idle:  # nothing to publish for: do not save up a burst for later
                start, made = time.monotonic(), 0
                continue
            due = int((time.monotonic() - start) * rate) - made
            for _ in range(min(due, 512)):
                made += 1
                self._publish_one()
                if limit is not None and self.published >= limit:
                    break

    def _publish_one(self) -> None:
        with self.lock:
            rules = list(self.rules.values())
        if not rules:
            return
        tweet = (self.tweets.aimed(branch_terms(self.rng.choice(rules).expr, self.rng.choice))
                 if self.rng.random() < 0.9 else self.tweets.noise())
        view = TweetView.of(tweet, self.tweets.usernames())
        with self.lock:  # evaluated against the rules in force now (they may just have changed)
            hits = [r for r in self.rules.values() if matches(r.expr, view)]
            if not hits:
                return
            item = Published(time.time(), int(tweet["id"]), tweet,
                             [{"id": r.id, **({"tag": r.tag} if r.tag else {})} for r in hits])
            self.published += 1
            self.log.append(item)
            while self.log and item.t - self.log[0].t > LOG_SECONDS:
                self.log.popleft()
            sessions = list(self.active)
            for session in sessions:  # redundant streams each carry every tweet
                session.queue.append(item)
        for session in sessions:
            session.wake.set()
        if not sessions:
            self.state.ground_truth.event("missed", None, id=item.id)

    # -- rules

    def add_rules(self, entries: list[Any], dry_run: bool) -> tuple[int, dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        created: list[StoredRule] = []
        with self.lock:
            taken = {r.value: r.id for r in self.rules.values()}
            for entry in entries:
                rule = self._new_rule(entry, taken, errors)
                if rule is not None:
                    created.append(rule)
                    taken[rule.value] = rule.id
            room = self.options.max_rules - len(self.rules)
            if len(created) > room:
                errors.append({"title": "RulesCapExceeded", "type": PROBLEMS + "rule-cap",
                               "detail": f"Rule creation would exceed the cap of "
                                         f"{self.options.max_rules} rules "
                                         f"({len(self.rules)} in force, {len(created)} to add)"})
                created = []
            if not dry_run:
                self.rules.update({r.id: r for r in created})
        if created and not dry_run:
            self.state.ground_truth.event("rules", None, op="add",
                                          rules=[r.public() for r in created])
        return self._add_reply(entries, created, errors, dry_run)

    def _new_rule(self, entry: Any, taken: dict[str, str],
                  errors: list[dict[str, Any]]) -> StoredRule | None:
        value = entry.get("value") if isinstance(entry, dict) else None
        tag = entry.get("tag") if isinstance(entry, dict) else None
        if not isinstance(value, str):
            errors.append({"title": "Invalid Request", "type": PROBLEMS + "invalid-request",
                           "detail": "add[].value must be a string"})
            return None
        if value in taken:
            errors.append({"value": value, "id": taken[value], "title": "DuplicateRule",
                           "type": PROBLEMS + "duplicate-rules"})
            return None
        try:
            expr = parse_rule(value, self.options.max_rule_length)
        except RuleSyntaxError as exc:
            errors.append({"value": value, "details": [str(exc)], "title": "UnprocessableEntity",
                           "type": PROBLEMS + "invalid-rules"})
            return None
        rule_id = str(self.state.ids.next())
        return StoredRule(rule_id, value, tag if isinstance(tag, str) and tag else None, expr)

    def _add_reply(self, entries: list[Any], created: list[StoredRule],
                   errors: list[dict[str, Any]], dry_run: bool) -> tuple[int, dict[str, Any]]:
        summary = {"created": len(created), "not_created": len(entries) - len(created),
                   "valid": len(created), "invalid": len(entries) - len(created)}
        body: dict[str, Any] = {"meta": {"sent": _now_iso(), "summary": summary}}
        if created:
            body["data"] = [r.public() for r in created]
        if errors:
            body["errors"] = errors
        # Syntax errors are a 400 (the request is invalid); DuplicateRule alone answers 200.
        invalid = any(e.get("title") != "DuplicateRule" for e in errors)
        return (400 if invalid else 200), body

    def delete_rules(self, ids: list[Any], dry_run: bool) -> tuple[int, dict[str, Any]]:
        wanted = [str(i) for i in ids]
        with self.lock:
            found = [self.rules[i] for i in wanted if i in self.rules]
            if not dry_run:
                for rule in found:
                    del self.rules[rule.id]
        if found and not dry_run:
            self.state.ground_truth.event("rules", None, op="delete",
                                          rules=[r.public() for r in found])
        summary = {"deleted": len(found), "not_deleted": len(wanted) - len(found)}
        body: dict[str, Any] = {"meta": {"sent": _now_iso(), "summary": summary}}
        missing = [i for i in wanted if i not in {r.id for r in found}]
        if missing:
            body["errors"] = [{"value": i, "title": "Not Found Error",
                               "detail": f"Rule {i} does not exist",
                               "type": PROBLEMS + "resource-not-found"} for i in missing]
        return 200, body

    def list_rules(self, ids: set[str] | None, size: int = PAGE_MAX,
                   after: int = 0) -> dict[str, Any]:
        """One page: up to ``size`` rules with an id above ``after``, oldest first (ids grow, so
        a rule added or deleted while a client pages neither shifts nor repeats the others)."""
        with self.lock:
            rules = [r for r in self.rules.values()
                     if int(r.id) > after and (ids is None or r.id in ids)]
        page = [r.public() for r in rules[:size]]
        meta: dict[str, Any] = {"sent": _now_iso(), "result_count": len(page)}
        if len(rules) > size:
            meta["next_token"] = _page_token(int(rules[size - 1].id))
        return {"data": page, "meta": meta} if page else {"meta": meta}

    # -- streams

    def attach(self, session: V2Session, backfill_minutes: int) -> int | None:
        """Add ``session`` to the app's streams (None: ``--redundant`` are connected → 429).

        The backfill snapshot and the registration happen under one lock, so every published
        tweet is either in the replay or queued live: none falls between, none is in both.
        """
        with self.lock:
            self.active = [s for s in self.active if s.alive]
            if len(self.active) >= self.state.config.redundant:
                return None
            self.active.append(session)
            cutoff = time.time() - backfill_minutes * 60
            replay = [p for p in self.log if p.t >= cutoff] if backfill_minutes else []
            session.queue.extend(replay)
        return len(replay)

    def detach(self, session: V2Session) -> list[Published]:
        with self.lock:
            if session in self.active:
                self.active.remove(session)
            left, session.queue = list(session.queue), deque()
        return left

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"rules": [r.public() for r in self.rules.values()],
                    "published": self.published, "connected": len(self.active),
                    "log": len(self.log)}


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _page_token(after: int) -> str:
    """Opaque to the client (lower-case base32, as the real tokens look): the last id sent."""
    return base64.b32encode(after.to_bytes(8, "big")).decode().rstrip("=").lower()


def _page_after(token: str) -> int | None:
    """The id a ``pagination_token`` continues after; None: not one of ours."""
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except (binascii.Error, ValueError):
        return None
    return int.from_bytes(raw, "big") if len(raw) == 8 and token == token.lower() else None


def _invalid_parameter(name: str, value: str, why: str) -> dict[str, Any]:
    """The v2 400 for a bad query parameter, shaped as the real endpoint's."""
    return {"errors": [{"parameters": {name: [value]},
                        "message": f"The `{name}` query parameter value [{value}] {why}"}],
            "title": "Invalid Request", "detail": "One or more parameters to your request was "
            "invalid.", "type": PROBLEMS + "invalid-request"}


def _page_query(query: dict[str, str]) -> tuple[int, int] | dict[str, Any]:
    """(max_results, after id) of a ``GET …/rules``, or the 400 problem for a bad one."""
    size = query.get("max_results", str(PAGE_MAX))
    if not (size.isascii() and size.isdigit() and len(size) <= 4 and 1 <= int(size) <= PAGE_MAX):
        return _invalid_parameter("max_results", size, f"is not between 1 and {PAGE_MAX}")
    token = query.get("pagination_token")
    after = 0 if token is None else _page_after(token)
    if after is None:
        return _invalid_parameter("pagination_token", token or "", "is not valid")
    return int(size), after


# ---------------------------------------------------------------- one stream


@dataclass
class V2Session:
    """A live ``200`` stream: writes queued tweets, keep-alives, scripted faults."""

    app: V2App
    conn: int
    wire: Wire
    fields: Fields
    steps: list[Step]
    queue: deque[Published] = field(default_factory=deque)
    wake: threading.Event = field(default_factory=threading.Event)
    alive: bool = True
    sent: int = 0
    last_write: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.wire.on_blocked = self._on_blocked

    def run(self) -> str:
        try:
            try:
                reason = self._run_steps()
            except OSError as exc:
                reason = f"client closed ({type(exc).__name__})"
            except Stopping:
                reason = "shutdown (the client was reading nothing)"
            if reason.startswith("client closed") and (lag := self.app.options.close_lag):
                time.sleep(lag)  # not noticed yet: still the app's one connection
            return reason
        finally:
            self.alive = False

    def _run_steps(self) -> str:
        reason = run_steps(self.steps, self._step)
        return reason if reason is not None else (self._stream(None, None, tweets=True) or "ended")

    def _step(self, step: Step) -> str | None:
        kind, value = step.kind, step.value
        if kind == "deliver":
            return self._stream(count=value, duration=None, tweets=True)
        if kind == "keepalive_only":
            return self._stream(count=None, duration=value, tweets=False)
        if kind == "stall":
            return self._stream(count=None, duration=value, tweets=False, keepalives=False)
        if kind == "disconnect":
            self._write(self.wire.frame(orjson.dumps(OPERATIONAL_DISCONNECT)))
            self.app.state.ground_truth.event("control", self.conn, type="disconnect",
                                              code="operational-disconnect")
            self.wire.end()
            return "operational-disconnect"
        if kind == "close":
            self.wire.end()
            return "close"
        if kind in ("reset", "close_mid_message"):
            self.wire.reset()
            return kind
        if kind == "corrupt_gzip":
            self.wire.corrupt()
            return kind
        if kind == "bad_lines":
            self._send_bad_lines(value)
        return None  # v1.1-only steps (control, trickle, split, lone_surrogates) do not apply

    def _send_bad_lines(self, kinds: tuple[str, ...]) -> None:
        for kind in kinds:
            noise = {"data": self.app.tweets.noise()}
            line = bad_line(kind, self.app.state.config.max_line, noise)
            self._write(self.wire.frame(line))
            self.app.state.ground_truth.event("bad_line", self.conn, kind=kind)

    def _stream(self, count: int | None, duration: float | None, *, tweets: bool,
                keepalives: bool = True) -> str | None:
        end = time.monotonic() + duration if duration is not None else None
        sent_here = 0
        keepalive = self.app.state.config.keepalive
        while True:
            if self.app.state.stopping.is_set():
                self.wire.end()
                return "shutdown"
            if self.wire.client_gone():
                return "client closed"
            now = time.monotonic()
            if (end is not None and now >= end) or (count is not None and sent_here >= count):
                return None
            if tweets and self.queue:
                limit = None if count is None else count - sent_here
                sent_here += self._send_queued(limit)
                continue
            if keepalives and now - self.last_write >= keepalive:
                self._write(b"\r\n")
            self.wake.wait(TICK)
            self.wake.clear()

    def _send_queued(self, limit: int | None) -> int:
        with self.app.lock:
            n = len(self.queue) if limit is None else min(limit, len(self.queue))
            items = [self.queue.popleft() for _ in range(min(n, 256))]
        fields, render = self.fields, self.app.tweets.render
        data, ends = self.wire.encode_batch([render(p.tweet, p.rules, fields) for p in items])
        start = self.wire.bytes_sent
        try:
            self.wire.send(data)
        except GivenUp:
            self._record(items, *self.wire.completed(ends, self.wire.bytes_sent - start))
            raise
        self.last_write = time.monotonic()
        self._record(items, len(items))
        return len(items)

    def _record(self, items: list[Published], done: int, cut: bool = False) -> None:
        """The ground truth of a write: the tweets that went whole; those of a write given up
        part-way that did not are ``missed`` (published for us, never read), the one it cut
        ``partial`` too."""
        gt = self.app.state.ground_truth
        self.sent += done
        gt.tweets(self.conn, [p.id for p in items[:done]])
        if cut:
            gt.event("partial", self.conn, id=items[done].id)
        for item in items[done:]:
            gt.event("missed", self.conn, id=item.id)

    def _on_blocked(self) -> None:
        """A write waits for a client that reads nothing: a stop gives it up."""
        if self.app.state.stopping.is_set():
            raise Stopping

    def _write(self, body: bytes) -> None:
        self.wire.send(self.wire.encode(body))
        self.last_write = time.monotonic()


# ---------------------------------------------------------------- HTTP routes


def handle(app: V2App, handler: BaseHTTPRequestHandler) -> None:
    """Serve one ``/2/...`` request on ``handler`` (the server's request handler)."""
    parts = urlsplit(handler.path)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if parts.path == RULES_PATH:
        _rules_request(app, handler, query)
    elif parts.path == STREAM_PATH and handler.command == "GET":
        _stream_request(app, handler, query)
    else:
        _reply(handler, 404, {"title": "Not Found Error", "type": PROBLEMS + "resource-not-found",
                              "detail": f"No route for {handler.command} {parts.path}"})


def _authorised(app: V2App, handler: BaseHTTPRequestHandler) -> bool:
    given = handler.headers.get("Authorization", "")
    token = app.options.bearer_token
    expected = f"Bearer {token}"
    return bool(token) and hmac.compare_digest(given.encode(), expected.encode())


def _rules_request(app: V2App, handler: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
    limits = app.rules_window.hit()
    if not _authorised(app, handler):
        _reply(handler, 401, UNAUTHORIZED, limits)
        return
    if handler.command == "GET":
        ids = set(query["ids"].split(",")) if query.get("ids") else None
        page = _page_query(query)
        if isinstance(page, dict):
            _reply(handler, 400, page, limits)
        else:
            _reply(handler, 200, app.list_rules(ids, *page), limits)
        return
    try:
        length = int(handler.headers.get("Content-Length") or 0)
        body = orjson.loads(handler.rfile.read(length)) if 0 < length <= MAX_BODY else None
    except (ValueError, orjson.JSONDecodeError):
        body = None
    dry_run = query.get("dry_run") == "true"
    app.ensure_firehose()
    if isinstance(body, dict) and isinstance(body.get("add"), list):
        status, reply = app.add_rules(body["add"], dry_run)
    elif isinstance(body, dict) and isinstance(body.get("delete"), dict) and isinstance(
            body["delete"].get("ids"), list):
        status, reply = app.delete_rules(body["delete"]["ids"], dry_run)
    else:
        status, reply = 400, {"title": "Invalid Request", "type": PROBLEMS + "invalid-request",
                              "detail": "Body must be {\"add\": [...]} or "
                                        "{\"delete\": {\"ids\": [...]}}"}
    _reply(handler, status, reply, limits)


def _fields(query: dict[str, str]) -> Fields:
    def items(name: str) -> frozenset[str]:
        return frozenset(v for v in query.get(name, "").split(",") if v)
    return Fields(items("tweet.fields"), items("expansions"), items("user.fields"),
                  items("place.fields"))


def _stream_request(app: V2App, handler: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
    state = app.state
    conn = state.next_attempt()
    limits = app.stream_window.hit()
    gt = state.ground_truth
    if not state.rate_limiter.allow():
        gt.event("connect", conn, api="v2", params=query, status=429, reason="rate limit")
        _reply(handler, 429, TOO_MANY_REQUESTS, limits)
        return
    if not _authorised(app, handler):
        gt.event("connect", conn, api="v2", params=query, status=401)
        _reply(handler, 401, UNAUTHORIZED, limits)
        return
    backfill = _backfill(query)
    app.ensure_firehose()
    steps = state.config.script.take() if state.config.script else []
    if steps and steps[0].kind == "status":
        gt.event("connect", conn, api="v2", params=query, status=steps[0].value, scripted=True)
        body = steps[0].extra["body"].encode()
        _reply_raw(handler, steps[0].value, body, "application/json",
                   {**limits, **steps[0].extra["headers"]})
        return
    _open_stream(app, handler, conn, query, limits, backfill, steps)


def _backfill(query: dict[str, str]) -> int:
    value = query.get("backfill_minutes", "0")
    return int(value) if value.isdigit() and 0 <= int(value) <= 5 else 0


def _open_stream(app: V2App, handler: BaseHTTPRequestHandler, conn: int, query: dict[str, str],
                 limits: dict[str, str], backfill: int, steps: list[Step]) -> None:
    state = app.state
    gt = state.ground_truth
    sock: socket.socket = handler.connection
    use_gzip = "gzip" in handler.headers.get("Accept-Encoding", "").lower()
    session = V2Session(app, conn, Wire(sock, gzip=use_gzip, delimited=False), _fields(query),
                        steps)
    replayed = app.attach(session, backfill)
    if replayed is None:
        gt.event("connect", conn, api="v2", params=query, status=429,
                 reason="TooManyConnections")
        _reply(handler, 429, TOO_MANY_CONNECTIONS, limits)
        return
    gt.event("connect", conn, api="v2", params=query, status=200)  # before the client sees it
    if backfill:
        gt.event("backfill", conn, minutes=backfill, tweets=replayed)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.send_header("Connection", "close")
    if use_gzip:
        handler.send_header("Content-Encoding", "gzip")
    for name, value in limits.items():
        handler.send_header(name, value)
    handler.end_headers()
    sock.setblocking(False)  # the body's writes wait in Wire, which watches for a stop meanwhile
    reason = "ended"
    try:
        reason = session.run()
    finally:
        handler.close_connection = True
        for item in app.detach(session):  # published for us, never written: lost
            gt.event("missed", conn, id=item.id)
        gt.event("close", conn, reason=reason, tweets=session.sent)


def _reply(handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any],
           headers: dict[str, str] | None = None) -> None:
    _reply_raw(handler, status, orjson.dumps(body), "application/json", headers or {})


def _reply_raw(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str,
               headers: dict[str, str]) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    with contextlib.suppress(OSError):
        handler.wfile.write(body)
    handler.close_connection = True
