"""The schema of settings.yaml: one frozen dataclass per section.

Each optional key's default is written once, here: the section builders read it from these
fields (`Section.default`), and tests/test_settings.py checks that a minimal file loads into
exactly these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ingestd.config.errors import Secret
from ingestd.config.mongo_uri import mask_userinfo
from ingestd.logs import scrub_userinfo

Box = tuple[float, float, float, float]  # west, south, east, north (degrees)


@dataclass(frozen=True)
class BackoffSettings:
    """Reconnect back-off (docs/protocol.md §4.2): linear for network errors, exponential for
    HTTP."""

    network_start: float = 0.25
    network_step: float = 0.25
    network_cap: float = 16.0
    http_start: float = 5.0
    http_cap: float = 320.0
    rate_limit_start: float = 60.0
    rate_limit_cap: float = 960.0
    reconnect_delay: float = 1.0
    max_attempts_per_minute: int = 6
    jitter: float = 0.1


@dataclass(frozen=True)
class Rule:
    """One X API v2 filtered-stream rule as configured (docs/protocol.md §7.3)."""

    value: str
    tag: str | None = None


@dataclass(frozen=True)
class StreamSettings:
    url: str
    track: tuple[str, ...] = ()
    follow: tuple[int, ...] = ()
    locations: tuple[Box, ...] = ()
    language: tuple[str, ...] = ()
    filter_level: str | None = None
    delimited: bool = False
    gzip: bool = True
    read_timeout: float = 90.0  # with api: v2, config.stream.V2_READ_TIMEOUT
    connect_timeout: float = 20.0
    # "": certifi's bundle (config.stream.ca_bundle), looked up where a TLS connection is made:
    # importing certifi loads importlib.resources, ~0.5 MB in every process that reads settings.
    ca_file: str = ""
    max_message_bytes: int = 1_000_000
    api: str = "v1.1"
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    # -- v2 only (api: v2): rules synced over the rules endpoint, fields on the stream request
    # (with api: v2 the field lists default to config.stream_v2.V2_DEFAULTS)
    rules: tuple[Rule, ...] = ()
    tweet_fields: tuple[str, ...] = ()
    expansions: tuple[str, ...] = ()
    user_fields: tuple[str, ...] = ()
    place_fields: tuple[str, ...] = ()
    backfill_minutes: int = 0


@dataclass(frozen=True)
class AuthSettings:
    consumer_key: Secret
    consumer_secret: Secret
    access_token: Secret
    access_token_secret: Secret
    bearer_token: Secret = field(default_factory=lambda: Secret(""))  # v2 (OAuth 2.0 app-only)


@dataclass(frozen=True)
class WriteConcernSettings:
    """What MongoDB must have done before a batch counts as stored (docs/reliability.md §3.5).

    ``majority`` + journal: an acknowledged batch survives a failover and a crash; anything
    weaker lets the spool's checkpoint move past a batch the server can still lose.
    """

    w: int | str = "majority"
    j: bool = True


@dataclass(frozen=True)
class MongoSettings:
    uri: Secret
    database: str = "twitter"
    collection: str = "tweets"
    # The coverage ledger (gaps and per-hour figures) in the same database: ingestd.sink.coverage.
    coverage_collection: str = "coverage"
    write_concern: WriteConcernSettings = field(default_factory=WriteConcernSettings)
    timeout_ms: int = 30_000
    slow_write_seconds: float = 10.0
    # Messages about keys that are accepted but do nothing (logged by the store worker; a
    # daemon being reloaded must not fail on them). Not part of the target's identity.
    notices: tuple[str, ...] = field(default=(), compare=False)

    def display_uri(self) -> str:
        """The URI with `user:pass@` replaced by `***@` where pymongo splits it (a password may
        hold `#` or a space, which end a URL for a text scrubber), and secret options masked:
        safe to print."""
        return scrub_userinfo(mask_userinfo(self.uri.reveal()))


# writer.tombstone_retention bounds (seconds): a delete can precede its tweet by seconds on a live
# stream, so a minute is the least; MongoDB's expireAfterSeconds is a 32-bit int.
TOMBSTONE_RETENTION_MIN = 60
TOMBSTONE_RETENTION_MAX = 2**31 - 1


@dataclass(frozen=True)
class WriterSettings:
    batch_size: int = 1000
    flush_interval: float = 1.0
    apply_deletes: bool = True
    # true: an encoder child; false: none; "auto": a child while encoding, not MongoDB, takes
    # most of the store worker's time (``sink.encoder_split``)
    encoder_process: bool | Literal["auto"] = "auto"
    retry_start: float = 0.5
    retry_cap: float = 30.0
    # Seconds a tombstone (``<collection>_deleted``) is kept after its delete was received: a TTL
    # index on ``deleted_at`` removes it then, and the start-up load reads only the ones younger.
    tombstone_retention: int = 7 * 86400


# spool.when_full: stop reading (the endpoint then disconnects us), or drop the newest messages.
WHEN_FULL_CHOICES = ("block", "drop_newest")


@dataclass(frozen=True)
class SpoolSettings:
    max_bytes: int = 1 << 30
    max_records: int = 2_000_000
    segment_bytes: int = 64 << 20
    fsync_interval: float = 0.2
    when_full: str = "block"


@dataclass(frozen=True)
class DeadletterSettings:
    max_bytes: int = 256 << 20


@dataclass(frozen=True)
class ControlSettings:
    stop_timeout: float = 10.0
    heartbeat_timeout: float = 30.0
    crash_loop_restarts: int = 5
    crash_loop_window: float = 60.0


@dataclass(frozen=True)
class MetricsSettings:
    listen: str | None = "127.0.0.1:9464"

    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, IPv6 brackets removed; None when metrics are disabled."""
        return None if self.listen is None else split_listen(self.listen)


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: str = "auto"
    error_interval: float = 10.0


@dataclass(frozen=True)
class HaSettings:
    """``ha``: one active stream among instances with the same settings (docs/design.md, "Standby
    pairs and redundant streams"). ``instance`` and ``lease_key`` are filled in by the builder."""

    mode: str = "single"  # single | standby | redundant
    lease_seconds: float = 10.0
    instance: str = ""  # default: "<hostname>:<hash of the state folder>"
    collection: str = "leases"
    lease_key: str = ""  # default: "stream:<hash of the public credential keys>"


@dataclass(frozen=True)
class Settings:
    path: Path
    state_dir: Path
    stream: StreamSettings
    auth: AuthSettings
    mongo: MongoSettings
    writer: WriterSettings
    spool: SpoolSettings
    deadletter: DeadletterSettings
    control: ControlSettings
    metrics: MetricsSettings
    logging: LoggingSettings
    ha: HaSettings = field(default_factory=HaSettings)


def split_listen(listen: str) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' → (host, port); None when malformed."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # bare IPv6 needs brackets to find the port
    if not sep or not host or not port.isascii() or not port.isdigit():
        return None
    if len(port.lstrip("0")) > 5 or int(port) > 65535:  # int() refuses 4300 digits and more
        return None
    return host, int(port)

