"""ingestd/config: every validation rule, the defaults, secrets handling."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ingestd.config import schema
from ingestd.config.errors import EXIT_CONFIG, ConfigError, ConfigErrors, Secret
from ingestd.config.schema import Rule, Settings, StreamSettings
from ingestd.config.settings import load_settings, load_settings_text, secret_values
from ingestd.config.stream import V2_READ_TIMEOUT, ca_bundle
from ingestd.config.stream_v2 import V2_DEFAULTS
from ingestd.config.values import number_text, parse_size, plain_number

REPO = Path(__file__).resolve().parents[1]
FILE = Path("/etc/ingestd/settings.yaml")
ENV = {
    "TWITTER_CONSUMER_KEY": "ck-canary-1111",
    "TWITTER_CONSUMER_SECRET": "cs-canary-2222",
    "TWITTER_ACCESS_TOKEN": "at-canary-3333",
    "TWITTER_ACCESS_TOKEN_SECRET": "ats-canary-4444",
}
BASE: dict[str, Any] = {
    "stream": {"url": "https://stream.twitter.com/1.1/statuses/filter.json",
               "track": ["iphone", "ipad"]},
    "auth": {
        "consumer_key": "${TWITTER_CONSUMER_KEY}",
        "consumer_secret": "${TWITTER_CONSUMER_SECRET}",
        "access_token": "${TWITTER_ACCESS_TOKEN}",
        "access_token_secret": "${TWITTER_ACCESS_TOKEN_SECRET}",
    },
    "mongo": {"uri": "mongodb://localhost:27017", "database": "twitter", "collection": "tweets"},
}


def doc(**sections: dict[str, Any]) -> dict[str, Any]:
    """BASE with the given sections' keys overridden (None value deletes the key)."""
    out = copy.deepcopy(BASE)
    for name, changes in sections.items():
        section = out.setdefault(name, {})
        for key, value in changes.items():
            if value is None:
                section.pop(key, None)
            else:
                section[key] = value
    return out


def load(data: object, env: dict[str, str] | None = None) -> Settings:
    text = data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True)
    return load_settings_text(text, FILE, ENV if env is None else env)


def errors(data: object, env: dict[str, str] | None = None) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        load(data, env)
    return list(info.value.errors)


def error_at(data: object, key_path: str, env: dict[str, str] | None = None) -> str:
    """The reason reported for `key_path` (fails if none)."""
    found = [e for e in errors(data, env) if e.key_path == key_path]
    assert found, f"no error at {key_path}: {errors(data, env)}"
    return found[0].reason


# ---------------------------------------------------------------- the shipped example


def test_shipped_settings_yaml_validates_and_documents_the_real_defaults() -> None:
    s = load_settings(REPO / "settings.yaml", env=ENV)
    assert s.auth.consumer_key.reveal() == ENV["TWITTER_CONSUMER_KEY"]
    assert s.stream.track == ("iphone", "ipad", "ipod")
    # The example lists every optional key "with its default": it must agree with the code.
    minimal = load(BASE)
    assert s.stream.backoff == minimal.stream.backoff
    for name in ("writer", "spool", "deadletter", "control", "metrics", "logging"):
        assert getattr(s, name) == getattr(minimal, name), name
    assert s.mongo.write_concern == minimal.mongo.write_concern
    assert s.mongo.timeout_ms == minimal.mongo.timeout_ms
    assert s.mongo.slow_write_seconds == minimal.mongo.slow_write_seconds
    assert s.mongo.notices == (), "the shipped example uses no retired key"


# ---------------------------------------------------------------- retired and slow-write keys


def test_retired_server_selection_timeout_is_a_notice_naming_file_key_and_replacement() -> None:
    # It never bounded a write (pymongo uses timeoutMS for server selection once that is set):
    # accepted so an old file still starts and reloads, but said plainly.
    s = load(doc(mongo={"server_selection_timeout_ms": 5000}))
    (notice,) = s.mongo.notices
    assert str(FILE) in notice
    assert "mongo.server_selection_timeout_ms" in notice and "ignored" in notice
    assert "use mongo.timeout_ms" in notice
    assert not hasattr(s.mongo, "server_selection_timeout_ms")
    # The notice is not part of the target: removing the key on reload is not a new target.
    assert s.mongo == load(BASE).mongo


def test_slow_write_threshold_is_a_positive_number() -> None:
    assert load(doc(mongo={"slow_write_seconds": 0.25})).mongo.slow_write_seconds == 0.25
    assert load(BASE).mongo.slow_write_seconds == 10.0
    assert "must be > 0" in error_at(doc(mongo={"slow_write_seconds": 0}),
                                     "mongo.slow_write_seconds")
    assert "must be a number" in error_at(doc(mongo={"slow_write_seconds": "10s"}),
                                          "mongo.slow_write_seconds")


def test_minimal_file_gives_defaults_as_tuples() -> None:
    s = load(BASE)
    assert s.path == FILE
    assert s.stream.track == ("iphone", "ipad") and isinstance(s.stream.track, tuple)
    assert s.spool.max_bytes == 1 << 30 and s.spool.segment_bytes == 64 << 20
    assert s.deadletter.max_bytes == 256 << 20
    assert s.metrics.address() == ("127.0.0.1", 9464)
    # null: certifi's bundle, looked up by the connection (not by every process that loads this)
    assert s.stream.ca_file == "" and Path(ca_bundle(s.stream)).is_file()
    assert EXIT_CONFIG == 78


def test_a_minimal_file_loads_exactly_the_schema_defaults() -> None:
    # Defaults are written once, in the schema dataclasses: a builder that supplies its own
    # (or reads the wrong field's) makes a section differ from the dataclass built bare.
    s = load(doc(mongo={"database": None, "collection": None}))
    assert s.stream == StreamSettings(url=BASE["stream"]["url"], track=("iphone", "ipad"))
    assert s.mongo == schema.MongoSettings(uri=Secret(BASE["mongo"]["uri"]))
    assert s.auth == schema.AuthSettings(*(Secret(value) for value in ENV.values()))
    for name in ("writer", "spool", "deadletter", "control", "metrics", "logging"):
        section_schema = getattr(schema, f"{name.capitalize()}Settings")
        assert getattr(s, name) == section_schema(), name


