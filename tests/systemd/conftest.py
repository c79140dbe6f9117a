"""Fixtures for ``make test-systemd``: one container per Debian release, shared by its tests.

Needs root, debootstrap, systemd-nspawn (systemd-container) and nsenter. Without them the tests
are skipped with a note naming what is missing — except under ``CI=true``, where that is a failure.
A failing test gets the container's ``journalctl -u ingestd`` attached to its report.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.systemd.deployment import Deployment
from tests.systemd.instances import Instances
from tests.systemd.machine import scratch_dir

RELEASES = {"debian12": "bookworm", "debian13": "trixie"}
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "chroot")
REPO = Path(__file__).resolve().parents[2]
TIMINGS: dict[str, dict[str, float]] = {}


def missing_prerequisites() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root"]
    return missing + [tool for tool in TOOLS if shutil.which(tool) is None]


def source_tree() -> Path:
    """The tree under test: ``INGESTD_SRC``, else the checkout holding this harness."""
    src = Path(os.environ.get("INGESTD_SRC") or REPO).resolve()
    assert (src / "deploy" / "systemd" / "ingestd.service").exists(), f"{src}: not an ingestd tree"
    return src


@pytest.fixture(scope="module", params=list(RELEASES), ids=list(RELEASES))
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    missing = missing_prerequisites()
    if missing:
        note = (f"needs {', '.join(missing)} (as root: apt-get install -y systemd-container "
                "debootstrap)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the systemd suite {note}", pytrace=False)
        pytest.skip(note)
    release = RELEASES[request.param]
    started = time.monotonic()
    workdir = scratch_dir()
    # Only now the Mongo stand-in (tests/support/mongo.py): a skip should not start servers.
    dep = Deployment(release, source_tree(), workdir, request.getfixturevalue("mongo_uri"))
    try:
        try:
            dep.start()
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- journalctl -u ingestd ---\n{dep.journal()}") from exc
        dep.timings["setup total"] = time.monotonic() - started
        yield dep
    finally:
        dep.stop()
        dep.timings["total"] = time.monotonic() - started
        TIMINGS[request.param] = dep.timings
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def instances(deployment: Deployment) -> Iterator[Instances]:
    """``ingestd@a`` and ``ingestd@b``, set up by the README's lines once the plain unit's tests
    are done with the container (they run last in the module)."""
    group = Instances(deployment)
    started = time.monotonic()
    try:
        try:
            group.start()
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- journal ---\n{deployment.journal()}") from exc
        deployment.timings["instances setup"] = time.monotonic() - started
        yield group
    finally:
        group.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None],
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the unit's journal to every failure, so a red CI run is diagnosable."""
    report = yield
    dep = getattr(item, "funcargs", {}).get("deployment")
    # The journal names the instances' units too (Deployment.journal).
    if report.failed and isinstance(dep, Deployment) and dep.box is not None:
        try:
            journal = dep.journal()
        except Exception as exc:  # the journal is a diagnostic: never mask the real failure
            journal = f"(journal unavailable: {exc})"
        report.sections.append((f"journalctl -u ingestd -u 'ingestd@*' ({dep.release})",
                                journal[-20000:]))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for release, timings in TIMINGS.items():
        figures = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        terminalreporter.write_line(f"[systemd {release}] {figures}")
