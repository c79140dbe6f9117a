"""Load and validate settings.yaml into frozen dataclasses.

Every problem is collected and raised at once as `ConfigErrors` (one line per problem,
`"<file>: <key.path>: <reason>"`), so an operator fixes the file in one pass. Messages never
contain a secret value: `${NAME}` substitutions are masked out of every reason.

    settings = load_settings(Path("/etc/ingestd/settings.yaml"))
    settings.stream.post_params()   # [("track", "iphone,ipad"), ..., ("stall_warnings", "true")]
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import certifi
import yaml

from ingestd.logs import MASK, scrub_userinfo

EXIT_CONFIG: Final = 78

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------- errors and secrets


class ConfigError(Exception):
    """One invalid setting: `str()` is `"<file>: <key.path>: <reason>"`."""

    def __init__(self, file: Path | str, key_path: str, reason: str) -> None:
        super().__init__(str(file), key_path, reason)
        self.file = str(file)
        self.key_path = key_path
        self.reason = reason

    def __str__(self) -> str:
        # File-level problems (unreadable, YAML syntax) have no key path.
        if not self.key_path:
            return f"{self.file}: {self.reason}"
        return f"{self.file}: {self.key_path}: {self.reason}"


class ConfigErrors(ConfigError):
    """All problems found in one file; the first one also fills the ConfigError fields."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = errors[0]
        super().__init__(first.file, first.key_path, first.reason)
        self.errors: tuple[ConfigError, ...] = tuple(errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class Secret:
    """A secret string: masked in str/repr (hence in dataclass reprs and tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


# ---------------------------------------------------------------- settings dataclasses


@dataclass(frozen=True)
class BackoffSettings:
    """Reconnect back-off (protocol.md §4.2): linear for network errors, exponential for HTTP."""

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
    """One X API v2 filtered-stream rule as configured (protocol.md §7.3)."""

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
    read_timeout: float = 90.0
    connect_timeout: float = 20.0
    ca_file: str = field(default_factory=certifi.where)
    max_message_bytes: int = 1_000_000
    api: str = "v1.1"
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    # -- v2 only (api: v2): rules synced over the rules endpoint, fields on the stream request
    rules: tuple[Rule, ...] = ()
    tweet_fields: tuple[str, ...] = ()
    expansions: tuple[str, ...] = ()
    user_fields: tuple[str, ...] = ()
    place_fields: tuple[str, ...] = ()
    backfill_minutes: int = 0

    def post_params(self) -> list[tuple[str, str]]:
        """Form parameters in protocol order; empty ones omitted, stall warnings always on."""
        params = [
            ("track", ",".join(self.track)),
            ("follow", ",".join(str(i) for i in self.follow)),
            ("locations", ",".join(format_coordinate(n) for box in self.locations for n in box)),
            ("language", ",".join(self.language)),
            ("filter_level", self.filter_level or ""),
            ("delimited", "length" if self.delimited else ""),
            ("stall_warnings", "true"),
        ]
        return [(name, value) for name, value in params if value]

    def filter_key(self) -> tuple[Hashable, ...]:
        """Everything that needs a new connection when it changes.

        v2 rules are not in here: they change on the live connection (rules endpoint), and
        ``backfill_minutes`` only matters on the next reconnect.
        """
        return (self.url, self.track, self.follow, self.locations, self.language,
                self.filter_level, self.delimited, self.gzip, self.api, self.tweet_fields,
                self.expansions, self.user_fields, self.place_fields)

    def v2_query_params(self, *, backfill: bool = False) -> list[tuple[str, str]]:
        """Query parameters of ``GET /2/tweets/search/stream``; lists comma-joined, no spaces."""
        params = [
            ("tweet.fields", ",".join(self.tweet_fields)),
            ("expansions", ",".join(self.expansions)),
            ("user.fields", ",".join(self.user_fields)),
            ("place.fields", ",".join(self.place_fields)),
            ("backfill_minutes", str(self.backfill_minutes) if backfill else ""),
        ]
        return [(name, value) for name, value in params if value and value != "0"]


@dataclass(frozen=True)
class AuthSettings:
    consumer_key: Secret
    consumer_secret: Secret
    access_token: Secret
    access_token_secret: Secret
    bearer_token: Secret = field(default_factory=lambda: Secret(""))  # v2 (OAuth 2.0 app-only)


@dataclass(frozen=True)
class WriteConcernSettings:
    w: int | str = 1
    j: bool = False


@dataclass(frozen=True)
class MongoSettings:
    uri: Secret
    database: str = "twitter"
    collection: str = "tweets"
    write_concern: WriteConcernSettings = field(default_factory=WriteConcernSettings)
    timeout_ms: int = 30_000
    slow_write_seconds: float = 10.0
    # Messages about keys that are accepted but do nothing (logged by the store worker; a
    # daemon being reloaded must not fail on them). Not part of the target's identity.
    notices: tuple[str, ...] = field(default=(), compare=False)

    def display_uri(self) -> str:
        """The URI with `user:pass@` replaced by `***@`, safe to log."""
        return scrub_userinfo(self.uri.reveal())


@dataclass(frozen=True)
class WriterSettings:
    batch_size: int = 1000
    flush_interval: float = 0.5
    apply_deletes: bool = True
    encoder_process: bool = True
    retry_start: float = 0.5
    retry_cap: float = 30.0


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
        return None if self.listen is None else _split_listen(self.listen)


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: str = "auto"
    error_interval: float = 10.0


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


# ---------------------------------------------------------------- public helpers


def format_coordinate(value: float) -> str:
    """Shortest exact decimal text, never scientific notation: -122.75, 37.8, 100."""
    from decimal import Decimal  # not at module level: the supervisor rarely formats numbers

    text = format(Decimal(repr(float(value))).normalize(), "f")
    return "0" if text == "-0" else text


def filter_diff(old: StreamSettings, new: StreamSettings) -> dict[str, dict[str, list[Any]]]:
    """Added/removed track phrases, follow ids and boxes (compared as sets), sorted."""
    pairs: dict[str, tuple[Sequence[Any], Sequence[Any]]] = {
        "track": (old.track, new.track),
        "follow": (old.follow, new.follow),
        "locations": (old.locations, new.locations),
    }
    return {
        name: {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b))}
        for name, (a, b) in pairs.items()
    }


def start_only_changes(old: Settings, new: Settings) -> list[str]:
    """Keys a reload changed that take effect only at the next start: the state folder, the
    metrics listener and the spool (its files and bounds are opened once by the stream worker)."""
    changed = ["state_dir"] if old.state_dir != new.state_dir else []
    if old.metrics.listen != new.metrics.listen:
        changed.append("metrics.listen")
    changed += [f"spool.{f.name}" for f in fields(SpoolSettings)
                if getattr(old.spool, f.name) != getattr(new.spool, f.name)]
    return changed


def secret_values(settings: Settings) -> list[str]:
    """Every secret as text (plus the Mongo password, raw and decoded) for the log redactor."""
    auth = settings.auth
    values = [s.reveal() for s in (auth.consumer_key, auth.consumer_secret,
                                   auth.access_token, auth.access_token_secret,
                                   auth.bearer_token)]
    uri = settings.mongo.uri.reveal()
    password = _uri_password(uri)
    if password:
        # The whole URI only when it carries credentials: masking a bare host is noise.
        values += [uri, password, unquote(password)]
    return sorted({v for v in values if v}, key=len, reverse=True)


def load_settings(path: Path, env: Mapping[str, str] | None = None, *,
                  secrets: bool = True) -> Settings:
    """Read and validate `path`; raises ConfigErrors listing every problem.

    ``secrets=False`` is for commands that only look at a running daemon (status, reload): a
    `${NAME}` stays unresolved and its key is not validated, so they need no credentials.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigErrors([ConfigError(path, "", "file not found")]) from None
    except UnicodeDecodeError as exc:
        reason = f"not valid UTF-8 (byte offset {exc.start})"
        raise ConfigErrors([ConfigError(path, "", reason)]) from None
    except OSError as exc:
        reason = f"cannot read file: {exc.strerror or type(exc).__name__}"
        raise ConfigErrors([ConfigError(path, "", reason)]) from None
    return load_settings_text(text, path, env, secrets=secrets)


def load_settings_text(text: str, path: Path, env: Mapping[str, str] | None = None, *,
                       secrets: bool = True) -> Settings:
    """Validate settings given as text (the supervisor hands workers the text it checked)."""
    ctx = _Context(path, os.environ if env is None else env, secrets=secrets)
    raw = _parse_yaml(text, ctx)
    raw = _interpolate(raw, "", ctx)
    root = _Section(ctx, "", raw)
    settings = _build(root)
    root.finish()
    if ctx.errors:
        raise ConfigErrors(ctx.errors)
    return settings


# ---------------------------------------------------------------- parsing machinery


class _Missing:
    """Sentinel: the key is absent (distinct from an explicit null)."""


_MISSING = _Missing()
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Context:
    """Collects errors; remembers substituted values so no reason can echo them."""

    def __init__(self, path: Path, env: Mapping[str, str], *, secrets: bool = True) -> None:
        self.path = path
        self.env = env
        self.secrets = secrets
        self.errors: list[ConfigError] = []
        self.substituted: list[str] = []
        self.unresolved: set[str] = set()  # key paths left as `${NAME}` when not resolving

    def error(self, key_path: str, reason: str) -> None:
        if key_path in self.unresolved:
            return  # the value is a placeholder on purpose: nothing to say about it
        for value in sorted(self.substituted, key=len, reverse=True):
            if value:
                reason = reason.replace(value, MASK)
        self.errors.append(ConfigError(self.path, key_path, scrub_userinfo(reason)))

    def fail(self, reason: str) -> ConfigErrors:
        return ConfigErrors([ConfigError(self.path, "", reason)])


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag.endswith(":str"):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, ctx: _Context) -> dict[object, object]:
    try:
        raw: object = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # Only problem/context/position: str(exc) quotes file lines, which may hold secrets.
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        detail = "; ".join(p for p in (exc.context, exc.problem) if p)
        raise ctx.fail(f"YAML syntax error at {where}: {detail}") from None
    except yaml.reader.ReaderError as exc:
        where = f"character offset {exc.position}"
        raise ctx.fail(f"YAML error at {where}: {exc.reason} (#x{exc.character:04x})") from None
    except yaml.YAMLError as exc:
        raise ctx.fail(f"YAML error: {type(exc).__name__}") from None
    if raw is None:
        raise ctx.fail("file is empty: expected a mapping with stream, auth and mongo sections")
    if not isinstance(raw, dict):
        raise ctx.fail(f"top level must be a mapping of sections, got {_kind(raw)}")
    return raw


