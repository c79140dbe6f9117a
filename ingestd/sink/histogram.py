"""Histograms the store worker publishes in ``run/store.json`` under ``"hist"`` (as plain JSON).

The supervisor's metrics collector turns them into Prometheus histogram families; this module is
here, not with the collector, so that the store worker never loads the metrics code.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
INSERT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0, 60.0)
LATENCY_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                           60.0, 300.0, 900.0, 3600.0)


class Histogram:
    """A Prometheus-style histogram accumulator that a worker can publish as plain JSON.

    ``counts[i]`` is the number of observations ``<= buckets[i]`` and ``> buckets[i-1]`` (not
    cumulative); the extra last count is for values above the largest bound (``+Inf``).
    """

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        """Count ``value`` (``times`` times)."""
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "<=").
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts),
                "sum": round(self.sum, 6), "count": self.count}
