"""The shipped systemd unit: ``systemd-analyze verify`` finds nothing, and the exposure is ≤ 2.0.

``systemd-analyze`` comes with Debian's ``systemd`` package (``apt-get install -y systemd``; CI's
``.ci/run`` installs it; ``make test`` installs nothing and this module is skipped without it).
The unit's ``ExecStart=`` binary must exist for ``verify``, so the test checks a copy whose
``/usr/local/bin/ingestd`` points at a temporary executable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "ingestd.service"
BINARY = "/usr/local/bin/ingestd"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze not found: install Debian's systemd package (apt-get install -y "
           "systemd) to verify the shipped unit",
)


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with its ``ingestd`` binary path rewritten to an executable that exists."""
    binary = tmp_path / "ingestd"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(BINARY, str(binary)))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_unit_uses_the_real_binary_path() -> None:
    text = UNIT.read_text()
    assert f"ExecStart={BINARY} run --config /etc/ingestd/settings.yaml" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text


def test_verify_reports_no_problem(unit_copy: Path) -> None:
    result = analyze("verify", "--man=no", str(unit_copy))
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if unit_copy.name in line or str(unit_copy.parent) in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == []


def test_security_exposure_is_at_most_2(unit_copy: Path) -> None:
    if "--offline" not in analyze("security", "--help").stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (needs systemd >= 250)")
    result = analyze("security", "--offline=yes", "--no-pager", str(unit_copy))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE
