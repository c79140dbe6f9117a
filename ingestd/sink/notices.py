"""Stream notices that change nothing in MongoDB (limit, disconnect, warning): only counted."""

from __future__ import annotations

import structlog

from ingestd.documents.labels import LIMIT_TRACK_MAX
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
        bump(self._counters.disconnects, str(body.get("code")))

    def on_warning(self, body: object) -> None:
        if not isinstance(body, dict):
            raise BadControl("not an object")
        warning = {"code": str(body.get("code")), "percent_full": body.get("percent_full")}
        self._counters.last_warning = warning
        # The stream worker logs the notice at warning level (with its ``conn``) as it
        # arrives; here it is only noted, so the journal has one line per notice.
        log.debug("stream_warning_noted", code=warning["code"],
                  percent_full=warning["percent_full"])