def test_a_minimal_v2_file_differs_from_the_schema_only_where_v2_says() -> None:
    data = {"stream": {"url": "https://api.x.com/2/tweets/search/stream", "api": "v2",
                       "rules": ["cat has:media"]},
            "auth": {"bearer_token": "${BEARER}"}, "mongo": BASE["mongo"]}
    s = load(data, {"BEARER": "bearer-canary-6666"})
    assert s.stream == StreamSettings(
        url=data["stream"]["url"], api="v2", rules=(Rule("cat has:media"),),
        read_timeout=V2_READ_TIMEOUT, **V2_DEFAULTS)


# ---------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.yaml", env=ENV)
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: file not found"


def test_directory_and_invalid_utf8_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_settings(tmp_path, env=ENV)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"stream:\n  url: \xff\n")
    with pytest.raises(ConfigError, match=r"not valid UTF-8 \(byte offset 15\)"):
        load_settings(bad, env=ENV)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("a: 1\n")

    def denied(*_a: object, **_k: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)  # works even when tests run as root
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=ENV)
    assert str(info.value) == f"{path}: cannot read file: Permission denied"


def test_yaml_syntax_error_gives_line_and_column_without_quoting_the_file() -> None:
    text = "stream:\n  url: https://h/x\n  track: [a, b\nauth: {consumer_key: hunter2-secret}\n"
    (err,) = errors(text)
    assert err.key_path == ""
    assert "YAML syntax error at line 4, column 5" in err.reason
    assert "hunter2" not in str(err)


@pytest.mark.parametrize(("text", "reason"), [
    ("", "file is empty"),
    ("# only a comment\n", "file is empty"),
    ("- a\n- b\n", "top level must be a mapping of sections, got a list"),
    ("just text", "top level must be a mapping of sections, got a string"),
])
def test_empty_or_non_mapping(text: str, reason: str) -> None:
    (err,) = errors(text)
    assert reason in err.reason


def test_control_character_is_reported_with_its_offset() -> None:
    (err,) = errors("stream:\n  url: a\x00b\n")
    assert err.reason == (
        "YAML error at character offset 16: special characters are not allowed (#x0000)")


def test_duplicate_key_is_an_error() -> None:
    (err,) = errors("stream:\n  track: [a]\n  track: [b]\n")
    assert "duplicate key 'track'" in err.reason and "line 3" in err.reason


def test_yaml_aliases_still_work_and_are_bounded() -> None:
    text = (yaml.safe_dump(BASE) + "writer: {batch_size: &n 10}\n"
            + "control: {crash_loop_restarts: *n}\n")
    settings = load(text)
    assert settings.writer.batch_size == settings.control.crash_loop_restarts == 10
    (err,) = errors(yaml.safe_dump(BASE) + "x: &a [*a]\n")
    assert (err.key_path, err.reason) == (
        "x[0]", "a YAML alias refers to a value that contains it (a recursive alias)")


# ---------------------------------------------------------------- structure and types


def test_unknown_keys_suggest_the_closest_name() -> None:
    data = doc(stream={"trak": ["x"]}, writer={"batchsize": 5})
    data["mongoo"] = {}
    assert error_at(data, "stream.trak") == "unknown key; did you mean 'track'?"
    assert "did you mean 'batch_size'" in error_at(data, "writer.batchsize")
    assert "did you mean 'mongo'" in error_at(data, "mongoo")
    data = doc(writer={"zzz": 1})
    assert "(known keys: apply_deletes, batch_size, encoder_process, flush_interval" in error_at(
        data, "writer.zzz")


@pytest.mark.parametrize(("section", "key", "value", "reason"), [
    ("stream", "read_timeout", True, "must be a number, got a boolean"),
    ("writer", "batch_size", True, "must be an integer, got a boolean"),
    ("writer", "batch_size", 10.0, "must be an integer, got a number"),
    ("stream", "gzip", "yes", "must be true or false, got a string"),
    ("writer", "encoder_process", "yes", 'must be true, false or "auto", got a string'),
    ("writer", "encoder_process", 1, 'must be true, false or "auto", got an integer'),
    ("stream", "track", "iphone", "must be a list, got a string"),
    ("writer", "flush_interval", "0.5s", "must be a number, got a string"),
])
def test_wrong_types(section: str, key: str, value: object, reason: str) -> None:
    assert reason in error_at(doc(**{section: {key: value}}), f"{section}.{key}")


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_encoder_process_takes_true_false_or_auto(value: object) -> None:
    assert load(doc(writer={"encoder_process": value})).writer.encoder_process == value


def test_a_section_that_is_not_a_mapping() -> None:
    data = doc()
    data["writer"] = [1, 2]
    assert error_at(data, "writer") == "must be a mapping, got a list"


@pytest.mark.parametrize(("section", "key", "value", "reason"), [
    ("writer", "batch_size", 0, "must be between 1 and 100000, got 0"),
    ("writer", "batch_size", 100_001, "must be between 1 and 100000, got 100001"),
    ("writer", "flush_interval", 0, "must be > 0, got 0"),
    ("writer", "retry_cap", 0.1, "must be >= retry_start (0.5), got 0.1"),
    ("writer", "tombstone_retention", 0, "must be between 60 and 2147483647, got 0"),
    ("writer", "tombstone_retention", 2**31, "must be between 60 and 2147483647, got 2147483648"),
    ("writer", "tombstone_retention", "7d", "must be an integer, got a string"),
    ("spool", "fsync_interval", 0, "must be > 0"),
    ("spool", "fsync_interval", 1.5, "must be <= 1, got 1.5"),
    ("spool", "when_full", "drop_oldest", "must be one of block, drop_newest; got 'drop_oldest'"),
    ("spool", "max_records", 0, "must be >= 1"),
    ("stream", "api", "v3", "must be one of v1.1, v2; got 'v3'"),
    ("stream", "api", "v2", "v2 does not take track/follow/locations"),
    ("stream", "filter_level", "high", "must be one of none, low, medium"),
    ("stream", "max_message_bytes", 100, "must be between 1024 and 16777216"),
    ("control", "crash_loop_restarts", 0, "must be >= 1"),
    ("logging", "format", "xml", "must be one of auto, json, console"),
    ("logging", "level", "verbose", "must be one of debug, info"),
    ("metrics", "listen", "localhost", "must be 'host:port'"),
    ("metrics", "listen", "127.0.0.1:65536", "must be 'host:port'"),
    ("metrics", "listen", "::1:80", "IPv6 as '[::1]:9464'"),
])
def test_range_and_choice_checks(section: str, key: str, value: object, reason: str) -> None:
    assert reason in error_at(doc(**{section: {key: value}}), f"{section}.{key}")


