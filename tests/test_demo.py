"""``ingestd demo``'s command line: the folder it empties, and its arguments.

The demo itself runs as ``make demo`` (CI runs it after the suites); these cover what it does
before anything starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingestd.tools.demo import DEMO_MARK, WorkdirRefused, prepare_workdir


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingestd", "demo", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ), check=False)


def test_a_workdir_no_demo_made_is_left_as_it_is(tmp_path: Path) -> None:
    # `ingestd demo --workdir <folder>` deleted the folder whole before it began: a home folder,
    # or the daemon's own state_dir, given by mistake was gone.
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    run = demo("--workdir", str(precious), "--seconds", "1")
    assert run.returncode == 2, run.stdout + run.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    assert f"--workdir {precious} exists" in run.stderr and DEMO_MARK in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("workdir", ["/proc/no-such-folder", "/dev/null"],
                         ids=["not creatable", "a file"])
def test_a_workdir_that_cannot_be_made_is_named(workdir: str) -> None:
    # /proc/x: a bare FileNotFoundError traceback, exit 1
    run = demo("--workdir", workdir, "--seconds", "1")
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"--workdir {workdir}" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("seconds", ["-5", "0", "nan", "inf", "soon"])
def test_seconds_must_be_a_time_above_zero(tmp_path: Path, seconds: str) -> None:
    run = demo("--workdir", str(tmp_path / "d"), "--seconds", seconds)
    assert run.returncode == 2 and "argument --seconds: not a number of seconds" in run.stderr
    assert not (tmp_path / "d").exists()


def test_an_earlier_demos_folder_is_emptied_and_marked_again(tmp_path: Path) -> None:
    marked = tmp_path / "marked"
    prepare_workdir(marked)
    (marked / "daemon.log").write_text("an earlier run")
    prepare_workdir(marked)
    assert [p.name for p in marked.iterdir()] == [DEMO_MARK]
    unmarked = tmp_path / "demo-state"  # made before demos marked their folder
    unmarked.mkdir()
    for name in ("simulator.log", "truth.jsonl", "daemon.log"):
        (unmarked / name).write_text("")
    prepare_workdir(unmarked)
    assert [p.name for p in unmarked.iterdir()] == [DEMO_MARK]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_workdir(empty)
    assert [p.name for p in empty.iterdir()] == [DEMO_MARK]
    half = tmp_path / "half"  # only one of an earlier demo's files: not enough to empty it
    half.mkdir()
    (half / "truth.jsonl").write_text("")
    with pytest.raises(WorkdirRefused):
        prepare_workdir(half)
    assert [p.name for p in half.iterdir()] == ["truth.jsonl"]
