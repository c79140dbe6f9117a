"""A clock a test moves by hand, for code that takes a ``clock`` callable."""

from __future__ import annotations


class FakeClock:
    """Returns ``now``; the test advances it by assigning ``now``."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