def test_backoff_caps_and_jitter() -> None:
    data = doc(stream={"backoff": {"http_cap": 1, "jitter": 2, "network_step": -1}})
    assert error_at(data, "stream.backoff.http_cap") == "must be >= http_start (5), got 1"
    assert "between 0 and 1" in error_at(data, "stream.backoff.jitter")
    assert ">= 0" in error_at(data, "stream.backoff.network_step")


def test_all_errors_are_collected_one_per_line() -> None:
    data = doc(stream={"track": ["", "ok"], "gzip": 1}, writer={"batch_size": 0}, extra={})
    with pytest.raises(ConfigErrors) as info:
        load(data)
    paths = [e.key_path for e in info.value.errors]
    assert {"stream.track[0]", "stream.gzip", "writer.batch_size", "extra"} <= set(paths)
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.errors)
    assert all(line.startswith(f"{FILE}: ") for line in lines)


def test_config_error_format() -> None:
    err = ConfigError(Path("/x.yaml"), "stream.track[3]", "too long")
    assert str(err) == "/x.yaml: stream.track[3]: too long"
    assert (err.file, err.key_path, err.reason) == ("/x.yaml", "stream.track[3]", "too long")
    assert isinstance(ConfigErrors([err]), ConfigError)


# ---------------------------------------------------------------- stream predicates


def test_track_phrase_byte_limits_count_utf8_bytes() -> None:
    ok = "é" * 30  # 60 bytes: the limit is inclusive
    data = doc(stream={"track": ["", "   ", "é" * 31, ok, "x" * 61, "a,b", 7]})
    assert error_at(data, "stream.track[0]") == "phrase is 0 UTF-8 bytes; must be 1 to 60"
    assert "0 UTF-8 bytes" in error_at(data, "stream.track[1]")
    assert error_at(data, "stream.track[2]") == "phrase is 62 UTF-8 bytes; must be 1 to 60"
    assert "61 UTF-8 bytes" in error_at(data, "stream.track[4]")
    assert "separates phrases" in error_at(data, "stream.track[5]")
    assert "must be a string, got an integer" in error_at(data, "stream.track[6]")
    assert "stream.track[3]" not in [e.key_path for e in errors(data)]


def test_track_at_most_400_phrases() -> None:
    assert load(doc(stream={"track": [f"w{i}" for i in range(400)]})).stream.track[-1] == "w399"
    reason = error_at(doc(stream={"track": [f"w{i}" for i in range(401)]}), "stream.track")
    assert "401 phrases" in reason and "at most 400" in reason


def test_follow_ids() -> None:
    s = load(doc(stream={"follow": [12, "13", "0000000000000000000000000014"]}))
    assert s.stream.follow == (12, 13, 14)
    data = doc(stream={"follow": [0, -5, "abc", 1.5, True]})
    assert "positive 64-bit integer, got 0" in error_at(data, "stream.follow[0]")
    assert "got -5" in error_at(data, "stream.follow[1]")
    assert "got 'abc'" in error_at(data, "stream.follow[2]")
    assert "got a number" in error_at(data, "stream.follow[3]")
    assert "got a boolean" in error_at(data, "stream.follow[4]")
    assert "at most 5000" in error_at(doc(stream={"follow": list(range(1, 5002))}),
                                      "stream.follow")


# Values `check` and a reload once accepted and a worker then crashed on (the input audit of
# 2026-12-06): each must be refused here, naming the key, so the daemon never sees it.
@pytest.mark.parametrize(("section", "key", "value", "key_path", "reason"), [
    ("stream", "follow", [1 << 70], "stream.follow[0]", "positive 64-bit integer"),
    ("stream", "follow", [1 << 63], "stream.follow[0]", "positive 64-bit integer"),
    ("stream", "url", "http://127.0.0.1:99999/x", "stream.url", "invalid port"),
    ("stream", "url", "http://127.0.0.1:0/x", "stream.url", "invalid port"),
    ("stream", "url", "http://127.0.0.1:port/x", "stream.url", "invalid port"),
    ("stream", "url", "http://[::1/x", "stream.url", "is not a URL: Invalid IPv6 URL"),
    ("stream", "connect_timeout", float("inf"), "stream.connect_timeout", "at most 604800"),
    ("stream", "connect_timeout", 1e30, "stream.connect_timeout", "at most 604800"),
    ("stream", "connect_timeout", 10**30, "stream.connect_timeout", "at most 604800"),
    pytest.param("stream", "connect_timeout", 10**400, "stream.connect_timeout",
                 "at most 604800", id="stream-connect_timeout-10**400"),
    ("stream", "read_timeout", float("nan"), "stream.read_timeout", "got nan"),
    ("control", "stop_timeout", float("-inf"), "control.stop_timeout", "at most 604800"),
    ("mongo", "timeout_ms", 10**9, "mongo.timeout_ms", "between 1 and 604800000"),
    ("spool", "max_records", 10**30, "spool.max_records",
     "64-bit integer (<= 9223372036854775807), got 10000000000000000000… (31 digits)"),
])
def test_values_past_what_the_daemon_can_use_are_refused(
        section: str, key: str, value: object, key_path: str, reason: str) -> None:
    assert reason in error_at(doc(**{section: {key: value}}), key_path)


@pytest.mark.parametrize(("options", "reason"), [
    ("tls=true&tlsCAFile=/nonexistent/ca.pem", "tlscafile file is not readable"),
    ("tls=true&tlsCertificateKeyFile=/etc/passwd", "Private key doesn't match certificate"),
])
def test_a_mongo_uri_no_client_can_be_built_from_is_refused(options: str, reason: str) -> None:
    # Found only by building a client: the store worker did, at start, and crash-looped (the
    # supervisor, checking a reload's URI, died of the OSError).
    uri = f"mongodb://user:pw-canary-9@db.example.com:27017/?{options}"
    found = error_at(doc(mongo={"uri": uri}), "mongo.uri")
    assert reason in found and "pw-canary-9" not in found, found


def test_a_password_in_the_stream_url_is_refused_and_never_quoted() -> None:
    for url in ("https://user:hunter2secret@stream.example.com/x", "https://hunter2secret@x.y/z",
                "https://user:hunter2secret@/x"):
        errs = errors(doc(stream={"url": url}))
        assert [e.key_path for e in errs] == ["stream.url"], errs
        assert all("hunter2secret" not in str(e) for e in errs), errs
    assert "user name or password" in error_at(doc(stream={"url": "https://a:b@x.y/z"}),
                                               "stream.url")


