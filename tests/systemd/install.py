"""The README's "Operating under systemd" → "Install" block, run line by line in the container.

The block is read from the README of the source tree under test, so the harness installs what
the README says today. Two substitutions only: ``/path/to/ingestd`` is the read-only bind of that
source tree, and ``sudo`` is dropped (the commands already run as root). Relative paths resolve
in a folder holding the test's ``settings.yaml`` and a ``deploy`` link into the source tree. The
credential loop reads each value from stdin ("paste the value, then Ctrl-D"): the loop body is
run once per key with that key's value on stdin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.systemd.machine import Container

SRC = "/src"
WORKDIR = "/root/install"


@dataclass(frozen=True)
class Step:
    """One line of the block, or the credential loop (its body run per key)."""

    command: str
    loop_keys: tuple[str, ...] = ()
    loop_var: str = ""


def install_block(readme: Path) -> str:
    return sh_block(readme, "Operating under systemd", "Install")


def sh_block(readme: Path, section: str, label: str) -> str:
    """The ```sh block after ``**label**`` in README section ``## section``."""
    text = readme.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"\*\*{re.escape(label)}\*\*\s*```sh\n(.*?)```", text, re.S)
    assert match, f"{readme}: no ```sh block under '{section}' → '{label}'"
    return match.group(1)


def parse_steps(block: str) -> list[Step]:
    steps: list[Step] = []
    lines = iter(block.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        loop = re.fullmatch(r"for (\w+) in ([\w ]+); do", line)
        if loop:
            body = []
            for inner in lines:
                if inner.strip() == "done":
                    break
                body.append(strip_comment(inner.strip()))
            steps.append(Step("; ".join(b for b in body if b), tuple(loop.group(2).split()),
                              loop.group(1)))
        else:
            steps.append(Step(line))
    return [Step(adapt(s.command), s.loop_keys, s.loop_var) for s in steps]


def strip_comment(line: str) -> str:
    """Drop a trailing ``# ...`` comment that is outside quotes."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def adapt(command: str) -> str:
    command = command.replace("/path/to/ingestd", SRC)
    return re.sub(r"(^|&&\s*|;\s*|\|\|\s*)sudo\s+", r"\1", command)


def install(box: Container, readme: Path, settings_text: str, secrets: dict[str, str]) -> str:
    """Run every step; returns a transcript (commands and their output) for failure messages."""
    box.run("mkdir", "-p", WORKDIR)
    box.run("sh", "-c", f"cat > {WORKDIR}/settings.yaml", input=settings_text)
    box.run("ln", "-sfn", f"{SRC}/deploy", f"{WORKDIR}/deploy")
    return run_block(box, install_block(readme), secrets)


def run_block(box: Container, block: str, secrets: dict[str, str]) -> str:
    """Run a README block's steps in WORKDIR; returns the transcript (fails on the first error)."""
    transcript = []
    for step in parse_steps(block):
        for key in step.loop_keys or ("",):
            script = f"{step.loop_var}={key}; {step.command}" if key else step.command
            result = box.run("sh", "-ec", script, cwd=WORKDIR, check=False, timeout=900,
                             input=secrets[key] if key else None)
            transcript.append(f"$ {script}\n{result.stdout}{result.stderr}".rstrip())
            assert result.returncode == 0, (
                f"README step failed ({result.returncode}):\n" + "\n".join(transcript))
    return "\n".join(transcript)
