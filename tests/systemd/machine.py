"""A minimal Debian root (debootstrap, cached outside the checkout) booted with systemd-nspawn.

The base root of each release is built once into ``CACHE/<release>/root`` and copied fresh for
every run, so a run never sees a previous run's state. The container shares the host network
(the simulator and the Mongo stand-in listen on host loopback) and is driven from the host with
``nsenter`` into its PID 1's namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import psutil

from tests.support.wait import wait_until

CACHE = Path(os.environ.get("INGESTD_TEST_CACHE", "/var/cache/ingestd-test"))
# What the README's install needs on top of minbase (no procps: the product must not need it).
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates")
# Commands run in the container get this environment only: nothing leaks from the host's
# (no TWITTER_*, no host pip settings), as in a root login shell.
CLEAN_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME=/root", "LANG=C.UTF-8", "TERM=dumb")
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def host_mirror() -> str:
    """The Debian mirror the host's own apt uses (no registry host is written in this repo)."""
    entries: list[tuple[str, list[str]]] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                entries += [(uri, fields.get("Suites", "").split())
                            for uri in fields.get("URIs", "").split()]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", legacy.read_text(), re.M):
            entries.append((m.group(1), [m.group(2)]))
    for uri, suites in entries:  # the main archive: a plain codename, not -security/-updates
        if any("-" not in s and "/" not in s for s in suites):
            return uri
    raise RuntimeError("no Debian mirror found in the host's apt configuration")


class BaseRoot:
    """The cached debootstrap root of one release."""

    def __init__(self, release: str) -> None:
        self.release = release
        self.dir = CACHE / release
        self.root = self.dir / "root"
        self.stamp = self.dir / "packages"

    def ensure(self) -> tuple[Path, float]:
        """The root, built if missing or made for another package list: (path, seconds spent)."""
        started = time.monotonic()
        wanted = " ".join(PACKAGES)
        if not (self.stamp.exists() and self.stamp.read_text() == wanted and self.root.is_dir()):
            self.build(wanted)
        return self.root, time.monotonic() - started

    def build(self, wanted: str) -> None:
        """debootstrap into ``root.tmp``, then rename. A second try on failure (a mirror or a full
        disk may pass); every failed try is reported, as a warning if the next one succeeds."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "root.tmp"
        failures: list[str] = []
        for _ in range(2):
            failure = self._debootstrap(tmp)
            if failure is None:
                break
            failures.append(failure)
        else:
            raise RuntimeError("\n\n".join(failures))
        if failures:
            warnings.warn(f"debootstrap {self.release} needed a second try:\n{failures[0]}",
                          stacklevel=2)
        remove_root(self.root)
        tmp.rename(self.root)
        self.stamp.write_text(wanted)

    def _debootstrap(self, tmp: Path) -> str | None:
        """One try: None on success, else what it printed, its own log in the target, and the
        disk's free space (a full disk also silences the log). The partial root is removed."""
        remove_root(tmp)
        log = self.dir / "debootstrap.log"
        with log.open("wb") as out:
            code = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                 self.release, str(tmp), host_mirror()],
                stdout=out, stderr=subprocess.STDOUT, timeout=1200, check=False).returncode
        if code == 0:
            return None
        free = shutil.disk_usage(self.dir).free / 2**20
        report = [f"debootstrap {self.release} failed ({code}); {free:,.0f} MiB free on {self.dir}",
                  "--- its output ---", _tail(log)]
        inner = tmp / "debootstrap" / "debootstrap.log"
        if inner.exists():
            report += [f"--- {inner} ---", _tail(inner)]
        remove_root(tmp)
        return "\n".join(report)


def remove_root(path: Path) -> None:
    """Remove a partial root, detaching what is mounted in it first. A debootstrap that was killed
    (or failed) after it mounted the target's /proc leaves that mount behind; removing the folder
    then fails on /proc's files, and the next debootstrap into it fails after "Extracting" with
    nothing on its output (seen here, a root.tmp whose /proc was still mounted; CI showed the
    same symptom)."""
    for mount in reversed(mounts_under(path)):  # deepest last in mountinfo: detach those first
        subprocess.run(["umount", "--lazy", mount], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        left = mounts_under(path)
        raise RuntimeError(f"cannot remove {path}" + (f": still mounted: {left}" if left else ""))


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, in /proc/self/mountinfo order (parents first)."""
    top = str(path.resolve()) if path.exists() else str(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # field 5 is the mount point, with space, tab, newline and backslash escaped in octal
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == top or point.startswith(top + "/"):
            found.append(point)
    return found


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def fresh_copy(base: Path, workdir: Path) -> Path:
    """A private copy of ``base`` for one run, trusting the CAs the host trusts (a TLS-inspecting
    egress proxy must not break ``pip install`` inside the container)."""
    root = workdir / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
    if HOST_CA_DIR.is_dir() and any(HOST_CA_DIR.iterdir()):
        shutil.copytree(HOST_CA_DIR, root / HOST_CA_DIR.relative_to("/"), dirs_exist_ok=True)
        subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True,
                       capture_output=True, timeout=120)
    return root


class Container:
    """One booted systemd-nspawn container; ``run``/``systemctl`` execute inside it as root."""

    def __init__(self, root: Path, binds: Sequence[str], log: Path) -> None:
        self.root = root
        self.binds = list(binds)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 120.0) -> Container:
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet",
               "--console=read-only", "-D", str(self.root), *self.binds, "--boot"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.pid1 = wait_until(self._init_pid, 30, "the container's PID 1 (systemd)")
        # Until PID 1's bus is up, systemctl answers "offline" (or nothing) at once; then
        # --wait blocks until the boot is done.
        state = wait_until(lambda: self.system_state(timeout), timeout,
                           "the container's systemd to answer", interval=0.2)
        assert state in ("running", "degraded"), f"container boot ended {state!r}"
        return self

    def system_state(self, timeout: float) -> str | None:
        state = self.run("systemctl", "is-system-running", "--wait", check=False,
                         timeout=timeout).stdout.strip()
        return None if state in ("", "offline") else state

    def _init_pid(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.console()}")
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.name() == "systemd":
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        return 0

    def run(self, *args: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None, cwd: str = "/") -> subprocess.CompletedProcess[str]:
        """``args`` in all of the container's namespaces, as root, with a clean environment."""
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"--chdir={cwd}",
               *CLEAN_ENV, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                input=input, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kwargs)  # type: ignore[arg-type]

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *units: str) -> str:
        if not self.pid1 or self.proc is None or self.proc.poll() is not None:
            return "(container not running)"
        selectors = [arg for unit in units for arg in ("-u", unit)]
        return self.run("journalctl", *selectors, "--no-pager", "-o", "short-precise",
                        check=False, timeout=60).stdout

    def console(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def poweroff(self, timeout: float = 60.0) -> None:
        """Power off; SIGKILL nspawn (which takes the whole container with it) if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.pid1:
            self.run("systemctl", "poweroff", check=False, timeout=30)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def scratch_dir() -> Path:
    """Per-run directory on the host's disk (not tmpfs: a root is ~300 MB)."""
    return Path(tempfile.mkdtemp(prefix="ingestd-systemd-", dir="/var/tmp"))