def test_the_longest_durations_and_largest_integers_still_load() -> None:
    s = load(doc(stream={"connect_timeout": 604800, "follow": [(1 << 63) - 1]},
                 mongo={"timeout_ms": 604_800_000}, spool={"max_records": (1 << 63) - 1}))
    assert s.stream.connect_timeout == 604800.0 and s.stream.follow == ((1 << 63) - 1,)
    assert s.mongo.timeout_ms == 604_800_000 and s.spool.max_records == (1 << 63) - 1


# ---------------------------------------------------------------- numbers of any size

# Where each schema dataclass sits in the file; a section added to the schema without an entry
# here fails test_every_numeric_key_is_swept, so no numeric key escapes the sweep below.
SECTION_PATHS: dict[type, str] = {
    schema.StreamSettings: "stream", schema.BackoffSettings: "stream.backoff",
    schema.MongoSettings: "mongo", schema.WriteConcernSettings: "mongo.write_concern",
    schema.WriterSettings: "writer", schema.SpoolSettings: "spool",
    schema.DeadletterSettings: "deadletter", schema.ControlSettings: "control",
    schema.LoggingSettings: "logging", schema.HaSettings: "ha",
}


def numeric_keys() -> list[str]:
    """Every key of settings.yaml whose value is a number (or may be one: ``w``); lists of
    numbers (follow ids, location boxes) have tests of their own."""
    return [f"{path}.{f.name}" for cls, path in SECTION_PATHS.items()
            for f in dataclasses.fields(cls)
            if re.search(r"\b(int|float)\b", str(f.type)) and not str(f.type).startswith("tuple")]


def test_every_numeric_key_is_swept() -> None:
    sections = {f.type for cls in vars(schema).values() if dataclasses.is_dataclass(cls)
                for f in dataclasses.fields(cls) if str(f.type).endswith("Settings")}
    assert {str(t) for t in sections} <= {c.__name__ for c in SECTION_PATHS} | {
        "AuthSettings", "MetricsSettings"}  # no numbers in these two
    assert len(numeric_keys()) == 33, numeric_keys()  # the walk found them all


def with_literal(key_path: str, literal: str) -> str:
    """BASE as YAML text with ``key_path`` set to the YAML ``literal`` as written (a value
    yaml.safe_dump cannot write: an integer past str()'s 4300 digits); v2 keys in a v2 file."""
    data = copy.deepcopy(BASE)
    if key_path == "stream.backfill_minutes":
        data["stream"] = {"url": "https://api.x.com/2/tweets/search/stream", "api": "v2",
                          "rules": ["cat"]}
        data["auth"] = {"bearer_token": "bearer-canary-6666"}
    *parents, name = key_path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[name] = "@@VALUE@@"
    return yaml.safe_dump(data).replace("'@@VALUE@@'", literal)


HUGE = {
    "21 digits": "9" * 21,  # just past 64 bits: it once reached orjson (status files, logs)
    "400 digits": "9" * 400,  # float() overflows
    "-400 digits": "-" + "9" * 400,
    "4000 hex digits": "0x" + "f" * 4000,  # str() refuses it: past 4300 decimal digits
    "1e400": "1e400",  # YAML reads inf
    "-.inf": "-.inf",
    ".nan": ".nan",
}


@pytest.mark.parametrize("literal", HUGE.values(), ids=HUGE.keys())
@pytest.mark.parametrize("key_path", numeric_keys())
def test_every_numeric_key_refuses_a_huge_number_with_a_short_reason(
        key_path: str, literal: str) -> None:
    # The audit: each of these passed check (a crash later), or crashed check with a bare
    # traceback (OverflowError, ValueError). Always ConfigErrors now, naming file and key.
    found = error_at(with_literal(key_path, literal), key_path)
    assert len(found) < 200, found
    assert "9" * 21 not in found and "f" * 21 not in found, found  # shortened


@pytest.mark.parametrize(("item", "got"), [
    ("0x" + "f" * 4000, "got an integer of about 4,816 digits"),
    ("'" + "9" * 5000 + "'", "got '" + "9" * 40 + "'… (5000 characters)"),
    ("-" + "9" * 400, "got -99999999999999999999… (400 digits)"),
], ids=["hex", "5000-digit string", "-400 digits"])
def test_a_follow_id_of_any_size_is_judged_without_a_crash(item: str, got: str) -> None:
    text = yaml.safe_dump(BASE).replace("track:\n", f"follow: [{item}]\n  track:\n")
    reason = error_at(text, "stream.follow[0]")
    assert reason == f"user id must be a positive 64-bit integer, {got}", reason


def test_a_coordinate_of_any_size_is_judged_without_a_crash() -> None:
    text = yaml.safe_dump(BASE).replace("track:\n", f"locations: [[{'9' * 400}, 0, 1, 1]]\n"
                                                     "  track:\n")
    assert "longitudes must be within -180..180" in error_at(text, "stream.locations[0]")


@pytest.mark.parametrize(("literal", "where", "reason"), [
    ("9" * 5000, "line 2", "an integer of 5000 digits cannot be read (at most 4300)"),
    ("2026-02-30", "line 2", "cannot read this value as a timestamp: day is out of range"),
])
def test_a_scalar_yaml_cannot_read_is_a_yaml_error_naming_its_line(
        literal: str, where: str, reason: str) -> None:
    text = f"writer:\n  batch_size: {literal}\n"
    (err,) = errors(text)
    assert err.key_path == "" and f"at {where}, column 15: {reason}" in err.reason, err


def test_write_concern_w_counts_at_most_the_50_members_of_a_replica_set() -> None:
    # D1 of the audit: w: 99999999999999999999 passed check and a reload, then the store
    # worker crash-looped logging it (orjson: "Integer exceeds 64-bit range").
    assert load(doc(mongo={"write_concern": {"w": 50}})).mongo.write_concern.w == 50
    for w, shown in ((51, "51"), (99999999999999999999, "99999999999999999999"),
                     (10**400, "10000000000000000000… (401 digits)")):
        reason = error_at(doc(mongo={"write_concern": {"w": w}}), "mongo.write_concern.w")
        assert reason == ("must be at most 50 (the members that acknowledge a write; a replica "
                          f"set has at most 50), got {shown}"), reason


