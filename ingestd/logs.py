"""structlog set-up for a systemd daemon: JSON lines, redaction, rate limiting, line cap.

Chain (docs/reliability.md §6): merge_contextvars → add_log_level → static context → timestamp →
exception formatting (never frame locals) → redaction → rate limiter → capped renderer.
Exceptions are turned into text/dicts *before* redaction so exception messages are scrubbed too.

    configure_logging("info", role="stream", pid=os.getpid(), secrets=secret_values(settings))
    log = get_logger(conn_id=3)
    log.warning("reconnecting", reason="stall", delay=1.5)
    bind_process(generation=4)   # after a reload: every later line carries generation=4

Library logs (stdlib ``logging``: pymongo, urllib3) and uncaught exceptions (``sys.excepthook``,
``threading.excepthook``) go through the same chain, so they are redacted and never show locals.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import IO, Any, NamedTuple, Protocol, TextIO, cast

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

MASK = "***"
MAX_LINE_BYTES = 16 * 1024
_MAX_DEPTH = 12
_HEAD = ("timestamp", "level", "event")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
# Fields that never identify *which* error happened: they must not split rate-limit keys.
_VOLATILE = frozenset({"timestamp", "level", "event", "repeated", "exception", "truncated"})
# Keys whose whole value is masked. `auth` only as a whole word: "author" is harmless.
_SECRET_KEY = re.compile(
    r"passw|passwd|pwd|secret|token|authoriz|cookie|credential|api_?key|(?:^|[_\-.])auth(?:$|[_\-.])",
    re.IGNORECASE,
)
# scheme://user:pass@host → scheme://***@host; greedy up to the last '@' of the authority.
# '#' does not end it: pymongo takes a raw '#' as part of a password. (A space does end it: in
# free text nothing tells the two apart; the daemon registers the password itself too.)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?@]*(?:@[^\s/?@]*)*@")
# Header text that carries credentials even when logged as a plain string.
_HEADER_SECRET = re.compile(
    r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*|cookie\s*[:=]\s*|bearer\s+)[^\r\n]+"
)
# The value may be quoted, or quoted with escaped quotes (a JSON body that echoes the header).
_OAUTH_PARAM = re.compile(
    r'(?i)\b(oauth_(?:token|signature|consumer_key|nonce)=)(?:\\?")?[^"\\,&\s]+(?:\\?")?')
# MongoDB URI options whose value is a secret: a key file's password, and the auth mechanism's
# properties (MONGODB-AWS takes AWS_SESSION_TOKEN there).
_URI_SECRET_OPTION = re.compile(
    r"(?i)\b((?:tlsCertificateKeyFilePassword|sslPEMKeyPassword|authMechanismProperties)=)"
    r"[^&;#\s]*")


class _SecretRegistry:
    """Secret values to mask anywhere in log strings; one alternation regex, rebuilt on change."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if not value or value in self._values:
            return
        with self._lock:
            self._values.add(value)
            # Longest first so a secret containing another is masked whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None

    def mask(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(MASK, text) if pattern is not None else text


_REGISTRY = _SecretRegistry()


def register_secret(value: str) -> None:
    """Mask `value` wherever it appears in any logged string from now on."""
    _REGISTRY.add(value)


def clear_secrets() -> None:
    """Forget registered secrets (tests, or before re-registering after a reload)."""
    _REGISTRY.clear()


def scrub_userinfo(text: str) -> str:
    """Replace `user:pass@` in URLs with `***@`, and the values of a MongoDB URI's secret
    options (a key file's password, AWS_SESSION_TOKEN) with `***`."""
    return _URI_SECRET_OPTION.sub(rf"\1{MASK}", _USERINFO.sub(rf"\1{MASK}@", text))


def scrub_text(text: str) -> str:
    """Apply every string-level redaction: registered secrets, URL userinfo, auth headers."""
    text = _REGISTRY.mask(text)
    text = scrub_userinfo(text)
    text = _HEADER_SECRET.sub(rf"\1{MASK}", text)
    return _OAUTH_PARAM.sub(rf"\1{MASK}", text)


def scrub_strings(value: Any) -> Any:
    """``value`` with ``scrub_text`` applied to every string in it (keys and structure kept): for
    documents other processes and people read, such as the status files, where a reason may
    quote what a server sent back (a 401 body echoing the request's Authorization header)."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: scrub_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_strings(v) for v in value]
    return value


def _redact_value(value: object, depth: int = 0) -> object:
    if isinstance(value, str):
        return scrub_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth >= _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, Mapping):
        return {str(k): _redact_item(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    # Anything else is rendered now, so its text passes through the scrubber too.
    return scrub_text(repr(value) if isinstance(value, BaseException) else str(value))


def _redact_item(key: str, value: object, depth: int) -> object:
    if _SECRET_KEY.search(key) and value is not None:
        return MASK
    return _redact_value(value, depth)


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret-named keys and scrub secrets from every string."""
    return {key: _redact_item(key, value, 0) for key, value in event_dict.items()}


class RateLimiter:
    """Suppress repeats of warning-or-worse events within `interval` seconds, and of any event
    that passes `rate_key=...` (a frequent info line, such as the endpoint's limit notices).

    The key is (level, event, every non-float scalar field) unless the caller passes
    `rate_key=...`. The first event after the interval carries `repeated=N` (suppressed count),
    so an error storm costs one line per interval and journald never drops our lines.
    A storm that stops inside its window is not left uncounted: ``flush`` (every half interval
    on the ``log-folds`` thread while events are suppressed; at exit for every window) prints
    the last suppressed event, with its own time, and `repeated` = the others suppressed before
    it (so it may follow lines stamped later: sorted by time, lines read in the order things
    happened; stamped at the flush, a fold of failures read as a new failure after a recovery).
    Either way every line stands for itself plus its `repeated`: the lines of a key add up to
    its events.
    """

    _MAX_KEYS = 4096

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        # key → (window start, suppressed count, the last suppressed event)
        self._state: dict[tuple[object, ...], tuple[float, int, EventDict | None]] = {}
        self._lock = threading.Lock()
        self.emit: Callable[[EventDict], None] | None = None  # prints a flushed line
        self._stop = threading.Event()
        self._auto = False  # start the flushing thread at the first suppressed event
        self._thread: threading.Thread | None = None

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        level = _LEVELS.get(str(event_dict.get("level", "info")), logging.INFO)
        explicit = event_dict.pop("rate_key", None)
        if self.interval <= 0 or (level < logging.WARNING and explicit is None):
            return event_dict
        key = self._key(event_dict, explicit)
        now = self.clock()
        with self._lock:
            last, suppressed, _ = self._state.get(key, (None, 0, None))
            if last is not None and now - last < self.interval:
                self._state[key] = (last, suppressed + 1, event_dict)
                if self._auto and self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(target=self._run, name="log-folds",
                                                    daemon=True)
                    self._thread.start()
                raise structlog.DropEvent
            self._prune(now)
            self._state[key] = (now, 0, None)
        if suppressed:
            event_dict["repeated"] = suppressed
        return event_dict

    def flush(self, everything: bool = False) -> list[EventDict]:
        """The folded lines due: for each window that has ended (every window if
        ``everything``) with events suppressed, the last of them, carrying `repeated` = the
        others; their windows start again now. Printed with ``emit`` if one is set."""
        now = self.clock()
        due: list[EventDict] = []
        with self._lock:
            for key, (last, suppressed, event_dict) in list(self._state.items()):
                if event_dict is None or not (everything or now - last >= self.interval):
                    continue
                if suppressed > 1:
                    event_dict["repeated"] = suppressed - 1
                due.append(event_dict)
                self._state[key] = (now, 0, None)
        if self.emit is not None:
            for event_dict in due:
                with contextlib.suppress(Exception):
                    self.emit(event_dict)
        return due

    def start(self) -> None:
        """Flush on a daemon thread (real time: not with a test's clock), every half interval
        while any event is suppressed; the thread ends when none is (an idle daemon has none)."""
        self._auto = self.interval > 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval / 2):
            self.flush()
            with self._lock:
                if not any(n for _, n, _ in self._state.values()):
                    self._thread = None
                    return

    def close(self) -> None:
        """Stop the thread and print every pending fold (a reconfigure, the process's exit)."""
        self._stop.set()
        self.flush(everything=True)

    @staticmethod
    def _key(event_dict: EventDict, explicit: object) -> tuple[object, ...]:
        head = (event_dict.get("level"), event_dict.get("event"))
        if explicit is not None:
            return (*head, str(explicit))
        fields = tuple(
            (k, v) for k, v in sorted(event_dict.items())
            if k not in _VOLATILE and isinstance(v, str | int | bool) and not isinstance(v, float)
        )
        return (*head, fields)

    def _prune(self, now: float) -> None:
        # Bound memory when keys carry many distinct values: forget expired windows without a
        # pending fold (those are printed by the next flush).
        if len(self._state) >= self._MAX_KEYS:
            expired = [k for k, (t, n, _) in self._state.items()
                       if now - t >= self.interval and not n]
            for k in expired:
                del self._state[k]


