"""Hostile or broken answers from the upstream, on the real daemon: each gets a clear, counted
outcome (a logged, backed-off reconnect), never a crash of the stream worker or a hang.

Each test reproduces a fault that crashed or hung the stream worker before its fix.
"""

from __future__ import annotations

import signal
import socket
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from ingestd.source.body import FULL_CHECK_BYTES, HOLD_BYTES
from ingestd.source.inflate import PIECE_BYTES
from ingestd.spool.format import HEADER_SIZE
from ingestd.spool.intake import COALESCE_BYTES
from tests.support.daemon import Daemon, finish, settings_doc
from tests.support.mongo import MongoStandIn
from tests.support.raw_endpoint import JSON_STREAM_HEAD, Answer, RawEndpoint, chunk, tweet
from tests.support.wait import wait_until
from tests.test_resilience import QUIET_AFTER_3, caught_up, run_pair

V2_ENV = {"TWITTER_BEARER_TOKEN": "AAAAAAAAAAAAAAAAAAAAAv2-raw-endpoint-token"}
CRASHES = ("uncaught_exception", "uncaught_thread_exception", "worker_exited")


def crashes(daemon: Daemon) -> list[dict[str, Any]]:
    """Uncaught exceptions and unrequested worker exits (the stop's own exits are info)."""
    return [e for e in daemon.log_events()
            if e.get("event") in CRASHES and e.get("level") != "info"]


def ended(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == "stream_ended"]


