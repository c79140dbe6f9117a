"""The reconnect schedule against the documented numbers (docs/protocol.md §4.2)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from ingestd.config.schema import BackoffSettings
from ingestd.source.backoff import Backoff, Ending, ServerWait
from ingestd.source.response import ServerHint, describe_hint, server_hint
from tests.support.clock import FakeClock

NOW = 1_800_000_000.0  # epoch seconds for the header tests


def no_jitter(**overrides: float) -> BackoffSettings:
    return BackoffSettings(jitter=0.0, max_attempts_per_minute=0, **overrides)  # type: ignore[arg-type]


def series(backoff: Backoff, ending: Ending, n: int, **kw: object) -> list[float | None]:
    return [backoff.delay(ending, healthy=False, **kw) for _ in range(n)]  # type: ignore[arg-type]


def test_network_errors_back_off_linearly_from_250ms_to_16s() -> None:
    delays = series(Backoff(no_jitter()), Ending.NETWORK, 70)
    assert delays[:4] == [0.25, 0.5, 0.75, 1.0]
    assert delays[63] == 16.0 and delays[69] == 16.0
    assert max(d for d in delays if d is not None) == 16.0


def test_stall_without_data_uses_the_network_schedule() -> None:
    assert series(Backoff(no_jitter()), Ending.STALL, 3) == [0.25, 0.5, 0.75]


def test_http_errors_back_off_exponentially_from_5s_to_320s() -> None:
    delays = series(Backoff(no_jitter()), Ending.HTTP, 9)
    assert delays == [5, 10, 20, 40, 80, 160, 320, 320, 320]


def test_rate_limited_starts_at_60s_doubles_and_caps() -> None:
    delays = series(Backoff(no_jitter(rate_limit_cap=900)), Ending.RATE_LIMITED, 6)
    assert delays == [60, 120, 240, 480, 900, 900]


def test_retry_after_is_honoured_when_longer() -> None:
    b = Backoff(no_jitter())
    assert b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=300.0) == 300.0
    assert b.delay(Ending.HTTP, healthy=False, retry_after=1.0) == 5.0


def test_a_server_wait_is_held_to_the_cap_of_its_ending() -> None:
    """A 420 asking for 28 h, a 503 asking for a day: the stream stays silent no longer than the
    operator's caps (rate_limit_cap 960 s, http_cap 320 s), jitter included."""
    for seed in range(5):
        b = Backoff(BackoffSettings(max_attempts_per_minute=0), rng=random.Random(seed))
        assert b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=100000.0) == 960.0
        assert b.last_server_wait == ServerWait(100000.0, 960.0, "rate_limit_cap")
        assert b.last_server_wait.capped
        assert b.delay(Ending.HTTP, healthy=False, retry_after=86400.0) == 320.0
        assert b.last_server_wait == ServerWait(86400.0, 320.0, "http_cap")
        assert b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=math.inf) == 960.0


def test_a_server_wait_is_not_jittered() -> None:
    """The server named the moment: waiting up to 10 % past it buys nothing, and would push a
    capped wait past the cap."""
    b = Backoff(BackoffSettings(jitter=0.1, max_attempts_per_minute=0), rng=random.Random(1))
    assert b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=300.0) == 300.0
    assert b.last_server_wait is not None and not b.last_server_wait.capped
    # Shorter than the schedule: the schedule's (jittered) wait stands.
    got = b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=1.0)
    assert got is not None and 120.0 <= got <= 132.0


def test_a_server_wait_lengthens_only_rate_limits_and_http_errors() -> None:
    b = Backoff(no_jitter())
    assert b.delay(Ending.NETWORK, healthy=False, retry_after=100.0) == 0.25
    assert b.last_server_wait == ServerWait(100.0, None)
    assert b.delay(Ending.STALL, healthy=False, retry_after=100.0) == 0.5
    assert b.delay(Ending.DISCONNECT, healthy=True, retry_after=100.0, disconnect_code=12) == 1.0
    assert b.delay(Ending.CLOSED, healthy=True, retry_after=100.0) == 1.0
    # Nothing usable: the schedule alone.
    assert b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=math.nan) == 60.0
    assert b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=-5.0) == 120.0


def test_retry_after_counts_on_420_429_503_only() -> None:
    seconds = {status: server_hint(status, {"retry-after": "120"}, NOW)
               for status in (420, 429, 503, 401, 500, 502)}
    assert [seconds[s] for s in (420, 429, 503)] == [ServerHint("retry-after", "120", 120.0)] * 3
    for status in (401, 500, 502):
        hint = seconds[status]
        assert hint is not None and hint.seconds is None
        assert hint.problem == f"not honoured after HTTP {status} (only after 420, 429 and 503)"
    # A stream's 200 headers are not an answer to a refused attempt.
    assert server_hint(200, {"retry-after": "120"}, NOW) is None


