"""logs.py: JSON lines, secret redaction everywhere, error rate limiting, line cap."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import yaml

from ingestd.config.schema import LoggingSettings
from ingestd.logs import (
    MAX_LINE_BYTES,
    bind_process,
    clear_secrets,
    configure_logging,
    flush_repeats,
    get_logger,
    reconfigure_logging,
    register_secret,
    scrub_text,
    scrub_userinfo,
)
from tests.support.creds import CREDS
from tests.support.daemon import settings_doc

CANARY = "canary-Zq8v1x"        # registered through configure_logging(secrets=...)
LATE = "late-canary-77Hh"       # registered afterwards with register_secret()
MONGO_PW = "mongo-pw-Xy12"
OAUTH_HEADER = 'OAuth oauth_consumer_key="ck", oauth_signature="sig-canary-Qq9%3D"'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TTYBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    clear_secrets()


def setup(fmt: str = "json", level: str = "info", **kw: Any) -> tuple[io.StringIO, Clock]:
    buf, clock = io.StringIO(), Clock()
    kw.setdefault("error_interval", 10.0)
    configure_logging(level, fmt, stream=buf, secrets=[CANARY], clock=clock, **kw)
    return buf, clock


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_with_static_and_bound_context() -> None:
    buf, _ = setup(role="stream", pid=4242)
    get_logger(conn_id=3).info("connected", status=200)
    get_logger().debug("hidden")
    (event,) = lines(buf)
    assert event["event"] == "connected" and event["level"] == "info"
    assert (event["role"], event["pid"], event["conn_id"], event["status"]) == (
        "stream", 4242, 3, 200)
    assert event["timestamp"].endswith("Z")
    assert list(event)[:3] == ["timestamp", "level", "event"]


def test_auto_format_is_json_off_a_tty_and_console_on_one() -> None:
    buf, _ = setup("auto")
    get_logger().info("plain")
    assert lines(buf)[0]["event"] == "plain"
    tty = TTYBuffer()
    configure_logging("info", "auto", stream=tty)
    get_logger().info("pretty", key="v")
    out = tty.getvalue()
    assert "pretty" in out and "key" in out and not out.startswith("{")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud")


def test_secrets_never_reach_the_output_json() -> None:
    buf, _ = setup()
    register_secret(LATE)
    log = get_logger()
    log.info(
        f"starting with {CANARY}",
        uri=f"mongodb://ingest:{MONGO_PW}@db1.example.com:27017/twitter",
        authorization=OAUTH_HEADER,
        headers=[f"Authorization: {OAUTH_HEADER}", "Accept: */*"],
        nested={"deeper": [{"note": f"x{LATE}y"}], "access_token": "tok-Kk1", "count": 3},
        password="p", consumer_secret="cs", obj=ValueError(f"in repr {CANARY}"),
    )
    out = buf.getvalue()
    for secret in (CANARY, LATE, MONGO_PW, "sig-canary", "tok-Kk1", '"cs"'):
        assert secret not in out
    (event,) = lines(buf)
    assert event["uri"] == "mongodb://***@db1.example.com:27017/twitter"
    assert event["authorization"] == event["password"] == "***"
    assert event["headers"] == ["Authorization: ***", "Accept: */*"]
    assert event["nested"] == {"deeper": [{"note": "x***y"}], "access_token": "***", "count": 3}
    assert event["event"] == "starting with ***"


def _fail(password_local: str) -> None:
    frame_local = f"local-{password_local}"  # would show up if frame locals were rendered
    uri = f"mongodb://u:{MONGO_PW}@h/"
    raise RuntimeError(f"auth failed for {uri} using {CANARY} {len(frame_local)}")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_exception_text_is_scrubbed_and_has_no_frame_locals(fmt: str) -> None:
    buf, _ = setup(fmt)
    try:
        _fail("unregistered-" + "local-canary")  # joined at run time: not in source lines
    except RuntimeError:
        get_logger().exception("store failed")
    out = buf.getvalue()
    assert "RuntimeError" in out and "_fail" in out
    for secret in (MONGO_PW, CANARY, "unregistered-local-canary"):
        assert secret not in out
    assert "mongodb://***@h/" in out
    if fmt == "json":
        (event,) = lines(buf)
        assert event["exception"][0]["exc_value"].startswith("auth failed for mongodb://***@h/")
        assert all("locals" not in frame for frame in event["exception"][0]["frames"])


def test_console_output_is_redacted_too() -> None:
    buf, _ = setup("console")
    get_logger().warning("retry", uri=f"mongodb://a:{MONGO_PW}@h", note=CANARY)
    out = buf.getvalue()
    assert MONGO_PW not in out and CANARY not in out and "retry" in out


def test_repeated_errors_are_rate_limited_with_a_count() -> None:
    buf, clock = setup(error_interval=10.0)
    log = get_logger()
    for _ in range(5):
        log.error("mongo unreachable", host="db1")
    log.error("mongo unreachable", host="db2")   # different key field: its own window
    log.info("progress", n=1)
    log.info("progress", n=1)                    # info is never limited
    clock.now += 9.9
    log.error("mongo unreachable", host="db1", delay=2.5)  # floats do not split the key
    clock.now += 0.2
    log.error("mongo unreachable", host="db1")
    events = [(e["event"], e.get("host"), e.get("repeated")) for e in lines(buf)]
    assert events == [
        ("mongo unreachable", "db1", None),
        ("mongo unreachable", "db2", None),
        ("progress", None, None),
        ("progress", None, None),
        ("mongo unreachable", "db1", 5),
    ]


def test_rate_key_overrides_the_fields() -> None:
    buf, clock = setup()
    log = get_logger()
    for attempt in range(4):
        log.warning("reconnecting", attempt=attempt, rate_key="stream")
    clock.now += 10
    log.warning("reconnecting", attempt=9, rate_key="stream")
    assert [(e["attempt"], e.get("repeated")) for e in lines(buf)] == [(0, None), (9, 3)]
    assert all("rate_key" not in e for e in lines(buf))


def test_an_info_event_with_a_rate_key_is_folded_too() -> None:
    # The endpoint's limit notices: info, every few seconds, a cumulative count per connection.
    buf, clock = setup()
    log = get_logger()
    for undelivered in (5, 9, 14):
        log.info("stream_limit", conn=1, undelivered=undelivered, rate_key="conn 1")
    log.info("stream_limit", conn=2, undelivered=3, rate_key="conn 2")
    clock.now += 10
    log.info("stream_limit", conn=1, undelivered=20, rate_key="conn 1")
    assert [(e["conn"], e["undelivered"], e.get("repeated")) for e in lines(buf)] == [
        (1, 5, None), (2, 3, None), (1, 20, 2)]


def test_a_storm_that_stops_inside_its_window_is_still_counted() -> None:
    # Nothing comes after the storm: the fold is printed once its window ends (the log-folds
    # thread's flush), as the last suppressed event carrying the others; the lines add up.
    buf, clock = setup()
    log = get_logger()
    for seq in range(6):
        log.warning("dead_letter", reason="invalid_json", seq=seq, rate_key="invalid_json")
    log.warning("dead_letter", reason="not_an_object", seq=6, rate_key="not_an_object")
    log.warning("dead_letter", reason="not_an_object", seq=7, rate_key="not_an_object")
    flush_repeats()
    assert len(lines(buf)) == 2  # windows still open
    clock.now += 10
    flush_repeats()
    flush_repeats()  # nothing more to print
    assert [(e["reason"], e["seq"], e.get("repeated")) for e in lines(buf)] == [
        ("invalid_json", 0, None), ("not_an_object", 6, None),
        ("invalid_json", 5, 4), ("not_an_object", 7, None)]
    log.warning("dead_letter", reason="invalid_json", seq=8, rate_key="invalid_json")
    assert len(lines(buf)) == 4  # the flush started a new window
    flush_repeats(everything=True)  # at exit: whatever is pending
    assert [(e["seq"], e.get("repeated")) for e in lines(buf)][4:] == [(8, None)]


def test_a_fold_printed_later_keeps_the_time_of_the_event_it_stands_for() -> None:
    # The audit's read-only drill: "spool_write_failed repeated=49" printed at its window's end
    # carried the flush's time, two seconds after "spool_write_recovered", as if the disk had
    # failed again. The folded line is the last suppressed event: it keeps that event's time,
    # so the lines sort (jq, journalctl -o json, Loki) in the order things happened.
    buf, clock = setup()
    log = get_logger()
    log.error("spool_write_failed", error="EROFS")
    log.error("spool_write_failed", error="EROFS")  # suppressed
    log.info("spool_write_recovered")
    clock.now += 10
    flush_repeats()
    failed, recovered, fold = lines(buf)
    assert fold["event"] == "spool_write_failed" and "repeated" not in fold  # one, itself
    assert failed["timestamp"] <= fold["timestamp"] <= recovered["timestamp"], lines(buf)


def test_zero_interval_disables_rate_limiting() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf, error_interval=0)
    for _ in range(3):
        get_logger().error("same")
    assert len(lines(buf)) == 3


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_lines_are_capped(fmt: str) -> None:
    buf, _ = setup(fmt)
    get_logger().warning("huge", blob="é" * 100_000, parts=["x" * 5000] * 50, small="kept")
    out = buf.getvalue()
    assert out.count("\n") == 1
    assert len(out.rstrip("\n").encode()) <= MAX_LINE_BYTES
    if fmt == "json":
        (event,) = lines(buf)
        assert event["truncated"] is True and event["small"] == "kept"
        assert event["event"] == "huge" and event["blob"].startswith("éé")


def test_cap_falls_back_to_the_essentials() -> None:
    buf, _ = setup()
    get_logger().info("many", **{f"k{i}": "v" * 60 for i in range(2000)})
    (event,) = lines(buf)
    assert event["truncated"] is True and event["event"] == "many"
    assert len(buf.getvalue().rstrip("\n").encode()) <= MAX_LINE_BYTES


def test_small_lines_are_not_marked_truncated() -> None:
    buf, _ = setup()
    get_logger().info("small", text="x" * 1000)
    assert "truncated" not in lines(buf)[0]


def test_scrub_helpers() -> None:
    assert scrub_userinfo("mongodb://u:p@h1,h2/db and https://x:y@host/p") == (
        "mongodb://***@h1,h2/db and https://***@host/p")
    assert scrub_userinfo("mongodb://u:p@ss@h/db") == "mongodb://***@h/db"
    assert scrub_userinfo("https://host/path@x") == "https://host/path@x"
    # pymongo takes a raw '#' as part of a password (the secrets audit: "MONGO#PW-123" shown)
    assert scrub_userinfo("at mongodb://ingest:MONGO#PW-123@db:27017/?a=b") == (
        "at mongodb://***@db:27017/?a=b")
    # secrets in a MongoDB URI's options (check printed them in the lease's and ping's lines)
    assert scrub_userinfo(
        "mongodb://h/?tls=true&authMechanism=MONGODB-AWS&authMechanismProperties="
        "AWS_SESSION_TOKEN:tok9&TLSCertificateKeyFilePassword=kp9;w=1") == (
        "mongodb://h/?tls=true&authMechanism=MONGODB-AWS&authMechanismProperties=***"
        "&TLSCertificateKeyFilePassword=***;w=1")
    assert scrub_text("Bearer abc.def") == "Bearer ***"
    # a JSON body echoing the OAuth header escapes its quotes (the re-audit: only the backslash
    # was masked, the nonce and signature stayed)
    echoed = '{"auth": "OAuth oauth_nonce=\\"11709\\", oauth_signature=\\"JASpc%3D\\""}'
    assert scrub_text(echoed) == '{"auth": "OAuth oauth_nonce=***, oauth_signature=***"}'
    register_secret("s3")
    assert scrub_text("as3b") == "a***b"


# ---------------------------------------------------------------- a reload's logging section


def test_a_reload_applies_level_format_and_interval_and_keeps_the_process_fields() -> None:
    # The settings audit: `logging.level: error` was reported applied by a reload, and info
    # lines kept coming (nothing reconfigured structlog after the start).
    buf, _ = setup(role="store", pid=77)
    bind_process(generation=3)
    log = get_logger()  # made before the reload, as a module's logger is
    assert reconfigure_logging(LoggingSettings(level="info", format="json",
                                               error_interval=10.0)) is False  # unchanged
    assert reconfigure_logging(LoggingSettings(level="warning", format="json",
                                               error_interval=0.0)) is True
    log.info("hidden")
    log.warning("shown")
    log.warning("shown")  # interval 0: not folded any more
    get_logger().error("secret", value=CANARY)
    assert [(e["event"], e["role"], e["pid"], e["generation"]) for e in lines(buf)] == [
        ("shown", "store", 77, 3), ("shown", "store", 77, 3), ("secret", "store", 77, 3)]
    assert CANARY not in buf.getvalue()  # the secrets registered before stay masked
    reconfigure_logging(LoggingSettings(level="debug", format="console", error_interval=10.0))
    log.debug("pretty", key="v")
    last = buf.getvalue().splitlines()[-1]
    assert "pretty" in last and "key=v" in last and not last.startswith("{")


def test_reconfigure_before_any_configure_changes_nothing() -> None:
    import ingestd.logs as logs

    saved, logs._CONFIGURED = logs._CONFIGURED, None
    try:
        assert reconfigure_logging(LoggingSettings(level="error")) is False
    finally:
        logs._CONFIGURED = saved


def run_refused_start(tmp_path: Path, journal: bool) -> list[str]:
    """``ingestd run`` onto a state folder that is a file (exit 78, one error line), its stdout
    a file; ``journal``: ``JOURNAL_STREAM`` names that file, as systemd names its stream."""
    (tmp_path / "not-a-folder").write_text("")
    doc = settings_doc("http://127.0.0.1:9/stream", "mongodb://127.0.0.1:9", "db")
    doc["state_dir"] = str(tmp_path / "not-a-folder" / "state")
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(doc))
    out_path = tmp_path / f"out-{journal}.log"
    with out_path.open("wb") as out:
        st = os.fstat(out.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"} | CREDS
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        code = subprocess.run([sys.executable, "-m", "ingestd", "run", "--config", str(config)],
                              stdout=out, stderr=subprocess.STDOUT, env=env, timeout=60,
                              cwd=tmp_path).returncode
    assert code == 78, out_path.read_text()
    return out_path.read_text().splitlines()


def test_lines_to_the_journal_carry_their_syslog_priority(tmp_path: Path) -> None:
    """Under systemd every line went to the journal at PRIORITY=6 (info), errors too: `journalctl
    -p err` and `systemctl status` showed none of them. Written to the journal's stream
    (JOURNAL_STREAM), a line starts with its priority (`<3>` error, `<6>` info), which journald
    strips and stores; written anywhere else, it is plain JSON. (The info lines' `<6>`:
    tests/systemd, under a real journald.)"""
    lines = run_refused_start(tmp_path, journal=True)
    (line,) = lines
    assert line.startswith("<3>{") and orjson.loads(line[3:])["level"] == "error", lines
    plain = run_refused_start(tmp_path, journal=False)
    assert plain and all(ln.startswith("{") for ln in plain), plain
