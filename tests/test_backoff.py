"""The reconnect schedule against the documented numbers (docs/protocol.md §4.2)."""

from __future__ import annotations

import random

import pytest

from ingestd.config.schema import BackoffSettings
from ingestd.source.backoff import Backoff, Ending
from tests.support.clock import FakeClock


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