def test_rate_limit_reset_counts_only_once_the_allowance_is_spent() -> None:
    day = str(int(NOW) + 86400)
    assert server_hint(429, {"x-rate-limit-reset": day, "x-rate-limit-remaining": "0"},
                       NOW) == ServerHint("x-rate-limit-reset", day, 86400.0)
    assert server_hint(420, {"x-rate-limit-reset": day, "x-rate-limit-remaining": "0"},
                       NOW) is not None
    # The audit's 503: a reset time, and no word that anything was spent.
    assert server_hint(503, {"x-rate-limit-reset": day}, NOW) is None
    assert server_hint(429, {"x-rate-limit-reset": day}, NOW) is None
    # v2's 429 TooManyConnections with requests left.
    assert server_hint(429, {"x-rate-limit-reset": day, "x-rate-limit-remaining": "3"},
                       NOW) is None
    # Spent, but on an answer that is no rate limit.
    assert server_hint(503, {"x-rate-limit-reset": day, "x-rate-limit-remaining": "0"},
                       NOW) is None


@pytest.mark.parametrize(("headers", "problem"), [
    ({"retry-after": "soon"}, "neither seconds nor an HTTP date"),
    ({"retry-after": "-5"}, "neither seconds nor an HTTP date"),
    ({"retry-after": "\u00b2"}, "neither seconds nor an HTTP date"),
    ({"retry-after": "Mon, 01 Jan 2024 00:00:00 GMT"}, "in the past"),
    ({"x-rate-limit-reset": "1700000000", "x-rate-limit-remaining": "0"}, "in the past"),
    ({"x-rate-limit-reset": "tomorrow", "x-rate-limit-remaining": "0"}, "not epoch seconds"),
])
def test_a_past_or_unreadable_server_wait_is_ignored(headers: dict[str, str],
                                                     problem: str) -> None:
    hint = server_hint(420, headers, NOW)
    assert hint is not None and hint.seconds is None and hint.problem == problem
    assert describe_hint(hint, None).endswith(f" ignored: {problem}")


def test_retry_after_as_an_http_date_and_the_longer_of_two() -> None:
    date = format_datetime(datetime.fromtimestamp(NOW + 600, UTC), usegmt=True)
    assert server_hint(503, {"retry-after": date}, NOW) == ServerHint("retry-after", date, 600.0)
    both = {"retry-after": "30", "x-rate-limit-reset": str(int(NOW) + 900),
            "x-rate-limit-remaining": "0"}
    hint = server_hint(429, both, NOW)
    assert hint is not None and (hint.header, hint.seconds) == ("x-rate-limit-reset", 900.0)


def test_the_log_says_when_a_server_wait_was_capped() -> None:
    b = Backoff(no_jitter())
    hint = server_hint(420, {"retry-after": "100000"}, NOW)
    assert hint is not None
    b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=hint.seconds)
    assert describe_hint(hint, b.last_server_wait) == (
        "retry-after=100000 capped to 960 (stream.backoff.rate_limit_cap)")
    reset = server_hint(429, {"x-rate-limit-reset": str(int(NOW) + 120),
                              "x-rate-limit-remaining": "0"}, NOW)
    assert reset is not None
    b.delay(Ending.RATE_LIMITED, healthy=False, retry_after=reset.seconds)
    assert describe_hint(reset, b.last_server_wait) == (
        f"x-rate-limit-reset={int(NOW) + 120} (in 120s) honoured")


def test_config_errors_wait_for_a_reload() -> None:
    assert Backoff(no_jitter()).delay(Ending.CONFIG, healthy=False) is None


def test_counters_reset_only_after_a_healthy_connection() -> None:
    b = Backoff(no_jitter())
    assert series(b, Ending.HTTP, 3) == [5, 10, 20]
    # A connection that delivered data and then dropped waits only the short reconnect delay...
    assert b.delay(Ending.NETWORK, healthy=True) == 1.0
    # ...and the exponential schedule starts over.
    assert series(b, Ending.HTTP, 2) == [5, 10]


def test_switching_schedule_resets_the_other() -> None:
    b = Backoff(no_jitter())
    assert series(b, Ending.NETWORK, 3) == [0.25, 0.5, 0.75]
    assert series(b, Ending.HTTP, 1) == [5]
    assert series(b, Ending.NETWORK, 1) == [0.25]


def test_contested_disconnects_back_off_like_rate_limits() -> None:
    b = Backoff(no_jitter())
    assert b.delay(Ending.DISCONNECT, healthy=True, disconnect_code=7) == 60
    assert b.delay(Ending.DISCONNECT, healthy=True, disconnect_code=12) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_jitter_only_lengthens_and_stays_small(seed: int) -> None:
    b = Backoff(BackoffSettings(jitter=0.1, max_attempts_per_minute=0), rng=random.Random(seed))
    for expected in (5, 10, 20, 40):
        got = b.delay(Ending.HTTP, healthy=False)
        assert got is not None and expected <= got <= expected * 1.1


def test_attempts_per_minute_are_bounded_whatever_the_upstream_does() -> None:
    clock = FakeClock(1000.0)
    b = Backoff(BackoffSettings(jitter=0.0, max_attempts_per_minute=6), clock=clock)
    attempts: list[float] = []
    # An upstream that accepts, delivers one message and closes at once, for 10 simulated minutes.
    while clock.now < 1600.0:
        b.record_attempt()
        attempts.append(clock.now)
        wait = b.delay(Ending.CLOSED, healthy=True)
        assert wait is not None
        clock.now += wait
    for start in attempts:
        in_window = [t for t in attempts if start <= t < start + 60.0]
        assert len(in_window) <= 6
    assert len(attempts) >= 6 * 9  # bounded, but not starved
