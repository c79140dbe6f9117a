"""The shipped systemd units: ``systemd-analyze verify`` finds nothing, and the exposure is ≤ 2.0.

Both ``ingestd.service`` and the template ``ingestd@.service`` (checked as instance
``ingestd@news.service``), and the template differs from the plain unit only where an instance
must: its settings file, state folder, credentials folder, dynamic user and description.

``systemd-analyze`` comes with Debian's ``systemd`` package (``.ci/run`` installs it; elsewhere
the tests skip with a note). The unit's ``ExecStart=`` binary must exist for ``verify``, so the
test checks a copy whose ``/usr/local/bin/ingestd`` points at a temporary executable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.skips import unavailable

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "ingestd.service"
TEMPLATE = UNIT.with_name("ingestd@.service")
# What makes an instance an instance: every other line of the template is the plain unit's.
INSTANCE_SUBSTITUTIONS = (
    ("/etc/ingestd/settings.yaml", "/etc/ingestd/%i.yaml"),
    ("/etc/ingestd/credentials/", "/etc/ingestd/credentials/%i/"),
    ("StateDirectory=ingestd\n", "StateDirectory=ingestd/%i\n"),
    ("# /var/lib/ingestd (", "# /var/lib/ingestd/%i ("),
    ("ingestion daemon\n", "ingestion daemon (%i)\n"),
    ("DynamicUser=yes\n", "DynamicUser=yes\nUser=ingestd-%i\n"),
)
BINARY = "/usr/local/bin/ingestd"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")


def needs_analyze() -> None:
    if ANALYZE is None:
        unavailable("systemd-analyze not installed (apt-get install -y systemd; .ci/run "
                    "installs it)")


@pytest.fixture(params=["ingestd.service", "ingestd@news.service"])
def unit_copy(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A unit with its ``ingestd`` binary path rewritten to an executable that exists; the
    template is copied as one of its instances (``verify`` refuses a bare template name)."""
    binary = tmp_path / "ingestd"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    copy = tmp_path / request.param
    source = TEMPLATE if "@" in request.param else UNIT
    copy.write_text(source.read_text().replace(BINARY, str(binary)))
    return copy


def settings_lines(text: str) -> list[str]:
    """The unit's lines without comments and blank lines."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_unit_uses_the_real_binary_path() -> None:
    text = UNIT.read_text()
    assert f"ExecStart={BINARY} run --config /etc/ingestd/settings.yaml" in text
    # The daemon's verdict, not a fire-and-forget signal; nothing outside ingestd (no procps).
    reloads = [line for line in text.splitlines() if line.startswith("ExecReload=")]
    assert reloads == [
        f"ExecReload={BINARY} reload --config /etc/ingestd/settings.yaml --pid $MAINPID"]


def test_template_is_the_plain_unit_per_instance() -> None:
    """A hardening or timing change to ingestd.service must reach ingestd@.service too."""
    expected = UNIT.read_text()
    for old, new in INSTANCE_SUBSTITUTIONS:
        assert old in expected, f"{UNIT.name} no longer has {old!r}: update the template"
        expected = expected.replace(old, new)
    assert settings_lines(TEMPLATE.read_text()) == settings_lines(expected)
    text = TEMPLATE.read_text()
    assert f"ExecReload={BINARY} reload --config /etc/ingestd/%i.yaml --pid $MAINPID" in text
    assert "StateDirectory=ingestd/%i" in text
    assert "User=ingestd-%i" in text  # without it every instance shares one dynamic UID


def test_verify_reports_no_problem(unit_copy: Path) -> None:
    needs_analyze()
    result = analyze("verify", "--man=no", str(unit_copy))
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if unit_copy.name in line or str(unit_copy.parent) in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == []


def test_security_exposure_is_at_most_2(unit_copy: Path) -> None:
    needs_analyze()
    if "--offline" not in analyze("security", "--help").stdout:
        unavailable("this systemd-analyze has no `security --offline` (needs systemd >= 250)")
    result = analyze("security", "--offline=yes", "--no-pager", str(unit_copy))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE
