"""One streaming response: runs the connection's script steps, then streams normally.

All socket writes happen on the handler thread that owns the session. Other threads only set
``wake`` (a newer connection with the same credentials, or shutdown); every wait in here is on that
event, so a kick or stop is noticed at once, never after a sleep.
"""

from __future__ import annotations

import collections
import contextlib
import math
import random
import select
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson

from ingestd.simulator import generator as gen
from ingestd.simulator.backlog import Backlog, Pace
from ingestd.simulator.feed import Feed, Outgoing
from ingestd.simulator.generator import Template
from ingestd.simulator.params import StreamParams
from ingestd.simulator.redundant import FeedCursor
from ingestd.simulator.script import Step, run_steps
from ingestd.simulator.state import SimState
from ingestd.simulator.wire import ClientClosed, GivenUp, Stopping, Wire

CLOSE_LOOK = 0.05  # s between looks for a client's close on an idle connection

BATCH = 512  # messages per write on the fast path
_CONTROL_WEIGHTS = {
    "delete": 40,
    "limit": 20,
    "scrub_geo": 10,
    "status_withheld": 10,
    "user_withheld": 10,
}  # no warning: FALLING_BEHIND comes when the client falls behind (backlog.py), or from a script
_CONTROL_KINDS, _CONTROL_WEIGHT_LIST = list(_CONTROL_WEIGHTS), list(_CONTROL_WEIGHTS.values())


# Writes remembered for a reset's ground truth: more than any socket's send buffer holds.
RECENT_BYTES = 16 << 20


class LoggedOut(GivenUp):
    """A newer connection on the same credentials logged this one out. The disconnect message
    cannot follow half a write, so the endpoint closes without it (docs/protocol.md)."""


class Session:
    """A live ``200`` stream for connection number ``conn``."""

    def __init__(
        self,
        state: SimState,
        conn: int,
        identity: str,
        params: StreamParams,
        wire: Wire,
        steps: list[Step],
    ) -> None:
        cfg = state.config
        self.state = state
        self.conn = conn
        self.identity = identity
        self.params = params
        self.wire = wire
        self.steps = steps
        seed = f"{cfg.seed}:{conn}" if cfg.seed is not None else None
        self.rng = random.Random(seed)
        pool = cfg.pool_size if cfg.rate <= 0 else 0
        feed = Feed(params, cfg.source, self.rng, state.ids, state.real, pool)
        self.feed: Feed | FeedCursor = feed
        if cfg.redundant > 1:  # every stream of these credentials carries the same tweets
            self.feed = FeedCursor(state.shared_feed(identity, feed), feed.generator)
        self.wake = threading.Event()
        self.kick_code: int | None = None
        self.tweets_sent = 0
        # (the wire's socket_bytes after a write, the tweet ids it completed), the last
        # RECENT_BYTES: a reset discards the bytes the client had not acknowledged yet
        self._recent: collections.deque[tuple[int, list[int]]] = collections.deque()
        self.limit_track = 0
        self.since_control = 0
        self.last_write = time.monotonic()
        self.starved_until = 0.0
        self.backlog = Backlog(cfg.queue, params.stall_warnings, cfg.warning_interval)
        self._pace: Pace | None = None  # while tweets are published at --rate
        wire.on_blocked = self._on_blocked

    def kick(self, code: int) -> None:
        """Called from another thread: end this stream with a ``disconnect`` message."""
        self.kick_code = code
        self.wake.set()

    # --- main loop ----------------------------------------------------------------------

    def run(self) -> str:
        """Stream until the script, a kick, shutdown or the client ends it; return why."""
        try:
            reason = run_steps(self.steps, self._step)
            return reason if reason is not None else (self._stream() or "ended")
        except OSError as exc:  # the client went away (EPIPE, ECONNRESET, ...)
            return f"client closed ({type(exc).__name__})"
        except Stopping:
            return "shutdown (the client was reading nothing)"
        except LoggedOut:
            with contextlib.suppress(OSError):  # the client may have gone meanwhile
                self.wire.hang_up()  # the bytes the socket took still go, then the end
            return f"disconnect {self.kick_code} (newer connection; the client was reading nothing)"

    def _step(self, step: Step) -> str | None:
        """Run one script step; a string return means the connection is over."""
        kind, value = step.kind, step.value
        if kind == "deliver":
            return self._stream(count=value)
        if kind == "keepalive_only":
            return self._stream(duration=value, tweets=False)
        if kind == "stall":  # silent, but a client's close (or half-close) ends it at once
            self._idle(value)
            return self._interrupted() if self.wake.is_set() else None
        if kind == "split":
            self.wire.split = value
        elif kind == "control":
            self._send_control(value)
        elif kind == "bad_lines":
            self._send_bad_lines(value)
        elif kind == "lone_surrogates":
            self._send_lone_surrogates(value)
        elif kind == "trickle":
            return self._trickle(value["bytes"], value["interval"], value["count"])
        else:
            return self._terminal(step)
        return None

    def _terminal(self, step: Step) -> str:
        kind = step.kind
        if kind == "disconnect":
            self._send_disconnect(step.value)
            return f"disconnect {step.value}"
        if kind == "close":
            self.wire.end()
            return "close"
        if kind == "close_mid_message":
            self._send_half()
            self.wire.hang_up()
            return "close_mid_message"
        if kind == "corrupt_gzip":
            self._send_corrupt(step.extra.get("tweets", 0), step.extra.get("partial", False))
            return "corrupt_gzip"
        if step.extra.get("mid_message"):  # reset
            self._send_half()
        self._note_unacked()
        self.wire.reset()
        return "reset"

    def _stream(
        self, count: int | None = None, duration: float | None = None, tweets: bool = True
    ) -> str | None:
        """Tweets at ``--rate`` (with controls and keep-alives) until count/duration is reached."""
        rate = self.state.config.rate
        pace = Pace(rate, time.monotonic(), count=count, quota=self._quota_left())
        self._pace = pace if tweets and rate > 0 else None
        try:
            return self._pass_until(pace, duration, tweets)
        finally:
            self._pace = None

    def _pass_until(self, pace: Pace, duration: float | None, tweets: bool) -> str | None:
        rate, count, start = pace.rate, pace.count, pace.start
        starved = False
        while not self.wake.is_set():
            if self.wire.client_gone():  # a stopping client reads on: write nothing after its FIN
                raise ClientClosed("the client closed its end")
            now = time.monotonic()
            if (duration is not None and now - start >= duration) or (
                count is not None and pace.sent >= count
            ):
                return None
            next_at = math.inf
            if tweets and self._may_tweet(now):
                if starved:  # what the source could not give was never published
                    pace.rebase(now)
                    starved = False
                if self._pace is not None and (ended := self._behind(pace, now)):
                    return ended
                due = BATCH if rate <= 0 else int((now - pace.start) * rate) + 1 - pace.sent
                due = min(due, BATCH, self._quota(),
                          (count - pace.sent) if count is not None else BATCH)
                if due > 0:
                    got = self._send_tweets(due)
                    pace.sent += got
                    if got < due:  # the source ran dry for now: retry in a second
                        self.starved_until = now + 1.0
                        starved = rate > 0
                    continue
                next_at = pace.start + pace.sent / rate
            elif tweets and self._quota() > 0:
                next_at = self.starved_until  # the source ran dry: try again then
            # else: --max-tweets used up; only keep-alives from now on (sleep until the next)
            idle_until = self.last_write + self.state.config.keepalive
            if now >= idle_until:
                self._write(self.wire.encode(b"\r\n"))
                continue
            end = start + duration if duration is not None else math.inf
            self._idle(max(0.0, min(next_at, idle_until, end) - now))
        return self._interrupted()

    def _behind(self, pace: Pace, now: float) -> str | None:
        """The queue before this pass's write: a warning is due, or a full queue ends the stream
        (dropped, then disconnect code 4)."""
        backlog = self.backlog
        self._observe(pace, now)
        warning = backlog.take_warning()  # noted before any overflow: it comes first
        if warning is not None:
            percent, queued = warning
            payload = orjson.dumps(gen.warning_msg(percent))
            self._write(self.wire.encode(self.wire.frame(payload)))
            self.state.ground_truth.event("control", self.conn, type="warning",
                                          percent_full=percent, queued=queued)
        if backlog.overflow is not None:
            self._pace = None  # the rest is the disconnect message, not queued tweets
            self._send_disconnect(4)
            return "disconnect 4 (queue full)"
        return None

    def _on_blocked(self) -> None:
        """A write waits for a client that reads nothing, while the queue behind it fills; a stop
        or a newer connection gives the write up."""
        if self.wake.is_set():
            raise Stopping if self.kick_code is None else LoggedOut
        pace = self._pace
        if pace is not None:
            self._observe(pace, time.monotonic())

    def _observe(self, pace: Pace, now: float) -> None:
        """The queue's depth, noted; when it first overflows the ground truth says so at once
        (the client may read nothing for a long time yet): the queued tweets are dropped."""
        backlog, queued = self.backlog, pace.queued(now)
        if backlog.overflow is None:
            backlog.observe(queued, now)
            if backlog.overflow is not None:
                self.state.ground_truth.event("queue_full", self.conn, queued=backlog.overflow,
                                              capacity=backlog.capacity)

    def _idle(self, timeout: float) -> None:
        """Wait up to ``timeout`` or until woken; a client that closes its end meanwhile ends the
        connection at once, so the ground truth records when it closed (an idle connection would
        otherwise notice only at its next keep-alive write, up to ``--keepalive`` later)."""
        deadline = time.monotonic() + timeout
        sock = self.wire.sock
        while not self.wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([sock], [], [], min(left, CLOSE_LOOK))
            if ready:
                if self.wire.client_gone():
                    raise ClientClosed("the client closed its end")
                self.wake.wait(min(left, CLOSE_LOOK))  # bytes from the client: not a close

    def _may_tweet(self, now: float) -> bool:
        return self._quota() > 0 and now >= self.starved_until

    def _quota(self) -> int:
        left = self._quota_left()
        return BATCH if left is None else left

    def _quota_left(self) -> int | None:
        limit = self.state.config.max_tweets
        return None if limit is None else max(0, limit - self.tweets_sent)

    def _interrupted(self) -> str:
        """Woken by another thread: a newer connection (code 7) or shutdown."""
        if self.kick_code is not None:
            self._send_disconnect(self.kick_code)
            return f"disconnect {self.kick_code} (newer connection)"
        self.wire.end()
        return "shutdown"

    # --- writing ------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.wire.send(data)
        self.last_write = time.monotonic()

    def _send_tweets(self, n: int) -> int:
        """Up to ``n`` tweets (plus due control messages) in one write; returns tweets sent."""
        bodies: list[bytes] = []
        items: list[Outgoing | dict[str, Any]] = []  # bodies' tweets and controls' events
        tweets = 0
        every = self.state.config.control_every
        for _ in range(n):
            out = self.feed.next()
            if out is None:
                break
            bodies.append(out.payload)
            items.append(out)
            tweets += 1
            self.since_control += 1
            if every and self.since_control >= every:
                self.since_control = 0
                payload, event = self._control(self._pick_control())
                bodies.append(payload)
                items.append(event)
        if bodies:
            data, ends = self.wire.encode_batch(bodies)
            with self._delivering(items, ends):
                self._write(data)
            self._record_items(items, len(items))
        return tweets

    def _record(self, sent: list[Outgoing]) -> None:
        """Ground truth and counters for tweets whose bytes are all on the socket."""
        if not sent:
            return
        self.tweets_sent += len(sent)
        ids = [o.id for o in sent]
        self.state.ground_truth.tweets(self.conn, ids)
        end = self.wire.socket_bytes
        recent = self._recent
        recent.append((end, ids))
        while recent[0][0] < end - RECENT_BYTES:
            recent.popleft()
        # a sample is plenty for delete/scrub_geo/withheld targets, and keeps the hot path cheap
        self.state.delivered.add([(o.id, o.user_id) for o in sent[::8]])
        self.state.count_tweets(self.conn, len(sent))

    @contextlib.contextmanager
    def _delivering(self, items: list[Outgoing | dict[str, Any]], ends: list[int],
                    since: int | None = None) -> Iterator[None]:
        """Around the write of ``items`` (encoded, each ending at ``ends`` from body offset
        ``since``, by default here): if it is given up part-way, the ground truth still gets each
        one whose last byte went out, and the tweet it cut as ``partial``, so it stays exactly
        what a client could have read."""
        start = self.wire.bytes_sent if since is None else since
        try:
            yield
        except GivenUp:
            self._record_items(items, *self.wire.completed(ends, self.wire.bytes_sent - start))
            raise

    def _record_items(self, items: list[Outgoing | dict[str, Any]], done: int, cut: bool = False
                      ) -> None:
        """The ground truth of a write's first ``done`` items (its tweets, then its control
        messages), and of the tweet after them if the write cut it."""
        self._record([o for o in items[:done] if isinstance(o, Outgoing)])
        for event in items[:done]:
            if isinstance(event, dict):
                self.state.ground_truth.event("control", self.conn, **event)
        if cut and isinstance(tweet := items[done], Outgoing):
            self.state.ground_truth.event("partial", self.conn, id=tweet.id)

    def _note_unacked(self) -> None:
        """Before a reset: the tweets whose bytes the client's kernel had not acknowledged yet.
        The RST discards them (a client that lagged never reads them), so the ground truth
        lists them as ``reset_unacked``: delivered to the socket, perhaps never to the client.
        Those acknowledged stay readable by the client after the reset."""
        unacked = self.wire.unacked_bytes()
        if unacked is None:
            return
        start = self.wire.socket_bytes - unacked
        ids = [i for end, batch in self._recent if end > start for i in batch]
        self.state.ground_truth.event("reset_unacked", self.conn, bytes=unacked, ids=ids)

    def _trickle(self, size: int, interval: float, count: int) -> str | None:
        """The next ``count`` tweets, ``size`` bytes per chunk, ``interval`` s apart."""
        for _ in range(count):
            out = self.feed.next()
            if out is None:
                return None
            data = self.wire.encode(self.wire.frame(out.payload))
            began = self.wire.bytes_sent
            for start in range(0, len(data), size):
                with self._delivering([out], [len(data)], since=began):
                    self._write(data[start : start + size])
                if start + size < len(data) and self.wake.wait(interval):
                    self.state.ground_truth.event("partial", self.conn, id=out.id)
                    return self._interrupted()
            self._record([out])
            if self.wake.wait(interval):
                return self._interrupted()
        return None

    def _send_half(self) -> None:
        """Half of a tweet's bytes, recorded as ``partial`` (never as delivered)."""
        out = self._tweet_to_cut()
        data = self.wire.encode(self.wire.frame(out.payload))
        try:
            self._write(data[: len(data) // 2])
        finally:  # given up or not, the tweet never completes
            self.state.ground_truth.event("partial", self.conn, id=out.id)

    def _tweet_to_cut(self) -> Outgoing:
        """The next tweet, for a step that sends only part of it."""
        out = self.feed.next()
        if out is None:  # predicates nothing matches: any tweet will do, it is never complete
            tweet_id = self.state.ids.next()
            template = Template.from_tweet(self.feed.generator.noise())
            out = Outgoing(tweet_id, template.user_id, template.render(tweet_id))
        return out

    def _send_corrupt(self, tweets: int, partial: bool) -> None:
        """``tweets`` tweets, the first half of one more if ``partial`` (sync-flushed: the bad bytes
        then start a deflate block), and the bad bytes, in one write; then a hang-up."""
        sent = [out for out in (self.feed.next() for _ in range(tweets)) if out is not None]
        data, ends = self.wire.encode_batch([out.payload for out in sent]) if sent else (b"", [])
        items: list[Outgoing | dict[str, Any]] = list(sent)
        half = self._tweet_to_cut() if partial else None
        if half is not None:
            framed = self.wire.frame(half.payload)
            data += self.wire.encode(framed[: len(framed) // 2])
            items.append(half)
            ends.append(sys.maxsize)  # never complete
        with self._delivering(items, ends):
            self.wire.corrupt(data)
        self._record(sent)
        if half is not None:
            self.state.ground_truth.event("partial", self.conn, id=half.id)

    def _send_bad_lines(self, kinds: tuple[str, ...]) -> None:
        for kind in kinds:
            self._write(self.wire.encode(self.wire.frame(self._bad_line(kind))))
            self.state.ground_truth.event("bad_line", self.conn, kind=kind)

    def _send_lone_surrogates(self, n: int) -> None:
        """The next ``n`` tweets, each with half an emoji's escape pair at the start of its text
        (as a cut between the halves leaves): valid JSON that strict parsers refuse."""
        sent = [out for out in (self.feed.next() for _ in range(n)) if out is not None]
        if not sent:
            return
        data, ends = self.wire.encode_batch([with_lone_surrogate(out.payload) for out in sent])
        with self._delivering(list(sent), ends):
            self._write(data)
        self._record(sent)
        self.state.ground_truth.event("lone_surrogates", self.conn, ids=[o.id for o in sent])

    def _bad_line(self, kind: str) -> bytes:
        return bad_line(kind, self.state.config.max_line, self.feed.generator.noise())

    # --- control messages ---------------------------------------------------------------

    def _pick_control(self) -> str:
        return self.rng.choices(_CONTROL_KINDS, weights=_CONTROL_WEIGHT_LIST)[0]

    def _send_control(self, kind: str) -> None:
        payload, event = self._control(kind)
        self._write(self.wire.encode(self.wire.frame(payload)))
        self.state.ground_truth.event("control", self.conn, **event)

    def _send_disconnect(self, code: int) -> None:
        payload = orjson.dumps(gen.disconnect_msg(code, f"sim-{self.identity}-{self.conn}"))
        self._write(self.wire.encode(self.wire.frame(payload)))
        self.state.ground_truth.event("control", self.conn, type="disconnect", code=code)
        self.wire.end()

    def _control(self, kind: str) -> tuple[bytes, dict[str, Any]]:
        """A control message of ``kind`` and its ground-truth event."""
        rng = self.rng
        now_ms = time.time_ns() // 1_000_000
        target = self.state.delivered.sample(rng)
        if target is None or (kind == "delete" and rng.random() < 0.2):
            target = (self.state.ids.next() - (rng.randrange(1, 10**6) << 22), rng.randrange(10**9))
        tweet_id, user_id = target
        countries = sorted(rng.sample(gen.COUNTRIES, rng.randrange(1, 4)))
        msg: dict[str, Any]
        event: dict[str, Any] = {"type": kind}
        if kind == "delete":
            msg = gen.delete_msg(tweet_id, user_id, now_ms)
            event.update(id=tweet_id, user_id=user_id)
        elif kind == "scrub_geo":
            msg = gen.scrub_geo_msg(user_id, tweet_id)
            event.update(user_id=user_id, up_to_status_id=tweet_id)
        elif kind == "status_withheld":
            msg = gen.status_withheld_msg(tweet_id, user_id, countries)
            event.update(id=tweet_id, user_id=user_id, countries=countries)
        elif kind == "user_withheld":
            msg = gen.user_withheld_msg(user_id, countries)
            event.update(user_id=user_id, countries=countries)
        elif kind == "warning":  # a script's: whatever the queue holds
            pct = rng.choice((60, 70, 80, 90))
            msg = gen.warning_msg(pct)
            event.update(percent_full=pct)
        else:
            self.limit_track += rng.randrange(1, 50)
            msg = gen.limit_msg(self.limit_track, now_ms)
            event.update(track=self.limit_track)
        return orjson.dumps(msg), event


# orjson parses up to 1024 levels; pymongo's encoder gives up near Python's recursion limit (1000)
# and MongoDB refuses more than 100 (docs/protocol.md §6)
DEEP_NESTING = 1000


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Valid JSON of a message's shape that the store worker once could not get past (a crash, a crash
# loop or a batch retried for ever); each is dead-lettered, counted or stored now.
POISON_LINES = {
    # nested deeper than MongoDB stores: the stand-in refuses the whole insert, not the document
    "nested_500": b'{"id":1234567890123456788,"text":"deep","n":' + _nested(500) + b"}",
    # a pre-snowflake id, and a time zone that moves the date past year 9999 in UTC
    "date_out_of_range": b'{"id":12345,"id_str":"12345","text":"late","user":{"id":5},'
                         b'"created_at":"Fri Dec 31 23:59:59 -2359 9999"}',
    "v2_date_out_of_range": b'{"data":{"id":"1500000000000000001","text":"late",'
                            b'"created_at":"9999-12-31T23:59:59-23:59"}}',
    "v2_rules_not_a_list": b'{"data":{"id":"1500000000000000002","text":"x"},"matching_rules":5}',
    # a good tweet whose own time no date can hold: the coverage ledger reads it before a gap
    "far_timestamp": b'{"id":1400000000000000001,"id_str":"1400000000000000001","text":"far",'
                     b'"user":{"id":5},"timestamp_ms":"99999999999999999999"}',
    "withheld_nested": b'{"status_withheld":{"id":1400000000000000002,"user_id":5,'
                       b'"withheld_in_countries":' + _nested(500) + b"}}",
    # a word with a track term (the tests' "iphone") and a long run of symbols before a "_":
    # trimming its edge punctuation with a regex took time quadratic in the run
    "slow_word": b'{"id":1400000000000000003,"id_str":"1400000000000000003","user":{"id":5},'
                 b'"text":"iphone' + "\u2603".encode() * 60000 + b'_"}',
    # not first in the line: the stream worker's notice watch reads only lines that start with it
    "notice_nested": b'{"timestamp_ms":"1","warning":{"code":' + _nested(1015)
                     + b',"percent_full":' + _nested(300) + b"}}",
}


def bad_line(kind: str, max_line: int, noise: dict[str, Any]) -> bytes:
    """A ``bad_lines`` script step's line of ``kind`` (v1.1 and v2 alike); ``noise`` is a message
    whose JSON text is cut for ``truncated_json``."""
    if kind == "truncated_json":
        return truncated(orjson.dumps(noise))
    if kind == "invalid_utf8":
        return b'{"id":1,"text":"bad \xff\xfe bytes \xc3"}'
    if kind == "json_array":
        return b'[{"id":1},{"id":2}]'
    if kind == "deep_nesting":  # a tweet's shape, nested deeper than BSON encoders recurse
        nested = b"[" * DEEP_NESTING + b"]" * DEEP_NESTING
        return b'{"id":1234567890123456789,"text":"deep","n":' + nested + b"}"
    if kind in POISON_LINES:
        return POISON_LINES[kind]
    if kind == "oversize":
        head, tail = b'{"oversize":"', b'"}'
        size = max(max_line, len(head) + len(tail))
        return head + b"x" * (size - len(head) - len(tail)) + tail
    return b'"not an object"'


def with_lone_surrogate(payload: bytes) -> bytes:
    """A tweet's JSON with a lone high surrogate escape first in its ``text`` (or ``full_text``)."""
    for key in (b'"text":"', b'"full_text":"'):
        at = payload.find(key)
        if at >= 0:
            at += len(key)
            return payload[:at] + b"\\ud83d" + payload[at:]
    raise ValueError("a tweet without text")


def truncated(payload: bytes) -> bytes:
    """The first half of a JSON text, cut on a character boundary: a cut through a multi-byte
    character would make the line invalid UTF-8 rather than truncated JSON."""
    return payload[: len(payload) // 2].decode("utf-8", "ignore").encode()