@pytest.mark.parametrize(("option", "reason"), [
    ("wtimeoutMS=604800001", "URI option wtimeoutMS must be at most 604800000 (a week), "
                             "got 604800001"),
    ("w=1&WTimeoutMS=99999999999999999999", "URI option WTimeoutMS must be at most 604800000 "
                                           "(a week), got 99999999999999999999"),
    ("wtimeoutMS=%39" + "9" * 30, "got 99999999999999999999… (31 digits)"),
])
def test_a_wtimeout_in_the_uri_is_bounded(option: str, reason: str) -> None:
    # The URI's wtimeoutMS is the one write-concern value the settings do not override:
    # pymongo takes any size, and the store worker's log line could not write it.
    uri = f"mongodb://user:pw-canary-5@db.example.com/?{option}"
    found = error_at(doc(mongo={"uri": uri}), "mongo.uri")
    assert reason in found and "pw-canary-5" not in found, found
    ok = load(doc(mongo={"uri": "mongodb://db.example.com/?wtimeoutMS=604800000"}))
    assert ok.mongo.uri.reveal().endswith("604800000")


@pytest.mark.parametrize(("key_path", "value", "got"), [
    ("spool.max_bytes", 99999999999999999999999999,
     "99999999999999999999… (26 digits)"),
    ("spool.max_bytes", "99999999999999TiB", "a string '99999999999999TiB'"),
    ("spool.segment_bytes", "1025TiB", "a string '1025TiB'"),
    ("deadletter.max_bytes", (1 << 50) + 1, "1125899906842625"),
    ("deadletter.max_bytes", "9" * 10**6 + "B", "a string '" + "9" * 40 + "'… (1000001 "
                                                  "characters)"),
], ids=["26 digits", "TiB", "segment", "PiB+1", "a megabyte of digits"])
def test_sizes_are_at_most_1024_tib(key_path: str, value: object, got: str) -> None:
    # D2 of the audit: a spool bound past 64 bits passed check (a warning only), then the
    # stream worker crash-looped writing it to its status file.
    section, key = key_path.split(".")
    reason = error_at(doc(**{section: {key: value}}), key_path)
    assert reason == f"must be at most 1024TiB (1125899906842624 bytes), got {got}", reason
    largest = load(doc(spool={"max_bytes": "1024TiB", "segment_bytes": 1 << 50},
                       deadletter={"max_bytes": "1.5 TiB"}))
    assert largest.spool.max_bytes == largest.spool.segment_bytes == 1 << 50
    assert largest.deadletter.max_bytes == 3 << 39


def test_a_listen_port_of_any_length_is_refused_without_a_crash() -> None:
    listen = "127.0.0.1:" + "9" * 5000
    assert "must be 'host:port'" in error_at(doc(metrics={"listen": listen}), "metrics.listen")


@pytest.mark.parametrize(("value", "text"), [
    (12345678901234567891, "12345678901234567891"),  # exact: float() would round it
    (10**20, "10000000000000000000… (21 digits)"),
    (-(10**25), "-10000000000000000000… (26 digits)"),
    (1 << 20000, "an integer of about 6,021 digits"),
    (-(1 << 20000), "a negative integer of about 6,021 digits"),
    (1e300, "10000000000000000000… (301 digits)"),
    (float("inf"), "inf"), (float("nan"), "nan"),
], ids=["20 digits", "21 digits", "-26 digits", "2**20000", "-2**20000", "1e300", "inf", "nan"])
def test_number_text_shortens_and_never_raises(value: float, text: str) -> None:
    assert number_text(value) == text


SF = [-122.75, 36.8, -121.75, 37.8]


@pytest.mark.parametrize(("box", "reason"), [
    ([1, 2, 3], "4 numbers), got 3 items"),
    ([1, 2, 3, "4"], "4 numbers), got a list"),
    ("1,2,3,4", "4 numbers), got a string"),
    ([10, 0, 5, 1], "west must be < east"),
    ([0, 1, 1, 0], "south < north"),
    ([0, 0, 0, 1], "west must be < east"),
    ([-181, 0, 0, 1], "longitudes must be within -180..180"),
    ([0, -91, 1, 0], "latitudes must be within -90..90"),
    ([0, 0, 0.05, 1], "at least 0.1 degrees"),
    ([0, 0, 1, 0.09], "at least 0.1 degrees"),
])
def test_bad_location_boxes(box: object, reason: str) -> None:
    assert reason in error_at(doc(stream={"locations": [SF, box]}), "stream.locations[1]")


def test_location_boxes_accepted_and_limited_to_25() -> None:
    tenth = [-122.75, 36.8, -122.65, 36.9]  # exactly 0.1 degrees despite float noise
    s = load(doc(stream={"locations": [SF, tenth, [-180, -90, 180, 90]]}))
    assert s.stream.locations[0] == (-122.75, 36.8, -121.75, 37.8)
    assert len(s.stream.locations) == 3
    assert "at most 25" in error_at(doc(stream={"locations": [SF] * 26}), "stream.locations")


def test_no_predicate_at_all() -> None:
    data = doc(stream={"track": [], "follow": [], "locations": []})
    assert "at least one of track, follow or locations" in error_at(data, "stream")
    assert load(doc(stream={"track": None, "follow": [1]})).stream.follow == (1,)


def test_language_codes() -> None:
    assert load(doc(stream={"language": ["en", "pt-BR"]})).stream.language == ("en", "pt-BR")
    data = doc(stream={"language": ["en_US", False]})
    assert "got 'en_US'" in error_at(data, "stream.language[0]")
    assert "quote it" in error_at(data, "stream.language[1]")  # YAML `no` (Norwegian)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/1.1/statuses/filter.json",
    "http://127.9.9.9/x", "http://[::1]:81/x", "http://localhost/x",
    "https://stream.twitter.com/1.1/statuses/filter.json",
])
def test_url_accepted(url: str) -> None:
    assert load(doc(stream={"url": url})).stream.url == url


@pytest.mark.parametrize(("url", "reason"), [
    ("http://stream.twitter.com/1.1/statuses/filter.json", "only for a loopback host"),
    ("http://128.0.0.1/x", "only for a loopback host"),
    ("ftp://example.com/x", "scheme must be https, got 'ftp'"),
    ("https:///path", "has no host"),
    ("stream.twitter.com/x", "has no host"),
    ("", "must not be empty"),
])
def test_url_rejected(url: str, reason: str) -> None:
    assert reason in error_at(doc(stream={"url": url}), "stream.url")


def test_required_keys() -> None:
    data = doc(stream={"url": None}, mongo={"uri": None})
    data["auth"].pop("access_token")
    for path in ("stream.url", "mongo.uri", "auth.access_token"):
        assert error_at(data, path) == "required key is missing"