def _interpolate(value: Any, path: str, ctx: _Context) -> Any:
    """Replace `${NAME}` in every string: env var NAME, else $CREDENTIALS_DIRECTORY/NAME."""
    if isinstance(value, dict):
        return {k: _interpolate(v, _join(path, str(k)), ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if isinstance(value, str):
        return _VAR.sub(lambda m: _lookup(m.group(1), path, ctx), value)
    return value


def _lookup(name: str, path: str, ctx: _Context) -> str:
    if not ctx.secrets:
        ctx.unresolved.add(path)
        return f"${{{name}}}"
    found = ctx.env.get(name)
    if found is None:
        found = _read_credential(name, path, ctx)
    if found is None:
        return f"${{{name}}}"  # left as is: the error above already names the key
    ctx.substituted.append(found)
    return found


def _read_credential(name: str, path: str, ctx: _Context) -> str | None:
    cred_dir = ctx.env.get("CREDENTIALS_DIRECTORY")
    missing = (f"${{{name}}} is not set: define environment variable {name} or a systemd "
               f"credential {name} (LoadCredential=)")
    if not cred_dir:
        ctx.error(path, missing)
        return None
    try:
        data = (Path(cred_dir) / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        ctx.error(path, missing)
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
        ctx.error(path, f"cannot read credential {name} from $CREDENTIALS_DIRECTORY: {why}")
        return None
    return data.removesuffix("\n").removesuffix("\r")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean (quote it: YAML reads yes/no/on/off/true/false as booleans)"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _num(value: float | None) -> str:
    return "" if value is None else format_coordinate(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section:
    """Typed, error-collecting access to one YAML mapping; unknown keys reported by finish()."""

    def __init__(self, ctx: _Context, path: str, raw: object) -> None:
        self.ctx = ctx
        self.path = path
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            ctx.error(path, f"must be a mapping, got {_kind(raw)}")
            raw = {}
        self._raw: dict[object, object] = raw
        self._known: list[str] = []
        self._children: list[_Section] = []

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def error(self, name: str, reason: str) -> None:
        self.ctx.error(self.key(name), reason)

    def get(self, name: str) -> object:
        self._known.append(name)
        return self._raw.get(name, _MISSING)

    def is_set(self, name: str) -> bool:
        """Whether the key holds something other than absent/null/empty/false/'none'."""
        value = self._raw.get(name)
        return value not in (None, False, "none") and value != []

    def section(self, name: str) -> _Section:
        raw = self.get(name)
        child = _Section(self.ctx, self.key(name), None if raw is _MISSING else raw)
        self._children.append(child)
        return child

    def finish(self) -> None:
        for key in self._raw:
            if key not in self._known:
                self.ctx.error(self.key(str(key)), self._unknown_reason(key))
        for child in self._children:
            child.finish()

    def _unknown_reason(self, key: object) -> str:
        import difflib  # error path only: the daemons do not carry it

        close = difflib.get_close_matches(str(key), self._known, n=1, cutoff=0.6)
        if close:
            return f"unknown key; did you mean {close[0]!r}?"
        return f"unknown key (known keys: {', '.join(sorted(set(self._known)))})"

    # -- typed getters: on error they record it and return the default

    def _typed(self, name: str, default: Any, ok: Callable[[object], bool], what: str,
               *, nullable: bool = False, required: bool = False) -> Any:
        value = self.get(name)
        if value is _MISSING:
            if required:
                self.error(name, "required key is missing")
            return default
        if value is None and nullable:
            return None
        if not ok(value):
            self.error(name, f"must be {what}, got {_kind(value)}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self._typed(name, default, lambda v: isinstance(v, bool), "true or false"))

    def integer(self, name: str, default: int, lo: int | None = None,
                hi: int | None = None) -> int:
        value: int = self._typed(name, default, _is_int, "an integer")
        return value if self._in_range(name, value, lo, hi) else default

    def number(self, name: str, default: float, *, gt: float | None = None,
               lo: float | None = None, hi: float | None = None) -> float:
        value = float(self._typed(name, default, _is_number, "a number"))
        if gt is not None and not value > gt:
            self.error(name, f"must be > {_num(gt)}, got {_num(value)}")
            return default
        return value if self._in_range(name, value, lo, hi) else default

    def _in_range(self, name: str, value: float, lo: float | None, hi: float | None) -> bool:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if lo is not None and hi is not None:
                bounds = f"between {_num(lo)} and {_num(hi)}"
            else:
                bounds = f">= {_num(lo)}" if lo is not None else f"<= {_num(hi)}"
            self.error(name, f"must be {bounds}, got {_num(value)}")
            return False
        return True

    def text(self, name: str, default: str, *, choices: Sequence[str] = (),
             required: bool = False) -> str:
        value = self._typed(name, default, lambda v: isinstance(v, str), "a string",
                            required=required)
        if required and self._raw.get(name) == "":
            self.error(name, "must not be empty")
        return str(value) if self._choice_ok(name, value, choices) else default

    def optional_text(self, name: str, default: str | None = None, *,
                      choices: Sequence[str] = ()) -> str | None:
        value = self._typed(name, default, lambda v: isinstance(v, str), "a string or null",
                            nullable=True)
        if value is None:
            return None
        return str(value) if self._choice_ok(name, value, choices) else default

    def _choice_ok(self, name: str, value: object, choices: Sequence[str]) -> bool:
        if choices and value not in choices:
            self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
            return False
        return True

    def items(self, name: str) -> list[tuple[str, object]]:
        """(key path, value) of each list item; absent or null means an empty list."""
        value = self.get(name)
        if value is _MISSING or value is None:
            return []
        if not isinstance(value, list):
            self.error(name, f"must be a list, got {_kind(value)}")
            return []
        return [(f"{self.key(name)}[{i}]", item) for i, item in enumerate(value)]

    def size(self, name: str, default: int) -> int:
        value = self.get(name)
        if value is _MISSING:
            return default
        parsed = parse_size(value)
        if parsed is None:
            self.error(name, f"must be a positive size in bytes or a string like '64MiB' "
                             f"(units B, KB, MB, GB, KiB, MiB, GiB), got {_kind(value)}"
                             + (f" {value!r}" if isinstance(value, str) else ""))
            return default
        return parsed


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: object) -> int | None:
    """Bytes from an int or a string like '64MiB', '1.5 GB'; None if invalid or not > 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        return None
    from decimal import Decimal

    size = int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])
    return size if size > 0 else None


# ---------------------------------------------------------------- sections


def _build(root: _Section) -> Settings:
    return Settings(
        path=root.ctx.path,
        state_dir=_state_dir(root),
        stream=(stream := _stream(root.section("stream"))),
        auth=_auth(root.section("auth"), stream.api),
        mongo=_mongo(root.section("mongo")),
        writer=_writer(root.section("writer")),
        spool=_spool(root.section("spool")),
        deadletter=DeadletterSettings(root.section("deadletter").size("max_bytes", 256 << 20)),
        control=_control(root.section("control")),
        metrics=_metrics(root.section("metrics")),
        logging=_logging(root.section("logging")),
    )


def _state_dir(root: _Section) -> Path:
    base = Path(os.path.abspath(root.ctx.path)).parent
    configured = root.optional_text("state_dir")
    if configured:
        return base / Path(configured).expanduser()
    from_systemd = root.ctx.env.get("STATE_DIRECTORY", "")
    if from_systemd:
        return Path(from_systemd.split(":")[0])
    return base / "state"


# -- stream

MAX_TRACK, MAX_TRACK_BYTES, MAX_FOLLOW, MAX_BOXES = 400, 60, 5000, 25
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*$")


def _stream(sec: _Section) -> StreamSettings:
    api = sec.text("api", "v1.1", choices=("v1.1", "v2"))
    track_items, follow_items = sec.items("track"), sec.items("follow")
    box_items = sec.items("locations")
    if api == "v2":
        if track_items or follow_items or box_items:
            sec.error("api", "v2 does not take track/follow/locations (v1.1 keys): with them api "
                             "must be one of v1.1; for v2 list stream.rules instead")
        for key in [k for k in ("language", "filter_level", "delimited") if sec.is_set(k)]:
            sec.error(key, "is a v1.1 parameter; v2 has no equivalent (use rule operators)")
    elif not (track_items or follow_items or box_items):
        sec.ctx.error(sec.path, "no predicate: set at least one of track, follow or locations")
    return StreamSettings(
        api=api,
        url=_url(sec),
        track=_track(sec, track_items),
        follow=_follow(sec, follow_items),
        locations=_locations(sec, box_items),
        language=_language(sec),
        filter_level=sec.optional_text("filter_level", choices=("none", "low", "medium")),
        delimited=sec.boolean("delimited", False),
        gzip=sec.boolean("gzip", True),
        # v2 sends a keep-alive at least every 20 s: three periods (protocol.md §7.4).
        read_timeout=sec.number("read_timeout", 60.0 if api == "v2" else 90.0, gt=0),
        connect_timeout=sec.number("connect_timeout", 20.0, gt=0),
        ca_file=_ca_file(sec),
        # A message must fit in one BSON document (16 MiB) to be storable at all.
        max_message_bytes=sec.integer("max_message_bytes", 1_000_000, lo=1024, hi=16 << 20),
        backoff=_backoff(sec.section("backoff")),
        **_v2_stream(sec, api),
    )


# -- stream, v2 (protocol.md §7.2-7.3)

V2_TWEET_FIELDS = frozenset((
    "attachments", "author_id", "context_annotations", "conversation_id", "created_at",
    "edit_controls", "entities", "geo", "id", "in_reply_to_user_id", "lang", "public_metrics",
    "possibly_sensitive", "referenced_tweets", "reply_settings", "source", "text", "withheld",
    "note_tweet", "edit_history_tweet_ids",
))
V2_EXPANSIONS = frozenset((
    "attachments.poll_ids", "attachments.media_keys", "author_id", "edit_history_tweet_ids",
    "entities.mentions.username", "geo.place_id", "in_reply_to_user_id", "referenced_tweets.id",
    "referenced_tweets.id.author_id",
))
V2_USER_FIELDS = frozenset((
    "created_at", "description", "entities", "id", "location", "most_recent_tweet_id", "name",
    "pinned_tweet_id", "profile_image_url", "protected", "public_metrics", "url", "username",
    "verified", "verified_type", "withheld",
))
V2_PLACE_FIELDS = frozenset((
    "contained_within", "country", "country_code", "full_name", "geo", "id", "name",
    "place_type",
))
# Defaults: enough for created_at as a date, per-author and per-language queries, and geo.
V2_DEFAULTS = {
    "tweet_fields": ("author_id", "created_at", "entities", "geo", "lang", "public_metrics",
                     "referenced_tweets", "conversation_id"),
    "expansions": ("author_id", "geo.place_id"),
    "user_fields": ("created_at", "name", "username"),
    "place_fields": ("country_code", "full_name", "geo", "place_type"),
}
MAX_RULE_LENGTH = 2048  # the largest access level's limit; the server enforces its own
MAX_TAG_LENGTH = 256


def _v2_stream(sec: _Section, api: str) -> dict[str, Any]:
    """The v2 keys; with ``api: v1.1`` any of them set is a mistake worth naming."""
    names = ("rules", "tweet_fields", "expansions", "user_fields", "place_fields",
             "backfill_minutes")
    if api != "v2":
        for name in [n for n in names if sec.is_set(n)]:
            sec.error(name, "is an X API v2 key: set stream.api to v2 to use it")
        for name in names:
            sec.get(name)
        return {}
    return {
        "rules": _rules(sec),
        "tweet_fields": _field_list(sec, "tweet_fields", V2_TWEET_FIELDS),
        "expansions": _field_list(sec, "expansions", V2_EXPANSIONS),
        "user_fields": _field_list(sec, "user_fields", V2_USER_FIELDS),
        "place_fields": _field_list(sec, "place_fields", V2_PLACE_FIELDS),
        # 0 = off; 1-5 asks the endpoint to resend the last N minutes after a reconnect.
        "backfill_minutes": sec.integer("backfill_minutes", 0, lo=0, hi=5),
    }


def _field_list(sec: _Section, name: str, known: frozenset[str]) -> tuple[str, ...]:
    if sec.get(name) is _MISSING:
        return V2_DEFAULTS[name]
    values: list[str] = []
    for path, item in sec.items(name):
        if not isinstance(item, str) or item not in known:
            got = repr(item) if isinstance(item, str) else _kind(item)
            sec.ctx.error(path, f"must be one of {', '.join(sorted(known))}; got {got}")
        elif item not in values:
            values.append(item)
    return tuple(values)


def _rules(sec: _Section) -> tuple[Rule, ...]:
    items = sec.items("rules")
    if not items:
        sec.error("rules", "v2 needs at least one rule: a list of {value, tag}")
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path, item in items:
        rule = _rule(sec.ctx, path, item)
        if rule is None:
            continue
        if rule.value in seen:
            # The endpoint refuses a second rule with the same value (DuplicateRule).
            sec.ctx.error(f"{path}.value", f"duplicates {seen[rule.value]}.value")
            continue
        seen[rule.value] = path
        rules.append(rule)
    return tuple(rules)


def _rule(ctx: _Context, path: str, item: object) -> Rule | None:
    if isinstance(item, str):
        item = {"value": item}
    if not isinstance(item, dict):
        ctx.error(path, f"a rule is a mapping {{value, tag}}, got {_kind(item)}")
        return None
    for key in item:
        if key not in ("value", "tag"):
            ctx.error(f"{path}.{key}", "unknown key (known keys: tag, value)")
    value, tag = item.get("value"), item.get("tag")
    ok = True
    if not isinstance(value, str) or not value.strip():
        ctx.error(f"{path}.value", "required: the rule text, e.g. 'cat has:media -is:retweet'")
        ok = False
    elif len(value.strip()) > MAX_RULE_LENGTH:
        ctx.error(f"{path}.value", f"is {len(value.strip())} characters; at most "
                                   f"{MAX_RULE_LENGTH} (the endpoint may allow fewer)")
        ok = False
    if tag is not None and (not isinstance(tag, str) or len(tag) > MAX_TAG_LENGTH):
        ctx.error(f"{path}.tag", f"must be a string of at most {MAX_TAG_LENGTH} characters")
        ok = False
    return Rule(str(value).strip(), tag or None) if ok else None


def _url(sec: _Section) -> str:
    url = sec.text("url", "", required=True)
    if not url:
        return url
    parts = urlsplit(url)
    if not parts.hostname:
        sec.error("url", f"has no host: {url!r}")
    elif parts.scheme == "http" and not _is_loopback(parts.hostname):
        sec.error("url", "http:// is allowed only for a loopback host; use https://")
    elif parts.scheme not in ("https", "http"):
        sec.error("url", f"scheme must be https, got {parts.scheme or 'none'!r}")
    return url


def _track(sec: _Section, items: list[tuple[str, object]]) -> tuple[str, ...]:
    if len(items) > MAX_TRACK:
        sec.error("track", f"has {len(items)} phrases; the endpoint accepts at most {MAX_TRACK}")
    phrases = []
    for path, item in items:
        if not isinstance(item, str):
            sec.ctx.error(path, f"must be a string, got {_kind(item)}")
            continue
        size = len(item.strip().encode("utf-8"))
        if not 1 <= size <= MAX_TRACK_BYTES:
            sec.ctx.error(path, f"phrase is {size} UTF-8 bytes; must be 1 to {MAX_TRACK_BYTES}")
        elif "," in item:
            sec.ctx.error(path, "contains ',' which separates phrases on the wire: use two items")
        else:
            phrases.append(item.strip())
    return tuple(phrases)


def _follow(sec: _Section, items: list[tuple[str, object]]) -> tuple[int, ...]:
    if len(items) > MAX_FOLLOW:
        sec.error("follow", f"has {len(items)} ids; the endpoint accepts at most {MAX_FOLLOW}")
    ids = []
    for path, item in items:
        value = item if _is_number(item) else (
            int(item) if isinstance(item, str) and item.isascii() and item.isdigit() else None)
        if not isinstance(value, int) or value <= 0:
            got = repr(item) if _is_int(item) or isinstance(item, str) else _kind(item)
            sec.ctx.error(path, f"user id must be a positive integer, got {got}")
        else:
            ids.append(value)
    return tuple(ids)


def _locations(sec: _Section, items: list[tuple[str, object]]) -> tuple[Box, ...]:
    if len(items) > MAX_BOXES:
        sec.error("locations", f"has {len(items)} boxes; the endpoint accepts at most {MAX_BOXES}")
    boxes = []
    for path, item in items:
        box = _box(sec.ctx, path, item)
        if box is not None:
            boxes.append(box)
    return tuple(boxes)


def _box(ctx: _Context, path: str, item: object) -> Box | None:
    shape = "a box is [west, south, east, north] in degrees (4 numbers)"
    if not isinstance(item, list) or len(item) != 4 or not all(_is_number(n) for n in item):
        got = f"{len(item)} items" if isinstance(item, list) and len(item) != 4 else _kind(item)
        ctx.error(path, f"{shape}, got {got}")
        return None
    west, south, east, north = (float(n) for n in item)
    problems = []
    if not (-180 <= west <= 180 and -180 <= east <= 180):
        problems.append("longitudes must be within -180..180")
    if not (-90 <= south <= 90 and -90 <= north <= 90):
        problems.append("latitudes must be within -90..90")
    if west >= east or south >= north:
        problems.append("west must be < east and south < north (south-west corner first)")
    # Each side 0.1..360 degrees (protocol.md §1.2); tolerance absorbs float noise.
    elif east - west < 0.1 - 1e-9 or north - south < 0.1 - 1e-9:
        problems.append("each side must span at least 0.1 degrees")
    for problem in problems:
        ctx.error(path, problem)
    return None if problems else (west, south, east, north)


def _language(sec: _Section) -> tuple[str, ...]:
    codes = []
    for path, item in sec.items("language"):
        if not isinstance(item, str) or not _LANGUAGE.match(item):
            got = repr(item) if isinstance(item, str) else _kind(item)
            sec.ctx.error(path, f"must be a BCP 47 language code like 'en' or 'pt-BR', got {got}")
        else:
            codes.append(item)
    return tuple(codes)


def _ca_file(sec: _Section) -> str:
    configured = sec.optional_text("ca_file")
    if configured is None:
        return certifi.where()
    path = Path(os.path.abspath(sec.ctx.path)).parent / Path(configured).expanduser()
    if not path.is_file():
        sec.error("ca_file", f"{str(path)!r} is not an existing file")
    elif not os.access(path, os.R_OK):
        sec.error("ca_file", f"{str(path)!r} is not readable")
    return str(path)


def _backoff(sec: _Section) -> BackoffSettings:
    d = BackoffSettings()
    values = {name: sec.number(name, getattr(d, name), lo=0) for name in (
        "network_start", "network_step", "network_cap", "http_start", "http_cap",
        "rate_limit_start", "rate_limit_cap", "reconnect_delay")}
    for start, cap in (("network_start", "network_cap"), ("http_start", "http_cap"),
                       ("rate_limit_start", "rate_limit_cap")):
        if values[cap] < values[start]:
            sec.error(cap, f"must be >= {start} ({_num(values[start])}), got {_num(values[cap])}")
    return BackoffSettings(
        **values,
        max_attempts_per_minute=sec.integer("max_attempts_per_minute", 6, lo=1, hi=600),
        jitter=sec.number("jitter", 0.1, lo=0, hi=1),
    )


# -- auth and mongo


def _secret(sec: _Section, name: str, required: bool = True) -> Secret:
    value = sec.text(name, "", required=required)
    if any(c.isspace() or not c.isprintable() for c in value):
        sec.error(name, "contains whitespace or control characters (check the credential)")
    return Secret(value)


def _auth(sec: _Section, api: str) -> AuthSettings:
    # v1.1 signs with OAuth 1.0a (four keys); v2's filtered stream takes only a bearer token.
    oauth, bearer = api != "v2", api == "v2"
    return AuthSettings(
        consumer_key=_secret(sec, "consumer_key", oauth),
        consumer_secret=_secret(sec, "consumer_secret", oauth),
        access_token=_secret(sec, "access_token", oauth),
        access_token_secret=_secret(sec, "access_token_secret", oauth),
        bearer_token=_secret(sec, "bearer_token", bearer),
    )


# Options that turn off certificate/hostname/revocation checks (reliability.md §3.3).
_INSECURE_TLS = {"tlsinsecure": "tlsInsecure", "tlsallowinvalidcertificates":
                 "tlsAllowInvalidCertificates", "tlsallowinvalidhostnames":
                 "tlsAllowInvalidHostnames", "tlsdisableocspendpointcheck":
                 "tlsDisableOCSPEndpointCheck"}


def _mongo(sec: _Section) -> MongoSettings:
    uri = sec.text("uri", "", required=True)
    if uri and sec.key("uri") not in sec.ctx.unresolved:
        _check_mongo_uri(sec, uri)
    database = sec.text("database", "twitter")
    collection = sec.text("collection", "tweets")
    _check_db_name(sec, database)
    _check_collection_name(sec, database, collection)
    return MongoSettings(
        uri=Secret(uri),
        database=database,
        collection=collection,
        write_concern=_write_concern(sec.section("write_concern")),
        timeout_ms=sec.integer("timeout_ms", 30_000, lo=1),
        slow_write_seconds=sec.number("slow_write_seconds", 10.0, gt=0),
        notices=_retired_mongo_keys(sec),
    )


# Keys that once existed and now do nothing → what to use instead.
_RETIRED_MONGO_KEYS = {
    "server_selection_timeout_ms": (
        "has no effect and is ignored: with timeout_ms set, pymongo bounds server selection by "
        "timeout_ms; remove it and use mongo.timeout_ms to bound a write attempt"),
}


def _retired_mongo_keys(sec: _Section) -> tuple[str, ...]:
    """Notices (file, key, what to use instead) for retired keys present in ``sec``.

    A warning, not an error: a settings file that was valid yesterday must still start the
    daemon and reload into it; the key never changed what a write does.
    """
    notices = []
    for key, advice in _RETIRED_MONGO_KEYS.items():
        if sec.get(key) is not _MISSING:
            notices.append(f"{sec.ctx.path}: {sec.key(key)} {advice}")
    return tuple(notices)


def _parse_mongo_uri(uri: str) -> dict[str, Any]:
    from pymongo.uri_parser import parse_uri

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymongo warnings may quote option values
        if uri.startswith("mongodb+srv://"):
            # parse_uri would resolve SRV/TXT records: validate syntax only, no DNS at load.
            # _validate_uri is private; if a pymongo release drops it, skip the check.
            try:
                from pymongo.uri_parser_shared import _validate_uri
            except ImportError:
                return {"options": {}, "nodelist": []}
            return _validate_uri(uri)
        return parse_uri(uri)


def pymongo_uri_facts(uri: str) -> dict[str, Any]:
    """pymongo's verdict on ``uri`` as plain JSON: ``{"error": reason}`` (not yet scrubbed), or
    ``{"true_options": [lower-cased names of options set to true], "hosts": [...]}``."""
    from pymongo.errors import PyMongoError

    try:
        parsed = _parse_mongo_uri(uri)
    except (PyMongoError, ValueError, TypeError) as exc:
        return {"error": str(exc)}
    options = parsed["options"].items()
    return {"true_options": sorted(str(k).lower() for k, v in options if v is True),
            "hosts": [str(host) for host, _port in parsed["nodelist"]]}


# pymongo is ~19 MB of RSS that the supervisor and the stream worker otherwise never need: they
# call check_mongo_uri_in_child() and, as long as they have not loaded pymongo, ask a short-lived
# child interpreter instead. The URI goes over stdin (a command line is world-readable in /proc).
_uri_check_in_child = False
_URI_CHILD = ("import json, sys\n"
              "from ingestd.config.settings import pymongo_uri_facts\n"
              "sys.stdout.write(json.dumps(pymongo_uri_facts(sys.stdin.read())))\n")
_URI_CHILD_TIMEOUT = 60.0
# The last verdict: a reload that keeps the URI spawns no child. One entry only, so an old
# password does not outlive the next URI change.
_last_uri_facts: tuple[str, dict[str, Any]] | None = None


def check_mongo_uri_in_child() -> None:
    """From now on, check ``mongo.uri`` in a child interpreter unless pymongo is loaded here.

    For the long-lived processes that never talk to MongoDB (supervisor, stream worker); the
    child costs ~0.3 s of CPU per new URI, so one-shot tools keep the in-process default.
    """
    global _uri_check_in_child
    _uri_check_in_child = True


def mongo_uri_facts(uri: str) -> dict[str, Any]:
    """``pymongo_uri_facts(uri)``, from a child interpreter if this process asked for that."""
    global _last_uri_facts
    if _last_uri_facts is not None and _last_uri_facts[0] == uri:
        return _last_uri_facts[1]
    in_child = _uri_check_in_child and "pymongo" not in sys.modules
    facts = _uri_facts_in_child(uri) if in_child else pymongo_uri_facts(uri)
    _last_uri_facts = (uri, facts)
    return facts


def _uri_facts_in_child(uri: str) -> dict[str, Any]:
    import subprocess

    try:
        done = subprocess.run([sys.executable, "-c", _URI_CHILD], input=uri.encode(),
                              capture_output=True, timeout=_URI_CHILD_TIMEOUT, check=True)
        facts = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        facts = None
    if not isinstance(facts, dict):
        # No usable child (no fork, killed, broken interpreter): pay the import, never guess.
        return pymongo_uri_facts(uri)
    return facts


def _check_mongo_uri(sec: _Section, uri: str) -> None:
    facts = mongo_uri_facts(uri)
    if "error" in facts:
        reason = str(facts["error"])
        for secret in (_uri_password(uri), _uri_userinfo(uri)):
            if secret:
                reason = reason.replace(secret, MASK).replace(unquote(secret), MASK)
        sec.error("uri", f"invalid MongoDB URI: {reason}")
        return
    true_options = set(facts.get("true_options", ()))
    insecure = [name for key, name in _INSECURE_TLS.items() if key in true_options]
    hosts = [str(host) for host in facts.get("hosts", ())]
    if insecure and not all(_is_loopback(h) for h in hosts):
        sec.error("uri", f"URI options {', '.join(insecure)} turn off TLS certificate checks; "
                         "allowed only when every host is loopback")


def _uri_userinfo(uri: str) -> str:
    authority = uri.partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    return authority.rpartition("@")[0]


def _uri_password(uri: str) -> str:
    return _uri_userinfo(uri).partition(":")[2]


_BAD_DB_CHARS = set('/\\. "$*<>:|?\x00')


def _check_db_name(sec: _Section, name: str) -> None:
    if not name:
        sec.error("database", "must not be empty")
    elif bad := sorted(set(name) & _BAD_DB_CHARS):
        sec.error("database", f"contains characters MongoDB forbids: {''.join(bad)!r}")
    elif len(name.encode()) >= 64:
        sec.error("database", "must be shorter than 64 bytes")


def _check_collection_name(sec: _Section, database: str, name: str) -> None:
    if not name:
        sec.error("collection", "must not be empty")
    elif "$" in name or "\x00" in name:
        sec.error("collection", "must not contain '$' or NUL")
    elif name.startswith("system."):
        sec.error("collection", "must not start with 'system.' (reserved)")
    elif name.startswith(".") or name.endswith(".") or ".." in name:
        sec.error("collection", "must not start or end with '.', nor contain '..'")
    elif len(f"{database}.{name}".encode()) > 255:
        sec.error("collection", "database.collection must be at most 255 bytes")


def _write_concern(sec: _Section) -> WriteConcernSettings:
    raw = sec.get("w")
    w: int | str = 1
    if raw == "majority" or (isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1):
        w = raw
    elif raw == 0 and not isinstance(raw, bool):
        # The spool is acknowledged only after MongoDB confirms a write; w=0 never confirms.
        sec.error("w", "0 (unacknowledged writes) is not allowed: tweets could be lost")
    elif raw is not _MISSING:
        sec.error("w", f"must be an integer >= 1 or 'majority', got {_kind(raw)}")
    return WriteConcernSettings(w=w, j=sec.boolean("j", False))


# -- writer, spool, control, metrics, logging


def _writer(sec: _Section) -> WriterSettings:
    retry_start = sec.number("retry_start", 0.5, gt=0)
    retry_cap = sec.number("retry_cap", 30.0, gt=0)
    if retry_cap < retry_start:
        sec.error("retry_cap",
                  f"must be >= retry_start ({_num(retry_start)}), got {_num(retry_cap)}")
    return WriterSettings(
        batch_size=sec.integer("batch_size", 1000, lo=1, hi=100_000),
        flush_interval=sec.number("flush_interval", 0.5, gt=0),
        apply_deletes=sec.boolean("apply_deletes", True),
        encoder_process=sec.boolean("encoder_process", True),
        retry_start=retry_start,
        retry_cap=retry_cap,
    )


def _spool(sec: _Section) -> SpoolSettings:
    max_bytes = sec.size("max_bytes", 1 << 30)
    segment_bytes = sec.size("segment_bytes", 64 << 20)
    if segment_bytes > max_bytes:
        sec.error("segment_bytes", f"must be <= max_bytes ({max_bytes}), got {segment_bytes}")
    return SpoolSettings(
        max_bytes=max_bytes,
        max_records=sec.integer("max_records", 2_000_000, lo=1),
        segment_bytes=segment_bytes,
        fsync_interval=sec.number("fsync_interval", 0.2, gt=0, hi=1),
        when_full=sec.text("when_full", "block", choices=("block", "drop_newest")),
    )


def _control(sec: _Section) -> ControlSettings:
    return ControlSettings(
        stop_timeout=sec.number("stop_timeout", 10.0, gt=0),
        heartbeat_timeout=sec.number("heartbeat_timeout", 30.0, gt=0),
        crash_loop_restarts=sec.integer("crash_loop_restarts", 5, lo=1),
        crash_loop_window=sec.number("crash_loop_window", 60.0, gt=0),
    )


def _split_listen(listen: str) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' → (host, port); None when malformed."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # bare IPv6 needs brackets to find the port
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


def _metrics(sec: _Section) -> MetricsSettings:
    listen = sec.optional_text("listen", "127.0.0.1:9464")
    if listen is not None and _split_listen(listen) is None:
        sec.error("listen", f"must be 'host:port' (port 0-65535, IPv6 as '[::1]:9464') or null, "
                            f"got {listen!r}")
        listen = "127.0.0.1:9464"
    return MetricsSettings(listen=listen)


def _logging(sec: _Section) -> LoggingSettings:
    return LoggingSettings(
        level=sec.text("level", "info", choices=("debug", "info", "warning", "error", "critical")),
        format=sec.text("format", "auto", choices=("auto", "json", "console")),
        error_interval=sec.number("error_interval", 10.0, lo=0),
    )