def _truncate_strings(value: object, limit: int) -> object:
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "…"
    if isinstance(value, Mapping):
        return {k: _truncate_strings(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_truncate_strings(v, limit) for v in value[: max(limit // 8, 4)]]
    return value


# syslog priorities (sd-daemon(3)'s "<N>" line prefixes) of our levels.
_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def writes_to_the_journal(stream: IO[str]) -> bool:
    """Whether ``stream`` is the journal's stream connection: systemd sets ``JOURNAL_STREAM``
    to its ``device:inode`` for a service's stdout/stderr (inherited by our workers, whose
    stdout is the supervisor's). Not when stdout was redirected (a file, a pipe, a terminal)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no descriptor (a test's StringIO)
        return False
    return bool(expected) and expected == f"{st.st_dev}:{st.st_ino}"


class CappedRenderer:
    """Render with `renderer`; shrink string values until the line fits in `max_bytes`.

    journald splits lines above 48K; a capped line stays one parseable record. With
    ``priority_prefix`` (stdout is the journal) each line starts with its level's syslog
    priority, ``<3>`` for an error: journald strips it and stores ``PRIORITY=3``, which
    ``journalctl -p err``, ``systemctl status`` and syslog forwarding go by (without it every
    line, errors included, was PRIORITY=6, info).
    """

    def __init__(self, renderer: Processor, max_bytes: int = MAX_LINE_BYTES, *,
                 priority_prefix: bool = False) -> None:
        self.renderer = renderer
        self.max_bytes = max_bytes
        self.priority_prefix = priority_prefix

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        line = self._capped(logger, method, event_dict)
        if not self.priority_prefix:
            return line
        level = str(event_dict.get("level", method))
        return f"<{_PRIORITIES.get(level, 6)}>{line}"

    def _capped(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        line = self._render(logger, method, event_dict)
        if len(line.encode()) <= self.max_bytes:
            return line
        for limit in (4096, 1024, 256, 64):
            trimmed = cast(dict[str, Any], _truncate_strings(event_dict, limit))
            trimmed["truncated"] = True
            line = self._render(logger, method, trimmed)
            if len(line.encode()) <= self.max_bytes:
                return line
        minimal = {k: event_dict[k] for k in ("timestamp", "level", "event") if k in event_dict}
        minimal = cast(dict[str, Any], _truncate_strings(minimal, 256))
        minimal["truncated"] = True
        return self._render(logger, method, minimal)

    def _render(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        # A fresh dict (renderers may pop keys) with the fields people scan for first.
        head = {k: event_dict[k] for k in _HEAD if k in event_dict}
        out = self.renderer(logger, method, {**head, **event_dict})
        return out.decode() if isinstance(out, bytes) else str(out)


def _orjson_dumps(obj: object, **kw: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, **kw).decode()


# Process-wide fields (role, pid, generation) of the configured chain; bind_process updates it.
_PROCESS_CONTEXT: dict[str, object] = {}


def bind_process(**fields: object) -> None:
    """Add or replace process-wide fields on every later line (e.g. the config generation)."""
    _PROCESS_CONTEXT.update(fields)


def _static_context(context: Mapping[str, object]) -> Processor:
    """Process-wide fields (role, pid): a processor, not contextvars, so threads get them.

    ``context`` is read on every event (not copied) so ``bind_process`` takes effect at once.
    """

    def add(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        for key, value in context.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def _use_console(fmt: str, stream: IO[str]) -> bool:
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format must be auto, json or console, not {fmt!r}")
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return fmt == "console"


def build_processors(
    fmt: str, stream: IO[str], error_interval: float, clock: Callable[[], float],
    context: Mapping[str, object],
) -> list[Processor]:
    """The processor chain; exposed for tests and for workers that log elsewhere."""
    console = _use_console(fmt, stream)
    exceptions: Processor = (
        structlog.processors.format_exc_info if console else structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
    )
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=console and bool(stream.isatty()),
                                      exception_formatter=structlog.dev.plain_traceback)
        if console else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    limiter = RateLimiter(error_interval, clock)
    capped = CappedRenderer(renderer, priority_prefix=writes_to_the_journal(stream))
    writer = structlog.WriteLogger(cast(TextIO, stream))
    # A folded line the limiter flushes has been through the chain up to it: render and write.
    limiter.emit = lambda event_dict: writer.msg(
        capped(writer, str(event_dict.get("level", "warning")), event_dict))
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _static_context(context),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        exceptions,
        redact,
        limiter,
        capped,
    ]


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    stream: IO[str] = sys.stdout,
    secrets: Iterable[str] = (),
    error_interval: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    **context: object,
) -> None:
    """Configure structlog process-wide. `context` (e.g. role, pid) is added to every event."""
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, not {level!r}")
    for secret in secrets:
        register_secret(secret)
    # Replaced key by key, never emptied: another thread's line meanwhile keeps role and pid.
    for key in [k for k in _PROCESS_CONTEXT if k not in context]:
        del _PROCESS_CONTEXT[key]
    _PROCESS_CONTEXT.update(context)
    global _CONFIGURED
    _CONFIGURED = _Configured(level, fmt, error_interval, stream, clock)
    processors = build_processors(fmt, stream, error_interval, clock, _PROCESS_CONTEXT)
    _use_limiter(next(p for p in processors if isinstance(p, RateLimiter)),
                 flush_thread=clock is time.monotonic)
    wrapper = structlog.make_filtering_bound_logger(_LEVELS[level])
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, stream)),
        # Not cached: a reload may reconfigure level/format for loggers made at import time.
        cache_logger_on_first_use=False,
    )
    # A logger bound to this chain directly: the hooks keep redacting even if someone resets
    # structlog's global configuration (whose default renderer prints frame locals).
    direct = cast(FilteringBoundLogger, structlog.wrap_logger(
        structlog.WriteLogger(cast(TextIO, stream)), processors=processors,
        wrapper_class=wrapper))
    _route_stdlib_logging(direct)
    _install_excepthooks(direct)


class _Configured(NamedTuple):
    """What ``configure_logging`` was last given (``reconfigure_logging`` keeps the rest)."""

    level: str
    fmt: str
    error_interval: float
    stream: IO[str]
    clock: Callable[[], float]


_CONFIGURED: _Configured | None = None


class LoggingView(Protocol):
    """The ``logging`` settings section, as ``reconfigure_logging`` reads it."""

    @property
    def level(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def error_interval(self) -> float: ...


def reconfigure_logging(new: LoggingView) -> bool:
    """Apply a reload's ``logging`` settings in this process if they changed (True then): the
    same stream, the process's fields (role, pid, generation) and the secrets registered are
    kept; the old rate limiter prints its pending folds. Loggers are not cached, so every
    logger, also one made at import, follows at its next line."""
    done = _CONFIGURED
    if done is None or (done.level, done.fmt, done.error_interval) == (
            new.level, new.format, new.error_interval):
        return False
    configure_logging(new.level, new.format, stream=done.stream,
                      error_interval=new.error_interval, clock=done.clock,
                      **cast(dict[str, Any], _PROCESS_CONTEXT))
    return True


# The configured chain's rate limiter: its folds are printed at exit, or when it is replaced.
_LIMITER: RateLimiter | None = None


def _use_limiter(limiter: RateLimiter, *, flush_thread: bool) -> None:
    global _LIMITER
    previous, _LIMITER = _LIMITER, limiter
    if previous is None:
        atexit.register(flush_repeats, everything=True)
    else:
        previous.close()
    if flush_thread:  # a test's clock does not tick with real time: it calls flush_repeats
        limiter.start()


def flush_repeats(everything: bool = False) -> None:
    """Print the folded repeats whose window has ended (all of them with ``everything``)."""
    if _LIMITER is not None:
        _LIMITER.flush(everything)


class _StdlibHandler(logging.Handler):
    """Sends stdlib ``logging`` records (pymongo's, urllib3's) through our chain."""

    def __init__(self, logger: FilteringBoundLogger) -> None:
        super().__init__()
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        # Failures are swallowed, not passed to handleError(): that prints the record's raw
        # arguments, unredacted, to stderr.
        with contextlib.suppress(Exception):
            self.logger.log(record.levelno, "library_log", **fields)


def _route_stdlib_logging(logger: FilteringBoundLogger) -> None:
    """Replace our previous handler on the root logger (configure may run again on reload).

    The root level stays at its default, WARNING: driver debug output (pymongo logs whole
    commands, tweets included) is never worth the journal volume, whatever our own level is.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(handler)
    root.addHandler(_StdlibHandler(logger))


def _install_excepthooks(logger: FilteringBoundLogger) -> None:
    """Uncaught exceptions become one redacted JSON event (traceback without locals)."""

    def on_uncaught(exc_type: type[BaseException], exc: BaseException,
                    tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        logger.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    def on_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or issubclass(args.exc_type, SystemExit):
            return
        logger.critical("uncaught_thread_exception",
                        thread=args.thread.name if args.thread else None,
                        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = on_uncaught
    threading.excepthook = on_thread


def get_logger(**bind: object) -> FilteringBoundLogger:
    """A logger with `bind` as initial context."""
    return cast(FilteringBoundLogger, structlog.get_logger(**bind))