def test_ca_file(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert load(doc(stream={"ca_file": str(bundle)})).stream.ca_file == str(bundle)
    assert "is not an existing file" in error_at(
        doc(stream={"ca_file": str(tmp_path / "none.pem")}), "stream.ca_file")


# ---------------------------------------------------------------- mongo


def test_mongo_uri_error_never_shows_the_password() -> None:
    env = {**ENV, "MONGO_PW": "pw-canary-5555"}
    data = doc(mongo={"uri": "mongodb://user:${MONGO_PW}@db.example.com/?bogusOption=1"})
    reason = error_at(data, "mongo.uri", env)
    assert reason.startswith("invalid MongoDB URI:")
    literal = doc(mongo={"uri": "mongodb://user:hunter2@db.example.com:notaport/"})
    text = str("\n".join(str(e) for e in errors(literal)))
    assert "hunter2" not in text and "mongo.uri: invalid MongoDB URI" in text
    assert "pw-canary" not in "\n".join(str(e) for e in errors(data, env))


# The secrets audit: ?datetime_conversion=x raised a KeyError from pymongo's validator through
# load_settings (a traceback and exit 1 from run, check and reload).
@pytest.mark.parametrize(("query", "named"), [
    ("datetime_conversion=x", "option datetime_conversion=x: Invalid datetime_conversion value"),
    ("w=-1", "option w=-1: The value of w must be a non negative integer"),
    ("authSource=admin&timeoutMS=soon", "option timeoutMS=soon: "),
    ("uuidRepresentation=x;tls=true", "option uuidRepresentation=x: "),
    ("tls=maybe", "option tls=maybe: "),
    ("tlsCertificateKeyFilePassword=pw-canary-5555&tls=x", "option tls=x: "),
])
def test_a_bad_uri_option_names_the_option_and_value(query: str, named: str) -> None:
    uri = f"mongodb://user:pw-canary-5555@db.example.com/?{query}"
    reason = error_at(doc(mongo={"uri": uri}), "mongo.uri")
    assert reason.startswith(f"invalid MongoDB URI: {named}"), reason
    assert "pw-canary" not in reason


@pytest.mark.parametrize("query", [
    "tlsCertificateKeyFilePassword=pw-canary-5555&maxPoolSize=-1",
    "authMechanismProperties=AWS_SESSION_TOKEN:pw-canary-5555&maxPoolSize=-1",
])
def test_a_bad_uri_option_never_quotes_a_secret_option(query: str) -> None:
    reason = error_at(doc(mongo={"uri": f"mongodb://db.example.com/?{query}"}), "mongo.uri")
    assert "maxPoolSize=-1" in reason and "pw-canary" not in reason


def test_a_bad_uri_option_value_is_not_quoted_where_a_password_may_have_spilled() -> None:
    # A raw '?' in a password puts its tail in the query: pymongo reads "tls=x@db…" as an option.
    uri = "mongodb://user:pw-canary?tls=x@db.example.com/"
    reason = error_at(doc(mongo={"uri": uri}), "mongo.uri")
    assert "option tls=***" in reason and "x@db" not in reason, reason
    unknown = error_at(doc(mongo={"uri": "mongodb://db.example.com/?pwcanary5555=1"}), "mongo.uri")
    assert "pwcanary" not in unknown and "Unknown option" in unknown  # pymongo's own caution


@pytest.mark.parametrize("option", [
    "tlsInsecure=true", "tlsAllowInvalidCertificates=true", "tlsAllowInvalidHostnames=true",
    "tls=true&tlsDisableOCSPEndpointCheck=true", "TLSINSECURE=true",
])
def test_insecure_tls_options_refused_unless_loopback(option: str) -> None:
    remote = doc(mongo={"uri": f"mongodb://u:secretpw@db1.example.com,127.0.0.1/?{option}"})
    reason = error_at(remote, "mongo.uri")
    assert "off TLS certificate checks" in reason and "secretpw" not in reason
    # Only the option written is named, not those pymongo derives from it (tlsInsecure's three).
    named = re.findall(r"tls\w+", reason)
    assert [n.lower() for n in named] == [option.split("&")[-1].split("=")[0].lower()], reason
    assert reason.startswith("URI option ") and " turns off " in reason
    for local in (f"mongodb://localhost:27018/?directConnection=true&{option}",
                  f"mongodb://[::1]/?{option}&loadBalanced=true"):
        assert load(doc(mongo={"uri": local})).mongo.uri.reveal() == local
    # an SRV name is no host: DNS may name any (the secrets audit: "localhost" passed)
    srv = doc(mongo={"uri": f"mongodb+srv://localhost/?{option}"})
    assert "off TLS certificate checks" in error_at(srv, "mongo.uri")


# The secrets audit: a loopback seed's hello named a primary at 192.0.2.2, and pymongo connected
# there with verification off. Only a client pinned to its one loopback host may turn checks off.
PINNED = "allowed only for one loopback host with directConnection=true"
UNPINNED = ("(without it the client also connects, checks off, to every replica-set member the "
            "host names, wherever they are)")


@pytest.mark.parametrize(("uri", "fix"), [
    ("mongodb://localhost:27118/?tls=true&tlsInsecure=true", "add directConnection=true"),
    ("mongodb://127.0.0.1/?tlsAllowInvalidCertificates=true&directConnection=false",
     "add directConnection=true"),
    ("mongodb://127.0.0.1/?tlsAllowInvalidHostnames=true&replicaSet=rs0",
     "add directConnection=true"),
    ("mongodb://localhost,127.0.0.2:27018,[::1]/?tlsInsecure=true",
     "list one loopback host and add directConnection=true"),
])
def test_insecure_tls_on_loopback_needs_a_direct_connection(uri: str, fix: str) -> None:
    reason = error_at(doc(mongo={"uri": uri}), "mongo.uri")
    assert reason.endswith(f"{PINNED}: {fix} {UNPINNED}"), reason


@pytest.mark.parametrize("uri", [
    "mongodb://db.example.com/?tlsInsecure=true&directConnection=true",
    "mongodb://10.0.0.5/?tlsInsecure=true&loadBalanced=true",
    "mongodb+srv://localhost/?tlsInsecure=true",
])
def test_insecure_tls_pinned_to_a_remote_host_is_still_refused(uri: str) -> None:
    assert error_at(doc(mongo={"uri": uri}), "mongo.uri") == (
        f"URI option tlsInsecure turns off TLS certificate checks; {PINNED}")


def test_two_insecure_tls_options_are_both_named() -> None:
    uri = "mongodb://db.example.com/?tlsAllowInvalidHostnames=true&tlsAllowInvalidCertificates=true"
    assert error_at(doc(mongo={"uri": uri}), "mongo.uri") == (
        "URI options tlsAllowInvalidCertificates, tlsAllowInvalidHostnames turn off TLS "
        f"certificate checks; {PINNED}")


def test_srv_uri_is_checked_without_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    from pymongo.synchronous import srv_resolver

    def no_dns(*_a: object, **_k: object) -> None:
        raise AssertionError("DNS lookup attempted")

    monkeypatch.setattr(srv_resolver._SrvResolver, "__init__", no_dns)
    ok = doc(mongo={"uri": "mongodb+srv://u:p@cluster0.example.invalid/db?retryWrites=true"})
    assert load(ok).mongo.uri.reveal().startswith("mongodb+srv://")
    bad = doc(mongo={"uri": "mongodb+srv://cluster0.example.invalid/?tlsInsecure=true"})
    assert error_at(bad, "mongo.uri") == ("URI option tlsInsecure turns off TLS certificate "
                                          f"checks; {PINNED}")
    with_port = doc(mongo={"uri": "mongodb+srv://cluster0.example.invalid:27017/"})
    assert "port" in error_at(with_port, "mongo.uri")


@pytest.mark.parametrize(("key", "name", "reason"), [
    ("database", "", "must not be empty"),
    ("database", "tw.itter", "forbids: '.'"),
    ("database", "a b$", "forbids: ' $'"),
    ("database", "d" * 64, "shorter than 64 bytes"),
    ("collection", "", "must not be empty"),
    ("collection", "a$b", "must not contain '$'"),
    ("collection", "system.users", "reserved"),
    ("collection", "a..b", "'..'"),
    ("collection", ".a", "must not start or end with '.'"),
    ("collection", "c" * 250, "at most 255 bytes"),
])
def test_bad_mongo_names(key: str, name: str, reason: str) -> None:
    assert reason in error_at(doc(mongo={key: name}), f"mongo.{key}")


def test_write_concern() -> None:
    # The default is the safe one (issue 14): majority-acknowledged and journaled. It was
    # w: 1, j: false, which lets a failover roll back a batch the spool had already let go of.
    default = load(BASE).mongo.write_concern
    assert (default.w, default.j) == ("majority", True)
    s = load(doc(mongo={"write_concern": {"w": "majority", "j": True}}))
    assert (s.mongo.write_concern.w, s.mongo.write_concern.j) == ("majority", True)
    assert load(doc(mongo={"write_concern": {"w": 2}})).mongo.write_concern.w == 2
    weak = load(doc(mongo={"write_concern": {"w": 1, "j": False}})).mongo.write_concern
    assert (weak.w, weak.j) == (1, False), "w: 1 stays available for a loss window one accepts"
    assert "unacknowledged" in error_at(doc(mongo={"write_concern": {"w": 0}}),
                                        "mongo.write_concern.w")
    (w0,) = errors(doc(mongo={"write_concern": {"w": 0}}))
    assert str(FILE) in str(w0) and "mongo.write_concern.w" in str(w0) and "0" in w0.reason
    for bad in (-1, "all", True):
        assert "integer >= 1 or 'majority'" in error_at(
            doc(mongo={"write_concern": {"w": bad}}), "mongo.write_concern.w")


def test_display_uri_hides_credentials() -> None:
    s = load(doc(mongo={"uri": "mongodb://user:p%40ss@db.example.com/?tls=true"}))
    assert s.mongo.display_uri() == "mongodb://***@db.example.com/?tls=true"


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(("value", "expected"), [
    (1000, 1000), ("1000", 1000), ("1GiB", 1 << 30), ("64 MiB", 64 << 20), ("64mib", 64 << 20),
    ("1.5KB", 1500), ("2GB", 2 * 10**9), ("10B", 10), ("3 KiB", 3072),
    (0, None), (-5, None), (True, None), ("1 XB", None), ("GiB", None), ("-1MiB", None),
    (1.5, None), (None, None), ("0.0001B", None),
])
def test_parse_size(value: object, expected: int | None) -> None:
    assert parse_size(value) == expected


def test_size_keys_report_errors() -> None:
    data = doc(spool={"max_bytes": "lots", "segment_bytes": "2GiB"}, deadletter={"max_bytes": 0})
    assert "got a string 'lots'" in error_at(data, "spool.max_bytes")
    assert "positive size" in error_at(data, "deadletter.max_bytes")
    small = doc(spool={"max_bytes": "1MiB", "segment_bytes": "2MiB"})
    assert "must be <= max_bytes (1048576)" in error_at(small, "spool.segment_bytes")


# ---------------------------------------------------------------- secrets


def test_secrets_from_env_are_wrapped_and_masked() -> None:
    s = load(BASE)
    assert isinstance(s.auth.consumer_secret, Secret)
    assert s.auth.consumer_secret.reveal() == "cs-canary-2222"
    text = repr(s) + str(s)
    assert all(v not in text for v in ENV.values())
    assert repr(s.auth.access_token) == str(s.auth.access_token) == "***"


def test_secret_value_semantics() -> None:
    a, b, c = Secret("x1"), Secret("x1"), Secret("x2")
    assert a == b and a != c and a != "x1"
    assert len({a, b, c}) == 2
    assert f"{a}" == "***"


def test_credentials_directory_fallback(tmp_path: Path) -> None:
    (tmp_path / "TWITTER_ACCESS_TOKEN_SECRET").write_text("from-file\n\n")
    (tmp_path / "TWITTER_ACCESS_TOKEN").write_text("token-file\n")
    env = {k: v for k, v in ENV.items() if k not in ("TWITTER_ACCESS_TOKEN_SECRET",
                                                    "TWITTER_ACCESS_TOKEN")}
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    env["TWITTER_ACCESS_TOKEN"] = "env-wins"
    errs = errors(BASE, env)  # "from-file\n": only one newline is stripped, the rest is invalid
    assert [e.key_path for e in errs] == ["auth.access_token_secret"]
    assert "whitespace" in errs[0].reason and "from-file" not in str(errs[0])
    (tmp_path / "TWITTER_ACCESS_TOKEN_SECRET").write_text("from-file\n")
    s = load(BASE, env)
    assert s.auth.access_token_secret.reveal() == "from-file"
    assert s.auth.access_token.reveal() == "env-wins"


def test_a_credential_error_names_the_file_it_looked_in(tmp_path: Path) -> None:
    # The secrets audit: a missing folder read like an unset variable, an empty file like an
    # empty value: neither said where the daemon had looked.
    env = {k: v for k, v in ENV.items() if k != "TWITTER_CONSUMER_SECRET"}
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path / "nonexistent")
    reason = error_at(BASE, "auth.consumer_secret", env)
    assert f"looked in {tmp_path}/nonexistent/TWITTER_CONSUMER_SECRET" in reason, reason
    assert f"$CREDENTIALS_DIRECTORY {tmp_path}/nonexistent is not a folder" in reason
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    assert "no such file" in error_at(BASE, "auth.consumer_secret", env)
    (tmp_path / "TWITTER_CONSUMER_SECRET").write_text("\n")
    errs = [e for e in errors(BASE, env) if e.key_path == "auth.consumer_secret"]
    assert [e.reason for e in errs] == [
        f"credential TWITTER_CONSUMER_SECRET ({tmp_path}/TWITTER_CONSUMER_SECRET) is empty"]


def test_missing_secret_names_key_and_variable() -> None:
    env = {k: v for k, v in ENV.items() if k != "TWITTER_CONSUMER_SECRET"}
    reason = error_at(BASE, "auth.consumer_secret", env)
    assert "${TWITTER_CONSUMER_SECRET} is not set" in reason
    assert "environment variable TWITTER_CONSUMER_SECRET" in reason
    assert all(v not in reason for v in env.values())


def test_substituted_values_never_appear_in_errors() -> None:
    env = {**ENV, "LANG_CODE": "not_a_code_canary"}
    data = doc(stream={"language": ["${LANG_CODE}"]})
    reason = error_at(data, "stream.language[0]", env)
    assert "not_a_code_canary" not in reason and "***" in reason


def test_empty_secret_is_an_error() -> None:
    assert error_at(BASE, "auth.consumer_key", {**ENV, "TWITTER_CONSUMER_KEY": ""}) == (
        "must not be empty")


NOT_PRINTABLE_ASCII = ("contains whitespace, a control character or a non-ASCII character; a "
                       "credential is printable ASCII (check it: a paste can add a typographic "
                       "quote or a look-alike letter)")


@pytest.mark.parametrize("value", [
    "tokén-canary", "token-canary\u2019", "\u0410AAA-canary", "canary\u200b", "canary\u00a0x",
    "can ary", "canary\x7f",
])
@pytest.mark.parametrize("variable", ["TWITTER_CONSUMER_KEY", "TWITTER_CONSUMER_SECRET",
                                      "TWITTER_ACCESS_TOKEN", "TWITTER_ACCESS_TOKEN_SECRET"])