def test_a_401_whose_date_header_overflows_is_diagnosed_without_a_crash(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """email.utils raises OverflowError for a zone offset or a field too large for a C int:
    the 401's diagnosis crashed the stream worker, on every attempt (a crash loop)."""
    dates = ["Mon, 01 Jan 2024 00:00:00 +99999999999999",
             "Mon, 99999999999999999999 Jan 2024 00:00:00 GMT"]
    script = [[{"status": 401, "body": "Unauthorized", "headers": {"Date": d}}] for d in dates]
    sim, daemon = run_pair(tmp_path, mongo_uri, mongo_database, [*script, QUIET_AFTER_3],
                           "--control-every", "0")
    try:
        daemon.wait_ready()
        wait_until(lambda: caught_up(daemon, sim, 3), 60, "tweets after the two 401s")
    finally:
        finish(daemon, sim)
    assert crashes(daemon) == []
    reasons = [e["reason"] for e in ended(daemon)[:2]]
    assert all("HTTP 401" in r and "no Date to compare" in r for r in reasons), reasons


def test_a_rate_limit_answer_with_a_huge_remaining_count_backs_off_without_a_crash(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """x-rate-limit-remaining of 5000 digits: int() refuses over 4300 digits (ValueError), which
    crashed the stream worker while it picked the wait, on every attempt."""
    headers = {"x-rate-limit-remaining": "0" * 5000, "x-rate-limit-reset": "1"}
    script = [[{"status": 429, "body": "Too Many Requests", "headers": headers}], QUIET_AFTER_3]
    sim, daemon = run_pair(tmp_path, mongo_uri, mongo_database, script, "--control-every", "0")
    try:
        daemon.wait_ready()
        wait_until(lambda: caught_up(daemon, sim, 3), 60, "tweets after the 429")
    finally:
        finish(daemon, sim)
    assert crashes(daemon) == []
    (first, *_) = ended(daemon)
    assert first["ending"] == "rate_limited" and "HTTP 429" in first["reason"]


def keepalives_until_stop(client: socket.socket, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        client.sendall(chunk(b"\r\n"))


def delivers(tweet_id: int) -> Answer:
    """A connection's handler that answers 200, sends one tweet, then keep-alives until stop."""

    def handler(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(JSON_STREAM_HEAD + chunk(tweet(tweet_id)))
        keepalives_until_stop(client, stop)

    return handler


def raw_daemon(tmp_path: Path, mongo_uri: str, db: str, url: str, **stream: Any) -> Daemon:
    doc = settings_doc(url, mongo_uri, db)
    doc["stream"].update(stream)
    return Daemon(tmp_path / "daemon", doc).start()


def run_until_received(tmp_path: Path, mongo_uri: str, db: str, script: list[Answer],
                       count: int, why: str, timeout: float = 30, **stream: Any) -> Daemon:
    """Run the daemon against ``script`` until its stream worker received ``count`` messages,
    then stop it; asserts it stopped cleanly and nothing crashed."""
    with RawEndpoint(script) as endpoint:
        daemon = raw_daemon(tmp_path, mongo_uri, db, endpoint.url, **stream)
        try:
            daemon.wait_ready()
            wait_until(lambda: daemon.counters("stream").get("received", 0) >= count, timeout,
                       why)
        finally:
            code, _ = daemon.stop()
            daemon.kill()
    assert crashes(daemon) == [] and code == 0
    return daemon


def test_a_logout_with_an_unhashable_code_during_a_filter_switch_retires_the_old_connection(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """While a filter switch is under way the reader asks whether a disconnect's code is one of
    the logout codes (2, 7): a code that is a list or an object made that set lookup raise
    TypeError out of the read loop, crashing the stream worker."""
    second = threading.Event()

    def old(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(JSON_STREAM_HEAD + chunk(tweet(1)))
        while not second.wait(0.5):
            client.sendall(chunk(b"\r\n"))
        client.sendall(chunk(b'{"disconnect":{"code":[7],"reason":"logged out"}}\r\n')
                       + b"0\r\n\r\n")

    def new(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(JSON_STREAM_HEAD + chunk(tweet(2)))
        second.set()
        keepalives_until_stop(client, stop)

    with RawEndpoint([old, new]) as endpoint:
        daemon = raw_daemon(tmp_path, mongo_uri, mongo_database, endpoint.url)
        try:
            daemon.wait_ready()
            wait_until(lambda: daemon.counters("stream").get("received", 0) >= 1, 30,
                       "the first connection's tweet")
            doc = daemon.doc
            doc["stream"]["track"] = ["ipad"]
            daemon.write_settings_atomically(doc)
            daemon.send(signal.SIGHUP)
            daemon.wait_log("old_connection_closed", 30, conn=1)
            wait_until(lambda: daemon.counters("stream").get("received", 0) >= 3, 30,
                       "the logout and the new connection's tweet")
            daemon.assert_running()
        finally:
            code, _ = daemon.stop()
            daemon.kill()
    assert crashes(daemon) == [] and code == 0
    assert daemon.counters("stream")["endings"].get("retired") == 1


def test_control_messages_with_fields_nested_1000_deep_end_the_connection_without_a_crash(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """orjson reads JSON nested up to 1024 deep, str() fails past ~1000 (RecursionError): the
    reader's str() of a disconnect's code or reason, a warning's code or a v2 error's title
    raised out of the read loop, crashing the stream worker. (The code stays a number here: the
    store worker's own str() of a deep one crash-loops it, in sink/, which is not this test's.)"""
    deep = b"[" * 1000 + b"]" * 1000
    lines = [b'{"disconnect":{"code":1,"reason":%s}}\r\n' % deep,
             b'{"errors":[{"title":%s,"detail":%s}]}\r\n' % (deep, deep)]

    def first(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(JSON_STREAM_HEAD + chunk(tweet(1)) + b"".join(map(chunk, lines))
                       + b"0\r\n\r\n")

    with RawEndpoint([first, delivers(2)]) as endpoint:
        daemon = raw_daemon(tmp_path, mongo_uri, mongo_database, endpoint.url)
        try:
            daemon.wait_ready()
            daemon.wait_log("connected", 30, conn=2)
            wait_until(lambda: daemon.counters("stream").get("received", 0) >= 4, 30,
                       "the control messages and a tweet on the next connection")
        finally:
            code, _ = daemon.stop()
            daemon.kill()
    assert crashes(daemon) == [] and code == 0
    (ended_1,) = [e for e in ended(daemon) if e["conn"] == 1]
    assert ended_1["ending"] == "disconnect" and ended_1["reason"] == "disconnect code 1: <list>"


def test_an_error_answer_whose_body_never_ends_is_given_up_within_the_read_timeout(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    """A 503 whose body keeps coming (a byte at a time, or without end): its first 4 KiB are
    kept for the log and the rest was read as long as it came, so the reader never reconnected,
    and never told why. Now an error body is read for at most read_timeout (or until 4 KiB are
    kept), then the answer counts as refused like any other 503."""

    def trickling_503(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
        while not stop.wait(0.2):
            client.sendall(chunk(b"<"))

    def endless_503(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 1000000000000\r\n"
                       b"\r\n")
        while not stop.is_set():
            client.sendall(b"x" * 65536)

    # read_timeout (3 s) for the first, at once for the second, the HTTP schedule's 0.5 s and
    # 1 s (+ jitter) after them: well within 20 s.
    daemon = run_until_received(tmp_path, mongo_uri, mongo_database,
                                [trickling_503, endless_503, delivers(1)], 1,
                                "a tweet after the two endless 503 answers", 20, read_timeout=3)
    first, second = ended(daemon)[:2]
    assert first["ending"] == second["ending"] == "http", (first, second)
    assert first["reason"].startswith("HTTP 503: <<<")
    assert second["reason"].startswith("HTTP 503: xxx")


def json_answer(client: socket.socket, body: bytes, status: bytes = b"200 OK") -> None:
    client.sendall(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                   b"Connection: close\r\n\r\n%s" % (status, len(body), body))


@pytest.mark.parametrize(("step", "reply"), [
    (b'"delete"', b'{"meta":"deleted"}'),  # wrong shape: meta.get raised AttributeError
    (b'"delete"', b'{"meta":{"summary":{"deleted":"one"}}}'),  # int("one"): ValueError
    (b'"delete"', b'{"errors":[{"title":%s}]}' % (b"[" * 1000 + b"]" * 1000)),  # RecursionError
    (b"dry_run", b'{"errors":[{"title":["DuplicateRule"],"value":["x"]}]}'),  # unhashable
], ids=["meta_not_an_object", "deleted_not_a_number", "title_nested_1000_deep",
        "dry_run_error_title_a_list"])
def test_v2_rules_answers_of_the_wrong_shape_are_reported_and_the_rules_sync_goes_on(
    tmp_path: Path, mongo_uri: str, mongo_database: str, step: bytes, reply: bytes
) -> None:
    """The rules thread read the endpoint's JSON by its documented shape: an answer of another
    shape (to the delete step, or the dry run) raised out of the thread, which died
    (``uncaught_thread_exception``); no rules sync ran after it, on a reload neither (``ingestd
    reload`` waited for an answer in vain)."""

    def v2(client: socket.socket, request: bytes, stop: threading.Event) -> None:
        line, _, body = request.partition(b"\r\n")[0], b"", request.partition(b"\r\n\r\n")[2]
        if line.startswith(b"GET /2/tweets/search/stream/rules"):
            json_answer(client, b'{"data":[{"id":"9","value":"old rule"}],"meta":{}}')
        elif line.startswith(b"POST /2/tweets/search/stream/rules") and step in line + body:
            json_answer(client, reply)
        elif line.startswith(b"POST /2/tweets/search/stream/rules"):
            json_answer(client, b'{"data":[{"id":"10","value":"coffee"}],'
                                b'"meta":{"summary":{"created":1,"valid":1}}}')
        else:
            client.sendall(JSON_STREAM_HEAD)
            keepalives_until_stop(client, stop)

    with RawEndpoint([v2]) as endpoint:
        url = endpoint.url.replace("/1.1/statuses/filter.json", "/2/tweets/search/stream")
        doc = settings_doc(url, mongo_uri, mongo_database)
        del doc["stream"]["track"]
        doc["stream"].update({"api": "v2", "rules": [{"value": "coffee"}], "read_timeout": 10})
        doc["auth"] = {"bearer_token": "${TWITTER_BEARER_TOKEN}"}
        daemon = Daemon(tmp_path / "daemon", doc).start(extra_env=V2_ENV)
        try:
            daemon.wait_ready()
            # The delete step's answer: either understood (generation 1's rules in force) or
            # reported, and then retried or refused; never the thread's end.
            wait_until(lambda: rules_settled(daemon, 1), 30, "the rules sync's outcome")
            doc["stream"]["rules"] = [{"value": "tea"}]
            daemon.write_settings_atomically(doc)
            daemon.send(signal.SIGHUP)
            wait_until(lambda: rules_settled(daemon, 2), 30, "the reload's rules sync")
        finally:
            code, _ = daemon.stop()
            daemon.kill()
    assert crashes(daemon) == [] and code == 0


def rules_settled(daemon: Daemon, generation: int) -> bool:
    """The rules thread answered for ``generation``: in force, refused, or retrying."""
    daemon.assert_running()
    if crashes(daemon):
        raise AssertionError(f"crashed: {crashes(daemon)[0]}")
    rules = daemon.status("stream").get("rules") or {}
    retried = [e for e in daemon.log_events() if e.get("event") == "rules_sync_retry"
               and e.get("generation") == generation]
    return generation in (rules.get("generation"), rules.get("refused_generation")) or bool(retried)


@pytest.mark.parametrize(("junk", "shown"), [
    (b"garbage line without a colon", "header line 3 refused by libcurl: Header without colon"),
    (b"\x00\x01\xff\xfe binary junk", "header line 3 refused by libcurl: NUL byte in header"),
], ids=["no_colon", "nul_bytes"])
def test_a_head_line_libcurl_refuses_ends_the_connection_with_a_reason_naming_it(
    tmp_path: Path, mongo_uri: str, mongo_database: str, junk: bytes, shown: str
) -> None:
    """libcurl itself ends a transfer whose head holds a line without a colon or with a NUL
    (error 8). The ending was a plain network one with libcurl's bare words; now the reason
    names the line's place, it is counted as ``malformed_response_header`` and the reader
    reconnects after the network back-off."""

    def bad(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + junk
                       + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(tweet(1)))
        keepalives_until_stop(client, stop)

    daemon = run_until_received(tmp_path, mongo_uri, mongo_database, [bad, delivers(2)], 1,
                                "the next connection's tweet")
    (first,) = [e for e in ended(daemon) if e["conn"] == 1]
    assert first["ending"] == "malformed_response_header" and first["backoff"] > 0, first
    assert first["reason"].startswith(f"malformed_response_header: {shown}"), first["reason"]
    assert daemon.counters("stream")["endings"].get("malformed_response_header") == 1


@pytest.mark.parametrize(("junk", "shown"), [
    # pycurl gave our callback's ValueError (int("²")) a traceback, libcurl an error 23:
    (b"HTTP/x: \xb2 junk", 'header line 3 "HTTP/x": (value not shown) (its field name'),
    # read as a new status line: the 200 stream was taken for a 503's error body
    (b"HTTP/1.1 503 x: y", 'header line 3 "HTTP/1.1 503 x": (value not shown)'),
    (b"X-Junk: \x01\x02\x03", 'header line 3 "X-Junk": (value not shown) (a control character'),
], ids=["status_digit_junk", "status_line_inside_the_head", "control_bytes_in_a_value"])
def test_a_junk_head_line_libcurl_passes_is_skipped_and_the_stream_read(
    tmp_path: Path, mongo_uri: str, mongo_database: str, junk: bytes, shown: str
) -> None:
    """A junk line libcurl passes on (a broken proxy's) made our header callback raise (a
    traceback, then libcurl's bare error 23: the connection ended, again and again) or was read
    as a new status line (the 200 stream taken for a 503's error body). Now it is skipped and
    logged once, naming the line without its value, and the stream is read on that connection:
    no reconnect over a line the daemon does not need."""

    def bad(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + junk
                       + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(tweet(1)))
        keepalives_until_stop(client, stop)

    with RawEndpoint([bad]) as endpoint:
        daemon = raw_daemon(tmp_path, mongo_uri, mongo_database, endpoint.url)
        try:
            daemon.wait_ready()
            wait_until(lambda: daemon.counters("stream").get("received", 0) >= 1, 30,
                       "the first connection's tweet")
            skipped = daemon.wait_log("response_header_lines_skipped", 30)
            before_stop = ended(daemon)
        finally:
            code, _ = daemon.stop()
            daemon.kill()
    assert crashes(daemon) == [] and code == 0
    assert before_stop == [], before_stop
    assert skipped["conn"] == 1 and len(skipped["lines"]) == 1, skipped
    assert skipped["lines"][0].startswith(shown), skipped
    assert "junk" not in skipped["lines"][0].partition("(value not shown)")[2], "a value shown"
    assert daemon.counters("stream")["endings"].get("malformed_response_header", 0) == 0


def test_a_gzip_bomb_of_tiny_messages_passes_a_full_spool_by_a_bounded_amount(
    tmp_path: Path, mongo_standin: MongoStandIn
) -> None:
    """``when_full: block``: fullness was looked at per 16 KiB of compressed input, and 16 KiB of
    gzip inflates to ~16 MB of tiny messages: one read went to the spool whole, far past its
    bound (~20 MB of spool here over a 1 MiB bound; up to ~264 MB of body for a 256 KiB read).
    Now the look comes per 16 KiB inflated, between the inflater's pieces, and the spool passes
    its bound by at most what is documented (docs/design.md, "source/")."""
    line = b'{"id":1}\r\n'  # no tweet: the store worker would count it, if it could write
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    lines = (4 << 20) // len(line)
    bomb = z.compress(line * lines) + z.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 16 * 1024  # one read, one look before it (formerly)

    def gzip_bomb(client: socket.socket, _: bytes, stop: threading.Event) -> None:
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + chunk(bomb))
        stop.wait()

    max_bytes = 1 << 20
    # The body taken past a look that found room, and what the intake and the reader held
    # unwritten at that look; in spool bytes for these messages (a 41-byte record header each).
    body_past = FULL_CHECK_BYTES + PIECE_BYTES + HOLD_BYTES + COALESCE_BYTES
    spool_past = (body_past // len(line) + 1) * (HEADER_SIZE + len(line) - 2)
    with RawEndpoint([gzip_bomb]) as endpoint:
        doc = settings_doc(endpoint.url, mongo_standin.uri, "bomb",
                           spool={"max_bytes": max_bytes, "segment_bytes": "256KiB"})
        daemon = Daemon(tmp_path / "daemon", doc)
        mongo_standin.stop()  # nothing is stored: the spool fills to its bound and stays there
        try:
            daemon.start().wait_ready()
            daemon.wait_log("spool_full", 30)
            spool = wait_until(lambda: full_spool(daemon), 30, "the full spool in the status")
        finally:
            code, _ = daemon.stop()
            daemon.kill()
    assert crashes(daemon) == [] and code == 0
    assert max_bytes <= spool["bytes"] < max_bytes + spool_past, (spool, spool_past)
    # The whole bomb came in one read: what the spool took, what it held back when the stop
    # closed the connection (dropped: spool_full; they were lost uncounted) and the message
    # the close cut add up to every line sent.
    counters = daemon.counters("stream")
    dropped = counters["dropped"]
    assert dropped.get("spool_full", 0) > 0, counters
    assert counters["received"] + dropped["spool_full"] + dropped.get("cut_by_disconnect", 0) \
        == lines, counters


def full_spool(daemon: Daemon) -> dict[str, Any] | None:
    """The stream worker's spool figures once its status says the spool is full."""
    spool: dict[str, Any] = daemon.status("stream").get("spool") or {}
    return spool if spool.get("full_since") is not None else None
