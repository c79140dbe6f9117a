"""Skipping a test for a missing capability of the machine (a tool, a mount, inotify, root).

Outside CI such a test skips with a note that names what is missing. Under CI (``CI=true``,
set by ``.ci/run``, which installs every tool the suites need) nothing may skip silently: a
capability missing there is a failure, so a test never stops running unnoticed.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(note: str) -> NoReturn:
    """Skip the running test because ``note`` (fail it under ``CI=true``)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{note} (CI must provide it)")
    pytest.skip(note)
