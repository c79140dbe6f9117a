"""Secrets never leave the process (docs/reliability.md §8 scenario 15), with canary values.

The real daemon runs with a unique random value for each OAuth secret and for the MongoDB
password, all read from ``$CREDENTIALS_DIRECTORY`` (as systemd's LoadCredential= provides them),
through: 401s (wrong consumer secret), MongoDB connection failures (URI with the canary password),
dead letters (bad lines), a refused reload (broken settings holding canary values), a good reload.
Then every log line, dead-letter file, spool file, run-state file, metrics scrape, status output,
and the command line and environment of every process are searched: no canary may appear, nor any
OAuth Authorization header.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import yaml

from tests.support.daemon import Daemon, settings_doc
from tests.support.simulator import SimProcess
from tests.support.wait import wait_until

BAD_LINES = ["truncated_json", "invalid_utf8", "json_array", "non_object"]
AUTH_HEADER = re.compile(r"OAuth oauth_|oauth_signature=|oauth_nonce=")


def canary(name: str) -> str:
    return f"cnry{name}{secrets.token_hex(10)}"


class CredentialDaemon(Daemon):
    """The daemon with secrets only in a credentials folder: none in its environment."""

    def __init__(self, workdir: Path, doc: dict[str, object], creds_dir: Path) -> None:
        super().__init__(workdir, doc)
        self.creds_dir = creds_dir

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in super().env().items() if not k.startswith("TWITTER_")}
        return env | {"CREDENTIALS_DIRECTORY": str(self.creds_dir)}


def write_creds(folder: Path, values: dict[str, str]) -> None:
    folder.mkdir(exist_ok=True)
    for name, value in values.items():
        (folder / name).write_text(value + "\n")


def proc_text(pid: int) -> str:
    """The command line and environment of a live process, as text."""
    out = []
    for name in ("cmdline", "environ"):
        try:
            out.append(Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(
                errors="replace"))
        except OSError as exc:
            raise AssertionError(f"process {pid} gone before its {name} was read") from exc
    return "\n".join(out)


def files_text(*folders: Path) -> dict[str, str]:
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                found[str(path)] = path.read_bytes().decode("latin-1")
    return found


def http_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as err:
        return str(err.read().decode())


def test_no_secret_reaches_logs_files_metrics_or_process_listings(
    tmp_path: Path, mongo_uri: str, mongo_database: str
) -> None:
    good = {"TWITTER_CONSUMER_KEY": canary("ck"), "TWITTER_CONSUMER_SECRET": canary("cs"),
            "TWITTER_ACCESS_TOKEN": canary("at") + "-" + canary("at2"),
            "TWITTER_ACCESS_TOKEN_SECRET": canary("ats")}
    wrong_secret, mongo_pw, reload_pw, typo_value = (
        canary("wrong"), canary("mongopw"), canary("reloadpw"), canary("typo"))
    canaries = [*good.values(), wrong_secret, mongo_pw, reload_pw, typo_value]

    sim = SimProcess(tmp_path / "sim", "--rate", "300", "--max-tweets", "60", "--keepalive",
                     "0.5", env=good,
                     script=[[{"deliver": 20}, {"bad_lines": BAD_LINES}, {"deliver": 10}]]).start()
    creds = tmp_path / "creds"
    # Nothing listens on port 9: every MongoDB operation fails, with the password in the URI.
    write_creds(creds, {**good, "TWITTER_CONSUMER_SECRET": wrong_secret,
                        "MONGO_URI": f"mongodb://ingest:{mongo_pw}@127.0.0.1:9/"})
    doc = settings_doc(sim.url, "${MONGO_URI}", mongo_database,
                       metrics={"listen": "127.0.0.1:0"})
    doc["mongo"].update(timeout_ms=1000)
    doc["control"]["stop_timeout"] = 2
    daemon = CredentialDaemon(tmp_path / "daemon", doc, creds)
    good_settings = daemon.config.read_text()
    seen: dict[str, str] = {}
    daemon.start()
    try:
        daemon.wait_ready()
        # Phase 1: the endpoint refuses the wrong consumer secret (HTTP 401).
        wait_until(lambda: daemon.counters("stream").get("endings", {}).get("http", 0) >= 1,
                   30, "a 401 from the simulator")
        # Phase 2: a broken settings file with canary values is refused on SIGHUP.
        broken = yaml.safe_load(good_settings)
        broken["mongo"]["uri"] = f"mongodb://ingest:{reload_pw}@127.0.0.1:notaport/"
        broken["auth"]["consumer_scret"] = typo_value
        daemon.config.write_text(yaml.safe_dump(broken))
        daemon.send(signal.SIGHUP)
        wait_until(lambda: daemon.status("supervisor").get("reload_failures") == 1, 30,
                   "the broken reload to be refused")
        # Phase 3: the right secret (credentials folder) and the good file; tweets and bad lines
        # flow, MongoDB keeps failing.
        write_creds(creds, {"TWITTER_CONSUMER_SECRET": good["TWITTER_CONSUMER_SECRET"]})
        daemon.config.write_text(good_settings)
        daemon.send(signal.SIGHUP)
        wait_until(lambda: daemon.counters("store").get("retries", 0) >= 2
                   and daemon.counters("stream").get("received", 0) >= 30,
                   60, "failing MongoDB writes")
        pids = {"supervisor": daemon.proc.pid if daemon.proc else 0,
                "stream": daemon.worker_pid("stream"), "store": daemon.worker_pid("store")}
        for role, pid in pids.items():
            seen[f"/proc/{role}"] = proc_text(pid)
        addr = (daemon.state_dir / "run" / "metrics.addr").read_text().strip()
        seen["/metrics"] = http_text(f"http://{addr}/metrics")
        seen["/healthz"] = http_text(f"http://{addr}/healthz")
        status = subprocess.run(
            [sys.executable, "-m", "ingestd", "status", "--json", "--config", str(daemon.config)],
            capture_output=True, text=True, env=daemon.env(), timeout=60)
        seen["status"] = status.stdout + status.stderr
        # Phase 4: MongoDB reachable (credentials folder, SIGHUP): the failing batch switches to
        # it, the bad lines are dead-lettered. (While MongoDB fails, the store worker may be held
        # on the first batch's ledger write before it has read them: nothing is taken past it.)
        write_creds(creds, {"MONGO_URI": mongo_uri})
        daemon.send(signal.SIGHUP)
        wait_until(lambda: sum(daemon.counters("store").get("deadlettered", {}).values())
                   == len(BAD_LINES) and daemon.counters("store").get("stored", 0) >= 30,
                   60, "dead letters and the tweets stored")
        daemon.stop()
    finally:
        daemon.kill()
        sim.stop()
    seen["log"] = daemon.logs()
    seen.update(files_text(daemon.state_dir))
    events = daemon.log_events()

    # The scenario really happened (otherwise "no leak" proves nothing).
    names = {e.get("event") for e in events}
    assert {"stream_ended", "reload_failed", "mongo_write_failed", "reload_applied"} <= names
    assert any("401" in str(e.get("reason")) for e in events if e.get("event") == "stream_ended")
    assert any("deadletter" in p and p.endswith(".jsonl") for p in seen), list(seen)
    assert any("/spool/" in p for p in seen)
    assert "mongo unavailable" in seen["status"]
    # Every line is one JSON object with an event and the process role.
    lines = [ln for ln in seen["log"].splitlines() if ln.strip()]
    assert len(lines) == len(events)
    assert all(e.get("event") and e.get("role") for e in events)

    for value in canaries:
        leaks = [where for where, text in seen.items() if value in text]
        assert not leaks, f"canary {value[:8]}… found in {leaks}"
    headers = [where for where, text in seen.items() if AUTH_HEADER.search(text)]
    assert not headers, f"an OAuth Authorization header value appears in {headers}"


def test_uncaught_exceptions_and_library_logs_are_redacted_without_locals(
    tmp_path: Path,
) -> None:
    secret, local_only = canary("hook"), canary("local")
    code = textwrap.dedent(f"""
        import logging, threading
        from ingestd.logs import configure_logging
        configure_logging("info", "json", secrets=[{secret!r}], role="probe", pid=1)
        logging.getLogger("pymongo.pool").warning(
            "auth failed for mongodb://u:%s@db:27017/", {secret!r})
        def in_thread():
            token = {local_only!r}
            raise RuntimeError("thread failed with " + {secret!r})
        t = threading.Thread(target=in_thread)
        t.start(); t.join()
        def main():
            password = {local_only!r}
            raise ValueError("main failed with " + {secret!r})
        main()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).parent.parent,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    out = result.stdout + result.stderr
    assert result.returncode == 1
    assert secret not in out and local_only not in out, out
    assert '"event":"library_log"' in out and '"logger":"pymongo.pool"' in out
    assert '"event":"uncaught_thread_exception"' in out
    assert '"event":"uncaught_exception"' in out and "main failed with ***" in out
    assert "Traceback" not in result.stderr, "the default hook printed a raw traceback"
