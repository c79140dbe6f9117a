"""Load and validate settings.yaml into the frozen dataclasses of ingestd/config/schema.py.

Every problem is collected and raised at once as `ConfigErrors` (one line per problem,
`"<file>: <key.path>: <reason>"`), so an operator fixes the file in one pass. Messages never
contain a secret value: `${NAME}` substitutions are masked out of every reason.

    settings = load_settings(Path("/etc/ingestd/settings.yaml"))
    settings.stream.track   # ("iphone", "ipad")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from urllib.parse import unquote, unquote_plus

from ingestd.config import schema
from ingestd.config.errors import ConfigError, ConfigErrors
from ingestd.config.ha import build_ha
from ingestd.config.loader import Context, interpolate, parse_yaml
from ingestd.config.mongo_section import build_mongo
from ingestd.config.mongo_uri import uri_password
from ingestd.config.schema import Settings, SpoolSettings
from ingestd.config.section import Section
from ingestd.config.sections import (
    build_auth,
    build_control,
    build_deadletter,
    build_logging,
    build_metrics,
    build_spool,
    build_state_dir,
    build_writer,
)
from ingestd.config.stream import build_stream


def start_only_changes(old: Settings, new: Settings) -> list[str]:
    """Keys a reload changed that take effect only at the next start: the state folder, the
    metrics listener, ``ha`` and the spool (its files and bounds are opened once by the stream
    worker)."""
    return supervisor_start_only_changes(old, new) + stream_start_only_changes(old, new)


def supervisor_start_only_changes(old: Settings, new: Settings) -> list[str]:
    """The start-only keys the supervisor reads once: the state folder, the metrics listener."""
    changed = ["state_dir"] if old.state_dir != new.state_dir else []
    if old.metrics.listen != new.metrics.listen:
        changed.append("metrics.listen")
    return changed


def stream_start_only_changes(old: Settings, new: Settings) -> list[str]:
    """The start-only keys the stream worker reads once, when it starts: ``ha`` and the spool."""
    changed = ["ha"] if old.ha != new.ha else []  # it joins (or not) the lease once
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
    password = uri_password(uri)
    if password:
        # The whole URI only when it carries credentials: masking a bare host is noise. pymongo
        # decodes the password with unquote_plus ('+' is a space).
        values += [uri, password, unquote(password), unquote_plus(password)]
    return sorted({v for v in values if v}, key=len, reverse=True)


def load_settings(path: Path, env: Mapping[str, str] | None = None, *,
                  secrets: bool = True, resolve: tuple[str, ...] = ()) -> Settings:
    """Read and validate `path`; raises ConfigErrors listing every problem.

    ``secrets=False`` is for commands that only look at a running daemon (status, reload): a
    `${NAME}` stays unresolved and its key is not validated, so they need no credentials; the
    key paths in ``resolve`` (``ingestd coverage``: ``mongo.uri``) are resolved all the same.
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
    return load_settings_text(text, path, env, secrets=secrets, resolve=resolve)


def load_settings_text(text: str, path: Path, env: Mapping[str, str] | None = None, *,
                       secrets: bool = True, resolve: tuple[str, ...] = (),
                       check_files: bool = True) -> Settings:
    """Validate settings given as text (the supervisor hands workers the text it checked;
    ``check_files=False``: the files it names are not looked for, see ``Context``)."""
    ctx = Context(path, os.environ if env is None else env, secrets=secrets, resolve=resolve,
                  check_files=check_files)
    raw = parse_yaml(text, ctx)
    raw = interpolate(raw, "", ctx)
    root = Section(ctx, "", raw)
    settings = _build(root)
    root.finish()
    if ctx.errors:
        raise ConfigErrors(ctx.errors)
    return settings


def _build(root: Section) -> Settings:
    state_dir = build_state_dir(root)  # first: the order keys are read is the order of errors
    stream = build_stream(root.section("stream", schema.StreamSettings))
    auth = build_auth(root.section("auth", schema.AuthSettings), stream.api)
    return Settings(
        path=root.ctx.path,
        state_dir=state_dir,
        stream=stream,
        auth=auth,
        mongo=build_mongo(root.section("mongo", schema.MongoSettings)),
        writer=build_writer(root.section("writer", schema.WriterSettings)),
        spool=build_spool(root.section("spool", schema.SpoolSettings)),
        deadletter=build_deadletter(root.section("deadletter", schema.DeadletterSettings)),
        control=build_control(root.section("control", schema.ControlSettings)),
        metrics=build_metrics(root.section("metrics", schema.MetricsSettings)),
        logging=build_logging(root.section("logging", schema.LoggingSettings)),
        ha=build_ha(root.section("ha", schema.HaSettings), state_dir, auth, stream.api),
    )


def lenient_state_dir(path: Path, env: Mapping[str, str] | None = None) -> Path | None:
    """The ``state_dir`` a settings file names, read as ``build_state_dir`` reads it but from
    the raw YAML alone, so that the rest of the file may be invalid (``ingestd status`` must
    find the daemon exactly when its file is broken). A file that cannot be parsed, or is
    missing, names none: the default then. None when the file cannot
    be read (no permission: the default would be a guess, and a running daemon reported as
    down) or when ``state_dir`` itself is wrong (not a string, an unset ``${NAME}``): no folder
    can be determined. Bytes that are not UTF-8 (a Latin-1 "café" in a track phrase) are read
    as U+FFFD: the ``state_dir`` line is usually not where they are."""
    ctx = Context(path, os.environ if env is None else env, secrets=False,
                  resolve=("state_dir",))
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    except OSError:
        return None
    try:
        raw: object = parse_yaml(text, ctx)
        if isinstance(raw, dict):
            raw = {"state_dir": interpolate(raw.get("state_dir"), "state_dir", ctx)}
    except ConfigError:
        raw = {}
    state_dir = build_state_dir(Section(ctx, "", raw if isinstance(raw, dict) else {}))
    return None if any(e.key_path == "state_dir" for e in ctx.errors) else state_dir