def test_an_oauth_credential_must_be_printable_ascii(variable: str, value: str) -> None:
    """oauthlib would percent-encode it and sign: a key X never issued, a 401 on every
    connection. Refused at load, the field named, never the value."""
    key = "auth." + variable.lower().removeprefix("twitter_")
    errs = errors(BASE, {**ENV, variable: value})
    assert [(e.key_path, e.reason) for e in errs] == [(key, NOT_PRINTABLE_ASCII)]
    assert "canary" not in "\n".join(str(e) for e in errs)


@pytest.mark.parametrize(("variable", "key"), [
    ("TWITTER_CONSUMER_KEY", "auth.consumer_key"), ("MONGO_URI", "mongo.uri")])
def test_an_environment_variable_that_is_not_utf8_is_refused_naming_it(
        variable: str, key: str) -> None:
    """The ops audit: `TWITTER_CONSUMER_KEY=$(printf 'ab\\xffcd') ingestd check` died with a
    UnicodeEncodeError traceback (exit 1): Python holds the undecodable byte as a lone
    surrogate, which the lease key's hash could not encode. Now an error naming the variable
    and the key, never the value (a MONGO_URI with a Latin-1 password byte likewise)."""
    data = doc(mongo={"uri": "${MONGO_URI}"})
    value = "canary\udcffx" if variable != "MONGO_URI" else "mongodb://u:canary\udcff@db/"
    env = {**ENV, "MONGO_URI": "mongodb://db/", variable: value}
    reason = error_at(data, key, env)
    assert reason == f"environment variable {variable} (for ${{{variable}}}) is not valid UTF-8"
    assert "canary" not in "\n".join(str(e) for e in errors(data, env))


@pytest.mark.parametrize("value", ["AAAA%2Bb%3Dtokén", "AAAA\u2013canary", "AAAA canary"])
def test_a_bearer_token_must_be_printable_ascii(value: str) -> None:
    """The secrets audit: a non-ASCII token passed check and then crashed every connection
    attempt (UnicodeEncodeError writing the Authorization header)."""
    data = {"stream": {"url": "https://api.x.com/2/tweets/search/stream", "api": "v2",
                       "rules": [{"value": "cats"}]},
            "auth": {"bearer_token": "${BEARER}"}, "mongo": BASE["mongo"]}
    assert error_at(data, "auth.bearer_token", {"BEARER": value}) == NOT_PRINTABLE_ASCII
    token = "AAAAAAAAAAAAAAAAAAAAA%2Fx~!#$&'()*+,-./:;<=>?@[]^_`{|}"
    assert load(data, {"BEARER": token}).auth.bearer_token.reveal() == token


def test_secret_values_include_mongo_password_raw_and_decoded() -> None:
    s = load(doc(mongo={"uri": "mongodb://user:p%40ss+x@db.example.com/"}))
    values = secret_values(s)
    assert set(ENV.values()) <= set(values)
    assert {"p%40ss+x", "p@ss+x", "p@ss x"} <= set(values)  # pymongo's decoding: '+' is ' '
    assert "mongodb://localhost:27017" not in secret_values(load(BASE))


# ---------------------------------------------------------------- state dir


def test_state_dir_resolution(tmp_path: Path) -> None:
    assert load(BASE).state_dir == Path("/etc/ingestd/state")
    env = {**ENV, "STATE_DIRECTORY": "/var/lib/ingestd:/var/lib/other"}
    assert load(BASE, env).state_dir == Path("/var/lib/ingestd")
    data = {**BASE, "state_dir": str(tmp_path)}
    assert load(data, env).state_dir == tmp_path
    assert load({**BASE, "state_dir": "rel"}).state_dir == Path("/etc/ingestd/rel")


# ---------------------------------------------------------------- number formatting


@given(st.floats(min_value=-180, max_value=180, allow_nan=False))
def test_plain_number_is_exact_and_never_scientific(value: float) -> None:
    text = plain_number(value)
    assert "e" not in text.lower()
    assert float(text) == value


def test_settings_are_frozen() -> None:
    s = load(BASE)
    with pytest.raises(AttributeError):
        s.stream.url = "https://other/"  # type: ignore[misc]
