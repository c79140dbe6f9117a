"""Builders of the small sections: state_dir, auth, writer, spool, deadletter, control, metrics,
logging. Each reads its keys with the defaults of its schema dataclass."""

from __future__ import annotations

import os
from pathlib import Path

from ingestd.config.errors import Secret
from ingestd.config.schema import (
    TOMBSTONE_RETENTION_MAX,
    TOMBSTONE_RETENTION_MIN,
    WHEN_FULL_CHOICES,
    AuthSettings,
    ControlSettings,
    DeadletterSettings,
    LoggingSettings,
    MetricsSettings,
    SpoolSettings,
    WriterSettings,
    split_listen,
)
from ingestd.config.section import Section
from ingestd.config.values import plain_number


def build_state_dir(root: Section) -> Path:
    """`state_dir` (relative to the file), else systemd's $STATE_DIRECTORY, else ./state."""
    base = Path(os.path.abspath(root.ctx.path)).parent
    configured = root.optional_text("state_dir", default=None)
    if configured:
        return base / Path(configured).expanduser()
    from_systemd = root.ctx.env.get("STATE_DIRECTORY", "")
    if from_systemd:
        return Path(from_systemd.split(":")[0])
    return base / "state"


def _secret(sec: Section, name: str, required: bool) -> Secret:
    """A credential: printable ASCII without spaces, what an HTTP header carries (a non-ASCII
    bearer token crashed every connection attempt) and what X issues (oauthlib percent-encodes a
    non-ASCII OAuth key and signs on: a 401 on every connection). The reason never quotes it."""
    value = sec.text(name, required=required, default="")
    if not all("!" <= c <= "~" for c in value):
        sec.error(name, "contains whitespace, a control character or a non-ASCII character; a "
                        "credential is printable ASCII (check it: a paste can add a "
                        "typographic quote or a look-alike letter)")
    return Secret(value)


def build_auth(sec: Section, api: str) -> AuthSettings:
    # v1.1 signs with OAuth 1.0a (four keys); v2's filtered stream takes only a bearer token.
    oauth, bearer = api != "v2", api == "v2"
    return AuthSettings(
        consumer_key=_secret(sec, "consumer_key", oauth),
        consumer_secret=_secret(sec, "consumer_secret", oauth),
        access_token=_secret(sec, "access_token", oauth),
        access_token_secret=_secret(sec, "access_token_secret", oauth),
        bearer_token=_secret(sec, "bearer_token", bearer),
    )


def build_writer(sec: Section) -> WriterSettings:
    retry_start = sec.number("retry_start", gt=0)
    retry_cap = sec.number("retry_cap", gt=0)
    if retry_cap < retry_start:
        sec.error("retry_cap", f"must be >= retry_start ({plain_number(retry_start)}), "
                               f"got {plain_number(retry_cap)}")
    return WriterSettings(
        batch_size=sec.integer("batch_size", lo=1, hi=100_000),
        flush_interval=sec.number("flush_interval", gt=0),
        apply_deletes=sec.boolean("apply_deletes"),
        encoder_process=sec.boolean_or("encoder_process", "auto"),
        retry_start=retry_start,
        retry_cap=retry_cap,
        tombstone_retention=sec.integer("tombstone_retention", lo=TOMBSTONE_RETENTION_MIN,
                                        hi=TOMBSTONE_RETENTION_MAX),
    )


def build_spool(sec: Section) -> SpoolSettings:
    max_bytes = sec.size("max_bytes")
    segment_bytes = sec.size("segment_bytes")
    if segment_bytes > max_bytes:
        sec.error("segment_bytes", f"must be <= max_bytes ({max_bytes}), got {segment_bytes}")
    return SpoolSettings(
        max_bytes=max_bytes,
        max_records=sec.integer("max_records", lo=1),
        segment_bytes=segment_bytes,
        fsync_interval=sec.number("fsync_interval", gt=0, hi=1),
        when_full=sec.text("when_full", choices=WHEN_FULL_CHOICES),
    )


def build_deadletter(sec: Section) -> DeadletterSettings:
    return DeadletterSettings(max_bytes=sec.size("max_bytes"))


def build_control(sec: Section) -> ControlSettings:
    return ControlSettings(
        stop_timeout=sec.number("stop_timeout", gt=0),
        heartbeat_timeout=sec.number("heartbeat_timeout", gt=0),
        crash_loop_restarts=sec.integer("crash_loop_restarts", lo=1),
        crash_loop_window=sec.number("crash_loop_window", gt=0),
    )


def build_metrics(sec: Section) -> MetricsSettings:
    listen = sec.optional_text("listen")
    if listen is not None and split_listen(listen) is None:
        sec.error("listen", f"must be 'host:port' (port 0-65535, IPv6 as '[::1]:9464') or null, "
                            f"got {listen!r}")
        listen = sec.default("listen")
    return MetricsSettings(listen=listen)


def build_logging(sec: Section) -> LoggingSettings:
    return LoggingSettings(
        level=sec.text("level", choices=("debug", "info", "warning", "error", "critical")),
        format=sec.text("format", choices=("auto", "json", "console")),
        error_interval=sec.number("error_interval", lo=0),
    )
