"""A missing capability skips a test on a developer's machine and fails it under CI."""

from __future__ import annotations

import pytest

from tests.support.skips import unavailable


def test_a_missing_capability_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no tmpfs here"):
        unavailable("no tmpfs here")


def test_a_missing_capability_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no tmpfs here \(CI must provide it\)"):
        unavailable("no tmpfs here")
