"""Stream notices that change nothing in MongoDB (limit, disconnect, warning): only counted."""

from __future__ import annotations

import structlog

from ingestd.documents.labels import LIMIT_TRACK_MAX, code_key
from ingestd.sink.compliance import BadControl
from ingestd.sink.counters import StoreCounters, bump

log = structlog.get_logger("ingestd.sink.notices")

LIMIT_CONNECTIONS = 1024


class StreamNotices:
    """Tallies what the endpoint says about the stream itself."""

    def __init__(self, counters: StoreCounters) -> None:
        self._counters = counters
        self._limits: dict[int, int] = {}  # conn id -> latest cumulative limit.track
        self._limit_base = 0  # folded-in totals of connections evicted from _limits

    def limit_missed(self) -> int:
        """Tweets the endpoint said it did not send, over all connections."""
        return self._limit_base + sum(self._limits.values())

    def on_limit(self, body: object, conn_id: int) -> int:
        """Note a limit notice; its cumulative ``track`` count."""
        track = body.get("track") if isinstance(body, dict) else None
        if type(track) is not int:
            raise BadControl("no track count")
        if not 0 <= track <= LIMIT_TRACK_MAX:  # a count of undelivered tweets
            raise BadControl(f"track {track} is no count of undelivered tweets")
        # Cumulative per connection: keep the latest, sum over connections.
        self._limits[conn_id] = track
        if len(self._limits) > LIMIT_CONNECTIONS:
            oldest = next(iter(self._limits))
            self._limit_base += self._limits.pop(oldest)
        return track

    def on_disconnect(self, body: object) -> None:
        if not isinstance(body, dict):
            raise BadControl("not an object")
        counts = self._counters.disconnects
        bump(counts, code_key(counts, _label(body.get("code"))))

    def on_warning(self, body: object) -> None:
        if not isinstance(body, dict):
            raise BadControl("not an object")
        pct = body.get("percent_full")
        # published in run/store.json: a structure there (nested 300 deep: orjson's limit is
        # 255) made every status write fail, and the worker with it
        warning = {"code": _label(body.get("code")),
                   "percent_full": pct if type(pct) is int or type(pct) is float else None}
        self._counters.last_warning = warning
        # The stream worker logs the notice at warning level (with its ``conn``) as it
        # arrives; here it is only noted, so the journal has one line per notice.
        log.debug("stream_warning_noted", code=warning["code"],
                  percent_full=warning["percent_full"])


LABEL_MAX = 64  # characters of a notice's code kept as a counter's key


def _label(code: object) -> str:
    """A notice's code as a counter's key: a number or a name as sent (capped), else its type's
    name: ``str()`` of a structure nested ~1000 deep raises RecursionError, and a code is a
    counter's key in run/store.json for the worker's whole life."""
    if type(code) is str:
        return code[:LABEL_MAX]
    if type(code) is int or code is None:
        return str(code)[:LABEL_MAX]
    return type(code).__name__
