"""A host whose wall clock is off by ``INGESTD_TEST_CLOCK_SKEW`` seconds, for a daemon started with
this folder first on ``PYTHONPATH`` (``skewed_env``): Python's ``time.time``/``time_ns`` only, the
monotonic clocks untouched, as NTP-less hosts drift. Its workers inherit the environment."""

import os
import time

_SKEW = float(os.environ.get("INGESTD_TEST_CLOCK_SKEW", "0") or 0)
if _SKEW:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _SKEW
    time.time_ns = lambda: _time_ns() + int(_SKEW * 1e9)
